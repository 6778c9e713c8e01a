"""fit across real processes: 2 local processes joined by ``jax.distributed`` (gloo CPU
collectives), one CPU device each, against one process with 2 CPU devices on the same global
data. The processes run ``tests/_multihost_worker.py``; ``tests/_multihost.py`` starts them on
a free port and never leaves one running. Each compares results to the float64 rounding of
the gradient's all-reduce (rtol 1e-12)."""

import json

import numpy as np
import pytest
from _multihost import launch, single

WORKER = "tests/_multihost_worker.py"


def results(out, name):
    with np.load(out / f"{name}.npz") as f:
        return {k: f[k] for k in f}


def same(a, b, rtol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].astype(float), b[k].astype(float), rtol=rtol, atol=1e-12, err_msg=k)


def finished(processes, code=0):
    for i, p in enumerate(processes):
        assert p.returncode == code, f"process {i} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


def test_fit_with_eval_and_metrics_and_train_step_across_two_processes(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    processes = launch([WORKER, str(two), "fit", "numpy", "stream", "step", "checks", "disagree", *FSDP_CASES])
    reference = single([WORKER, str(one), "fit", "step", "shards", *FSDP_REFERENCE], devices=2)
    finished(processes)
    finished([reference])
    check_fsdp(two, one)
    for name in ("fit", "step"):
        for i in range(2):  # every process reads the whole (replicated) result, equal to one process's
            same(results(two, f"{name}-{i}"), results(one, f"{name}-0"))
        same(results(two, f"{name}-0"), results(two, f"{name}-1"), rtol=0)
    assert results(two, "fit-1")["['replicated']"]
    for i in range(2):  # NumPy data in every process: the same fit
        same(results(two, f"numpy-{i}"), {k: v for k, v in results(one, "fit-0").items() if k != "['replicated']"})
    for i in range(2):  # streamed: the same fit, each process reading only its own shard's rows
        same(results(two, f"stream-{i}"), {k: v for k, v in results(one, "fit-0").items() if k != "['replicated']"})
        batches = results(two, f"stream_batches-{i}")
        pairs = [(k, k.replace("['stream']", "['device']")) for k in batches if k.startswith("['stream']")]
        assert pairs and all(np.array_equal(batches[s], batches[d], equal_nan=True) for s, d in pairs)
        for name, rows, probed in (("x", 32, {0, 31}), ("ex", 16, {0, 15})):  # the up-front check reads 2 rows
            read = set(results(two, f"stream_reads-{i}")[f"['{name}']"].tolist()) - probed
            assert read and read <= set(range(i * rows // 2, (i + 1) * rows // 2)), (i, name, sorted(read))
    # one device, no mesh, shards=2: the same batches as the 2-device mesh fit
    shards = results(one, "shards-0")
    same(shards, {k: v for k, v in results(one, "fit-0").items() if k != "['replicated']"}, rtol=1e-10)
    # progress from process 0 only
    assert "epoch/s" in processes[0].stderr or "epoch 1:" in processes[0].stdout
    assert "epoch" not in processes[1].stderr + processes[1].stdout.replace("done", "")
    # eager checks on global arrays compute where the data lives, and still catch bad values
    for i in range(2):
        found = json.loads((two / f"checks-{i}.json").read_text())
        assert "integer target must lie in [0, 3)" in found["labels"] and "values from 0 to 7" in found["labels"]
        assert "ids must lie in [0, 4)" in found["ids"], found["ids"]
        assert "must be finite" in found["nan"] and "first at row 21" in found["nan"], found["nan"]
        assert "spans 2 processes' devices; pass mesh=" in found["no mesh"], found["no mesh"]
        assert (
            found["accuracy"] == "no error" and found["param_count"] == "51" and "Total params: 51" in found["summary"]
        )
        disagree = json.loads((two / f"disagree-{i}.json").read_text())
        assert "the 2 processes disagree on epochs" in disagree["epochs"], disagree
        assert f"process {i} has epochs: {2 + i}" in disagree["epochs"], disagree
        assert "disagree on train_data" in disagree["shape"] and f"[{32 if i == 0 else 30}, 4]" in disagree["shape"]
        assert (
            "disagree on train" in disagree["global shape"]
            and f"[{32 if i == 0 else 30}, 4]" in disagree["global shape"]
        )


@pytest.mark.slow
def test_checkpoints_across_two_processes_killed_and_restarted(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    reference = single([WORKER, str(one), "fit"], devices=2)
    finished(launch([WORKER, str(two), "ckpt_full", "ckpt_kill"]), code=17)  # both killed after checkpoint 2
    assert sorted(p.name for p in (two / "killed").iterdir()) == [
        "checkpoint-000001.safetensors",
        "checkpoint-000002.safetensors",
    ]
    finished(launch([WORKER, str(two), "ckpt_resume"]))
    finished([reference])
    expected = {k: v for k, v in results(one, "fit-0").items() if k != "['replicated']"}
    for i in range(2):
        for name, writes in (("ckpt_full", [1, 2, 3, 4]), ("ckpt_resume", [3, 4])):
            got = results(two, f"{name}-{i}")
            assert list(got.pop("['writes']")) == (writes if i == 0 else [])  # process 0 writes every file
            if name == "ckpt_resume":  # the one field that says it resumed, from the checkpoint after epoch 2
                assert got.pop("['result'].resumed_epoch") == 2
                got["['result'].resumed_epoch"] = expected["['result'].resumed_epoch"]
            same(got, expected)


@pytest.mark.slow
def test_the_docs_multihost_block_runs_as_written_in_two_processes(tmp_path):
    """The scaling-out tutorial's block: two processes of two devices each print the loss of one
    process of four devices."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "tutorials" / "scaling-out.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "jax.distributed.initialize(" in b)
    processes = launch(["-c", block], devices=2, cwd=tmp_path)
    reference = single(["-c", block], devices=4, cwd=tmp_path)
    finished([*processes, reference])
    loss = lambda out: float(re.search(r"devices: loss (\S+)", out).group(1))
    expected = loss(reference.stdout)
    assert "process 0 of 1, 4 devices" in reference.stdout
    for i, p in enumerate(processes):
        assert f"process {i} of 2, 4 devices" in p.stdout, p.stdout
        assert loss(p.stdout) == pytest.approx(expected, rel=1e-5)


FSDP_CASES, FSDP_REFERENCE = ("fsdp", "fsdp_step", "fsdp_save"), ("fsdp_ref", "fsdp_step")


def check_fsdp(two, one):
    """FSDP over 2 processes (one device each, the params and Adam's moments split between them):
    the 4-layer MLP's fit (params, optimizer state, history, metrics) equals ``fit(shards=2)`` on
    one device to float64 rounding, and so does ``train_step``; ``save`` writes each process's
    blocks to its own file and ``load`` in the same mesh reads only that file. (The processes of
    the test above run these cases too, which saves starting two more.)"""
    expected = results(one, "fsdp_ref-0")
    for i in range(2):
        got = results(two, f"fsdp-{i}")
        # the 3 weights but the last are split, each process holding half of each; Adam's moments too
        assert list(got.pop("['params']['split']")) == [True, False] * 3 + [False, False]
        held = got.pop("['params']['held']")
        assert list(held[[0, 2, 4]]) == [4 * 16 // 2, 16 * 16 // 2, 16 * 16 // 2]
        assert got.pop("['opt']['split']").sum() == 6 and got.pop("['opt']['held']").size == 17
        same(got, expected, rtol=1e-10)
        same(results(two, f"fsdp_step-{i}"), results(one, "fsdp_step-0"), rtol=1e-10)
        saved = results(two, f"fsdp_save-{i}")
        files = list(saved["['files']"])
        assert len(files) == 3 and "tree.safetensors" in files  # the index, and one file of blocks per process
        assert [f.endswith(f"process-{i:05d}-of-00002.safetensors") for f in saved["['own']"]] == [True]
        assert len(saved["['all']"]) == 2  # replicated: every block, from both files
        for part in ("same", "replicated"):
            loaded = {k.replace(f"['{part}']", ""): v for k, v in saved.items() if k.startswith(f"['{part}']")}
            assert set(loaded) == {"['count']", *(f"['params']{k}" for k in _keys(expected, "['result'].params"))}
    same(results(two, "fsdp-0"), results(two, "fsdp-1"), rtol=0)


def _keys(arrays, prefix):
    return [k[len(prefix) :] for k in arrays if k.startswith(prefix)]


@pytest.mark.slow
def test_fsdp_checkpoints_across_two_processes_killed_and_restarted(tmp_path):
    """Each process writes its own blocks of the sharded state; killed after the second checkpoint
    and restarted, each reads back only its own blocks, and the run equals an uninterrupted one.
    A streamed FSDP fit equals the device-resident one."""
    two = tmp_path / "two"
    two.mkdir()
    finished(launch([WORKER, str(two), "fsdp", "fsdp_stream"]))
    for i in range(2):  # streamed from the host (each process reading its own rows): the same fit
        streamed, resident = results(two, f"fsdp_stream-{i}"), results(two, f"fsdp-{i}")
        assert list(streamed.pop("['params']['split']")) == [True, False] * 3 + [False, False]
        streamed.pop("['params']['held']")
        same(streamed, {k: v for k, v in resident.items() if k.startswith("['result']")}, rtol=1e-12)
    finished(launch([WORKER, str(two), "fsdp_ckpt_kill"]), code=17)
    names = sorted(p.name for p in (two / "fsdp_killed").iterdir())
    assert len(names) == 6 and names[-1] == "checkpoint-000002.safetensors"  # 2 checkpoints: index + 2 block files
    finished(launch([WORKER, str(two), "fsdp_ckpt_resume"]))
    for i in range(2):
        got = results(two, f"fsdp_ckpt_resume-{i}")
        read = got.pop("['read']")
        assert len(read) == 1 and read[0].startswith("checkpoint-000002.") and f"process-{i:05d}" in read[0]
        assert got.pop("['result'].resumed_epoch") == 2
        expected = {k: v for k, v in results(two, f"fsdp-{i}").items() if k.startswith("['result']")}
        expected.pop("['result'].resumed_epoch")
        same(got, expected, rtol=0)

"""FSDP (``fit(..., param_axis=...)``, ``train_step``, sharded checkpoints and ``save``/``load``)
on 4 forced CPU devices: runs tests/_fsdp_cases.py in a subprocess, because the device count is
fixed when JAX starts. The 2-process cases are in tests/test_multihost.py. The rule's own cases
need no devices and run here."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from test_shard import run_on_four_devices

import funcnet as fn
from funcnet.train import fsdp

HERE = Path(__file__).resolve().parent


def _run_cases(marks):
    run_on_four_devices(HERE / "_fsdp_cases.py", marks, timeout=900)


def test_fsdp_cases_pass_on_four_cpu_devices():
    _run_cases("not slow")


@pytest.mark.slow
def test_slow_fsdp_cases_pass_on_four_cpu_devices():
    """The 2-block Transformer, the 2-device MLP, a data x fsdp mesh, and the compositions."""
    _run_cases("slow")


@pytest.mark.parametrize(
    ("shape", "devices", "spec"),
    [
        ((128, 128), 4, ("fsdp", None)),  # equal dimensions: the first
        ((130, 256), 4, (None, "fsdp")),  # the largest that divides
        ((256, 130), 2, ("fsdp", None)),  # both divide by 2: the largest
        ((129, 129), 4, ()),  # none divides: replicated
        ((1, 8192), 2, ()),  # under 16,384 elements: replicated
        ((1, 16384), 2, (None, "fsdp")),
        ((), 2, ()),
        ((4, 4, 2048), 4, (None, None, "fsdp")),
        ((4096, 4096), 1, ()),  # one device: nothing to split
    ],
)
def test_the_default_rule(shape, devices, spec):
    assert fsdp.leaf_spec("t", fn.FSDP("fsdp"), devices, "[0].W", shape) == PartitionSpec(*spec)


def test_an_explicit_rule_and_the_threshold():
    rule = fn.FSDP("fsdp", dims=lambda path, shape: 1 if path.endswith(".W") else None)
    assert fsdp.leaf_spec("t", rule, 4, ".mu[0].W", (8, 12)) == PartitionSpec(None, "fsdp")
    assert fsdp.leaf_spec("t", rule, 4, "[0].B", (1, 4096)) == PartitionSpec()
    with pytest.raises(ValueError, match=r"\[0\].W of shape \(8, 10\) cannot be sharded along dimension 1 \(10\)"):
        fsdp.leaf_spec("t", rule, 4, "[0].W", (8, 10))
    with pytest.raises(ValueError, match=r"FSDP\.dims returned 2 for"):
        fsdp.leaf_spec("t", fn.FSDP("fsdp", dims=lambda p, s: 2), 4, "[0].W", (8, 12))
    assert fsdp.leaf_spec("t", fn.FSDP("fsdp", min_size=0), 2, "b", (1, 2)) == PartitionSpec(None, "fsdp")


def test_param_shardings_of_abstract_params_on_one_device():
    net = fn.serial(fn.Dense(256, fn.tanh), fn.Dense(4, fn.linear))
    like = jax.eval_shape(lambda key: net.init(key, (-1, 128))[1], jax.random.PRNGKey(0))
    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    shardings = fn.param_shardings(like, mesh, "fsdp")
    assert [s.spec for s in jax.tree_util.tree_leaves(shardings)] == [PartitionSpec()] * 4  # one device
    placed = fn.shard_params({"w": jnp.ones((128, 256))}, mesh, "fsdp")
    assert placed["w"].is_fully_replicated and placed["w"].shape == (128, 256)
    with pytest.raises(TypeError, match="param_axis must be a mesh axis name"):
        fn.param_shardings(like, mesh, 0)
    with pytest.raises(ValueError, match="param_axis 'model' is not an axis of the mesh"):
        fn.shard_params(like, mesh, "model")

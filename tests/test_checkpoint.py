"""save/load: exact round trips, atomic writes, clear errors, and resuming fit from a checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

KEY = jax.random.PRNGKey(0)


def _net_and_state():
    net = fn.serial(fn.Dense(5, fn.tanh), fn.Dense(2, fn.linear))
    _, params = net.init(KEY, (-1, 3))
    return net, params, fn.adam(0.01).init(params)


def test_round_trip_keeps_structure_dtypes_and_values(tmp_path):
    _, params, state = _net_and_state()
    tree = {"params": params, "opt_state": state, "f32": jnp.ones((2,), jnp.float32), "step": jnp.int32(7)}
    fn.save(tmp_path / "ckpt.safetensors", tree)
    loaded = fn.load(tmp_path / "ckpt.safetensors", tree)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_keys_are_pytree_paths(tmp_path):
    from safetensors.numpy import load_file

    _, params, _ = _net_and_state()
    fn.save(tmp_path / "p.safetensors", params)
    assert set(load_file(tmp_path / "p.safetensors")) == {"[0].W", "[0].B", "[1].W", "[1].B"}


def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    _, params, _ = _net_and_state()
    path = tmp_path / "p.safetensors"
    fn.save(path, params)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("funcnet.checkpoint.os.fsync", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        fn.save(path, jax.tree_util.tree_map(lambda a: a + 1, params))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary left behind


def test_mismatches_and_corrupt_files_get_clear_errors(tmp_path):
    _, params, _ = _net_and_state()
    path = tmp_path / "p.safetensors"
    fn.save(path, params)
    wrong_shape = fn.serial(fn.Dense(6, fn.tanh), fn.Dense(2, fn.linear)).init(KEY, (-1, 3))[1]
    with pytest.raises(ValueError, match=r"load: \[0\].W in .* is float64\[3, 5\], but like expects float64\[3, 6\]"):
        fn.load(path, wrong_shape)
    with pytest.raises(ValueError, match=r"\[0\].W .* but like expects float32"):
        fn.load(path, jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params))
    with pytest.raises(ValueError, match=r"has no entry \[2\].W"):
        fn.load(path, (*params, fn.DenseParams(jnp.ones((2, 2)), jnp.ones((1, 2)))))
    with pytest.raises(ValueError, match=r"has entries like does not, first \[1\].B"):
        fn.load(path, (params[0],))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        fn.load(tmp_path / "cut.safetensors", params)
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="not a readable safetensors checkpoint"):
        fn.load(tmp_path / "text.safetensors", params)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fn.load(tmp_path / "missing.safetensors", params)
    with pytest.raises(TypeError, match="every leaf must be an array, got str"):
        fn.save(tmp_path / "x.safetensors", {"a": "text"})


def test_fit_resumed_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    net, params, _ = _net_and_state()
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 2))
    optimizer = fn.adam(0.01)
    run = lambda p, **kw: fn.fit(net, fn.mean_squared_error, optimizer, p, (x, y), batch_size=6, key=KEY, **kw)
    whole = run(params, epochs=8)
    first = run(params, epochs=3)
    fn.save(tmp_path / "ckpt.safetensors", {"params": first.params, "opt_state": first.opt_state})
    like = {"params": params, "opt_state": optimizer.init(params)}
    restored = fn.load(tmp_path / "ckpt.safetensors", like)
    resumed = run(restored["params"], epochs=8, start_epoch=3, opt_state=restored["opt_state"])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), resumed.params, whole.params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), resumed.opt_state, whole.opt_state
    )

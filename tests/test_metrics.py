"""accuracy against hand-computed values, with and without ignore_index (padded targets)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funcnet as fn

# 2 sequences x 3 steps x 3 classes; arg-max classes [[0, 1, 2], [2, 2, 1]]
LOGITS = np.array(
    [
        [[5.0, 1.0, 0.0], [0.0, 4.0, 1.0], [0.0, 1.0, 3.0]],
        [[0.0, 1.0, 2.0], [1.0, 0.0, 7.0], [0.0, 3.0, 1.0]],
    ]
)
LABELS = np.array([[0, 2, -1], [2, -1, -1]], np.int32)  # hits at (0, 0) and (1, 0); (0, 1) misses


def test_accuracy_by_hand():
    full = np.array([[0, 1, 0], [2, 2, 0]], np.int32)  # 4 hits of 6
    np.testing.assert_allclose(fn.accuracy(LOGITS, full), 4 / 6, rtol=1e-12)
    np.testing.assert_allclose(fn.accuracy(LOGITS, np.eye(3)[full]), 4 / 6, rtol=1e-12)
    # ignore_index: 3 kept positions, 2 hits
    np.testing.assert_allclose(fn.accuracy(LOGITS, LABELS, ignore_index=-1), 2 / 3, rtol=1e-12)
    # a padding class inside [0, classes): class 2 ignored leaves (0, 0) and (0, 1) hits,
    # (0, 2) and (1, 2) misses
    np.testing.assert_allclose(fn.accuracy(LOGITS, full, ignore_index=2), 2 / 4, rtol=1e-12)
    # nothing to ignore: the plain fraction
    np.testing.assert_array_equal(fn.accuracy(LOGITS, full, ignore_index=-100), fn.accuracy(LOGITS, full))


def test_ignored_positions_predictions_change_nothing():
    keep = LABELS != -1
    noise = np.random.default_rng(0).standard_normal(LOGITS.shape) * 100
    changed = np.where(keep[..., None], LOGITS, noise)
    reference = fn.accuracy(LOGITS, LABELS, ignore_index=-1)
    np.testing.assert_array_equal(fn.accuracy(changed, LABELS, ignore_index=-1), reference)
    np.testing.assert_array_equal(jax.jit(functools.partial(fn.accuracy, ignore_index=-1))(changed, LABELS), reference)


def test_all_ignored_gives_zero_not_nan():
    value = fn.accuracy(LOGITS, np.full((2, 3), -100, np.int32), ignore_index=-100)
    assert float(value) == 0.0
    per_row = jax.vmap(lambda p, t: fn.accuracy(p[None], t[None], ignore_index=-1))(LOGITS, LABELS)
    np.testing.assert_allclose(per_row, [1 / 2, 1.0], rtol=1e-12)
    per_step = jax.vmap(lambda p, t: fn.accuracy(p[None], t[None], ignore_index=-1))(LOGITS[1], LABELS[1])
    np.testing.assert_array_equal(per_step, [1.0, 0.0, 0.0])  # the padded steps give 0, never NaN


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_accuracy_counts_in_float32(dtype):
    """70,000 kept positions: a float16 count would stop at 2048 and overflow at 65,504."""
    labels = np.zeros(140_000, np.int32)
    labels[::2] = -1
    labels[1::4] = 1  # half of the kept positions are hits of arg-max class 0
    value = fn.accuracy(jnp.zeros((140_000, 2), dtype).at[:, 0].set(1), labels, ignore_index=-1)
    assert value.dtype == dtype
    np.testing.assert_allclose(float(value), 0.5, rtol=1e-3)


BAD = [
    (
        lambda: fn.accuracy(LOGITS, LABELS, ignore_index=-1.0),
        TypeError,
        "accuracy: ignore_index must be an int or None, got float",
    ),
    (
        lambda: fn.accuracy(LOGITS, LABELS, ignore_index=np.array(-1)),
        TypeError,
        "accuracy: ignore_index must be an int or None, got ndarray",
    ),
    (
        lambda: fn.accuracy(LOGITS, np.eye(3)[np.maximum(LABELS, 0)], ignore_index=-1),
        TypeError,
        "accuracy: ignore_index applies to integer class labels only, got a float64 target",
    ),
    (
        lambda: fn.accuracy(LOGITS, LABELS, ignore_index=-100),
        ValueError,
        r"accuracy: integer target must lie in \[0, 3\) for the 3 classes of prediction, or equal "
        r"ignore_index=-100, got other values from -1 to 2",
    ),
    (
        lambda: fn.accuracy(LOGITS, LABELS),
        ValueError,
        r"accuracy: integer target must lie in \[0, 3\) for the 3 classes of prediction, got values from -1 to 2",
    ),
    (
        lambda: fn.accuracy(LOGITS, LABELS[:, :2], ignore_index=-1),
        ValueError,
        r"accuracy: target must have shape \(2, 3\)",
    ),
]


@pytest.mark.parametrize("call,error,message", BAD)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_ignore_index_under_jit():
    with pytest.raises(TypeError, match="accuracy: ignore_index must be an int or None"):
        jax.jit(lambda p, t: fn.accuracy(p, t, ignore_index=1.5))(LOGITS, LABELS)
    with pytest.raises(TypeError, match=r"accuracy: ignore_index must be an int or None, got .*Tracer"):
        jax.jit(fn.accuracy)(LOGITS, LABELS, ignore_index=-1)

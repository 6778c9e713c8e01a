"""Convolutions (book chapter 5): ``conv2d`` and ``max_pool2d`` ops, ``Conv2D``/``MaxPool2D``/``Flatten`` layers.

Layout, stated once: images are NHWC ``(batch, height, width, channels)`` and kernels HWIO
``(height, width, in_channels, out_channels)``, JAX's native layouts on every backend. The
book is channels-first, ``(batch, channels, height, width)`` images and ``(in, out, h, w)``
kernels: convert with ``x.transpose(0, 2, 3, 1)`` and ``W.transpose(2, 3, 0, 1)``.

Both ops are ``jax.custom_vjp`` with the book's hand-derived backward, written as
convolutions (``lax.conv_general_dilated``) rather than the book's Python loops:

* ``conv2d`` input_grad: the output gradient, dilated by the stride, convolved with the
  spatially flipped kernel whose in/out channels are swapped;
* ``conv2d`` param_grad: the input convolved with the output gradient, the batch being the
  contracted axis (the stride becomes a dilation of the output gradient);
* ``max_pool2d``: each window's gradient goes to its arg-max. Ties go to the first maximum
  in row-major window order (JAX's own autodiff may pick another tied element; the totals
  agree).
* ``avg_pool2d``: each window's gradient is spread evenly over it: the output gradient,
  divided by the window's size, dilated by the stride and summed over every window that
  covers a pixel (a ``reduce_window`` sum of the padded, dilated gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from funcnet import _checks, initializers, ops
from funcnet.layers import (
    Layer,
    LayerSpec,
    activation_name,
    check_input_shape,
    check_params,
    default_dtype,
    init_only,
    layer_spec,
)

__all__ = ["AvgPool2D", "Conv2D", "Conv2DParams", "Flatten", "MaxPool2D", "avg_pool2d", "conv2d", "max_pool2d"]

Array = jax.Array
Pair = tuple[int, int]

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _pair(fn: str, name: str, value: Any) -> tuple[int, int]:
    values = value if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2:
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}.")
    return tuple(_checks.positive_int(fn, name, v) for v in values)  # type: ignore[return-value]


def _padding(fn: str, padding: Any) -> str:
    if not isinstance(padding, str) or padding not in ("SAME", "VALID"):
        raise ValueError(f'{fn}: padding must be "SAME" or "VALID", got {padding!r}.')
    return padding


def _pads(size: Any, kernel: Any, stride: Any, padding: str) -> Any:
    """Explicit (low, high) pads per spatial dim, as XLA computes them for SAME/VALID."""
    return lax.padtype_to_pads(size, kernel, stride, padding)


def _out_size(size: int, kernel: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1


def _check_conv(x: Any, W: Any, stride: Pair, padding: str) -> None:
    fn = "conv2d"
    _checks.floating(fn, "x", x)
    _checks.floating(fn, "W", W)
    _checks.rank(fn, "x", x, 4, "NHWC (batch, height, width, channels)")
    _checks.rank(fn, "W", W, 4, "HWIO (height, width, in_channels, out_channels)")
    _checks.same_dtype(fn, ("x", "W"), x, W)
    if x.shape[3] != W.shape[2]:
        raise ValueError(
            f"{fn}: x has {x.shape[3]} channels but W expects {W.shape[2]} "
            f"(x.shape={tuple(x.shape)}, W.shape={tuple(W.shape)})."
        )
    if padding == "VALID" and (W.shape[0] > x.shape[1] or W.shape[1] > x.shape[2]):
        raise ValueError(
            f"{fn}: a {W.shape[0]}x{W.shape[1]} kernel does not fit a {x.shape[1]}x{x.shape[2]} "
            'image with padding="VALID"; use padding="SAME" or a smaller kernel.'
        )


def _conv2d(x: Array, W: Array, stride: Pair, padding: str) -> Array:
    return lax.conv_general_dilated(x, W, stride, padding, dimension_numbers=_DIMENSIONS)


def conv2d(x: jax.Array, W: jax.Array, *, stride: int | tuple[int, int] = 1, padding: str = "SAME") -> jax.Array:
    """2-D cross-correlation of NHWC ``x`` with HWIO ``W``. Book: Conv2D_Op.

    Args:
      x: ``(batch, height, width, in_channels)`` floating images.
      W: ``(kernel_h, kernel_w, in_channels, out_channels)`` kernel, of x's dtype.
      stride: an int or ``(sh, sw)`` pair; default ``1``.
      padding: ``"SAME"`` (output ``ceil(size / stride)``) or ``"VALID"``; default ``"SAME"``.

    Returns:
      ``(batch, out_height, out_width, out_channels)``; the backward is the book's, as
      convolutions (module docstring).
    """
    stride = _pair("conv2d", "stride", stride)
    padding = _padding("conv2d", padding)
    _check_conv(x, W, stride, padding)
    return _conv2d_vjp(x, W, stride, padding)


def _conv2d_fwd(x: Array, W: Array, stride: Pair, padding: str) -> tuple[Array, tuple[Array, Array]]:
    return _conv2d(x, W, stride, padding), (x, W)


def _conv2d_bwd(stride: Pair, padding: str, residuals: tuple[Array, Array], output_grad: Array) -> tuple[Array, Array]:
    x, W = residuals
    sizes, kernel, out = x.shape[1:3], W.shape[:2], output_grad.shape[1:3]
    pads = _pads(sizes, kernel, stride, padding)
    # input_grad: full correlation of the stride-dilated output_grad with the flipped,
    # in/out-swapped kernel; pads chosen so the result has the input's size.
    lhs_pads = []
    for n, k, s, o, (low, _) in zip(sizes, kernel, stride, out, pads, strict=True):
        before = k - 1 - low
        lhs_pads.append((before, n + k - 1 - ((o - 1) * s + 1) - before))
    flipped = jnp.flip(W, axis=(0, 1)).transpose(0, 1, 3, 2)
    input_grad = lax.conv_general_dilated(
        output_grad, flipped, (1, 1), lhs_pads, lhs_dilation=stride, dimension_numbers=_DIMENSIONS
    )
    # param_grad: correlate the input with output_grad over the batch (x's N is contracted,
    # x's C becomes the batch of the result), the stride becoming a dilation of output_grad.
    rhs_pads = [
        (low, k + (o - 1) * s - n - low) for n, k, s, o, (low, _) in zip(sizes, kernel, stride, out, pads, strict=True)
    ]
    param_grad = lax.conv_general_dilated(
        x, output_grad, (1, 1), rhs_pads, rhs_dilation=stride, dimension_numbers=("CHWN", "IHWO", "HWNC")
    )
    return input_grad, param_grad


_conv2d_vjp = jax.custom_vjp(_conv2d, nondiff_argnums=(2, 3))
_conv2d_vjp.defvjp(_conv2d_fwd, _conv2d_bwd)


def _check_pool(fn: str, x: Any, window: Pair) -> None:
    _checks.floating(fn, "x", x)
    _checks.rank(fn, "x", x, 4, "NHWC (batch, height, width, channels)")
    if window[0] > x.shape[1] or window[1] > x.shape[2]:
        raise ValueError(f"{fn}: a {window[0]}x{window[1]} window does not fit a {x.shape[1]}x{x.shape[2]} image.")


def max_pool2d(
    x: jax.Array, window: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None
) -> jax.Array:
    """Max over ``window`` patches of NHWC ``x`` every ``stride`` pixels (default: the window), VALID.

    Args:
      x: ``(batch, height, width, channels)`` floating images.
      window: an int or ``(wh, ww)`` pair that fits the image; default ``2``.
      stride: an int or pair; ``None`` (the default) is the window, non-overlapping patches.

    Returns:
      ``(batch, (height - wh) // sh + 1, (width - ww) // sw + 1, channels)``; each window's
      gradient goes to its arg-max (the first, on ties).
    """
    fn = "max_pool2d"
    window = _pair(fn, "window", window)
    stride = window if stride is None else _pair(fn, "stride", stride)
    _check_pool(fn, x, window)
    return _max_pool_vjp(x, window, stride)


def _windows(x: Array, window: Pair, stride: Pair) -> Array:
    """Every window element as a stacked view: (window_h * window_w, N, OH, OW, C)."""
    oh, ow = (x.shape[1] - window[0]) // stride[0] + 1, (x.shape[2] - window[1]) // stride[1] + 1
    return jnp.stack(
        [
            x[:, i : i + stride[0] * (oh - 1) + 1 : stride[0], j : j + stride[1] * (ow - 1) + 1 : stride[1], :]
            for i in range(window[0])
            for j in range(window[1])
        ]
    )


def _max_pool(x: Array, window: Pair, stride: Pair) -> Array:
    maxima: Array = lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *stride, 1), "VALID")
    return maxima


def _max_pool_fwd(x: Array, window: Pair, stride: Pair) -> tuple[Array, tuple[Array, tuple[int, ...]]]:
    winner = jnp.argmax(_windows(x, window, stride), axis=0)  # first maximum wins a tie
    return _max_pool(x, window, stride), (winner, x.shape)


def _max_pool_bwd(
    window: Pair, stride: Pair, residuals: tuple[Array, tuple[int, ...]], output_grad: Array
) -> tuple[Array]:
    winner, shape = residuals
    n, oh, ow, c = output_grad.shape
    rows = (jnp.arange(oh) * stride[0])[None, :, None, None] + winner // window[1]
    cols = (jnp.arange(ow) * stride[1])[None, None, :, None] + winner % window[1]
    batch = jnp.arange(n)[:, None, None, None]
    channel = jnp.arange(c)[None, None, None, :]
    input_grad = jnp.zeros(shape, output_grad.dtype).at[batch, rows, cols, channel].add(output_grad)
    return (input_grad,)


_max_pool_vjp = jax.custom_vjp(_max_pool, nondiff_argnums=(1, 2))
_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)


def avg_pool2d(
    x: jax.Array, window: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None
) -> jax.Array:
    """Mean over ``window`` patches of NHWC ``x`` every ``stride`` pixels (default: the window), VALID.

    Args:
      x: ``(batch, height, width, channels)`` floating images.
      window: an int or ``(wh, ww)`` pair that fits the image; default ``2``.
      stride: an int or pair; ``None`` (the default) is the window, non-overlapping patches.

    Returns:
      ``(batch, (height - wh) // sh + 1, (width - ww) // sw + 1, channels)``; each window's
      gradient is spread evenly over it.
    """
    fn = "avg_pool2d"
    window = _pair(fn, "window", window)
    stride = window if stride is None else _pair(fn, "stride", stride)
    _check_pool(fn, x, window)
    return _avg_pool_vjp(x, window, stride)


def _avg_pool(x: Array, window: Pair, stride: Pair) -> Array:
    total: Array = lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, (1, *window, 1), (1, *stride, 1), "VALID")
    return total / jnp.asarray(window[0] * window[1], x.dtype)


def _avg_pool_fwd(x: Array, window: Pair, stride: Pair) -> tuple[Array, Array]:
    return _avg_pool(x, window, stride), jnp.zeros((*x.shape[1:3], 0), x.dtype)  # the image size, no data


def _avg_pool_bwd(window: Pair, stride: Pair, residuals: Array, output_grad: Array) -> tuple[Array]:
    height, width, _ = residuals.shape
    share = output_grad / jnp.asarray(window[0] * window[1], output_grad.dtype)
    # Dilate by the stride, pad so every window covering a pixel is summed there; pixels past
    # the last window (the VALID remainder) get nothing.
    pads = (
        [(0, 0, 0)]
        + [
            (k - 1, k - 1 + n - ((o - 1) * s + k), s - 1)
            for n, k, s, o in zip((height, width), window, stride, output_grad.shape[1:3], strict=True)
        ]
        + [(0, 0, 0)]
    )
    spread = lax.pad(share, jnp.zeros((), share.dtype), pads)
    return (lax.reduce_window(spread, jnp.zeros((), share.dtype), lax.add, (1, *window, 1), (1, 1, 1, 1), "VALID"),)


_avg_pool_vjp = jax.custom_vjp(_avg_pool, nondiff_argnums=(1, 2))
_avg_pool_vjp.defvjp(_avg_pool_fwd, _avg_pool_bwd)


# --- Layers --------------------------------------------------------------------------------


class Conv2DParams(NamedTuple):
    """``W: (kh, kw, in_channels, out_channels)`` (HWIO) and ``B: (1, out_channels)``."""

    W: jax.Array
    B: jax.Array


@layer_spec
class _Conv2D(LayerSpec):
    out_channels: int
    kernel: tuple[int, int]
    activation: Callable[[Array], Array]
    stride: tuple[int, int]
    padding: str
    w_init: initializers.Initializer = init_only()
    b_init: initializers.Initializer = init_only()
    dtype: np.dtype = init_only()

    @property
    def name(self) -> str:
        return f"Conv2D({self.out_channels}, {self.kernel[0]}x{self.kernel[1]}, {activation_name(self.activation)})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        kernel, stride, padding = self.kernel, self.stride, self.padding
        batch, h, w, c = check_input_shape(self.name, input_shape, 4, "NHWC (batch, height, width, channels)")
        if kernel[0] > h or kernel[1] > w:  # with SAME it would be mostly padding
            raise ValueError(f"{self.name}: kernel_size {kernel} does not fit a {h}x{w} image.")
        k_w, k_b = jax.random.split(key)
        shape = (
            batch,
            _out_size(h, kernel[0], stride[0], padding),
            _out_size(w, kernel[1], stride[1], padding),
            self.out_channels,
        )
        return shape, Conv2DParams(
            self.w_init(k_w, (*kernel, c, self.out_channels), self.dtype),
            self.b_init(k_b, (1, self.out_channels), self.dtype),
        )

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del key
        check_params(self.name, params, Conv2DParams, "Conv2DParams(W, B)")
        y = conv2d(x, params.W, stride=self.stride, padding=self.padding)
        # the book's bias is per channel: reuse bias_add over all pixels as rows
        y = ops.bias_add(y.reshape(-1, y.shape[-1]), params.B).reshape(y.shape)
        return self.activation(y)


def Conv2D(
    out_channels: int,
    kernel_size: int | tuple[int, int],
    activation: Callable[[Array], Array] = ops.linear,
    *,
    stride: int | tuple[int, int] = 1,
    padding: str = "SAME",
    w_init: initializers.Initializer = initializers.standard_normal,
    b_init: initializers.Initializer = initializers.standard_normal,
    dtype: Any = None,
) -> Layer:
    """``activation(conv2d(x, W) + B)`` on NHWC images. Book: Conv2D.

    Args:
      out_channels: output channels (the book's ``out_channels``).
      kernel_size: an int or ``(kh, kw)`` pair.
      activation: any ``array -> array``; default ``linear`` (none).
      stride: an int or ``(sh, sw)`` pair; default ``1``.
      padding: ``"SAME"`` or ``"VALID"``; default ``"SAME"``.
      w_init: W's initializer ``(key, shape, dtype)``; default ``standard_normal`` (the book's
        N(0, 1)); ``glorot_normal`` is the modern choice.
      b_init: B's initializer; default ``standard_normal`` (the book's); ``zeros`` is the modern
        choice.
      dtype: parameter dtype; ``None`` is JAX's default float.

    Returns:
      A ``Layer`` on ``(batch, height, width, in_channels)`` images; params
      ``Conv2DParams(W, B)`` with ``W: (kh, kw, in_channels, out_channels)``, ``B: (1, out_channels)``.
    """
    kernel = _pair("Conv2D", "kernel_size", kernel_size)
    name = f"Conv2D({out_channels}, {kernel[0]}x{kernel[1]}, {activation_name(activation)})"
    _checks.positive_int(name, "out_channels", out_channels)
    _checks.callable_(name, "activation", activation)
    return _Conv2D(
        int(out_channels),
        kernel,
        activation,
        _pair(name, "stride", stride),
        _padding(name, padding),
        w_init,
        b_init,
        default_dtype(dtype),
    ).layer()


def pooled_shape(name: str, input_shape: Any, window: tuple[int, int], stride: tuple[int, int]) -> tuple[int, ...]:
    """The NHWC output shape of a VALID pooling; the window must fit the image."""
    batch, h, w, c = check_input_shape(name, input_shape, 4, "NHWC (batch, height, width, channels)")
    if window[0] > h or window[1] > w:
        raise ValueError(f"{name}: the window does not fit a {h}x{w} image.")
    return (batch, (h - window[0]) // stride[0] + 1, (w - window[1]) // stride[1] + 1, c)


@layer_spec
class _MaxPool2D(LayerSpec):
    window: tuple[int, int]
    stride: tuple[int, int]

    @property
    def name(self) -> str:
        return f"MaxPool2D({self.window[0]}x{self.window[1]}, stride {self.stride[0]}x{self.stride[1]})"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        return pooled_shape(self.name, input_shape, self.window, self.stride), ()

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del params, key
        return max_pool2d(x, self.window, self.stride)


def MaxPool2D(window: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None) -> Layer:
    """Max pooling over ``window`` patches (VALID), ``stride`` defaulting to the window.

    Args:
      window: an int or ``(wh, ww)`` pair; default ``2``.
      stride: an int or pair; ``None`` (the default) is the window.

    Returns:
      A ``Layer`` without params running ``max_pool2d`` on NHWC images.
    """
    window = _pair("MaxPool2D", "window", window)
    return _MaxPool2D(window, window if stride is None else _pair("MaxPool2D", "stride", stride)).layer()


@layer_spec
class _AvgPool2D(_MaxPool2D):
    @property
    def name(self) -> str:
        return f"AvgPool2D({self.window[0]}x{self.window[1]}, stride {self.stride[0]}x{self.stride[1]})"

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del params, key
        return avg_pool2d(x, self.window, self.stride)


def AvgPool2D(window: int | tuple[int, int] = 2, stride: int | tuple[int, int] | None = None) -> Layer:
    """Average pooling over ``window`` patches (VALID), ``stride`` defaulting to the window.

    Args:
      window: an int or ``(wh, ww)`` pair; default ``2``.
      stride: an int or pair; ``None`` (the default) is the window.

    Returns:
      A ``Layer`` without params running ``avg_pool2d`` on NHWC images.
    """
    window = _pair("AvgPool2D", "window", window)
    return _AvgPool2D(window, window if stride is None else _pair("AvgPool2D", "stride", stride)).layer()


@layer_spec
class _Flatten(LayerSpec):
    @property
    def name(self) -> str:
        return "Flatten()"

    def init(self, key: jax.Array, input_shape: Any) -> tuple[Any, Any]:
        del key
        shape = check_input_shape("Flatten", input_shape, None, "(batch, ...)")
        return (shape[0], int(np.prod(shape[1:]))), ()

    def apply(self, params: Any, x: Any, *, key: jax.Array | None = None) -> Any:
        del params, key
        _checks.array("Flatten", "x", x)
        return x.reshape(x.shape[0], -1)


def Flatten() -> Layer:
    """``(batch, ...)`` to ``(batch, features)``, for a Dense after convolutions. Book: Conv2D(flatten=True).

    Returns:
      A ``Layer`` without params; ``features`` is the product of the non-batch sizes.
    """
    return _Flatten().layer()

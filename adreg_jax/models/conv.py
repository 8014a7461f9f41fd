"""3-D convolutions that are fast on every backend, with one parameter tree.

Why: XLA:CPU runs a 3-D ``lax.conv_general_dilated`` through a slow generic loop, while its 2-D
convolution has a fast path (YNNPACK). A 3-D convolution is a sum over the kernel's depth taps of
2-D convolutions, with depth folded into the batch::

    y[b, d] = sum_t conv2d(x_padded[b, d * s_d + t], k[t])        t = 0 .. K_d - 1

or, the same sum, one 2-D convolution whose input channels are the K_d planes side by side (faster
for few input channels, and for the input gradient). The kernel gradient is matrix products of
in-plane patches with cotangent planes, one plane at a time (``kernel_gradient``). On GPU/TPU
(cuDNN, XLA:TPU) the native 3-D convolution is the fast one. A transposed convolution whose kernel
equals its stride (the U-Net's 2x upsampling) writes non-overlapping blocks: one matrix product.

``conv_impl`` chooses: ``"auto"`` (folded on CPU for all but the smallest convolutions, native
elsewhere, decided when the model is traced), ``"folded"`` or ``"native"``. The parameters
(``kernel`` (K_d, K_h, K_w, C_in, C_out), ``bias``) and their names are those of
``flax.linen.Conv`` / ``ConvTranspose`` whatever the choice, so a checkpoint trained on a GPU
loads on a CPU and predicts the same field.

Where this sits: every convolution of ``adreg_jax.models`` is built by ``conv`` or
``ConvTranspose`` below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "folded", "native")

# "auto" on a CPU folds only convolutions with at least this much work (input voxels x input
# channels x output channels): below it the run time is small either way, and the folded form
# takes ~3x longer to compile (measured at 16^3, channels 4-8: model gradient 42 s against 15 s).
FOLD_MIN_WORK = 32**3 * 8 * 8

_CHANNELS_LAST_3D = ("NDHWC", "DHWIO", "NDHWC")


def resolve_conv_impl(conv_impl: str, work: int | None = None) -> str:
    """``"folded"`` or ``"native"``: ``"auto"`` is folded on the CPU backend for convolutions of
    at least ``FOLD_MIN_WORK`` (voxels x C_in x C_out; None = unknown, counts as large), native
    otherwise."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}; got {conv_impl!r}")
    if conv_impl == "auto":
        small = work is not None and work < FOLD_MIN_WORK
        return "folded" if jax.default_backend() == "cpu" and not small else "native"
    return conv_impl


def _work(inputs: jnp.ndarray, out_channels: int) -> int:
    return math.prod(inputs.shape[1:]) * out_channels


def conv3d_folded(
    lhs: jnp.ndarray,
    rhs: jnp.ndarray,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jnp.ndarray:
    """``lax.conv_general_dilated`` for (B, D, H, W, C) inputs and (K_d, K_h, K_w, C, O) kernels,
    computed as a sum over depth taps of 2-D convolutions (depth folded into the batch).

    Same signature as ``lax.conv_general_dilated`` (flax's ``Conv`` calls it so); dilations,
    feature groups and other layouts, which the models do not use, go to the native op.
    """
    plain = (
        lhs.ndim == 5
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1,)))
        and all(d == 1 for d in (rhs_dilation or (1,)))
        and not kwargs
        and (
            dimension_numbers is None
            or lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST_3D)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        )
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers or _CHANNELS_LAST_3D,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:4], rhs.shape[:3], window_strides, padding)
    strides = tuple(int(s) for s in window_strides)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv3d(lhs, rhs, strides, pads, precision)


def _depth_planes(lhs, taps, stride, pad):
    """The input planes ``d * stride + t`` of every output plane d, one array per depth tap t."""
    x = jnp.pad(lhs, ((0, 0), pad, (0, 0), (0, 0), (0, 0)))
    out_depth = (x.shape[1] - taps) // stride + 1
    last = (out_depth - 1) * stride + 1
    return [lax.slice_in_dim(x, t, t + last, stride, axis=1) for t in range(taps)]


def _conv2d(x, kernel, strides, pads, precision):
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


def _taps_summed(lhs, rhs, strides, pads, precision):
    """The forward as a sum over depth taps of 2-D convolutions (depth folded into the batch)."""
    batch, _, height, width, channels = lhs.shape
    out = None
    for tap, planes in enumerate(_depth_planes(lhs, rhs.shape[0], strides[0], pads[0])):
        term = _conv2d(
            planes.reshape(-1, height, width, channels), rhs[tap], strides[1:], pads[1:], precision
        )
        out = term if out is None else out + term
    return out.reshape(batch, -1, *out.shape[1:])


def _taps_in_channels(lhs, rhs, strides, pads, precision):
    """The same convolution as one 2-D convolution whose input channels are the K_d depth taps'
    planes side by side (K_d * C channels, kernel (K_h, K_w, K_d * C, O))."""
    batch, _, height, width, channels = lhs.shape
    taps, kh, kw, _, out_channels = rhs.shape
    planes = jnp.concatenate(_depth_planes(lhs, taps, strides[0], pads[0]), axis=-1)
    kernel = jnp.moveaxis(rhs, 0, 2).reshape(kh, kw, taps * channels, out_channels)
    out = _conv2d(
        planes.reshape(-1, height, width, taps * channels), kernel, strides[1:], pads[1:], precision
    )
    return out.reshape(batch, -1, *out.shape[1:])


# Measured on the 2-core CPU (XLA 0.10, YNNPACK 2-D convolutions), 3x3x3 kernels, 32^3-96^3:
# the taps-in-channels forward is 1.2-3.4x faster for C_in <= 8 (2 -> 16 at 64^3: 28 against
# 96 ms) and up to 1.6x slower for C_in >= 16; its input gradient (one transposed convolution
# with K_d * C outputs, then a sum of shifted planes) is 1.0-2.7x faster at every size.
TAPS_IN_CHANNELS_MAX_INPUT = 8


def _forward(lhs, rhs, strides, pads, precision):
    if lhs.shape[-1] <= TAPS_IN_CHANNELS_MAX_INPUT:
        return _taps_in_channels(lhs, rhs, strides, pads, precision)
    return _taps_summed(lhs, rhs, strides, pads, precision)


def kernel_gradient(lhs, cotangent, kernel_shape, strides, pads, precision=None):
    """d(sum(conv(lhs, k) * cotangent)) / dk, (K_d, K_h, K_w, C, O), as matrix products of input
    patches (in-plane im2col) with cotangent planes, one plane at a time in a ``fori_loop``.

    A plane's patches fit in cache, where XLA's own kernel-gradient convolution transposes both
    full volumes and was 2-4x slower on CPU. With depth stride 1 the loop runs over *input* planes:
    each plane's (H_out * W_out, K_h K_w C) patch matrix is built once and meets the K_d cotangent
    planes it feeds (1.3-2x faster than building K_d K_h K_w C columns per output plane, which the
    strided case does).
    """
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    if strides[0] == 1:
        return _kernel_gradient_by_input_plane(x, cotangent, kernel_shape, strides, precision)
    return _kernel_gradient_by_output_plane(x, cotangent, kernel_shape, strides, precision)


def _in_plane_patches(plane, taps_hw, strides_hw, out_hw):
    """(H_out * W_out, K_h * K_w * C) columns of one padded (H, W, C) plane."""
    (taps_h, taps_w), (stride_h, stride_w), (out_h, out_w) = taps_hw, strides_hw, out_hw
    channels = plane.shape[-1]
    columns = [
        lax.slice(
            plane,
            (i, j, 0),
            (i + (out_h - 1) * stride_h + 1, j + (out_w - 1) * stride_w + 1, channels),
            (stride_h, stride_w, 1),
        )
        for i in range(taps_h)
        for j in range(taps_w)
    ]
    return jnp.concatenate(columns, axis=-1).reshape(out_h * out_w, -1)


def _kernel_gradient_by_input_plane(x, cotangent, kernel_shape, strides, precision):
    taps_d, taps_h, taps_w = kernel_shape
    batch, _, out_h, out_w, out_channels = cotangent.shape
    _, padded_d, padded_h, padded_w, channels = x.shape
    # Input plane p feeds output plane d = p - t through depth tap t; with the cotangent padded
    # by K_d - 1 planes on both sides, those are its planes p .. p + K_d - 1 (t = K_d - 1 .. 0).
    g = jnp.pad(cotangent, ((0, 0), (taps_d - 1, taps_d - 1), (0, 0), (0, 0), (0, 0)))
    g = g.reshape(batch, g.shape[1], out_h * out_w, out_channels)

    def add_plane(index, total):
        b, p = index // padded_d, index % padded_d
        plane = lax.dynamic_slice(x, (b, p, 0, 0, 0), (1, 1, padded_h, padded_w, channels))
        patches = _in_plane_patches(plane[0, 0], (taps_h, taps_w), strides[1:], (out_h, out_w))
        planes = lax.dynamic_slice(g, (b, p, 0, 0), (1, taps_d, out_h * out_w, out_channels))[0]
        product = jnp.einsum("pk,tpo->tko", patches, planes, precision=precision)
        return total + product.astype(total.dtype)

    total = jnp.zeros((taps_d, taps_h * taps_w * channels, out_channels), jnp.float32)
    total = lax.fori_loop(0, batch * padded_d, add_plane, total)
    return total[::-1].reshape(taps_d, taps_h, taps_w, channels, out_channels)


def _kernel_gradient_by_output_plane(x, cotangent, kernel_shape, strides, precision):
    taps_d, taps_h, taps_w = kernel_shape
    batch, out_d, out_h, out_w, out_channels = cotangent.shape
    _, _, padded_h, padded_w, channels = x.shape

    def add_plane(index, total):
        b, d = index // out_d, index % out_d
        slab = lax.dynamic_slice(
            x, (b, d * strides[0], 0, 0, 0), (1, taps_d, padded_h, padded_w, channels)
        )[0]
        patches = jnp.concatenate(
            [
                _in_plane_patches(slab[t], (taps_h, taps_w), strides[1:], (out_h, out_w))
                for t in range(taps_d)
            ],
            axis=-1,
        )
        plane = lax.dynamic_slice(
            cotangent, (b, d, 0, 0, 0), (1, 1, out_h, out_w, out_channels)
        ).reshape(out_h * out_w, out_channels)
        return total + lax.dot_general(
            patches, plane, (((0,), (0,)), ((), ())), precision=precision
        ).astype(total.dtype)

    total = jnp.zeros((taps_d * taps_h * taps_w * channels, out_channels), jnp.float32)
    total = lax.fori_loop(0, batch * out_d, add_plane, total)
    return total.reshape(taps_d, taps_h, taps_w, channels, out_channels)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv3d(lhs, rhs, strides, pads, precision):
    return _forward(lhs, rhs, strides, pads, precision)


def _conv3d_forward(lhs, rhs, strides, pads, precision):
    return _forward(lhs, rhs, strides, pads, precision), (lhs, rhs)


def _conv3d_backward(strides, pads, precision, residuals, cotangent):
    lhs, rhs = residuals
    # The input gradient: JAX's transpose of the taps-in-channels form (a transposed 2-D
    # convolution with K_d * C outputs, then the K_d planes added back where they came from).
    _, input_vjp = jax.vjp(lambda x: _taps_in_channels(x, rhs, strides, pads, precision), lhs)
    (d_lhs,) = input_vjp(cotangent)
    d_rhs = kernel_gradient(lhs, cotangent, rhs.shape[:3], strides, pads, precision)
    return d_lhs, d_rhs.astype(rhs.dtype)


_conv3d.defvjp(_conv3d_forward, _conv3d_backward)


def conv(features: int, kernel_size: Sequence[int], conv_impl: str, **kwargs: Any) -> nn.Conv:
    """A ``flax.linen.Conv`` (same parameters, same names) that runs ``conv_impl``."""
    resolve_conv_impl(conv_impl)  # a bad name fails here, at build time

    def convolve(lhs, rhs, *args, **options):
        if resolve_conv_impl(conv_impl, _work(lhs, rhs.shape[-1])) == "folded":
            return conv3d_folded(lhs, rhs, *args, **options)
        return lax.conv_general_dilated(lhs, rhs, *args, **options)

    return nn.Conv(features, tuple(kernel_size), conv_general_dilated=convolve, **kwargs)


class ConvTranspose(nn.Module):
    """``flax.linen.ConvTranspose`` (padding "SAME", same parameters and names) for 3-D inputs.

    When the kernel equals the stride (the U-Net's upsampling) and ``conv_impl`` resolves to
    folded, the output blocks do not overlap and ``y[s*i + a] = x[i] @ kernel[K - 1 - a] + bias``
    (lax.conv_transpose flips the kernel): one matrix product instead of a convolution.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    conv_impl: str = "auto"
    use_bias: bool = True
    dtype: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel_size, strides = tuple(self.kernel_size), tuple(self.strides)
        kernel = self.param(
            "kernel", self.kernel_init, kernel_size + (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        folded = resolve_conv_impl(self.conv_impl, _work(x, self.features)) == "folded"
        if folded and kernel_size == strides:
            batch, *spatial, _ = x.shape
            flipped = kernel[::-1, ::-1, ::-1]
            y = jnp.einsum("bdhwc,xyzco->bdxhywzo", x, flipped)
            y = y.reshape(batch, *(n * s for n, s in zip(spatial, strides, strict=True)), -1)
        else:
            y = lax.conv_transpose(x, kernel, strides, "SAME", dimension_numbers=_CHANNELS_LAST_3D)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)
        return y

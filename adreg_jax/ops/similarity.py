"""Image similarity measures: local NCC, global NCC, MSE, SSIM, mutual information.

Where this sits: the training loss is built from ``ncc_local`` and ``ssim``; evaluation reports all
four. Images are (..., D, H, W, C); every measure returns one value per leading index (a scalar
for an unbatched image), averaged over voxels and channels.

Windowed statistics use separable filters with zero padding ("same" output size), as the
convolutions of VoxelMorph's NCC and of pytorch-ssim do, so values match those implementations at
the borders too.

The measures are jitted (their scalar parameters static): called eagerly (evaluation, a
notebook) each is one compiled program rather than dozens of operations compiled and run one by
one; inside a traced function they are inlined as before.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax.ops._checks import check_same_shape

_SPATIAL = (-4, -3, -2)


def _filter_axis(x: jnp.ndarray, taps: np.ndarray, axis: int) -> jnp.ndarray:
    """Correlate x with 1-D ``taps`` (odd length) along ``axis``, zero padding, same size.

    A sum of shifted slices: XLA fuses it into one loop, O(voxels * len(taps)).
    """
    radius = len(taps) // 2
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(x, pad)
    out = 0.0
    for offset, tap in enumerate(taps):
        piece = jax.lax.slice_in_dim(padded, offset, offset + n, axis=axis % x.ndim)
        out = out + (piece if tap == 1.0 else piece * float(tap))
    return out


def _filter3d(x: jnp.ndarray, taps: np.ndarray) -> jnp.ndarray:
    for axis in _SPATIAL:
        x = _filter_axis(x, taps, axis)
    return x


def _box_sum_axis(x: jnp.ndarray, window: int, axis: int) -> jnp.ndarray:
    """Sliding sum of ``window`` values along ``axis`` (zero padding, same size).

    ``lax.reduce_window`` (sum pooling): measured 5-14x faster on CPU, with its gradient, than a
    cumsum differenced at distance ``window`` (which XLA lowers to a windowed reduction of its
    own), and it is what GPUs run as pooling.
    """
    axis = axis % x.ndim
    dims = [1] * x.ndim
    dims[axis] = window
    pad = [(0, 0)] * x.ndim
    pad[axis] = (window // 2, window // 2)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, [1] * x.ndim, pad)


def box_sum(x: jnp.ndarray, window: int) -> jnp.ndarray:
    """Sum over the window**3 box centred on each voxel of x (..., D, H, W, C), zeros outside."""
    for axis in _SPATIAL:
        x = _box_sum_axis(x, window, axis)
    return x


def ncc_local_map(
    a: jnp.ndarray,
    b: jnp.ndarray,
    window: int = 9,
    eps: float = 1e-5,
    b_stats: tuple[jnp.ndarray, jnp.ndarray] | None = None,
) -> jnp.ndarray:
    """The voxel-wise local NCC map (..., D, H, W, C) whose mean is ``ncc_local``
    (``b_stats``: ``ncc_reference_stats(b, window)``, when b's are reused between calls)."""
    return ncc_local_maps((a,), b, window, eps, b_stats)[0]


def ncc_reference_stats(b: jnp.ndarray, window: int = 9) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The reference image's share of local NCC, (S(b), S(b^2) - S(b)^2 / n): 2 of the 5 box
    sums, the same for every image compared with b (a registration's fixed image, step after
    step)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer; got {window}")
    b = b.astype(jnp.float32)
    # Separate box sums: stacked on the channel axis they ran 2-4x slower on CPU (a small minor
    # axis that XLA's loops do not vectorise).
    sb = box_sum(b, window)
    return sb, box_sum(b * b, window) - sb * sb / float(window**3)


def ncc_local_maps(
    images: Sequence[jnp.ndarray],
    b: jnp.ndarray,
    window: int = 9,
    eps: float = 1e-5,
    b_stats: tuple[jnp.ndarray, jnp.ndarray] | None = None,
) -> list[jnp.ndarray]:
    """``ncc_local_map(a, b)`` of each ``a`` in ``images``, with b's box sums computed once
    (several images against one reference: a registration's before and after), or given
    (``b_stats``: ``ncc_reference_stats(b, window)``)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer; got {window}")
    n = float(window**3)
    b = b.astype(jnp.float32)
    sb, var_b = ncc_reference_stats(b, window) if b_stats is None else b_stats
    maps = []
    for a in images:
        check_same_shape(a, b, ("a", "b"))
        a = a.astype(jnp.float32)
        sa, saa, sab = (box_sum(x, window) for x in (a, a * a, a * b))
        cross = sab - sa * sb / n
        var_a = saa - sa * sa / n
        maps.append(cross * cross / (var_a * var_b + eps))
    return maps


@functools.partial(jax.jit, static_argnames=("window", "eps"))
def ncc_local(a: jnp.ndarray, b: jnp.ndarray, window: int = 9, eps: float = 1e-5) -> jnp.ndarray:
    """Local normalised cross-correlation, a similarity in [0, 1] (the loss is its negative).

    With box sums S over a window**3 neighbourhood (n = window**3 voxels):
    ``cross = S(ab) - S(a) S(b) / n``, ``var_a = S(a^2) - S(a)^2 / n`` (same for b),
    ``cc = cross^2 / (var_a * var_b + eps)``, averaged over voxels and channels.

    Args:
      a, b: images (..., D, H, W, C), equal shapes.
      window: odd edge length of the box (9 as in VoxelMorph and TransMorph).
    Returns:
      (...) mean local NCC per leading index.
    """
    return jnp.mean(ncc_local_map(a, b, window, eps), axis=(-4, -3, -2, -1))


@functools.partial(jax.jit, static_argnames="eps")
def ncc_global(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-8) -> jnp.ndarray:
    """Pearson correlation of all voxels and channels, in [-1, 1]: (...) per leading index.

    ``sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2) + eps)``.
    """
    check_same_shape(a, b, ("a", "b"))
    axes = (-4, -3, -2, -1)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    da = a - jnp.mean(a, axis=axes, keepdims=True)
    db = b - jnp.mean(b, axis=axes, keepdims=True)
    num = jnp.sum(da * db, axis=axes)
    den = jnp.sqrt(jnp.sum(da * da, axis=axes) * jnp.sum(db * db, axis=axes) + eps)
    return num / den


@jax.jit
def mse(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """Mean squared intensity difference, (...) per leading index."""
    check_same_shape(a, b, ("a", "b"))
    diff = a.astype(jnp.float32) - b.astype(jnp.float32)
    return jnp.mean(diff * diff, axis=(-4, -3, -2, -1))


def gaussian_taps(sigma: float = 1.5, size: int = 11) -> np.ndarray:
    """Normalised 1-D Gaussian window (the SSIM window: sigma 1.5, 11 taps)."""
    x = np.arange(size, dtype=np.float64) - size // 2
    taps = np.exp(-(x**2) / (2.0 * sigma**2))
    return (taps / taps.sum()).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("sigma", "size", "c1", "c2"))
def ssim(
    a: jnp.ndarray,
    b: jnp.ndarray,
    sigma: float = 1.5,
    size: int = 11,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
) -> jnp.ndarray:
    """Structural similarity with a 3-D Gaussian window, intensities in [0, 1].

    Local means mu, variances s and covariance s_ab under the window (zero padding);
    ``ssim = (2 mu_a mu_b + c1)(2 s_ab + c2) / ((mu_a^2 + mu_b^2 + c1)(s_a + s_b + c2))``,
    averaged over voxels and channels. SSIM(x, x) = 1.

    Returns:
      (...) per leading index.
    """
    check_same_shape(a, b, ("a", "b"))
    if size % 2 == 0 or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"need an odd window size and sigma > 0; got size={size}, sigma={sigma}")
    taps = gaussian_taps(sigma, size)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    stats = _filter3d(jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1), taps)
    mu_a, mu_b, saa, sbb, sab = jnp.split(stats, 5, axis=-1)
    var_a = saa - mu_a * mu_a
    var_b = sbb - mu_b * mu_b
    cov = sab - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return jnp.mean(num / den, axis=(-4, -3, -2, -1))


def _check_bins(bins: int, sigma_ratio: float) -> None:
    if bins < 2 or not sigma_ratio > 0:
        raise ValueError(f"need bins >= 2 and sigma_ratio > 0; got {bins}, {sigma_ratio}")


@functools.partial(jax.jit, static_argnames=("bins", "sigma_ratio", "value_range"))
def parzen_weights(
    x: jnp.ndarray,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> jnp.ndarray:
    """Each intensity of x (..., D, H, W, C), clipped to ``value_range``, spread over ``bins``
    evenly spaced centres with Gaussian weights (sigma = ``sigma_ratio`` * bin spacing)
    normalised to sum 1: (..., D * H * W * C, bins). What ``mutual_information`` histograms; pass
    an image's own as its ``b_weights`` to reuse them between calls (a fixed image)."""
    _check_bins(bins, sigma_ratio)
    x = x.astype(jnp.float32).reshape(*x.shape[:-4], -1)
    return _parzen(x, bins, float(sigma_ratio), tuple(map(float, value_range)))


def _parzen_centres(bins, sigma_ratio, value_range, ndim):
    """(the bins' centres along the last of ``ndim`` axes, the Gaussian's sigma) of
    ``parzen_weights``."""
    low, high = value_range
    centres = jnp.linspace(low, high, bins, dtype=jnp.float32).reshape((1,) * (ndim - 1) + (-1,))
    return centres, sigma_ratio * (high - low) / (bins - 1)


def _parzen_forward(x, bins, sigma_ratio, value_range):
    low, high = value_range
    centres, sigma = _parzen_centres(bins, sigma_ratio, value_range, x.ndim + 1)
    logits = -0.5 * jnp.square((jnp.clip(x, low, high)[..., None] - centres) / sigma)
    weights = jax.nn.softmax(logits, axis=-1)
    return weights, (x, weights)


def _parzen_backward(bins, sigma_ratio, value_range, residuals, cotangent):
    """The softmax of Gaussian logits has dw_i/dx = w_i (c_i - sum_j w_j c_j) / sigma^2: two
    sums over the bins per voxel, where autodiff's softmax and logit gradients made several
    (the gradient of a 40 x 56 x 48 image's MI 16.6-17.9 -> 13.0-13.3 ms on the 2-core CPU,
    docs/performance.md's fourth round). The clip's derivative as jnp.clip's: 1 inside, 1/2 at
    a bound (max/min ties), 0 outside."""
    x, weights = residuals
    low, high = value_range
    centres, sigma = _parzen_centres(bins, sigma_ratio, value_range, weights.ndim)
    weighted = cotangent * weights
    mean = jnp.sum(weights * centres, axis=-1)
    dx = (jnp.sum(weighted * centres, axis=-1) - mean * jnp.sum(weighted, axis=-1)) / sigma**2
    inside = jnp.where((x > low) & (x < high), 1.0, jnp.where((x == low) | (x == high), 0.5, 0.0))
    return (dx * inside,)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _parzen(x, bins, sigma_ratio, value_range):
    """``parzen_weights`` of x (..., N) -> (..., N, bins), with ``_parzen_backward``."""
    return _parzen_forward(x, bins, sigma_ratio, value_range)[0]


_parzen.defvjp(_parzen_forward, _parzen_backward)


@functools.partial(jax.jit, static_argnames=("bins", "sigma_ratio", "value_range"))
def mutual_information(
    a: jnp.ndarray,
    b: jnp.ndarray,
    bins: int = 32,
    sigma_ratio: float = 0.5,
    value_range: tuple[float, float] = (0.0, 1.0),
    weight: jnp.ndarray | None = None,
    b_weights: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Mutual information of the intensities of a and b in nats, by Parzen windowing.

    Each intensity spreads over ``bins`` centres (``parzen_weights``); the joint histogram is the
    mean outer product of the two weight vectors over voxels (and channels), and
    ``MI = sum p(i, j) log(p(i, j) / (p(i) p(j)))``. Differentiable in both images; no assumption
    of a linear intensity relation, so it serves scans of different modalities (T1 to T2, MR to
    CT), as in MONAI's GlobalMutualInformationLoss and VoxelMorph's MutualInformation.

    ``weight`` (the shape of a, >= 0; e.g. a mask): each voxel's outer product counts ``weight``
    times and the joint histogram is divided by the weights' sum, so a 0/1 mask gives the MI of
    the voxels inside it. ``b_weights``: ``parzen_weights(b, bins, sigma_ratio, value_range)``
    computed once for a b that does not change between calls (b is then not read again).

    Returns:
      (...) per leading index: 0 for independent images, the entropy of a for b = a.
    """
    check_same_shape(a, b, ("a", "b"))
    _check_bins(bins, sigma_ratio)
    lead = a.shape[:-4]
    wa = parzen_weights(a, bins, sigma_ratio, value_range)
    wb = parzen_weights(b, bins, sigma_ratio, value_range) if b_weights is None else b_weights
    if wb.shape != wa.shape:
        raise ValueError(f"b_weights has shape {wb.shape}; expected {wa.shape} (parzen_weights)")
    if weight is None:
        joint = jnp.einsum("...ni,...nj->...ij", wa, wb) / wa.shape[-2]
    else:
        check_same_shape(a, weight, ("a", "weight"))
        w = weight.astype(jnp.float32).reshape(*lead, -1)
        total = jnp.maximum(jnp.sum(w, axis=-1), 1e-6)[..., None, None]
        joint = jnp.einsum("...ni,...nj->...ij", wa * w[..., None], wb) / total
    pa = jnp.sum(joint, axis=-1, keepdims=True)
    pb = jnp.sum(joint, axis=-2, keepdims=True)
    tiny = 1e-10
    return jnp.sum(joint * (jnp.log(joint + tiny) - jnp.log(pa * pb + tiny)), axis=(-2, -1))

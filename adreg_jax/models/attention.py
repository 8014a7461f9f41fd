"""AD-RegNet's two attention modules.

BCAM (bidirectional cross-attention) lets the moving features attend to the fixed ones and the
reverse at a pyramid level; RAA (regional adaptive attention) re-weights regions of the deepest
feature map. Both use ``jax.nn.dot_product_attention`` so that a GPU runs a fused kernel.

Memory: a level with at most ``global_max_tokens`` voxels attends globally; a larger one is cut
into non-overlapping ``window``^3 windows (zero-padded to a multiple), attention staying inside
each, so the cost grows linearly with the volume.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _pad_to_multiple(x: jnp.ndarray, size: tuple[int, int, int]) -> jnp.ndarray:
    pads = [(0, 0)] + [(0, (-n) % s) for n, s in zip(x.shape[1:4], size, strict=True)] + [(0, 0)]
    return jnp.pad(x, pads)


def to_windows(x: jnp.ndarray, window: tuple[int, int, int]) -> jnp.ndarray:
    """(B, D, H, W, C) with D, H, W multiples of window -> (B * n_windows, prod(window), C)."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def from_windows(x: jnp.ndarray, shape: tuple[int, ...], window: tuple[int, int, int]):
    """Inverse of ``to_windows`` for a (B, D, H, W, C) ``shape``."""
    b, d, h, w, c = shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, d, h, w, c)


class MultiHeadCross(nn.Module):
    """Queries from one token set attend to keys/values of another: (N, T, C) -> (N, T, C)."""

    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: jnp.ndarray, context: jnp.ndarray) -> jnp.ndarray:
        channels = queries.shape[-1]
        if channels % self.heads:
            raise ValueError(
                f"attention width {channels} is not divisible by model.attention_heads={self.heads}"
            )
        head_dim = channels // self.heads

        def project(x, name):
            y = nn.DenseGeneral((self.heads, head_dim), dtype=self.dtype, name=name)(x)
            return y  # (N, T, heads, head_dim)

        q = project(queries, "query")
        k = project(context, "key")
        v = project(context, "value")
        out = jax.nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(channels, axis=(-2, -1), dtype=self.dtype, name="out")(out)


class BidirectionalCrossAttention(nn.Module):
    """BCAM at one pyramid level.

    ``m2f = Attn(Q = moving, K = V = fixed)`` and ``f2m = Attn(Q = fixed, K = V = moving)``, each
    with its own Q/K/V projections and heads; ``alpha = sigmoid(a)`` (a learnable scalar,
    initialised at 0 so that alpha = 0.5) mixes them, ``cross = alpha * m2f + (1 - alpha) * f2m``,
    and ``cross`` is added residually to both feature maps. Returns (fixed', moving', alpha).
    """

    heads: int = 4
    window: int = 4
    global_max_tokens: int = 4096
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, fixed: jnp.ndarray, moving: jnp.ndarray):
        shape = fixed.shape
        tokens = shape[1] * shape[2] * shape[3]
        if tokens <= self.global_max_tokens:
            window = tuple(shape[1:4])
            f_pad, m_pad = fixed, moving
        else:
            window = (self.window,) * 3
            f_pad, m_pad = _pad_to_multiple(fixed, window), _pad_to_multiple(moving, window)
        f_tok = to_windows(f_pad, window)
        m_tok = to_windows(m_pad, window)
        f_tok = nn.LayerNorm(dtype=self.dtype, name="norm_fixed")(f_tok)
        m_tok = nn.LayerNorm(dtype=self.dtype, name="norm_moving")(m_tok)
        m2f = MultiHeadCross(self.heads, self.dtype, name="moving_to_fixed")(m_tok, f_tok)
        f2m = MultiHeadCross(self.heads, self.dtype, name="fixed_to_moving")(f_tok, m_tok)
        logit = self.param("balance_logit", nn.initializers.zeros, ())
        alpha = jax.nn.sigmoid(logit)
        cross = alpha.astype(m2f.dtype) * m2f + (1.0 - alpha).astype(f2m.dtype) * f2m
        cross = from_windows(cross, f_pad.shape, window)[:, : shape[1], : shape[2], : shape[3]]
        return fixed + cross.astype(fixed.dtype), moving + cross.astype(moving.dtype), alpha


class RegionalAdaptiveAttention(nn.Module):
    """RAA on the deepest features x (B, D, H, W, C).

    The map is cut into non-overlapping regions of ``region_size`` voxels (zero-padded to a
    multiple); each region's descriptor is its average; multi-head self-attention runs across the
    R descriptors; a linear score per region gives softmax weights ``w_r`` (sum 1 over regions).
    Each voxel of region r is scaled: ``x' = x * (1 + gamma * (R * w_r - 1))``. ``R * w_r`` has
    mean 1, so the module redistributes emphasis between regions; ``gamma`` is a learnable scalar
    gate initialised at 0, so the module starts as the identity. Returns (x', w) with w (B, R).
    """

    region_size: tuple[int, int, int] = (2, 2, 2)
    heads: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray):
        region = tuple(min(r, n) for r, n in zip(self.region_size, x.shape[1:4], strict=True))
        padded = _pad_to_multiple(x, region)
        b, d, h, w, c = padded.shape
        grid = (d // region[0], h // region[1], w // region[2])
        regions = to_windows(padded, region).reshape(b, -1, region[0] * region[1] * region[2], c)
        descriptors = jnp.mean(regions, axis=2)  # (B, R, C)
        descriptors = nn.LayerNorm(dtype=self.dtype)(descriptors)
        context = MultiHeadCross(self.heads, self.dtype, name="self_attention")(
            descriptors, descriptors
        )
        scores = nn.Dense(1, dtype=self.dtype, name="score")(descriptors + context)[..., 0]
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # (B, R)
        gamma = self.param("gate", nn.initializers.zeros, ())
        n_regions = weights.shape[-1]
        scale = 1.0 + gamma * (n_regions * weights - 1.0)  # (B, R)
        scale_map = jnp.broadcast_to(scale.reshape(b, *grid, 1, 1, 1, 1), (b, *grid, *region, 1))
        scale_map = scale_map.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, 1)
        scale_map = scale_map[:, : x.shape[1], : x.shape[2], : x.shape[3]]
        return x * scale_map.astype(x.dtype), weights

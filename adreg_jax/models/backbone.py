"""The shared 3D U-Net pieces: conv blocks, the encoder both images pass through, decoder stages.

Where this sits: ``ADRegNet`` (adregnet.py) runs the fixed and the moving image through ONE
``Encoder`` (shared weights), fuses the two feature pyramids level by level, and decodes them
with ``DecoderStage``s. Features are channels-last (B, D, H, W, C).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adreg_jax.models.conv import ConvTranspose, conv


def make_norm(kind: str, dtype: Any) -> nn.Module | None:
    """Normalisation after each conv: instance (default, batch-size independent, no running
    statistics so init/apply stay pure), layer, or none."""
    if kind == "instance":
        return nn.InstanceNorm(dtype=dtype)
    if kind == "layer":
        return nn.LayerNorm(dtype=dtype)
    if kind == "none":
        return None
    raise ValueError(f"model.norm must be 'instance', 'layer' or 'none'; got {kind!r}")


class ConvBlock(nn.Module):
    """3x3x3 conv (stride 1, padding 1) -> norm -> LeakyReLU."""

    features: int
    norm: str = "instance"
    negative_slope: float = 0.2
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        norm = make_norm(self.norm, self.dtype)
        # A bias in front of a normalisation is cancelled by it: zero gradient, wasted memory.
        x = conv(
            self.features,
            (3, 3, 3),
            self.conv_impl,
            padding=1,
            use_bias=norm is None,
            dtype=self.dtype,
        )(x)
        if norm is not None:
            x = norm(x)
        return nn.leaky_relu(x, self.negative_slope)


def rematerialised(module_cls: type[nn.Module]) -> type[nn.Module]:
    """``module_cls`` whose backward pass recomputes its forward from its input: only the input is
    kept between the passes (same parameters, same names, same gradients).

    Why not ``nn.remat`` / ``jax.checkpoint``: XLA:CPU merges the recomputation with the forward
    pass (common-subexpression elimination; the optimisation barriers do not survive), so the
    compiled memory does not change (8 ConvBlocks at 48^3, 16 channels: 305 MB of temporaries
    with or without). Here the recomputation starts from ``x + 0 * cotangent[0]``, which exists
    only in the backward pass, so no compiler can hoist or merge it (the same blocks: 109 MB).
    """

    class Rematerialised(module_cls):
        @nn.compact
        def __call__(self, x):
            def forward(module, x):
                return module_cls.__call__(module, x)

            def forward_keeping_input(module, x):
                return forward(module, x), (x, module.variables)

            def backward(residuals, cotangent):
                x, variables = residuals
                tie = jnp.zeros((), x.dtype) * cotangent.reshape(-1)[0].astype(x.dtype)
                definition = self.clone(parent=None)
                _, vjp = jax.vjp(
                    lambda v, x: definition.apply(v, x, method=module_cls.__call__),
                    variables,
                    x + tie,
                )
                return vjp(cotangent)

            block = nn.custom_vjp(forward, forward_fn=forward_keeping_input, backward_fn=backward)
            return block(self, x)

    Rematerialised.__name__ = Rematerialised.__qualname__ = module_cls.__name__
    return Rematerialised


RematConvBlock = rematerialised(ConvBlock)


def conv_blocks(parent: nn.Module, x: jnp.ndarray, features: int, count: int, first: int):
    """``count`` ConvBlocks of ``parent`` (fields norm, negative_slope, dtype, conv_impl, remat),
    named ConvBlock_{first}, ... as linen would auto-name them, so that the parameter tree is the
    same with and without rematerialisation (``rematerialised`` keeps only each block's input for
    the backward pass and recomputes the rest)."""
    block = RematConvBlock if parent.remat else ConvBlock
    for index in range(first, first + count):
        x = block(
            features,
            parent.norm,
            parent.negative_slope,
            parent.dtype,
            parent.conv_impl,
            name=f"ConvBlock_{index}",
        )(x)
    return x


class Encoder(nn.Module):
    """Level 0 at full resolution, each further level halves the grid with a stride-2 conv.

    Returns one feature map per level, finest first: level l is (B, D/2^l, H/2^l, W/2^l,
    channels[l]).
    """

    channels: Sequence[int]
    convs_per_level: int = 2
    norm: str = "instance"
    negative_slope: float = 0.2
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        features = []
        for level, width in enumerate(self.channels):
            if level > 0:
                x = conv(width, (3, 3, 3), self.conv_impl, strides=2, padding=1, dtype=self.dtype)(
                    x
                )
                x = nn.leaky_relu(x, self.negative_slope)
            x = conv_blocks(self, x, width, self.convs_per_level, level * self.convs_per_level)
            features.append(x)
        return features


class DecoderStage(nn.Module):
    """Transposed-conv upsampling by 2, skip concatenation, then the level's conv blocks."""

    features: int
    convs_per_level: int = 2
    norm: str = "instance"
    negative_slope: float = 0.2
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, skip: jnp.ndarray) -> jnp.ndarray:
        x = ConvTranspose(self.features, (2, 2, 2), (2, 2, 2), self.conv_impl, dtype=self.dtype)(x)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        return conv_blocks(self, x, self.features, self.convs_per_level, 0)

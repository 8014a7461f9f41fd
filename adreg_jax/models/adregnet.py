"""The assembled AD-RegNet and its ablations, built from ``config.model``.

Data flow of one call ``module.apply(variables, fixed, moving)`` (images (B, D, H, W, 1)):
  pad to a multiple of 2^(levels-1) -> shared Encoder on fixed and on moving (one weight set)
  -> per level: BCAM (configured levels) -> joint = concat(fixed, moving) features
  -> RAA on the deepest joint map -> decoder (transposed conv + skip) -> a DDF head per level
  -> coarse-to-fine blending: ``ddf_l = s_l * head_l + (1 - s_l) * resize_ddf(ddf_{l+1})`` with a
     sigmoid weight map ``s_l`` from a small conv net on (decoder features, upsampled field)
  -> (diffeomorphic: the finest field is a velocity, integrated by scaling and squaring)
  -> crop back -> ONE warp of the original moving image.

With ``use_cross_attention``, ``use_regional_attention`` and ``use_multires`` all off, this is a
plain VoxelMorph-style U-Net (single finest DDF head): the project's baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from adreg_jax import ops
from adreg_jax.models.attention import BidirectionalCrossAttention, RegionalAdaptiveAttention
from adreg_jax.models.backbone import ConvBlock, DecoderStage, Encoder
from adreg_jax.models.conv import conv

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The paper's ablation study as config.model overrides (benchmarks and comparisons use these).
ABLATIONS: dict[str, dict[str, bool]] = {
    "AD-RegNet (full)": {},
    "no cross attention": {"use_cross_attention": False},
    "no regional attention": {"use_regional_attention": False},
    "no multi-resolution": {"use_multires": False},
    "U-Net baseline": {
        "use_cross_attention": False,
        "use_regional_attention": False,
        "use_multires": False,
    },
}


def _ddf_head(name: str, dtype: Any, conv_impl: str) -> nn.Conv:
    # Near-zero initial weights: an untrained model predicts (almost) the identity map.
    return conv(
        3,
        (3, 3, 3),
        conv_impl,
        padding=1,
        dtype=dtype,
        kernel_init=nn.initializers.normal(1e-5),
        bias_init=nn.initializers.zeros,
        name=name,
    )


class ADRegNet(nn.Module):
    """AD-RegNet; fields documented in configs/default.py (``config.model``)."""

    channels: Sequence[int] = (16, 32, 64, 128, 256)
    convs_per_level: int = 2
    norm: str = "instance"
    leaky_relu_slope: float = 0.2
    use_cross_attention: bool = True
    cross_attention_levels: Sequence[int] = (3, 4)
    attention_heads: int = 4
    attention_window: int = 4
    global_attention_max_tokens: int = 4096
    use_regional_attention: bool = True
    region_size: Sequence[int] = (2, 2, 2)
    region_heads: int = 4
    use_multires: bool = True
    diffeomorphic: bool = False
    integration_steps: int = 7
    dtype: str = "float32"
    conv_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, fixed: jnp.ndarray, moving: jnp.ndarray) -> dict[str, Any]:
        if fixed.ndim != 5 or fixed.shape[-1] != 1 or fixed.shape != moving.shape:
            raise ValueError(
                f"fixed and moving must both be (B, D, H, W, 1); got fixed {tuple(fixed.shape)} "
                f"and moving {tuple(moving.shape)}"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}; got {self.dtype!r}")
        dtype = _DTYPES[self.dtype]
        levels = len(self.channels)
        bad = [lv for lv in self.cross_attention_levels if not 0 <= lv < levels]
        if self.use_cross_attention and bad:
            raise ValueError(
                f"model.cross_attention_levels {tuple(self.cross_attention_levels)} name levels "
                f"outside 0..{levels - 1}"
            )
        spatial = fixed.shape[1:4]
        stride = 2 ** (levels - 1)
        pads = [(0, 0)] + [(0, (-n) % stride) for n in spatial] + [(0, 0)]
        fixed_p = jnp.pad(fixed, pads).astype(dtype)
        moving_p = jnp.pad(moving, pads).astype(dtype)

        # One encoder, both images: stacking on the batch axis shares the weights by construction.
        batch = fixed.shape[0]
        encoder = Encoder(
            self.channels,
            self.convs_per_level,
            self.norm,
            self.leaky_relu_slope,
            dtype,
            self.conv_impl,
            self.remat,
        )
        pyramid = encoder(jnp.concatenate([fixed_p, moving_p], axis=0))

        joint, alphas = [], {}
        for level, feats in enumerate(pyramid):
            f_feat, m_feat = feats[:batch], feats[batch:]
            if self.use_cross_attention and level in self.cross_attention_levels:
                f_feat, m_feat, alpha = BidirectionalCrossAttention(
                    self.attention_heads,
                    self.attention_window,
                    self.global_attention_max_tokens,
                    dtype,
                    name=f"bcam_level{level}",
                )(f_feat, m_feat)
                alphas[f"level{level}"] = alpha
            joint.append(jnp.concatenate([f_feat, m_feat], axis=-1))

        x = joint[-1]
        region_weights = None
        if self.use_regional_attention:
            x, region_weights = RegionalAdaptiveAttention(
                tuple(self.region_size), self.region_heads, dtype, name="raa"
            )(x)
        x = ConvBlock(self.channels[-1], self.norm, self.leaky_relu_slope, dtype, self.conv_impl)(x)

        # Decoder: features per level, coarsest first.
        decoded = [x]
        for level in range(levels - 2, -1, -1):
            x = DecoderStage(
                self.channels[level],
                self.convs_per_level,
                self.norm,
                self.leaky_relu_slope,
                dtype,
                self.conv_impl,
                self.remat,
                name=f"decoder_level{level}",
            )(x, joint[level])
            decoded.append(x)

        level_ddfs, blend_weights = [], []
        if self.use_multires:
            ddf = None
            for index, feats in enumerate(decoded):
                level = levels - 1 - index
                head = _ddf_head(f"ddf_head_level{level}", dtype, self.conv_impl)(feats).astype(
                    jnp.float32
                )
                if ddf is None:
                    ddf = head
                else:
                    upsampled = ops.resize_ddf(ddf, feats.shape[1:4])
                    gate_in = jnp.concatenate([feats, upsampled.astype(feats.dtype)], axis=-1)
                    gate = conv(
                        16,
                        (3, 3, 3),
                        self.conv_impl,
                        padding=1,
                        dtype=dtype,
                        name=f"blend{level}_a",
                    )(gate_in)
                    gate = nn.leaky_relu(gate, self.leaky_relu_slope)
                    gate = conv(
                        1, (3, 3, 3), self.conv_impl, padding=1, dtype=dtype, name=f"blend{level}_b"
                    )(gate)
                    weight = jax.nn.sigmoid(gate.astype(jnp.float32))
                    ddf = weight * head + (1.0 - weight) * upsampled
                    blend_weights.append(weight)
                level_ddfs.append(ddf)
        else:
            ddf = _ddf_head("ddf_head_level0", dtype, self.conv_impl)(decoded[-1]).astype(
                jnp.float32
            )
            level_ddfs.append(ddf)

        outputs: dict[str, Any] = {}
        if self.diffeomorphic:
            outputs["velocity"] = ddf[:, : spatial[0], : spatial[1], : spatial[2]]
            ddf = ops.integrate_velocity(ddf, self.integration_steps)
        ddf = ddf[:, : spatial[0], : spatial[1], : spatial[2]]
        outputs.update(
            ddf=ddf,
            warped=ops.warp(moving, ddf),
            level_ddfs=level_ddfs,
            blend_weights=blend_weights,
            alphas=alphas,
            region_weights=region_weights,
        )
        return outputs


def build_model(model_config) -> ADRegNet:
    """The module described by ``config.model`` (an ml_collections.ConfigDict or a mapping)."""
    fields = dict(model_config)
    known = set(ADRegNet.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown config.model fields {unknown}; known fields: {sorted(known)}")
    for key in ("channels", "cross_attention_levels", "region_size"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return ADRegNet(**fields)

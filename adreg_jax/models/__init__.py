"""Flax (linen) modules of AD-RegNet: pure init/apply, built from ``config.model``."""

from adreg_jax.models.adregnet import ABLATIONS, ADRegNet, build_model
from adreg_jax.models.attention import BidirectionalCrossAttention, RegionalAdaptiveAttention
from adreg_jax.models.backbone import ConvBlock, DecoderStage, Encoder

__all__ = [
    "ABLATIONS",
    "ADRegNet",
    "BidirectionalCrossAttention",
    "ConvBlock",
    "DecoderStage",
    "Encoder",
    "RegionalAdaptiveAttention",
    "build_model",
]

"""Data: generated brain pairs from the packaged MNI152 atlas and the Grain pipelines that batch
them (see docs/architecture.md for the batch dict)."""

from adreg_jax.data.generated import BRAIN_LABELS, GeneratedBrainPairs, load_atlas
from adreg_jax.data.pipeline import build_dataset, build_source, make_iterator

__all__ = [
    "BRAIN_LABELS",
    "GeneratedBrainPairs",
    "build_dataset",
    "build_source",
    "load_atlas",
    "make_iterator",
]

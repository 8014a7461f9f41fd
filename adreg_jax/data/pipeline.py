"""Grain pipelines: from ``config.data`` to iterators of batch dicts (docs/architecture.md).

Where this sits: training.py asks ``make_iterator(config.data, "train", seed)`` for an endless,
checkpointable stream and ``build_dataset(config.data, "val"|"test", seed)`` for fixed held-out
pairs; the iterator's ``get_state()`` goes into every checkpoint so that a resumed run reads
exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import grain
import numpy as np

from adreg_jax.data.generated import GeneratedBrainPairs

TRAIN_LENGTH = 10**9  # generated training pairs are fresh at every index; no epoch boundary
_SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003}
DATASETS = ("generated_brain",)


def _check_split(split: str) -> None:
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_SEEDS)}; got {split!r}")


def build_source(data_config, split: str, seed: int):
    """The random-access source of one split (len and getitem of unbatched pair dicts)."""
    _check_split(split)
    if data_config.dataset not in DATASETS:
        raise ValueError(
            f"config.data.dataset={data_config.dataset!r} is not available; "
            f"this version provides {list(DATASETS)}"
        )
    length = {
        "train": TRAIN_LENGTH,
        "val": int(data_config.val_size),
        "test": int(data_config.test_size),
    }[split]
    return GeneratedBrainPairs(
        shape=tuple(data_config.image_size),
        length=length,
        seed=seed + _SPLIT_SEEDS[split],
        anatomy_voxels=float(data_config.anatomy_voxels),
        motion_voxels=float(data_config.motion_voxels),
        intensity=float(data_config.intensity),
    )


class RandomFlip(grain.transforms.RandomMap):
    """Flip every volume of a pair along each axis with probability 1/2. A flipped DDF also
    changes the sign of the component along the flipped axis."""

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        out = dict(element)
        for axis in range(3):
            if rng.random() < 0.5:
                for key in ("fixed", "moving", "fixed_seg", "moving_seg", "true_ddf"):
                    if key in out:
                        out[key] = np.flip(out[key], axis=axis)
                if "true_ddf" in out:
                    out["true_ddf"] = out["true_ddf"].copy()
                    out["true_ddf"][..., axis] *= -1.0
        return {k: np.ascontiguousarray(v) for k, v in out.items()}


def build_dataset(data_config, split: str, seed: int) -> grain.MapDataset:
    """Unbatched pairs of one split as a ``grain.MapDataset`` (augmented when training)."""
    dataset = grain.MapDataset.source(build_source(data_config, split, seed))
    if split == "train" and data_config.augment_flip:
        dataset = dataset.seed(seed).random_map(RandomFlip())
    return dataset


def make_iterator(data_config, split: str, seed: int) -> grain.DatasetIterator:
    """Batched numpy dicts, prefetched by ``num_workers`` processes (0 = in this process).

    The iterator's ``get_state()``/``set_state()`` restore the stream exactly.
    """
    dataset = build_dataset(data_config, split, seed)
    batch_size = int(data_config.batch_size) if split == "train" else 1
    iter_dataset = dataset.batch(batch_size, drop_remainder=split == "train").to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=int(data_config.prefetch))
    )
    if int(data_config.num_workers) > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data_config.num_workers))
        )
    return iter(iter_dataset)

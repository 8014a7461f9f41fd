"""IXI as released by TransMorph: ``atlas.pkl`` and ``Train/``, ``Val/``, ``Test/`` pickles.

Where this sits: files -> **ixi** -> pipeline. Each pickle holds a tuple (image, label) of
160 x 192 x 224 arrays: float32 image in [0, 1] and a label map (remapped 0..45, or FreeSurfer
ids, see labels.to_ixi_labels). Pairs are atlas-to-subject: moving = atlas, fixed = subject.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from adreg_jax.data import labels, preprocess

IXI_SHAPE = (160, 192, 224)
IXI_SPLITS = {"train": "Train", "val": "Val", "test": "Test"}


def load_pickle(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One TransMorph pickle -> (image (D, H, W) float32 in [0, 1], label (D, H, W) int32 0..45)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IXI pickle {path} missing")
    with path.open("rb") as handle:
        content = pickle.load(handle)  # noqa: S301 - the user's own data set files
    if not (isinstance(content, tuple | list) and len(content) == 2):
        raise ValueError(f"{path}: expected a pickled tuple (image, label), got {type(content)}")
    image, label_map = (np.asarray(a) for a in content)
    if image.shape != label_map.shape or image.ndim != 3:
        raise ValueError(
            f"{path}: image {image.shape} and label {label_map.shape} must be equal 3D shapes "
            f"(expected {IXI_SHAPE})"
        )
    preprocess.check_finite(image, str(path))
    return np.clip(image.astype(np.float32), 0.0, 1.0), labels.to_ixi_labels(label_map)


def subject_paths(root: str | Path, split: str) -> list[Path]:
    """Sorted subject pickles of one split ("train", "val", "test")."""
    folder = Path(root) / IXI_SPLITS[split]
    paths = sorted(folder.glob("*.pkl"))
    if not paths:
        raise FileNotFoundError(f"no *.pkl in {folder}; expected TransMorph's IXI layout")
    return paths


class IXIPairs:
    """Random-access atlas-to-subject pairs (moving = atlas, fixed = subject), 1 mm spacing."""

    def __init__(self, root: str | Path, split: str):
        self.atlas_path = Path(root) / "atlas.pkl"
        self.paths = subject_paths(root, split)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        atlas, atlas_labels = load_pickle(self.atlas_path)
        subject, subject_labels = load_pickle(self.paths[index])
        if atlas.shape != subject.shape:
            raise ValueError(
                f"{self.paths[index]}: shape {subject.shape} differs from the atlas {atlas.shape}"
            )
        return {
            "fixed": subject[..., None],
            "moving": atlas[..., None],
            "fixed_seg": subject_labels,
            "moving_seg": atlas_labels,
            "spacing": np.ones(3, np.float32),
        }

"""Label tables of the data sets, in one place, with their sources.

Where this sits: loaders (ixi.py) remap label maps with these tables; evaluation reports Dice
over ``IXI_VOI`` and the left/right-merged ``IXI_GROUPS``.

Source: TransMorph (junyuchen245/TransMorph_Transformer_for_Medical_Image_Registration), IXI
scripts: ``utils.process_label`` (``seg_table``, the 46 FreeSurfer ids whose positions are the
remapped labels 0..45 of its IXI release) and ``infer_*.py`` ``dice_val_VOI`` (``VOI_lbls``, the
30 remapped labels evaluated). The 17 groups merge each left/right pair of those 30 by FreeSurfer
structure name, as TransMorph's boxplot does.
"""

from __future__ import annotations

import numpy as np

# position i = remapped label i (0 = background)
IXI_FREESURFER_IDS: tuple[int, ...] = (
    0, 2, 3, 4, 5, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 26, 28, 30, 31, 41, 42, 43, 44,
    46, 47, 49, 50, 51, 52, 53, 54, 58, 60, 62, 63, 72, 77, 80, 85, 251, 252, 253, 254, 255,
)  # fmt: skip

# the 30 remapped labels that TransMorph evaluates on IXI
IXI_VOI: tuple[int, ...] = (
    1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 21, 22, 23, 25, 26, 27, 28, 29,
    30, 31, 32, 34, 36,
)  # fmt: skip

# 17 structures, left and right merged (remapped labels)
IXI_GROUPS: dict[str, tuple[int, ...]] = {
    "Cerebral-White-Matter": (1, 21),
    "Cerebral-Cortex": (2, 22),
    "Lateral-Ventricle": (3, 23),
    "Cerebellum-White-Matter": (5, 25),
    "Cerebellum-Cortex": (6, 26),
    "Thalamus": (7, 27),
    "Caudate": (8, 28),
    "Putamen": (9, 29),
    "Pallidum": (10, 30),
    "3rd-Ventricle": (11,),
    "4th-Ventricle": (12,),
    "Brain-Stem": (13,),
    "Hippocampus": (14, 31),
    "Amygdala": (15, 32),
    "CSF": (16,),
    "VentralDC": (18, 34),
    "Choroid-Plexus": (20, 36),
}

# generated brain phantom (generated.py)
BRAIN_TISSUES: dict[int, str] = {0: "background", 1: "CSF", 2: "grey matter", 3: "white matter"}


def freesurfer_to_ixi(label_map: np.ndarray) -> np.ndarray:
    """Remap FreeSurfer ids to TransMorph's 0..45; ids outside the table become 0 (background)."""
    lookup = np.zeros(int(max(IXI_FREESURFER_IDS)) + 1, np.int32)
    lookup[list(IXI_FREESURFER_IDS)] = np.arange(len(IXI_FREESURFER_IDS), dtype=np.int32)
    ids = np.asarray(label_map).astype(np.int64)
    inside = (ids >= 0) & (ids < len(lookup))
    return np.where(inside, lookup[np.clip(ids, 0, len(lookup) - 1)], 0).astype(np.int32)


def to_ixi_labels(label_map: np.ndarray) -> np.ndarray:
    """Either convention in, remapped 0..45 out: maps already within 0..45 pass unchanged.

    A map with any id above 45 is taken as FreeSurfer ids (some IXI copies store those).
    """
    label_map = np.asarray(label_map)
    if label_map.size and int(label_map.max()) > len(IXI_FREESURFER_IDS) - 1:
        return freesurfer_to_ixi(label_map)
    return label_map.astype(np.int32)

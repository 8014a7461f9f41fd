"""Build the packaged demo atlas ``assets/mni152_2mm.npz`` from the ICBM 2009a template.

    python -m adreg_jax.data.make_mni_asset --mni-dir ../shared/data/mni152

The template's T1 is skull-stripped with a brain mask from its grey/white-matter probability
maps, cropped to the brain, and resampled to 2 mm. Labels: 0 background, 1 CSF (inside the brain
mask but neither GM nor WM), 2 grey matter, 3 white matter (the larger probability wins).
Arrays keep the NIfTI's voxel axis order (RAS: axis 0 = right, 1 = anterior, 2 = superior).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

NAMES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
ASSET = Path(__file__).resolve().parent / "assets" / "mni152_2mm.npz"


def build(mni_dir: Path, out: Path = ASSET, voxel_mm: float = 2.0) -> Path:
    arrays = {}
    for key, name in NAMES.items():
        path = mni_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: MNI152 2009a file not found (expected {name})")
        arrays[key] = np.asarray(nib.load(path).dataobj, dtype=np.float32) / 255.0
    gm, wm, t1 = arrays["gm"], arrays["wm"], arrays["t1"]
    tissue = gm + wm > 0.3
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, iterations=3))
    lo = np.argwhere(mask).min(0) - 2
    hi = np.argwhere(mask).max(0) + 3
    crop = tuple(slice(max(a, 0), b) for a, b in zip(lo, hi, strict=True))
    zoom = 1.0 / voxel_mm
    t1_small = ndimage.zoom(np.where(mask, t1, 0.0)[crop], zoom, order=1)
    probs = [ndimage.zoom(p[crop], zoom, order=1) for p in (mask.astype(np.float32), gm, wm)]
    mask_small, gm_small, wm_small = probs
    labels = np.zeros(t1_small.shape, np.uint8)
    inside = mask_small > 0.5
    labels[inside] = 1
    labels[inside & (gm_small > 0.5) & (gm_small >= wm_small)] = 2
    labels[inside & (wm_small > 0.5) & (wm_small > gm_small)] = 3
    t1_small = np.where(inside, t1_small, 0.0)
    t1_small = np.clip(t1_small / np.percentile(t1_small[inside], 99.5), 0.0, 1.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        image=np.round(t1_small * 255).astype(np.uint8),
        labels=labels,
        spacing=np.full(3, voxel_mm, np.float32),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mni-dir", type=Path, default=Path("../shared/data/mni152"))
    args = parser.parse_args()
    path = build(args.mni_dir)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

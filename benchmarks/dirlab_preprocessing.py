"""DIR-Lab preprocessing at the true sizes: every landmark in the network's grid, TRE unchanged.

For each of the ten cases this writes T00 and T50 volumes of the case's true shape in DIR-Lab's
raw format (header-less int16, z y x) into a temporary folder: a thorax-like phantom in HU whose
lungs hold the case's REAL landmarks (``generated_lung.thorax_hu``; the real images are not
available here). The real landmark files are copied beside them. Then the held-out (test) pair
of ``configs/dirlab.py`` goes through the project's own pipeline (``pipeline.build_dataset``:
loader, lung box from HU, resampling, crop) and the table shows, per case: the original size,
the network grid's spacing, shape and field of view, whether the lung box found in the images
lies in the grid, the landmarks inside the grid and real (``points_mask``), and the "before"
TRE (zero field) in the original mm through the preprocessing (``evaluation.original_mm_tre``)
beside the published value.

    python benchmarks/dirlab_preprocessing.py [--landmarks ../shared/data/dirlab] [--cases 1,6]

Exits non-zero when a case has fewer than all landmarks inside and real, or a before-TRE more
than 0.05 mm from the published one.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adreg_jax.data import dirlab, pipeline  # noqa: E402
from adreg_jax.data.generated_lung import thorax_hu  # noqa: E402


def _config():
    spec = importlib.util.spec_from_file_location("dirlab_config", ROOT / "configs" / "dirlab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _write_phantom_case(landmarks: Path, root: Path, case: int) -> None:
    """True-size phantom images of one case beside a copy of its real landmark files."""
    real = dirlab.load_dirlab_case(landmarks, case, images=False)
    shape, spacing = dirlab.case_shape(case), dirlab.case_spacing(case)
    images = {
        "T00": thorax_hu(shape, spacing, real.fixed_points, seed=case),
        "T50": thorax_hu(shape, spacing, real.moving_points, seed=100 + case),
    }
    folder = dirlab.write_case(root, case, images, real.fixed_points, real.moving_points)
    # the real files themselves, byte for byte, replace the ones write_case wrote
    for phase in ("T00", "T50"):
        for path in (folder / "ExtremePhases").glob(f"*_{phase}_xyz.txt"):
            path.unlink()
        source = dirlab.landmark_path(landmarks, case, phase)
        shutil.copy(source, folder / "ExtremePhases" / source.name)


def main() -> int:
    from adreg_jax.evaluation import original_mm_tre

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--landmarks", default=str(ROOT.parent / "shared" / "data" / "dirlab"))
    parser.add_argument("--cases", default=",".join(str(c) for c in dirlab.CASES))
    args = parser.parse_args()
    landmarks = Path(args.landmarks)
    if not landmarks.is_dir():
        print(f"error: landmark folder {landmarks} missing (the DIR-Lab layout)", file=sys.stderr)
        return 1
    cases = [int(c) for c in args.cases.split(",")]
    config = _config()
    data = config.data
    print(
        f"configs/dirlab.py: image_size {tuple(data.image_size)}, spacing_mm "
        f"{tuple(data.spacing_mm)}, crop_center {data.crop_center!r}, region_size "
        f"{tuple(config.model.region_size)}"
    )
    print(
        "| case | size x y z | spacing x y z (mm) | grid spacing z y x (mm) | grid shape z y x "
        "| grid FOV z y x (mm) | lungs in grid | landmarks inside & real | TRE before (mm) "
        "| published | diff | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures, befores = [], []
    for case in cases:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"dirlab{case}_") as tmp:
            _write_phantom_case(landmarks, Path(tmp), case)
            data.root, data.test_case = tmp, case
            source = pipeline.build_dataset(data, "test", seed=0)
            pair = source[0]
            # the box the pipeline centred its window on, found again from the written images
            lung_box = dirlab.find_lung_box(dirlab.load_dirlab_case(tmp, case), data.hu_offset)
        grid_map = dirlab.preprocess.GridMap(
            np.asarray(pair["grid_scale"], np.float64), np.asarray(pair["grid_shift"], np.float64)
        )
        lungs_inside = bool(
            dirlab.preprocess.inside_grid(
                grid_map.forward(lung_box.astype(np.float64)), pair["fixed"].shape[:3]
            ).all()
        )
        zero = np.zeros(pair["fixed"].shape[:3] + (3,), np.float32)
        before = original_mm_tre(pair, zero)["tre_mm_before"]
        published = dirlab.CASES[case][2]
        real = int(pair["points_mask"].sum())
        total = real + int(pair["points_outside"])
        size, spacing_xyz, _ = dirlab.CASES[case]
        grid_spacing = np.asarray(pair["spacing"], np.float64)
        fov = grid_spacing * np.asarray(pair["fixed"].shape[:3])
        befores.append(before)
        print(
            f"| {case} | {'x'.join(map(str, size))} | {' '.join(f'{s:.2f}' for s in spacing_xyz)} "
            f"| {' '.join(f'{s:.3f}' for s in grid_spacing)} "
            f"| {'x'.join(map(str, pair['fixed'].shape[:3]))} "
            f"| {' '.join(f'{v:.0f}' for v in fov)} | {'yes' if lungs_inside else 'NO'} "
            f"| {real}/{total} | {before:.3f} | {published:.2f} | {before - published:+.3f} "
            f"| {time.perf_counter() - start:.0f} |",
            flush=True,
        )
        if real != total or total != 300 or abs(before - published) > 0.05 or not lungs_inside:
            failures.append(case)
    published_mean = np.mean([dirlab.CASES[c][2] for c in cases])
    print(
        f"mean before over {len(cases)} cases: {np.mean(befores):.3f} "
        f"(published {published_mean:.2f})"
    )
    if failures:
        print(
            f"error: cases {failures} miss a target (300/300 real, |diff| <= 0.05, lungs in grid)"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

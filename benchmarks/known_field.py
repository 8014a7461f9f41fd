"""Does a network find a known field on real scans as it does on its training pairs?

    python benchmarks/known_field.py --model brain
    python benchmarks/known_field.py --checkpoint runs/brain --pairs 4   # a train.py run

Real pairs have no true field, so their Dice mixes two questions: is the network's field right,
and is the anatomy the same? This asks the first alone. Each scan of the real brain pairs (the
MNI152 template and the OASIS ``test_scan``, ``real_scans.prepare_brain``; 1 mm) is warped by a
random smooth field of the training generator (``synth.subject_ddf``, no affine part, ``FIELDS``):
control points 16-48 mm apart, largest velocity 20 mm (mean 3-4 mm in the brain, what a real pair
needs after its affine stage), and a finer one, 8-16 mm apart, largest velocity 12 mm (mean about
2 mm: the detail two anatomies also differ by); the network then registers the scan onto its
warped copy as ``adreg-register`` runs it (``deformable.network_field``: both resampled to the
network's grid, the field back to 1 mm). Beside them, the held-out synthesised pairs of the
network's own configuration (``data.*``, ``test`` split; for a packaged model, which keeps only
its grid, ``configs/brain.py``'s), on the network's grid.

Reported per image source, in the brain: the mean end-point error in mm before (zero field) and
after, and the cosine between the network's field and the true one (1: same direction
everywhere). With 3 pairs per source (2026-11-28): the first version of the brain model, trained
on bends of the whole brain (the generator's bug, fixed since: ``data.synth_scale_mm``), 0.83 on
its own, mostly affine, pairs and 0.43 / 0.36 on the real scans; the second, 0.56 on its own
and 0.68 / 0.65 on the real scans (8-16 mm: 0.38 / 0.38); the third, trained with finer maps
inside (``data.synth_detail_mm``), 0.55, 0.72 / 0.69 (8-16 mm: 0.42 / 0.41); the fourth (the
third fine-tuned on mixed contrasts), 0.58 on the first 3 test pairs of ``configs/brain.py``
(0.64 for the third), 0.66 / 0.66 (8-16 mm: 0.41 / 0.40).

Needs ``../shared/data`` (see its README; nothing here is packaged).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives beside adreg_jax/

from real_scans import DATA, prepare_brain, shared_data  # noqa: E402

from adreg_jax.data import build_dataset  # noqa: E402
from adreg_jax.data.generated import _resample  # noqa: E402
from adreg_jax.data.synth import subject_ddf  # noqa: E402
from adreg_jax.registration import deformable  # noqa: E402
from adreg_jax.registration.loading import load_volume  # noqa: E402
from adreg_jax.registration.pipeline import load_scan  # noqa: E402
from configs.brain import get_config as brain_config  # noqa: E402


def field_errors(true: np.ndarray, found: np.ndarray, inside: np.ndarray, spacing) -> tuple:
    """(mean |true|, mean |true - found|, cosine) over ``inside``, fields in voxels -> mm."""
    t, f = true[inside] * spacing, found[inside] * spacing
    cosine = float((t * f).sum() / max(np.sqrt((t * t).sum() * (f * f).sum()), 1e-12))
    return (
        float(np.linalg.norm(t, axis=1).mean()),
        float(np.linalg.norm(t - f, axis=1).mean()),
        cosine,
    )


# the known fields: (low, high) mm between control points, largest velocity mm. 16-48 mm: the
# shipped model's coarse maps (mean 3.3-3.5 mm in the brain); 8-16 mm: the finer detail a real
# pair also differs by (mean 1.7-1.9 mm), which the coarse maps alone did not teach
FIELDS = (((16.0, 48.0), 20.0), ((8.0, 16.0), 12.0))


def real_rows(pairs: dict, count: int, checkpoint, model, scales=(1.0,)) -> list[tuple[str, list]]:
    """Known-field pairs made from each real scan, registered by ``network_field`` (its passes
    on ``scales``, adreg-register's ``--network-scales``)."""
    rows = []
    for name, key in (("MNI152 template", "mni_to_scan"), ("OASIS test_scan", "scan_to_mni")):
        path, seg_path = str(pairs[key]["moving"]), str(pairs[key]["moving_seg"])
        _, affine, image, _ = load_scan(path, "scan")  # once per scan, for every field
        brain = load_volume(seg_path, "labels")[0] > 0  # canonical axes, as the scan
        spacing = nib.affines.voxel_sizes(affine).astype(np.float32)
        for scale_mm, max_mm in FIELDS:
            results = []
            for seed in range(count):
                rng = np.random.default_rng(seed)
                true = subject_ddf(rng, image.shape, spacing, max_mm, (0, 0, 0), scale_mm)
                fixed = _resample(image, true, order=1)
                found = deformable.network_field(
                    checkpoint,
                    jnp.asarray(fixed)[None, ..., None],
                    jnp.asarray(image)[None, ..., None],
                    model=model,
                    spacing=spacing,
                    scales=scales,
                ).ddf
                inside = _resample(brain.astype(np.float32), true, order=0) > 0
                results.append(field_errors(true, np.asarray(found)[0], inside, spacing))
            scale = f"{scale_mm[0]:g}-{scale_mm[1]:g} mm"
            rows.append((f"{name}, 1 mm, warped by a field of {scale}", results))
    return rows


def synthesised_rows(count: int, checkpoint, model) -> list[tuple[str, list]]:
    """The network's own held-out synthesised pairs, on its grid."""
    config, apply, variables = deformable.restored_network(checkpoint, model)
    if config.data.dataset != "synth_brain":
        return []
    data = config.data
    if "train_size" not in data:  # a packaged model keeps its grid only: configs/brain.py's data
        data = brain_config().data
        data.image_size = tuple(config.data.image_size)
    source = build_dataset(data, "test", 0)
    results = []
    for index in range(min(count, len(source))):
        pair = source[index]
        found = apply(
            variables, jnp.asarray(pair["fixed"])[None], jnp.asarray(pair["moving"])[None]
        )
        inside = pair["fixed_seg"] > 0
        found = np.asarray(found["ddf"])[0]
        results.append(field_errors(pair["true_ddf"], found, inside, pair["spacing"]))
    return [(f"synthesised test pairs ({data.dataset}, {data.image_size})", results)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a packaged model's name (adreg-register --model)")
    which.add_argument("--checkpoint", help="a train.py run directory (its best checkpoint)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs per source")
    parser.add_argument(
        "--network-scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="the network's passes on the real scans' pairs (adreg-register --network-scales; "
        "the synthesised pairs: one pass on its grid)",
    )
    parser.add_argument("--data", default=str(DATA))
    args = parser.parse_args(argv)
    data = shared_data(args.data)
    if data is None:
        return 1
    with tempfile.TemporaryDirectory(prefix="known_field_") as work:
        pairs = prepare_brain(data, Path(work))
        rows = synthesised_rows(args.pairs, args.checkpoint, args.model)
        rows += real_rows(pairs, args.pairs, args.checkpoint, args.model, args.network_scales)
    scales = " ".join(f"{s:g}" for s in args.network_scales)
    print(
        f"network: {args.model or args.checkpoint}, scales {scales}; {args.pairs} pairs per source"
    )
    print("| pairs | true field mm | end-point error mm | cosine with the true field |")
    print("|---|---|---|---|")
    for name, results in rows:
        mean = np.mean(results, axis=0)
        low, high = np.min(results, axis=0)[2], np.max(results, axis=0)[2]
        print(f"| {name} | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} ({low:.2f}-{high:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

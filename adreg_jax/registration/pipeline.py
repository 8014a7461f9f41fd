"""One registration from files to outputs: the stages of adreg-register run in order for one pair
(the single-pair command and every pair of a cohort call ``register_pair``).

Where this sits: ``loading`` -> ``affine`` (optional) -> network (optional) -> ``deformable`` ->
**pipeline** builds the ``Transform`` (composed fields in world mm, the inverse with
``--inverse``) -> ``transform_io`` files, warped images, ``metrics`` -> ``--out``.

Outputs in the pair's folder: ``warped.nii.gz`` (the moving scan in its own intensities on the
fixed grid, one interpolation from its own grid), the transform (``transform.json``,
``ddf.nii.gz``, ``ddf_itk.nii.gz``, with ``--inverse`` also ``ddf_inverse*.nii.gz``),
``jacobian.nii.gz`` (det J of the voxel map), ``warped_seg.nii.gz`` with a moving segmentation,
``overview.png``, and ``metrics.json``, written last (a cohort counts a pair with it as done).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax.data.nifti import save_nifti
from adreg_jax.data.points import read_point_file
from adreg_jax.registration import programs
from adreg_jax.registration.affine import affine_then, affine_warp, optimise_affine
from adreg_jax.registration.deformable import (
    NetworkField,
    default_smooth_weight,
    network_field,
    optimise_velocity,
    resize_image,
    velocity_to_ddf,
)
from adreg_jax.registration.levels import (
    DEFAULT_MOTION_MM,
    default_steps,
    deformable_levels,
    level_shape,
    level_voxels,
    parse_levels,
)
from adreg_jax.registration.loading import (
    check_points_inside,
    detect_and_normalise,
    load_mask,
    load_segmentations,
    load_volume,
    moving_points_on_fixed_grid,
    normalise,
    resample_to_grid,
    spacing_of,
)
from adreg_jax.registration.metrics import (
    dice_report,
    image_metrics,
    network_objective_gain,
    tre_after_before,
    warp_and_jacobian,
)
from adreg_jax.registration.similarity import similarity_fn
from adreg_jax.registration.transform import (
    Grid,
    Transform,
    affine_voxel_matrix,
    inverse_consistency,
    inverse_transform_field,
)
from adreg_jax.registration.transform_io import ddf_voxels_to_world_mm, save_transform

# (raw array, affine, normalised array, detected modality) of a scan; a cohort passes a caching
# loader so that an atlas shared by many pairs is read once.
Loaded = tuple[np.ndarray, np.ndarray, np.ndarray, str]


def load_scan(path: str, name: str) -> Loaded:
    """(array in its own intensities, affine, array normalised to [0, 1] as its detected
    modality, that modality) of a 3-D scan."""
    raw, affine = load_volume(path, name)
    normalised, modality = detect_and_normalise(raw, path)
    return raw, affine, normalised, modality


def _steps(args: argparse.Namespace, voxels: list[int], modality: str = "mr") -> list[int]:
    """Adam steps per deformable level (``voxels``: the voxel count of each level's grid):
    ``--instance-steps`` (one number for all, or one per level) or ``levels.default_steps`` (for
    the fixed scan's ``modality``)."""
    levels = len(voxels)
    if args.instance_steps is None:
        return list(default_steps(voxels, modality))
    if len(args.instance_steps) not in (1, levels):
        raise ValueError(
            f"--instance-steps {args.instance_steps}: give one number, or one per level of the "
            f"{levels} levels{' of --levels' if args.levels else ' chosen for this scan'}"
        )
    return list(args.instance_steps) * (levels // len(args.instance_steps))


def check_options(args: argparse.Namespace) -> None:
    """Reject option combinations that cannot work, before any scan is read."""
    similarity_fn(args.similarity)
    steps = args.instance_steps or [1]
    model = getattr(args, "model", None)
    if model and args.checkpoint:
        raise ValueError(
            f"--model {model} and --checkpoint {args.checkpoint}: give one network, not both"
        )
    if model:
        from adreg_jax.pretrained import weights_path  # Flax: only with a network

        weights_path(model)  # an unknown name fails here, before any scan is read
    network = bool(args.checkpoint or model)
    scales = getattr(args, "network_scales", None)
    if scales is not None and not network:
        raise ValueError(f"--network-scales {' '.join(map(str, scales))} needs a network: give "
                         "--model or --checkpoint")  # fmt: skip
    if scales is not None and (not scales or min(scales) <= 0):
        raise ValueError(f"--network-scales {' '.join(map(str, scales))}: give numbers > 0")
    if max(steps) <= 0 and not network and not args.affine:
        raise ValueError(
            "nothing to do: give --checkpoint or --model, --affine and/or --instance-steps > 0"
        )
    if args.levels:
        parse_levels(args.levels)  # a malformed factor fails here, before any scan is read
    if args.levels and len(steps) not in (1, len(args.levels)):
        raise ValueError(
            f"--instance-steps {args.instance_steps}: give one number, or one per level of "
            f"--levels {' '.join(map(str, args.levels))}"
        )
    if args.inverse and max(steps) > 0 and args.integration_steps <= 0:
        raise ValueError(
            "--inverse needs a diffeomorphic field: --integration-steps > 0 (with 0 the "
            "displacement itself is optimised and has no exact inverse)"
        )
    if args.inverse and network and max(steps) <= 0:
        raise ValueError(
            "--inverse needs a stationary velocity: the network's field alone has no exact "
            "inverse; add instance optimisation (--instance-steps > 0)"
        )


def _on_device(volume: np.ndarray) -> jnp.ndarray:
    """(D, H, W) -> (1, D, H, W, 1) float32 on the device, reshaped on the host (indexing a device
    array is a compiled program of its own); by ``jax.device_put`` (on a CPU it shares the host's
    memory), not ``jnp.asarray``, which runs a copying program (one more to fetch per shape)."""
    return jax.device_put(np.ascontiguousarray(volume, np.float32)[None, ..., None])


@programs.jit
def _field_outputs(ddf, linear):
    """The final field (1, D, H, W, 3) as the outputs need it: in world mm (D, H, W, 3) for the
    transform's warps; the same transposed (3, W, H, D), whose bytes are NIfTI's (Fortran) order
    of the field, for its files (nibabel then copies it out as it is, where a C-ordered field
    cost a transposing copy per file: 0.5 s of 0.9 s per 1 mm brain field, on one core); the
    voxel field's centre planes across each axis, all that overview.png draws of it."""
    field = ddf[0]
    planes = tuple(jnp.take(field, n // 2, axis=axis) for axis, n in enumerate(field.shape[:3]))
    field_mm = ddf_voxels_to_world_mm(field, linear)
    return field_mm, field_mm.transpose(3, 2, 1, 0), planes


def _prefetch_figures() -> None:
    """Import matplotlib (for overview.png, 0.3-0.5 s) in a background thread while the
    registration runs: the import mostly waits on files and the registration mostly on XLA, and
    the PNG's own import then finds it done (or waits on the import lock for the rest)."""

    def run() -> None:
        try:
            importlib.import_module("adreg_jax.figures")
        except Exception:  # the PNG's own import reports it
            pass

    if "adreg_jax.figures" not in sys.modules:
        threading.Thread(target=run, name="import-figures", daemon=True).start()


def _write_json(path: Path, record: dict) -> None:
    """Written under a temporary name and renamed: a killed run leaves no half-written file."""
    temporary = path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, path)


def _checked_network_field(field: NetworkField, args: argparse.Namespace, masks):
    """(the network's field or None, metrics) when the network's field is the result
    (``--instance-steps 0``): it is kept only when it raises the similarity that the command
    optimises over the image after the affine stage alone, measured on the network's grid on the
    images it saw (``--keep-network``: kept regardless). A network can lower it on scans unlike
    those it was trained on: the brain model on a thick-slice T1 / T2-like pair lowered MI (the
    finest level's 1.251 -> 1.171) and Dice (0.843 -> 0.816), while on the 1 mm T1 pairs it
    raised NCC with the Dice (benchmarks/real_scans.py, 2026-11-28). Instance optimisation, when
    it follows, starts from the network's field whatever it does to the similarity (from it, it
    ended higher on that pair: MI 1.366 against 1.330 from zero)."""
    if masks is not None:
        masks = tuple(resize_image(m, field.fixed.shape[1:4]) for m in masks)
    gain = float(
        network_objective_gain(field.fixed, field.moving, field.grid_ddf, args.similarity, masks)
    )
    kept = gain > 0 or bool(getattr(args, "keep_network", False))
    if not kept and not args.quiet:
        print(
            f"the network's field lowered the {args.similarity} similarity by {-gain:.4f}: "
            "dropped (the result is the affine stage's, or none); --keep-network keeps it",
            file=sys.stderr,
        )
    return (field.ddf if kept else None), {"network_kept": kept, "network_objective_gain": gain}


def register_pair(
    pair: dict[str, str],
    args: argparse.Namespace,
    out: Path,
    load: Callable[[str, str], Loaded] = load_scan,
    extra: dict | None = None,
) -> dict:
    """Register ``pair`` (keys "fixed", "moving", optional "fixed_seg", "moving_seg",
    "fixed_points", "moving_points": file paths) with the options of ``args`` (adreg-register's
    flags); write the outputs into ``out``; return the metrics (with ``extra`` added)."""
    started = time.perf_counter()
    check_options(args)
    if not args.no_png:
        _prefetch_figures()
    fixed_raw, fixed_affine, fixed, fixed_modality = load(pair["fixed"], "--fixed")
    moving_raw, moving_affine, moving_norm, moving_modality = load(pair["moving"], "--moving")
    modality = {"fixed": fixed_modality, "moving": moving_modality}
    if args.modality != "auto":  # as told, not as detected
        modality = {"fixed": args.modality, "moving": args.modality}
        fixed = normalise(fixed_raw, pair["fixed"], args.modality)
        moving_norm = normalise(moving_raw, pair["moving"], args.modality)
    shape = fixed_raw.shape
    moving = resample_to_grid(moving_norm, moving_affine, shape, fixed_affine, order=1)
    fixed_info, moving_info = (fixed_raw.shape, fixed_affine), (moving_raw.shape, moving_affine)
    segs = load_segmentations(pair, fixed_info, moving_info, shape, fixed_affine)
    masks = None
    if pair.get("fixed_mask") or pair.get("moving_mask"):
        # a missing mask is all inside: the other one alone restricts the similarity
        fixed_mask = np.ones(shape, np.float32)
        moving_mask = np.ones(shape, np.float32)
        if pair.get("fixed_mask"):
            fixed_mask = load_mask(pair["fixed_mask"], "--fixed-mask", shape, fixed_affine)
        if pair.get("moving_mask"):
            native = load_mask(pair["moving_mask"], "--moving-mask", *moving_info)
            moving_mask = resample_to_grid(native, moving_affine, shape, fixed_affine, order=1)
        masks = tuple(_on_device(m) for m in (fixed_mask, moving_mask))
    points = None
    if bool(pair.get("fixed_points")) != bool(pair.get("moving_points")):
        raise ValueError("give both --fixed-points and --moving-points, or neither")
    if pair.get("fixed_points"):
        fixed_file = read_point_file(pair["fixed_points"])
        fixed_points = fixed_file.to_voxels(fixed_affine, pair["fixed"])
        check_points_inside(fixed_points, shape, fixed_file, "--fixed-points")
        moving_file = read_point_file(pair["moving_points"])
        moving_native = moving_file.to_voxels(moving_affine, pair["moving"])
        check_points_inside(moving_native, moving_raw.shape, moving_file, "--moving-points")
        moving_points = moving_points_on_fixed_grid(moving_native, moving_affine, fixed_affine)
        if fixed_points.shape != moving_points.shape:
            raise ValueError(
                f"--fixed-points {pair['fixed_points']} has {len(fixed_points)} points but "
                f"--moving-points {pair['moving_points']} has {len(moving_points)}; expected pairs"
            )
        points = (np.asarray(fixed_points, np.float32), np.asarray(moving_points, np.float32))
    spacing = spacing_of(fixed_affine)
    motion_mm = args.motion_mm or DEFAULT_MOTION_MM[modality["fixed"]]
    if args.levels:
        levels = parse_levels(args.levels)
    else:
        levels = deformable_levels(
            shape, spacing, motion_mm, finest_mm=float(np.min(spacing_of(moving_affine)))
        )
    steps = _steps(args, level_voxels(shape, levels), modality["fixed"])

    fixed_j, moving_j = _on_device(fixed), _on_device(moving)
    loaded = time.perf_counter()
    progress = not args.quiet
    matrix, affine_voxel, velocity = None, None, None
    source = moving_j  # the moving image the deformable stage sees
    if args.affine:
        matrix, translation = optimise_affine(
            fixed_j, moving_j, args.similarity, args.affine_steps, progress=progress,
            spacing=spacing, masks=masks,
        )  # fmt: skip
        source = jax.block_until_ready(affine_warp(matrix, translation, moving_j))
        if masks is not None:  # the moving mask goes with the moving image
            masks = (masks[0], affine_warp(matrix, translation, masks[1]))
        affine_voxel = affine_voxel_matrix(np.asarray(matrix), np.asarray(translation), shape)
    stages = {"affine": time.perf_counter() - loaded}
    model = getattr(args, "model", None)
    initial = None
    checked = {}
    if args.checkpoint or model:
        field = network_field(
            args.checkpoint, fixed_j, source, model=model, spacing=spacing,
            scales=getattr(args, "network_scales", None) or (1.0,),
        )  # fmt: skip
        initial = field.ddf
        if max(steps) <= 0:  # the network's field is the result: kept if it raises the similarity
            initial, checked = _checked_network_field(field, args, masks)
    initial = jax.block_until_ready(initial)
    stages["network"] = time.perf_counter() - loaded - stages["affine"]
    if max(steps) > 0:
        velocity = optimise_velocity(
            fixed_j,
            source,
            steps,
            initial=initial,
            factors=levels,
            spacing=spacing,
            masks=masks,
            similarity=args.similarity,
            learning_rate=args.learning_rate,
            smooth_weight=(
                default_smooth_weight(modality["fixed"], args.similarity)
                if args.smooth_weight is None
                else args.smooth_weight
            ),
            grid_factor=args.grid_factor,
            integration_steps=args.integration_steps,
            progress=progress,
        )
        ddf = velocity_to_ddf(velocity, args.integration_steps, tuple(shape))
    elif initial is not None:
        ddf = initial
    else:
        ddf = jnp.zeros((1, *shape, 3), jnp.float32)
    if matrix is not None:
        ddf = affine_then(matrix, translation, ddf)  # affine first, then the deformable field
    ddf = jax.block_until_ready(ddf)
    registered = time.perf_counter()
    stages["deformable"] = registered - loaded - stages["affine"] - stages["network"]

    fixed_grid, moving_grid = Grid(shape, fixed_affine), Grid(moving_raw.shape, moving_affine)
    linear = np.asarray(fixed_affine[:3, :3], np.float32)
    ddf_mm, ddf_mm_fortran, ddf_planes = _field_outputs(ddf, linear)
    transform = Transform(
        fixed_grid,
        moving_grid,
        np.asarray(ddf_mm_fortran).T,  # (D, H, W, 3), Fortran-ordered
        affine_world=(
            None
            if affine_voxel is None
            else fixed_affine @ affine_voxel @ np.linalg.inv(fixed_affine)
        ),
    ).with_device_field(ddf_mm)
    metrics = {
        "similarity": args.similarity,
        "modality": modality,
        "levels": [list(factors) for factors in levels],
        "instance_steps": steps,
        **checked,
        **(extra or {}),
    }
    if args.inverse:
        inverse = inverse_transform_field(transform, velocity, args.integration_steps, affine_voxel)
        transform = Transform(
            transform.fixed, transform.moving, transform.ddf_mm, inverse, transform.affine_world
        ).with_device_field(ddf_mm)
        metrics.update(inverse_consistency(transform))
        stages["inverse"] = time.perf_counter() - registered

    # XLA runs programs in the order they are dispatched: first what the files and the PNG need
    # (warped image, det J, the warps in the scan's own intensities), then the NCC metrics, which
    # XLA computes while this thread draws the PNG and writer threads compress the files (ISA-L
    # releases the GIL); metrics.json is written last, once everything is on disk.
    warped_norm, jacobian, folding = warp_and_jacobian(ddf, moving_j)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sources = {"fixed": str(pair["fixed"]), "moving": str(pair["moving"])}
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="adreg-write") as writer:
        pending = [writer.submit(save_transform, out, transform, sources)]
        warped = transform.warp(moving_raw, moving_affine, order=1, name=pair["moving"])
        pending.append(writer.submit(save_nifti, out / "warped.nii.gz", warped, fixed_affine))
        jacobian = np.asarray(jacobian)
        pending.append(writer.submit(save_nifti, out / "jacobian.nii.gz", jacobian, fixed_affine))
        if "moving" in segs:
            # From the moving segmentation's own grid through the transform, as adreg-apply
            # --labels.
            warped_seg = transform.warp(
                segs["moving_native"], moving_affine, order=0, name=pair["moving_seg"]
            )
            pending.append(
                writer.submit(save_nifti, out / "warped_seg.nii.gz", warped_seg, fixed_affine)
            )
            if "fixed" in segs:  # before the metrics' program: XLA would take both cores
                metrics.update(dice_report(segs["fixed"], segs["moving"], warped_seg))
        if points is not None:
            fixed_points, moving_points = points
            after, before = tre_after_before(
                fixed_points, moving_points, ddf, np.asarray(spacing, np.float32)
            )
            metrics["tre_mm"], metrics["tre_mm_before"] = float(after), float(before)
        # with or without instance optimisation: one grid, so that objectives compare (the full
        # grid's MI, a 1 mm brain's 7 M voxels spread over 32 bins each, took 4-5 s)
        finest = tuple(level_shape(shape, levels[-1]))
        measures = image_metrics(moving_j, warped_norm, fixed_j, args.similarity, finest)
        if matrix is not None:
            # on the host: a jax operation here would queue behind the metrics' program
            metrics["affine_matrix"] = (np.asarray(matrix) + np.eye(3)).round(5).tolist()
            metrics["affine_translation_vox"] = (
                (np.asarray(translation) * np.asarray(shape) / 2.0).round(3).tolist()
            )
            metrics["affine_world"] = np.asarray(transform.affine_world).round(6).tolist()
        drawn = time.perf_counter()
        if not args.no_png:
            from adreg_jax.figures import overview_figure

            overview_figure(
                out / "overview.png",
                fixed,
                moving,
                np.asarray(warped_norm)[0, ..., 0],
                None,
                spacing=spacing,
                title=f"{Path(pair['moving']).name} -> {Path(pair['fixed']).name}",
                jacobian=jacobian,
                ddf_planes=[np.asarray(plane) for plane in ddf_planes],
            )
        drawn = time.perf_counter() - drawn
        measures["folding_percent"] = folding
        metrics.update({key: float(value) for key, value in measures.items()})
        for job in pending:
            job.result()  # a failed write raises here
    # time_s: the whole command but drawing the PNG; time_register_s: arrays in memory to the
    # final field (affine, network, instance optimisation, JIT compilation included): what a
    # registration library's own call costs, the figure to set beside ANTs' ants.registration
    # time.
    metrics["time_s"] = time.perf_counter() - started - drawn
    metrics["time_load_s"] = loaded - started
    metrics["time_register_s"] = registered - loaded
    metrics.update({f"time_{name}_s": value for name, value in stages.items()})
    _write_json(out / "metrics.json", metrics)
    return metrics

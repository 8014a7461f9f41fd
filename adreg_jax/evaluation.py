"""Evaluation of a trained run on its test split: per-case metrics, JSON, CSV and a markdown table.

Where this sits: ``eval.py`` calls ``evaluate_run(config, workdir)`` after training. The model and
the best checkpoint come from ``training.restore_for_inference``; the test pairs from
``data.build_dataset(config.data, "test", seed)``; every metric from ``adreg_jax.ops`` with the
conventions of DESIGN.md (Dice over the data set's labels, absent labels left out of means; TRE
in mm; Jacobian determinant with numpy.gradient derivatives).

Writes into ``WORKDIR/eval/``: ``metrics.json`` (means, stds and per-case values),
``per_case.csv``, ``table.md`` (one row per case, "before" columns beside the registered ones, a
mean (std) row; for IXI also the Dice of TransMorph's 17 left/right-merged structures,
``structures.md``; for DIR-Lab ``dirlab_table.md``, see ``dirlab_table``) and per-case figures in
``figures/`` (``figures.py``): the overview (slices, differences, det J with folds, deformed grid,
and the test-time-augmentation spread) and the attention diagnostics (BCAM alpha per level, RAA
region weights, multi-resolution blend maps).

Landmarks: every case with landmarks reports how many entered its TRE (``landmarks``) and how
many the preprocessing put outside the network's grid (``landmarks_outside``, not real, left out
of the TRE). DIR-Lab's TRE is in the original images' mm (``original_mm_tre``).

Uncertainty (the TTA spread): the pair is registered four times, as given and mirrored along each
spatial axis (both images flipped, the predicted DDF flipped back with the mirrored component
negated, so all four fields live on the original grid). The maps are the voxel-wise standard
deviation over the four passes of the warped image (intensity units) and of the displacement
(the norm of the per-component standard deviations, in voxels). Mirroring is an exact symmetry
of the registration problem but not of a trained network, so the spread shows where the
prediction is not determined by the images alone.

``compare_runs`` puts other runs (ablations, the U-Net baseline) beside this one: a table of mean
(std) per metric per run and the paired Wilcoxon signed-rank p-value (scipy) of each against the
first, over the same test cases.
"""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.data import build_dataset, dataset_labels
from adreg_jax.data.dirlab import CASES as DIRLAB_CASES
from adreg_jax.data.dirlab import tre_mm
from adreg_jax.data.labels import IXI_GROUPS, IXI_VOI
from adreg_jax.data.preprocess import GridMap
from adreg_jax.losses import mean_tre, tre_errors
from adreg_jax.training import restore_for_inference


def case_metrics(
    apply_fn, variables, pair: dict[str, np.ndarray], labels, outputs=None
) -> dict[str, float]:
    """All metrics of one registered pair (unbatched pair dict from the data pipeline);
    ``apply_fn`` is the (jitted) ``model.apply``; ``outputs`` its result when already computed."""
    batch = {k: jnp.asarray(v)[None] for k, v in pair.items()}
    if outputs is None:
        outputs = apply_fn(variables, batch["fixed"], batch["moving"])
    ddf = outputs["ddf"]
    row = dict(_image_metrics(batch["fixed"], batch["moving"], outputs["warped"], ddf))
    if labels and "fixed_seg" in batch:
        before, after = _label_dice(batch["moving_seg"], batch["fixed_seg"], ddf, tuple(labels))
        row["dice_before"] = jnp.nanmean(before)
        row["dice"] = jnp.nanmean(after)
        for label, value in zip(labels, np.asarray(after), strict=True):
            row[f"dice_label{label}"] = value
        groups = structure_dice(dict(zip(labels, np.asarray(after), strict=True)))
        if groups:
            row["dice_17"] = np.nanmean(list(groups.values()))
            row.update({f"dice_{name}": value for name, value in groups.items()})
    if "fixed_points" in batch:
        points = {k: batch[k] for k in _POINT_KEYS if k in batch}
        row["landmarks"] = jnp.sum(tre_errors(points, ddf)[1])
        if "points_outside" in pair:
            row["landmarks_outside"] = pair["points_outside"]
        if "case" in pair:
            row["dirlab_case"] = pair["case"]
        if "grid_scale" in pair:
            row.update(original_mm_tre(pair, ddf[0]))
        else:
            row.update(_point_metrics(points, ddf))
    return {key: float(np.asarray(value).reshape(-1)[0]) for key, value in row.items()}


# The array work of ``case_metrics`` as compiled programs: run op by op, a case's ~100 small
# operations each compiled on first use (2-5 s per new image size) and dispatched one by one.
_POINT_KEYS = ("fixed_points", "moving_points", "points_mask", "spacing")


@jax.jit
def _image_metrics(fixed, moving, warped, ddf) -> dict[str, jnp.ndarray]:
    stats = ops.jacobian_stats(ddf)
    return {
        "ncc_before": ops.ncc_local(moving, fixed),
        "ncc": ops.ncc_local(warped, fixed),
        "mse_before": ops.mse(moving, fixed),
        "mse": ops.mse(warped, fixed),
        "ssim_before": ops.ssim(moving, fixed),
        "ssim": ops.ssim(warped, fixed),
        "negative_jacobian_percent": stats["percent_nonpositive"],
        "jacobian_mean": stats["mean"],
        "jacobian_std": stats["std"],
        "jacobian_min": stats["min"],
    }


@functools.partial(jax.jit, static_argnums=3)
def _label_dice(moving_seg, fixed_seg, ddf, labels: tuple[int, ...]):
    """Per-label Dice (len(labels),) before and after warping the moving labels by ``ddf``."""
    warped_seg = ops.warp(moving_seg[..., None], ddf, order=0)[..., 0]
    return ops.dice(moving_seg, fixed_seg, labels)[0], ops.dice(warped_seg, fixed_seg, labels)[0]


@jax.jit
def _point_metrics(points: dict[str, jnp.ndarray], ddf) -> dict[str, jnp.ndarray]:
    """Mean and std of the TRE (mm) over the real landmarks, before (zero field) and after."""
    row = {}
    for key, field in (("tre_mm_before", jnp.zeros_like(ddf)), ("tre_mm", ddf)):
        row[key] = mean_tre(points, field)
        row[f"{key}_std"] = _landmark_std(points, field)
    return row


def original_mm_tre(pair: dict[str, np.ndarray], ddf: jnp.ndarray) -> dict[str, float]:
    """DIR-Lab TRE in the original images' mm, mean and std over the real landmarks.

    The fixed landmarks p (network grid) go to p + ddf(p) (``ops.sample_ddf_at_points``); those
    points and the moving landmarks are mapped back through the preprocessing exactly (the
    pair's ``grid_scale`` / ``grid_shift``, a ``preprocess.GridMap``) onto the raw voxel grid,
    where the distance is taken in the raw spacing (``dirlab.tre_mm``). ddf: (D, H, W, 3).
    Because the GridMap is a per-axis scale and shift, this equals ``ops.tre`` on the network
    grid with the network spacing (raw spacing / scale); the mapping makes it evident.
    """
    grid_map = GridMap(
        np.asarray(pair["grid_scale"], np.float64), np.asarray(pair["grid_shift"], np.float64)
    )
    fixed = np.asarray(pair["fixed_points"], np.float64)
    moving = np.asarray(pair["moving_points"], np.float64)
    mask = np.asarray(pair["points_mask"], bool)
    shift = np.asarray(ops.sample_ddf_at_points(ddf, jnp.asarray(fixed, jnp.float32)), np.float64)
    spacing = np.asarray(pair["original_spacing"], np.float64)
    row = {}
    for key, mapped in (("tre_mm_before", fixed), ("tre_mm", fixed + shift)):
        errors = tre_mm(mapped, moving, grid_map, spacing)[mask]
        row[key] = float(errors.mean()) if errors.size else float("nan")
        row[f"{key}_std"] = float(errors.std()) if errors.size else float("nan")
    return row


def _landmark_std(batch, ddf) -> jnp.ndarray:
    """Standard deviation of the TRE (mm) over the real landmarks of a one-pair batch: the
    "(std)" of the per-case "mean (std)" that DIR-Lab tables print."""
    errors, mask = tre_errors(batch, ddf)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(errors * mask) / count
    return jnp.sqrt(jnp.sum(mask * jnp.square(errors - mean)) / count)


def structure_dice(per_label: dict[int, float]) -> dict[str, float]:
    """TransMorph's 17-structure Dice: each IXI structure the mean of its left and right labels'
    Dice (those present); empty unless the labels are IXI's."""
    if not set(IXI_VOI) <= set(per_label):
        return {}
    groups = {}
    for name, members in IXI_GROUPS.items():
        values = [per_label[m] for m in members if np.isfinite(per_label[m])]
        groups[name] = float(np.mean(values)) if values else float("nan")
    return groups


def tta_spread(apply_fn, variables, fixed, moving) -> dict[str, np.ndarray]:
    """Voxel-wise spread of the registration under mirroring (see the module docstring).

    fixed, moving: (1, D, H, W, 1). Returns ``warped_std`` (D, H, W) and ``ddf_std`` (D, H, W,
    voxels)."""
    fixed, moving = np.asarray(fixed), np.asarray(moving)
    ddfs = [apply_fn(variables, fixed, moving)["ddf"]]
    for axis in _MIRROR_AXES:  # the inputs mirrored on the host: nothing to compile
        mirrored = (np.flip(fixed, axis).copy(), np.flip(moving, axis).copy())
        ddfs.append(apply_fn(variables, *mirrored)["ddf"])
    return jax.tree.map(np.asarray, _mirror_spread(jnp.asarray(moving), tuple(ddfs)))


_MIRROR_AXES = (1, 2, 3)


@jax.jit
def _mirror_spread(moving, ddfs) -> dict[str, jnp.ndarray]:
    """The spread of ``tta_spread`` from its four predicted fields (as given, then mirrored along
    ``_MIRROR_AXES``): the mirrored ones flipped back, their mirrored component negated."""
    fields = [ddfs[0]]
    for axis, ddf in zip(_MIRROR_AXES, ddfs[1:], strict=True):
        fields.append(jnp.flip(ddf, axis).at[..., axis - 1].multiply(-1.0))
    warped = jnp.stack([ops.warp(moving, field)[0, ..., 0] for field in fields])
    fields = jnp.stack([field[0] for field in fields])
    return {
        "warped_std": jnp.std(warped, axis=0),
        "ddf_std": jnp.sqrt(jnp.sum(jnp.var(fields, axis=0), axis=-1)),
    }


def _region_grid(config, shape) -> tuple[int, int, int]:
    """The (gd, gh, gw) grid of RAA regions over the deepest features of an input of ``shape``."""
    stride = 2 ** (len(config.model.channels) - 1)
    deep = [-(-n // stride) for n in shape]
    region = [min(r, n) for r, n in zip(config.model.region_size, deep, strict=True)]
    return tuple(-(-n // r) for n, r in zip(deep, region, strict=True))


def case_figures(apply_fn, variables, config, pair, outputs, out: Path, name: str) -> list[Path]:
    """The overview and attention figures of one case into ``out``."""
    from adreg_jax.figures import attention_figure, overview_figure

    fixed, moving = jnp.asarray(pair["fixed"])[None], jnp.asarray(pair["moving"])[None]
    spacing = np.asarray(pair.get("spacing", (1.0, 1.0, 1.0)), np.float64).reshape(-1)[:3]
    spread = tta_spread(apply_fn, variables, fixed, moving)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        overview_figure(
            out / f"{name}_overview.png",
            pair["fixed"][..., 0],
            pair["moving"][..., 0],
            np.asarray(outputs["warped"][0, ..., 0]),
            np.asarray(outputs["ddf"][0]),
            spacing=spacing,
            extra={"TTA std warped": spread["warped_std"], "TTA std ddf (vox)": spread["ddf_std"]},
            title=name,
        )
    ]
    region = outputs.get("region_weights")
    if region is not None:
        grid = _region_grid(config, pair["fixed"].shape[:3])
        region = np.asarray(region[0]).reshape(grid) * float(np.prod(grid))
    paths.append(
        attention_figure(
            out / f"{name}_attention.png",
            pair["fixed"][..., 0],
            {k: float(v) for k, v in outputs.get("alphas", {}).items()},
            region,
            [np.asarray(w[0, ..., 0]) for w in outputs.get("blend_weights", [])],
            spacing=spacing,
        )
    )
    return paths


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for row in rows for k in row})
    summary = {}
    for key in keys:
        values = np.asarray([row[key] for row in rows if key in row], np.float64)
        summary[key] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}
    return summary


_TABLE_COLUMNS = (
    ("landmarks in TRE", "landmarks"),
    ("landmarks outside grid", "landmarks_outside"),
    ("Dice before", "dice_before"),
    ("Dice", "dice"),
    ("Dice 17 structures", "dice_17"),
    ("TRE before (mm)", "tre_mm_before"),
    ("TRE (mm)", "tre_mm"),
    ("NCC before", "ncc_before"),
    ("NCC", "ncc"),
    ("MSE", "mse"),
    ("SSIM", "ssim"),
    ("% det J <= 0", "negative_jacobian_percent"),
    ("det J mean", "jacobian_mean"),
    ("det J std", "jacobian_std"),
    ("det J min", "jacobian_min"),
)


def _cell(row: dict[str, float], key: str) -> str:
    """A per-case value; "mean (std)" where the case has a spread of its own (TRE over
    landmarks)."""
    if key not in row:
        return ""
    if f"{key}_std" in row:
        return f"{row[key]:.2f} ({row[f'{key}_std']:.2f})"
    if key in _COUNT_KEYS:
        return f"{row[key]:.0f}"
    return f"{row[key]:.4f}"


_COUNT_KEYS = ("landmarks", "landmarks_outside")


def markdown_table(rows: list[dict[str, float]], summary: dict[str, dict[str, float]]) -> str:
    columns = [(title, key) for title, key in _TABLE_COLUMNS if key in summary]
    lines = [
        "| case | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for index, row in enumerate(rows):
        cells = [_cell(row, key) for _, key in columns]
        name = f"DIR-Lab {row['dirlab_case']:.0f}" if "dirlab_case" in row else str(index)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [
        f"{sum(row.get(key, 0.0) for row in rows):.0f} in all"
        if key in _COUNT_KEYS
        else f"{summary[key]['mean']:.4f} ({summary[key]['std']:.4f})"
        for _, key in columns
    ]
    lines.append("| mean (std) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def dirlab_table(results: Sequence[dict[str, Any]]) -> str:
    """DIR-Lab TRE like the paper's Table I from leave-one-case-out runs.

    ``results``: ``evaluate_run`` results (or their ``metrics.json``), each holding one or more
    DIR-Lab cases. One row per case: the landmarks that entered the TRE (of those in the files),
    TRE mean (std) over the landmarks in the original images' mm before and after registration,
    and the published "before"; then the mean over the cases of the per-case means (std over
    cases). A case whose TRE used fewer landmarks than its files hold is flagged, never hidden.
    """
    rows = sorted(
        (row for result in results for row in result["per_case"] if "dirlab_case" in row),
        key=lambda row: row["dirlab_case"],
    )
    if not rows:
        raise ValueError("dirlab_table: no DIR-Lab cases in the results (no 'dirlab_case' rows)")
    lines = [
        "| case | landmarks in TRE | TRE before (mm) | published before | TRE after (mm) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        case = int(row["dirlab_case"])
        used, outside = int(row["landmarks"]), int(row.get("landmarks_outside", 0))
        count = f"{used}/{used + outside}" + ("" if outside == 0 else " (FEWER)")
        published = DIRLAB_CASES[case][2] if case in DIRLAB_CASES else float("nan")
        lines.append(
            f"| {case} | {count} | {_cell(row, 'tre_mm_before')} | {published:.2f} | "
            f"{_cell(row, 'tre_mm')} |"
        )
    before = np.asarray([row["tre_mm_before"] for row in rows])
    after = np.asarray([row["tre_mm"] for row in rows])
    published = np.asarray(
        [DIRLAB_CASES.get(int(r["dirlab_case"]), (0, 0, np.nan))[2] for r in rows]
    )
    lines.append(
        f"| mean of {len(rows)} cases (std) | {int(sum(r['landmarks'] for r in rows))} | "
        f"{before.mean():.2f} ({before.std():.2f}) | {published.mean():.2f} | "
        f"{after.mean():.2f} ({after.std():.2f}) |"
    )
    note = (
        "\nTRE in the original images' mm: landmarks mapped back through the preprocessing; "
        "per case mean (std) over its landmarks, last row mean (std) over the cases' means.\n"
    )
    return "\n".join(lines) + "\n" + note


def structures_table(summary: dict[str, dict[str, float]]) -> str:
    """Mean (std) Dice of TransMorph's 17 IXI structures, one row each ("" when not IXI)."""
    names = [name for name in IXI_GROUPS if f"dice_{name}" in summary]
    if not names:
        return ""
    lines = ["| structure | Dice mean (std) |", "|---|---|"]
    for name in names:
        stat = summary[f"dice_{name}"]
        lines.append(f"| {name} | {stat['mean']:.4f} ({stat['std']:.4f}) |")
    stat = summary["dice_17"]
    lines.append(f"| mean of the 17 | {stat['mean']:.4f} ({stat['std']:.4f}) |")
    return "\n".join(lines) + "\n"


@functools.cache
def _jitted_apply(model) -> Any:
    """``jax.jit(model.apply)``, one per model (Flax modules hash by their fields): runs of one
    architecture evaluated in one process (``eval.py --compare``) share the compiled program."""
    return jax.jit(model.apply)


def evaluate_run(
    config,
    workdir: str | Path,
    which: str | int = "best",
    figures: int = -1,
    out: str | Path | None = None,
    pretrained: str | None = None,
) -> dict[str, Any]:
    """Evaluate the run in ``workdir`` on ``config``'s test split; returns the metrics dict.

    ``which``: its checkpoint ("best", "latest" or a step number, ``restore_for_inference``).
    ``pretrained``: the name of a packaged model (``adreg_jax.pretrained.MODELS``) evaluated in
    place of the run's checkpoint; ``workdir`` is then only where the results go.

    ``figures``: how many cases get figures (-1: all, 0: none). ``out``: where to write
    (default ``workdir/eval``). The model comes from the run's own saved config, the test pairs
    from ``config.data``, so runs with different models are compared on the same cases.
    """
    workdir = Path(workdir)
    if pretrained:
        from adreg_jax.pretrained import load

        run_config, model, variables = load(pretrained)
    else:
        run_config, model, variables = restore_for_inference(workdir, which=which)
    apply_fn = _jitted_apply(model)  # every test pair has one shape: one compile
    dataset = build_dataset(config.data, "test", int(config.seed))
    labels = dataset_labels(config.data)
    if len(dataset) == 0:
        raise ValueError(f"the test split of config.data.dataset={config.data.dataset!r} is empty")
    out = Path(out) if out is not None else workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    rows, figure_paths = [], []
    for index in range(len(dataset)):
        pair = dataset[index]
        batch = {k: jnp.asarray(v)[None] for k, v in pair.items()}
        outputs = apply_fn(variables, batch["fixed"], batch["moving"])
        rows.append(case_metrics(apply_fn, variables, pair, labels, outputs))
        if figures < 0 or index < figures:
            figure_paths += case_figures(
                apply_fn, variables, run_config, pair, outputs, out / "figures", f"case{index:03d}"
            )
    summary = summarise(rows)
    result = {
        "workdir": str(workdir),
        "cases": len(rows),
        "summary": summary,
        "per_case": rows,
        "figures": [str(p) for p in figure_paths],
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    keys = sorted({k for row in rows for k in row})
    with (out / "per_case.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", *keys])
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow({"case": index, **row})
    (out / "table.md").write_text(markdown_table(rows, summary))
    if any("dirlab_case" in row for row in rows):
        (out / "dirlab_table.md").write_text(dirlab_table([result]))
    structures = structures_table(summary)
    if structures:
        (out / "structures.md").write_text(structures)
    return result


# --- comparing runs -----------------------------------------------------------------------------

_COMPARE_KEYS = (
    "dice",
    "dice_17",
    "tre_mm",
    "ncc",
    "mse",
    "ssim",
    "negative_jacobian_percent",
    "jacobian_std",
)


def wilcoxon_p(first: Sequence[float], other: Sequence[float]) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value; 1.0 when the pairs do not differ at all."""
    from scipy.stats import wilcoxon

    first, other = np.asarray(first, np.float64), np.asarray(other, np.float64)
    keep = np.isfinite(first) & np.isfinite(other)
    differences = first[keep] - other[keep]
    if differences.size == 0 or np.all(differences == 0):
        return 1.0
    return float(wilcoxon(first[keep], other[keep]).pvalue)


def compare_runs(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Runs side by side: ``results`` maps a run name to an ``evaluate_run`` result, the first is
    the reference. Returns {"table": markdown, "metrics": {key: {run: {mean, std, p}}}}."""
    names = list(results)
    cases = {name: result["cases"] for name, result in results.items()}
    if len(set(cases.values())) != 1:
        raise ValueError(f"runs were evaluated on different numbers of test cases: {cases}")
    reference = results[names[0]]["per_case"]
    keys = [k for k in _COMPARE_KEYS if all(k in r["summary"] for r in results.values())]
    table = {}
    for key in keys:
        first = [row.get(key, np.nan) for row in reference]
        table[key] = {}
        for name in names:
            values = [row.get(key, np.nan) for row in results[name]["per_case"]]
            stat = dict(results[name]["summary"][key])
            stat["p"] = None if name == names[0] else wilcoxon_p(first, values)
            table[key][name] = stat
    header = "| metric | " + " | ".join(names) + " |"
    lines = [header, "|---|" + "---|" * len(names)]
    for key in keys:
        cells = []
        for name in names:
            stat = table[key][name]
            cell = f"{stat['mean']:.4f} ({stat['std']:.4f})"
            if stat["p"] is not None:
                cell += f", p={stat['p']:.3g}"
            cells.append(cell)
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    note = (
        f"\nmean (std) over {len(reference)} test cases; p: two-sided paired "
        f"Wilcoxon signed-rank test against {names[0]}.\n"
    )
    return {"table": "\n".join(lines) + "\n" + note, "metrics": table}

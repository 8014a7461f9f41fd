"""Evaluation of a trained run on its test split: per-case metrics, JSON, CSV and a markdown table.

Where this sits: ``eval.py`` calls ``evaluate_run(config, workdir)`` after training. The model and
the best checkpoint come from ``training.restore_for_inference``; the test pairs from
``data.build_dataset(config.data, "test", seed)``; every metric from ``adreg_jax.ops`` with the
conventions of DESIGN.md (Dice over the data set's labels, absent labels left out of means; TRE
in mm; Jacobian determinant with numpy.gradient derivatives).

Writes ``WORKDIR/eval/metrics.json`` (means, stds and per-case values), ``per_case.csv`` and
``table.md`` (one row per case, "before" columns beside the registered ones, a mean (std) row).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import ops
from adreg_jax.data import build_dataset, dataset_labels
from adreg_jax.losses import mean_tre
from adreg_jax.training import restore_for_inference


def case_metrics(apply_fn, variables, pair: dict[str, np.ndarray], labels) -> dict[str, float]:
    """All metrics of one registered pair (unbatched pair dict from the data pipeline);
    ``apply_fn`` is the (jitted) ``model.apply``."""
    batch = {k: jnp.asarray(v)[None] for k, v in pair.items()}
    outputs = apply_fn(variables, batch["fixed"], batch["moving"])
    ddf, warped = outputs["ddf"], outputs["warped"]
    fixed, moving = batch["fixed"], batch["moving"]
    stats = ops.jacobian_stats(ddf)
    row = {
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
    if labels and "fixed_seg" in batch:
        warped_seg = ops.warp(batch["moving_seg"][..., None], ddf, order=0)[..., 0]
        before = ops.dice(batch["moving_seg"], batch["fixed_seg"], labels)[0]
        after = ops.dice(warped_seg, batch["fixed_seg"], labels)[0]
        row["dice_before"] = jnp.nanmean(before)
        row["dice"] = jnp.nanmean(after)
        for label, value in zip(labels, np.asarray(after), strict=True):
            row[f"dice_label{label}"] = value
    if "fixed_points" in batch:
        row["tre_mm_before"] = mean_tre(batch, jnp.zeros_like(ddf))
        row["tre_mm"] = mean_tre(batch, ddf)
    return {key: float(np.asarray(value).reshape(-1)[0]) for key, value in row.items()}


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for row in rows for k in row})
    summary = {}
    for key in keys:
        values = np.asarray([row[key] for row in rows if key in row], np.float64)
        summary[key] = {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values))}
    return summary


_TABLE_COLUMNS = (
    ("Dice before", "dice_before"),
    ("Dice", "dice"),
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


def markdown_table(rows: list[dict[str, float]], summary: dict[str, dict[str, float]]) -> str:
    columns = [(title, key) for title, key in _TABLE_COLUMNS if key in summary]
    lines = [
        "| case | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for index, row in enumerate(rows):
        cells = [f"{row[key]:.4f}" if key in row else "" for _, key in columns]
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    cells = [f"{summary[key]['mean']:.4f} ({summary[key]['std']:.4f})" for _, key in columns]
    lines.append("| mean (std) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_run(config, workdir: str | Path, which: str = "best") -> dict[str, Any]:
    """Evaluate the run in ``workdir`` on ``config``'s test split; returns the metrics dict."""
    workdir = Path(workdir)
    _, model, variables = restore_for_inference(workdir, which=which)
    apply_fn = jax.jit(model.apply)  # every test pair has one shape: one compile
    dataset = build_dataset(config.data, "test", int(config.seed))
    labels = dataset_labels(config.data)
    rows = [case_metrics(apply_fn, variables, dataset[i], labels) for i in range(len(dataset))]
    if not rows:
        raise ValueError(f"the test split of config.data.dataset={config.data.dataset!r} is empty")
    summary = summarise(rows)
    out = workdir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result = {"workdir": str(workdir), "cases": len(rows), "summary": summary, "per_case": rows}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    keys = sorted({k for row in rows for k in row})
    with (out / "per_case.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", *keys])
        writer.writeheader()
        for index, row in enumerate(rows):
            writer.writerow({"case": index, **row})
    (out / "table.md").write_text(markdown_table(rows, summary))
    return result

"""Figures of a registered pair (matplotlib, PNG), for ``adreg-register``'s overview and the
per-case figures of ``eval.py``.

Volumes are unbatched (D, H, W) numpy arrays on the fixed grid; with canonical (RAS+) arrays axis
0 runs right, 1 anterior, 2 superior, so the three views below are the radiological axial, coronal
and sagittal planes through the centre (shown with the first in-plane axis horizontal, the second
vertical and pointing up). The DDF follows DESIGN.md: (D, H, W, 3) in voxels, warping pulls.

Everything is drawn on ``matplotlib.figure.Figure`` objects (no pyplot state), so the functions
are safe to call from worker threads and never open a window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from adreg_jax import ops

# (name, axis cut through, in-plane axes (horizontal, vertical))
VIEWS = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))


def _cut(volume: np.ndarray, axis: int, index: int | None = None) -> np.ndarray:
    """The plane through ``index`` (default: the centre) of ``volume`` along ``axis``, transposed
    so that rows run along the second in-plane axis (drawn with origin="lower")."""
    index = volume.shape[axis] // 2 if index is None else index
    return np.take(volume, index, axis=axis).T


def _show(ax, image, spacing, plane, title, **kwargs):
    h_axis, v_axis = plane
    aspect = spacing[v_axis] / spacing[h_axis]
    handle = ax.imshow(image, origin="lower", aspect=aspect, interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return handle


def _grid_lines(ax, ddf_plane: np.ndarray, plane, step: int):
    """Deformed grid: fixed grid lines drawn at their positions p + ddf(p) in the moving image."""
    h_axis, v_axis = plane
    # ddf_plane: (n_h, n_v, 3) for this cut, before transposing
    n_h, n_v = ddf_plane.shape[:2]
    dh, dv = ddf_plane[..., h_axis], ddf_plane[..., v_axis]
    hh, vv = np.meshgrid(np.arange(n_h), np.arange(n_v), indexing="ij")
    xs, ys = hh + dh, vv + dv
    # one LineCollection, not a Line2D per grid line (a few dozen artists per panel)
    lines = [np.stack([xs[i, :], ys[i, :]], axis=-1) for i in range(0, n_h, step)]
    lines += [np.stack([xs[:, j], ys[:, j]], axis=-1) for j in range(0, n_v, step)]
    ax.add_collection(LineCollection(lines, colors="k", linewidths=0.5))
    ax.set_xlim(-0.5, n_h - 0.5)
    ax.set_ylim(-0.5, n_v - 0.5)


def overview_figure(
    path: str | Path,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    ddf: np.ndarray | None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    extra: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
    jacobian: np.ndarray | None = None,
    ddf_planes: Sequence[np.ndarray] | None = None,
) -> Path:
    """One PNG: rows = axial, coronal, sagittal centre planes; columns = fixed, moving, warped,
    |fixed - moving|, |fixed - warped|, det J (folds, det J <= 0, in red), the deformed grid, and
    one column per ``extra`` volume (e.g. an uncertainty map). ``jacobian``: det J of ``ddf``
    when the caller has it (computed here otherwise). ``ddf_planes``: the field's centre planes
    across axes 0, 1 and 2 (``np.take(ddf, n // 2, axis)``), all the figure draws of it, in place
    of ``ddf`` (None then) when the caller has them and ``jacobian``.

    Only the three planes are drawn, so only they are computed at full resolution; the display
    ranges are percentiles of every second voxel per axis (a DIR-Lab-sized CT, 141x256x256:
    6.6-7.3 s -> 1.9-2.7 s)."""
    fixed, moving, warped = (np.asarray(v, np.float32) for v in (fixed, moving, warped))
    if jacobian is None:
        jacobian = ops.jacobian_determinant(np.asarray(ddf, np.float32))
    jac = np.asarray(jacobian)
    if ddf_planes is None:
        ddf = np.asarray(ddf, np.float32)
        ddf_planes = [np.take(ddf, n // 2, axis=axis) for axis, n in enumerate(ddf.shape[:3])]
    extra = dict(extra or {})
    sample = (slice(None, None, 2),) * 3
    low, high = np.percentile(fixed[sample], (1, 99.5))
    diff_max = max(float(np.percentile(np.abs(fixed[sample] - moving[sample]), 99.5)), 1e-6)
    step = max(2, min(fixed.shape) // 24)
    columns = 7 + len(extra)
    figure = Figure(figsize=(2.0 * columns, 6.4), dpi=110)
    axes = figure.subplots(3, columns, squeeze=False)
    gray = {"cmap": "gray", "vmin": low, "vmax": high}
    hot = {"cmap": "magma", "vmin": 0.0, "vmax": diff_max}
    panels = (  # (label, the plane along an axis, style)
        ("fixed", lambda axis: _cut(fixed, axis), gray),
        ("moving", lambda axis: _cut(moving, axis), gray),
        ("warped", lambda axis: _cut(warped, axis), gray),
        ("|fixed - moving|", lambda axis: np.abs(_cut(fixed, axis) - _cut(moving, axis)), hot),
        ("|fixed - warped|", lambda axis: np.abs(_cut(fixed, axis) - _cut(warped, axis)), hot),
    )
    for row, (name, axis, plane) in enumerate(VIEWS):
        for column, (label, cut, style) in enumerate(panels):
            _show(axes[row, column], cut(axis), spacing, plane, label if row == 0 else "", **style)
        jac_cut = _cut(jac, axis)
        handle = _show(
            axes[row, 5],
            jac_cut,
            spacing,
            plane,
            "det J" if row == 0 else "",
            cmap="RdBu_r",
            vmin=0.0,
            vmax=2.0,
        )
        folds = np.ma.masked_where(jac_cut > 0, np.zeros_like(jac_cut))  # 0: red in "autumn"
        _show(axes[row, 5], folds, spacing, plane, "", cmap="autumn", vmin=0, vmax=1)
        if row == 2:
            figure.colorbar(handle, ax=axes[row, 5], fraction=0.046, pad=0.02)
        grid_ax = axes[row, 6]
        _show(
            grid_ax,
            _cut(warped, axis),
            spacing,
            plane,
            "grid" if row == 0 else "",
            cmap="gray",
            vmin=low,
            vmax=high * 2.5,
        )
        _grid_lines(grid_ax, np.asarray(ddf_planes[axis], np.float32), plane, step)
        for offset, (label, volume) in enumerate(extra.items()):
            volume = np.asarray(volume, np.float32)
            handle = _show(
                axes[row, 7 + offset],
                _cut(volume, axis),
                spacing,
                plane,
                label if row == 0 else "",
                cmap="viridis",
                vmin=0.0,
                vmax=max(float(np.percentile(volume, 99.5)), 1e-6),
            )
            if row == 2:
                figure.colorbar(handle, ax=axes[row, 7 + offset], fraction=0.046, pad=0.02)
        axes[row, 0].set_ylabel(name, fontsize=9)
    folding = 100.0 * float(np.mean(jac <= 0))
    figure.suptitle(
        (title + "  " if title else "") + f"det J <= 0: {folding:.3f}% of voxels", fontsize=10
    )
    # fixed margins (inches) measured from tight_layout on this grid, which draws the whole
    # figure once more to find them (a third of the figure's time)
    width = 2.0 * columns
    figure.subplots_adjust(
        left=0.34 / width,
        right=1.0 - (0.55 if extra else 0.15) / width,
        top=0.9,
        bottom=0.025,
        wspace=0.31,
        hspace=0.05,
    )
    path = Path(path)
    figure.savefig(path, pil_kwargs={"compress_level": 1})  # zlib level 6: 0.2 s more
    return path


def attention_figure(
    path: str | Path,
    fixed: np.ndarray,
    alphas: Mapping[str, float],
    region_weights: np.ndarray | None,
    blend_weights: Sequence[np.ndarray],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """The attention diagnostics of one pair: BCAM's balance alpha per level (bar chart), RAA's
    relative region weights ``R * w_r`` (mean 1) over the fixed image, and the multi-resolution
    blend maps (weight of the finer level's field), each at the axial centre plane.

    ``region_weights``: (gd, gh, gw) grid of R * w_r, or None when the model has no RAA;
    ``blend_weights``: (d, h, w) maps, coarse to fine.
    """
    fixed = np.asarray(fixed, np.float32)
    panels = 2 + len(blend_weights)
    figure = Figure(figsize=(2.6 * panels, 2.9), dpi=110)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    names = list(alphas)
    axes[0].bar(range(len(names)), [float(alphas[n]) for n in names], color="tab:blue")
    axes[0].set_xticks(range(len(names)), names, fontsize=8)
    axes[0].set_ylim(0.0, 1.0)
    axes[0].axhline(0.5, color="gray", linewidth=0.5)
    axes[0].set_title("BCAM alpha (moving->fixed share)", fontsize=8)
    if not names:
        axes[0].text(0.5, 0.5, "no cross attention", ha="center", va="center", fontsize=8)
    axial, plane = VIEWS[0][1], VIEWS[0][2]
    if region_weights is not None:
        weights = np.asarray(region_weights, np.float32)
        # nearest upsampling of the region grid onto the fixed grid (regions cover the padded map)
        index = [
            np.minimum(np.arange(n) * g // n, g - 1)
            for n, g in zip(fixed.shape, weights.shape, strict=True)
        ]
        dense = weights[np.ix_(*index)]
        _show(axes[1], _cut(fixed, axial), spacing, plane, "RAA region weight R*w", cmap="gray")
        handle = _show(
            axes[1],
            _cut(dense, axial),
            spacing,
            plane,
            "",
            cmap="coolwarm",
            alpha=0.55,
            vmin=min(0.5, dense.min()),
            vmax=max(1.5, dense.max()),
        )
        figure.colorbar(handle, ax=axes[1], fraction=0.046, pad=0.02)
    else:
        axes[1].text(0.5, 0.5, "no regional attention", ha="center", va="center", fontsize=8)
        axes[1].set_axis_off()
    for offset, blend in enumerate(blend_weights):
        blend = np.asarray(blend, np.float32)
        handle = _show(
            axes[2 + offset],
            _cut(blend, axial),
            spacing,
            plane,
            f"blend weight {blend.shape[0]}x{blend.shape[1]}x{blend.shape[2]}",
            cmap="viridis",
            vmin=0.0,
            vmax=1.0,
        )
    if blend_weights:
        figure.colorbar(handle, ax=axes[-1], fraction=0.046, pad=0.02)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path

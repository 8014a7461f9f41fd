"""Evaluation of a trained run: tables, figures, the TTA spread, structures, run comparison."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adreg_jax import evaluation, training
from adreg_jax.data.labels import IXI_GROUPS, IXI_VOI
from tests.test_training import tiny_config

# The tests share a module fixture: one xdist worker runs them all (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("tiny_run_evaluation")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of two training steps on generated brains, and its config."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config()
    config.train.max_steps = 2
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.data.test_size = 2
    training.train_and_evaluate(config, workdir)
    return config, workdir


def test_evaluate_run_writes_tables_and_figures(tiny_run):
    config, workdir = tiny_run
    result = evaluation.evaluate_run(config, workdir, figures=1)
    out = workdir / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["cases"] == result["cases"] == len(result["per_case"]) >= 2
    for key in ("dice", "dice_before", "ncc", "ssim", "negative_jacobian_percent", "jacobian_min"):
        assert key in saved["summary"]
        assert all(np.isfinite(row[key]) for row in saved["per_case"])
    lines = (out / "per_case.csv").read_text().splitlines()
    assert len(lines) == 1 + result["cases"]
    table = (out / "table.md").read_text()
    assert "| mean (std) |" in table and "Dice before" in table
    # figures for the first case only: the overview and the attention diagnostics, real PNGs
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["case000_attention.png", "case000_overview.png"]
    for name in names:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_is_chosen_by_its_step(tiny_run, tmp_path):
    """Step 2, the run's one checkpoint, is its latest; a step it does not hold is refused."""
    config, workdir = tiny_run
    by_step = evaluation.evaluate_run(config, workdir, which=2, figures=0, out=tmp_path / "a")
    latest = evaluation.evaluate_run(config, workdir, "latest", figures=0, out=tmp_path / "b")
    assert by_step["per_case"] == latest["per_case"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3; it holds steps \[2\]"):
        evaluation.evaluate_run(config, workdir, which=3, figures=0, out=tmp_path / "c")
    # a checkpoint's own directory stands for its run at that step, wherever a run is taken
    step_dir = workdir / "checkpoints" / "2"
    _, _, from_dir = training.restore_for_inference(step_dir)
    _, _, from_run = training.restore_for_inference(workdir, which=2)
    for got, want in zip(jax.tree.leaves(from_dir), jax.tree.leaves(from_run), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_comparing_a_run_with_itself_gives_equal_columns_and_p_one(tiny_run):
    config, workdir = tiny_run
    first = evaluation.evaluate_run(config, workdir, figures=0, out=workdir / "a")
    second = evaluation.evaluate_run(config, workdir, figures=0, out=workdir / "b")
    comparison = evaluation.compare_runs({"run": first, "again": second})
    dice = comparison["metrics"]["dice"]
    assert dice["run"]["mean"] == pytest.approx(dice["again"]["mean"])
    assert dice["run"]["p"] is None and dice["again"]["p"] == 1.0
    assert "| dice |" in comparison["table"] and "Wilcoxon" in comparison["table"]


def test_wilcoxon_of_a_consistent_improvement_is_the_exact_tail():
    # Ten paired cases, all improved, by distinct amounts: the exact two-sided signed-rank
    # p-value is 2 / 2**10 (only one of the 2**10 sign patterns is as extreme on each side).
    first = np.linspace(0.5, 0.6, 10)
    other = first + np.linspace(0.01, 0.1, 10)
    assert evaluation.wilcoxon_p(first, other) == pytest.approx(2.0 / 2**10)
    assert evaluation.wilcoxon_p(first, first) == 1.0


def test_structure_dice_merges_left_and_right():
    per_label = {label: 0.5 for label in IXI_VOI}
    per_label[1], per_label[21] = 0.6, 0.8  # left / right cerebral white matter
    per_label[16] = np.nan  # CSF absent from both images
    groups = evaluation.structure_dice(per_label)
    assert len(groups) == len(IXI_GROUPS) == 17
    assert groups["Cerebral-White-Matter"] == pytest.approx(0.7)
    assert np.isnan(groups["CSF"])
    assert groups["Brain-Stem"] == pytest.approx(0.5)
    assert evaluation.structure_dice({1: 0.5, 2: 0.5, 3: 0.5}) == {}


def test_tta_spread_of_a_constant_field_is_its_mirror_spread():
    # A "model" that predicts the same translation (a, b, c) whatever it sees: mirrored passes
    # return it with one component negated, so each component takes [v, -v, v, v] over the four
    # passes, variance 0.75 v^2, and the spread is sqrt(0.75) |(a, b, c)|.
    vector = jnp.asarray([1.0, -2.0, 0.5])

    def apply_fn(variables, fixed, moving):
        return {"ddf": jnp.broadcast_to(vector, (*fixed.shape[:4], 3))}

    image = jnp.asarray(np.random.default_rng(0).random((1, 8, 9, 10, 1)), jnp.float32)
    spread = evaluation.tta_spread(apply_fn, None, image, image)
    np.testing.assert_allclose(
        spread["ddf_std"], np.sqrt(0.75) * float(jnp.linalg.norm(vector)), rtol=1e-5
    )
    assert spread["warped_std"].shape == (8, 9, 10)
    assert float(spread["warped_std"].max()) > 0.0


def test_case_metrics_give_tre_mean_and_std_over_landmarks():
    # Zero field: each landmark's error is its offset in mm; offsets of 1, 2 and 4 voxels along
    # axis 0 at 2 mm spacing give errors 2, 4, 8 mm (the padded fourth point is masked out).
    fixed_points = np.zeros((4, 3), np.float32) + 4.0
    moving_points = fixed_points.copy()
    moving_points[:, 0] += [1.0, 2.0, 4.0, 9.0]
    image = np.random.default_rng(0).random((8, 8, 8, 1)).astype(np.float32)
    pair = {
        "fixed": image,
        "moving": image,
        "fixed_points": fixed_points,
        "moving_points": moving_points,
        "points_mask": np.array([True, True, True, False]),
        "spacing": np.array([2.0, 1.0, 1.0], np.float32),
    }

    def apply_fn(variables, fixed, moving):
        return {"ddf": jnp.zeros((*fixed.shape[:4], 3)), "warped": moving}

    row = evaluation.case_metrics(apply_fn, None, pair, labels=())
    errors = np.array([2.0, 4.0, 8.0])
    assert row["tre_mm_before"] == pytest.approx(errors.mean())
    assert row["tre_mm_before_std"] == pytest.approx(errors.std())
    assert row["tre_mm"] == pytest.approx(errors.mean())
    table = evaluation.markdown_table([row], evaluation.summarise([row]))
    assert f"{errors.mean():.2f} ({errors.std():.2f})" in table


def test_dirlab_tre_in_original_mm_and_the_table_i_counts():
    # A DIR-Lab-like pair on a network grid that scales and shifts the raw grid per axis:
    # q = p * scale + shift. Truth in the raw grid: a constant field c (network voxels) moves a
    # raw point by c / scale raw voxels, so the error is |(p - m + c / scale) * raw spacing|.
    scale, shift = np.array([1.0, 0.5, 0.625]), np.array([2.0, -3.0, 4.0])
    raw_spacing = np.array([2.5, 0.97, 0.97])
    rng = np.random.default_rng(0)
    raw_fixed = rng.uniform([2, 10, 10], [8, 30, 30], (4, 3))
    raw_moving = raw_fixed + rng.uniform(-3, 3, (4, 3))
    c = np.array([0.5, -1.0, 2.0])
    pair = {
        "fixed": np.zeros((10, 12, 16, 1), np.float32),
        "moving": np.zeros((10, 12, 16, 1), np.float32),
        "fixed_points": (raw_fixed * scale + shift).astype(np.float32),
        "moving_points": (raw_moving * scale + shift).astype(np.float32),
        "points_mask": np.array([True, True, True, False]),  # the last one left the grid
        "points_outside": np.int32(1),
        "spacing": (raw_spacing / scale).astype(np.float32),
        "case": np.int32(3),
        "grid_scale": scale.astype(np.float32),
        "grid_shift": shift.astype(np.float32),
        "original_spacing": raw_spacing.astype(np.float32),
    }

    def apply_fn(variables, fixed, moving):
        return {"ddf": jnp.broadcast_to(jnp.asarray(c, jnp.float32), (*fixed.shape[:4], 3)),
                "warped": moving}  # fmt: skip

    row = evaluation.case_metrics(apply_fn, None, pair, labels=())
    truth = np.linalg.norm((raw_fixed - raw_moving + c / scale) * raw_spacing, axis=-1)[:3]
    before = np.linalg.norm((raw_fixed - raw_moving) * raw_spacing, axis=-1)[:3]
    assert row["tre_mm"] == pytest.approx(truth.mean(), rel=1e-5)
    assert row["tre_mm_std"] == pytest.approx(truth.std(), rel=1e-4)
    assert row["tre_mm_before"] == pytest.approx(before.mean(), rel=1e-5)
    assert (row["landmarks"], row["landmarks_outside"], row["dirlab_case"]) == (3, 1, 3)
    # on the network grid with the network spacing, ops.tre gives the same numbers
    grid = {k: v for k, v in pair.items() if k not in ("grid_scale", "grid_shift")}
    assert evaluation.case_metrics(apply_fn, None, grid, labels=())["tre_mm"] == pytest.approx(
        truth.mean(), rel=1e-5
    )
    table = evaluation.markdown_table([row], evaluation.summarise([row]))
    assert "| DIR-Lab 3 | 3 | 1 |" in table
    other = dict(row, dirlab_case=1.0, landmarks=300.0, landmarks_outside=0.0)
    dirlab = evaluation.dirlab_table([{"per_case": [row]}, {"per_case": [other]}])
    lines = dirlab.splitlines()
    assert lines[2].startswith("| 1 | 300/300 |") and "| 3.89 |" in lines[2]
    assert lines[3].startswith("| 3 | 3/4 (FEWER) |") and "| 6.94 |" in lines[3]
    assert lines[4].startswith(f"| mean of 2 cases (std) | 303 | {before.mean():.2f} (0.00) |")

"""Grain pipelines on generated brain pairs: shapes, determinism, exact resume, flips."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from adreg_jax.data import generated, pipeline

_spec = importlib.util.spec_from_file_location(
    "default_config", Path(__file__).resolve().parents[1] / "configs" / "default.py"
)
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def _config(**overrides):
    data = default.get_config().data
    data.image_size = (16, 16, 16)
    data.train_size = 20
    data.val_size = 3
    data.batch_size = 2
    data.update(overrides)
    return data


def test_batches_follow_the_contract():
    batch = next(pipeline.make_iterator(_config(), "train", seed=0))
    assert batch["fixed"].shape == (2, 16, 16, 16, 1) and batch["fixed"].dtype == np.float32
    assert batch["fixed_seg"].shape == (2, 16, 16, 16) and batch["fixed_seg"].dtype == np.int32
    assert batch["true_ddf"].shape == (2, 16, 16, 16, 3)
    assert batch["spacing"].shape == (2, 3)
    assert 0.0 <= batch["moving"].min() and batch["moving"].max() <= 1.0
    val = list(pipeline.make_iterator(_config(), "val", seed=0))
    assert [b["fixed"].shape[0] for b in val] == [2, 1]


def test_state_restores_exact_stream():
    data = _config(augment_flip=True, augment_intensity=1.0)
    iterator = pipeline.make_iterator(data, "train", seed=3)
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = pipeline.make_iterator(data, "train", seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_true_ddf_warps_moving_onto_fixed():
    # independent check: warping the moving labels with the true DDF recovers the fixed labels
    source = generated.GeneratedBrainPairs((24, 24, 24), length=1, seed=0, intensity=0.0)
    pair = source[0]
    coords = np.indices((24, 24, 24)) + np.moveaxis(pair["true_ddf"], -1, 0)
    warped = ndimage.map_coordinates(pair["moving_seg"], coords, order=0)
    before = np.mean(pair["moving_seg"] == pair["fixed_seg"])
    after = np.mean(warped == pair["fixed_seg"])
    assert after > before and after > 0.93, (before, after)
    again = generated.GeneratedBrainPairs((24, 24, 24), length=1, seed=0, intensity=0.0)[0]
    np.testing.assert_array_equal(again["moving"], pair["moving"])


def test_flip_moves_points_and_ddf_consistently():
    rng = np.random.default_rng(0)
    element = {
        "fixed": rng.random((4, 5, 6, 1), dtype=np.float32),
        "moving": rng.random((4, 5, 6, 1), dtype=np.float32),
        "true_ddf": np.broadcast_to(np.float32([1, 0, 0]), (4, 5, 6, 3)).copy(),
        "fixed_points": np.float32([[0, 1, 2]]),
        "moving_points": np.float32([[1, 1, 2]]),
        # raw point (0, 2, 0) lands on grid point (0, 1, 2): q = p * scale + shift
        "grid_scale": np.float32([1.0, 0.5, 2.0]),
        "grid_shift": np.float32([0.0, 0.0, 2.0]),
    }

    # force every axis to flip: a generator whose random() is always >= 0.5
    class AlwaysFlip:
        def random(self):
            return 0.9

    out = pipeline.augment(element, AlwaysFlip(), flip=True, intensity=0.0)
    np.testing.assert_array_equal(out["fixed"], element["fixed"][::-1, ::-1, ::-1])
    np.testing.assert_allclose(out["fixed_points"], [[3, 3, 3]])
    # a +1 shift along D becomes -1 and still links fixed point to moving point
    np.testing.assert_allclose(out["fixed_points"] + out["true_ddf"][3, 3, 3], out["moving_points"])
    # the raw -> grid map flips too: the flipped point still maps back to raw (0, 2, 0)
    raw = (out["fixed_points"] - out["grid_shift"]) / out["grid_scale"]
    np.testing.assert_allclose(raw, [[0, 2, 0]])


def test_lung_phantom_landmarks_follow_the_true_motion():
    from adreg_jax.data import generated_lung

    source = generated_lung.GeneratedLungPairs((24, 24, 24), length=2, seed=1, num_points=16)
    pair = source[1]
    assert pair["fixed_points"].shape == (16, 3) and pair["points_mask"].all()
    # zero-DDF TRE is the breathing motion: within the 5..20 mm diaphragm range at most
    motion_mm = np.linalg.norm(
        (pair["moving_points"] - pair["fixed_points"]) * pair["spacing"], axis=-1
    )
    assert 0 < motion_mm.max() <= 25.0
    # independent check: the moving image at the moving points matches fixed at the fixed points
    fixed_values = ndimage.map_coordinates(pair["fixed"][..., 0], pair["fixed_points"].T, order=1)
    moving_values = ndimage.map_coordinates(
        pair["moving"][..., 0], pair["moving_points"].T, order=1
    )
    unmoved_values = ndimage.map_coordinates(
        pair["moving"][..., 0], pair["fixed_points"].T, order=1
    )
    error = np.mean(np.abs(fixed_values - moving_values))
    assert error < 0.75 * np.mean(np.abs(fixed_values - unmoved_values)) and error < 0.1, error
    np.testing.assert_array_equal(source[1]["moving"], pair["moving"])
    batch = next(
        pipeline.make_iterator(_config(dataset="generated_lung", image_size=(16, 16, 16)), "val", 0)
    )
    assert batch["points_mask"].shape == (2, 32)


@pytest.mark.slow
def test_a_stream_started_at_a_batch_is_the_same_with_worker_processes():
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain's mp_prefetch reads absl flags (JAX-NOTES.md)
    inline = pipeline.make_iterator(_config(augment_flip=True), "train", seed=5)
    want = [next(inline) for _ in range(3)][1:]
    # a run resumed after one batch, with workers where the first read in-process
    workers = pipeline.make_iterator(
        _config(num_workers=2, augment_flip=True), "train", seed=5, start=1
    )
    for expected in want:
        got = next(workers)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_pairs_reorient_points_with_oblique_lps_images(tmp_path):
    # A NIfTI pair stored oblique and LPS with permuted axes: file axis 0 runs superior (3 mm),
    # axis 1 left (2 mm), axis 2 posterior (1 mm), all turned 15 degrees about world z. The
    # moving image is the fixed one shifted by t file voxels, so fixed point p corresponds to
    # moving point p + t. Truth from world coordinates: TRE before = |M t| mm for every point,
    # and the constant field that maps t into the canonical axes brings it to 0.
    import nibabel as nib

    import adreg_jax.ops as ops
    from adreg_jax.data import nifti

    angle = np.deg2rad(15.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    columns = np.array([[0, 0, 3.0], [-2.0, 0, 0], [0, -1.0, 0]]).T  # S, L, P per file axis
    affine = np.eye(4)
    affine[:3, :3] = rotation @ columns
    affine[:3, 3] = [10.0, -20.0, 5.0]
    rng = np.random.default_rng(0)
    fixed = ndimage.gaussian_filter(rng.random((10, 12, 14)), 1.0).astype(np.float32)
    shift = np.array([1, -2, 3])
    moving = np.roll(fixed, shift, axis=(0, 1, 2))
    nib.save(nib.Nifti1Image(fixed, affine), str(tmp_path / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(moving, affine), str(tmp_path / "moving.nii.gz"))
    points = np.array([[2, 4, 3], [5, 8, 6], [7, 6, 9], [3, 9, 4]], np.float32)
    # voxel indices along the file's axes: an elastix 'index' file
    for name, values in (("fixed.txt", points), ("moving.txt", points + shift)):
        rows = "\n".join(" ".join(map(str, p)) for p in values)
        (tmp_path / name).write_text(f"index\n{len(values)}\n{rows}\n")
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_points,moving_points\nfixed.nii.gz,moving.nii.gz,fixed.txt,moving.txt\n"
    )
    canonical, canonical_affine = nifti.load_nifti(tmp_path / "fixed.nii.gz")
    data = _config(dataset="pairs", root=str(tmp_path / "pairs.csv"), image_size=canonical.shape)
    pair = pipeline.build_dataset(data, "train", seed=0)[0]
    assert pair["points_mask"].all() and pair["points_outside"] == 0

    # the images moved with the points: the canonical image at the canonical points holds the
    # file's values at the file's points
    values = ndimage.map_coordinates(canonical, pair["fixed_points"].T, order=0)
    np.testing.assert_allclose(values, fixed[tuple(points.astype(int).T)])
    world_shift = affine[:3, :3] @ shift
    zero = np.zeros(canonical.shape + (3,), np.float32)
    before = ops.tre(pair["fixed_points"], pair["moving_points"], zero, pair["spacing"])
    np.testing.assert_allclose(before, np.linalg.norm(world_shift), rtol=1e-5)
    canonical_shift = np.linalg.solve(canonical_affine[:3, :3], world_shift)
    np.testing.assert_allclose(canonical_shift, np.round(canonical_shift), atol=1e-6)
    ddf = np.broadcast_to(canonical_shift.astype(np.float32), canonical.shape + (3,))
    after = ops.tre(pair["fixed_points"], pair["moving_points"], ddf, pair["spacing"])
    np.testing.assert_allclose(after, 0.0, atol=1e-5)
    # plain text holds voxel coordinates of the canonical arrays, as for adreg-register: the
    # same points, placed through world mm
    world = points @ affine[:3, :3].T + affine[:3, 3]
    canonical_points = np.linalg.solve(
        canonical_affine[:3, :3], (world - canonical_affine[:3, 3]).T
    )
    np.savetxt(tmp_path / "fixed.txt", canonical_points.T)
    plain = pipeline.build_dataset(data, "train", seed=0)[0]
    np.testing.assert_allclose(plain["fixed_points"], pair["fixed_points"], atol=1e-4)
    # and the same field warps the moving image onto the fixed one (away from the wrapped edge)
    warped = np.asarray(ops.warp(pair["moving"], ddf))[..., 0]
    inner = tuple(slice(3, -3) for _ in range(3))
    np.testing.assert_allclose(warped[inner], pair["fixed"][..., 0][inner], atol=1e-5)


def test_a_data_set_read_from_disk_without_its_root_names_the_option():
    for dataset, holds in (("dirlab", "DIR-Lab cases"), ("ixi", "atlas.pkl"), ("pairs", "CSV")):
        with pytest.raises(ValueError, match=f"config.data.root is not set.*{holds}"):
            pipeline.build_dataset(_config(dataset=dataset, root=""), "train", seed=0)

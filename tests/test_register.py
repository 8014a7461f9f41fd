"""adreg-register on NIfTI files it writes itself: a blob pair with a known shift."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from adreg_jax.registration import commands

SHAPE = (24, 24, 24)


def main(argv):
    """The command, without the persistent compilation cache (a process-wide JAX setting)."""
    return commands.main([*argv, "--cache-dir", ""])


def write(path, array, spacing=(2.0, 2.0, 2.0)):
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.asarray(SHAPE, np.float32)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    fixed = ndimage.gaussian_filter((radius < 7).astype(np.float32), 1.0)
    fixed_seg = (radius < 7).astype(np.int16)
    moving = ndimage.shift(fixed, (2.0, -1.5, 1.0), order=1)
    moving_seg = ndimage.shift(fixed_seg, (2.0, -1.5, 1.0), order=0)
    return {
        "fixed": write(tmp_path / "fixed.nii.gz", fixed),
        "moving": write(tmp_path / "moving.nii.gz", moving),
        "fixed_seg": write(tmp_path / "fixed_seg.nii.gz", fixed_seg),
        "moving_seg": write(tmp_path / "moving_seg.nii.gz", moving_seg),
        "out": tmp_path / "out",
    }


@pytest.mark.slow
def test_registers_a_shifted_blob_without_a_model(pair, tmp_path):
    # landmarks on the blob's surface: the fixed ones as voxel coordinates, the moving ones as
    # physical points in ANTs' CSV form (LPS mm of the 2 mm diagonal grid), shifted with the blob
    fixed_points = np.array([[12, 12, 5], [12, 5, 12], [19, 12, 12], [8, 15, 10]], np.float64)
    lps = (fixed_points + (2.0, -1.5, 1.0)) * 2.0 * (-1, -1, 1)
    np.savetxt(tmp_path / "fixed_points.txt", fixed_points)
    rows = "\n".join(f"{x},{y},{z},0" for x, y, z in lps)
    (tmp_path / "moving_points.csv").write_text(f"x,y,z,t\n{rows}\n")
    code = main(
        [
            "--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(pair["out"]),
            "--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"],
            "--fixed-points", str(tmp_path / "fixed_points.txt"),
            "--moving-points", str(tmp_path / "moving_points.csv"),
            "--instance-steps", "40", "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    for name in ("warped", "ddf", "jacobian", "warped_seg"):
        assert (pair["out"] / f"{name}.nii.gz").exists()
    assert (pair["out"] / "overview.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((pair["out"] / "metrics.json").read_text())
    assert metrics["dice_mean"] > metrics["dice_mean_before"] + 0.1
    assert metrics["ncc_after"] > metrics["ncc_before"]
    assert metrics["folding_percent"] < 0.1
    # the shift, 2 mm voxels: the landmarks start sqrt(2^2 + 1.5^2 + 1) * 2 mm apart
    assert metrics["tre_mm_before"] == pytest.approx(2.0 * np.sqrt(7.25), abs=1e-4)
    assert metrics["tre_mm"] < 0.5 * metrics["tre_mm_before"]
    ddf = nib.load(str(pair["out"] / "ddf.nii.gz"))
    assert ddf.shape == (*SHAPE, 3)
    # Moving = fixed shifted by +2 voxels along axis 0: the centre's displacement is ~ +2 voxels,
    # +4 mm at 2 mm spacing (world mm, RAS+ axes of this diagonal affine).
    centre_mm = np.asarray(ddf.dataobj)[12, 12, 12]
    assert centre_mm[0] == pytest.approx(4.0, abs=1.5)


def test_bad_inputs_exit_non_zero_naming_the_file(pair, tmp_path, capsys):
    missing = str(tmp_path / "nope.nii.gz")
    assert main(["--fixed", missing, "--moving", pair["moving"], "--out", str(tmp_path)]) == 1
    assert "nope.nii.gz" in capsys.readouterr().err
    flat = write(tmp_path / "flat.nii.gz", np.zeros(SHAPE, np.float32))
    assert main(["--fixed", flat, "--moving", pair["moving"], "--out", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err
    small_seg = write(tmp_path / "seg.nii.gz", np.zeros((8, 8, 8), np.int16))
    args = ["--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(tmp_path)]
    assert main([*args, "--fixed-seg", small_seg]) == 1
    assert "differs from its image" in capsys.readouterr().err
    two_d = write(tmp_path / "two_d.nii.gz", np.ones((8, 8), np.float32))
    assert main(["--fixed", two_d, "--moving", pair["moving"], "--out", str(tmp_path)]) == 1
    assert "3-D" in capsys.readouterr().err
    assert main([*args, "--instance-steps", "5", "5", "5"]) == 1
    assert "one per level" in capsys.readouterr().err
    assert main([*args, "--network-scales", "1", "2"]) == 1
    assert "--network-scales 1.0 2.0 needs a network" in capsys.readouterr().err
    assert main([*args, "--model", "brain", "--network-scales", "1", "-2"]) == 1
    assert "give numbers > 0" in capsys.readouterr().err


def textured_ellipsoid(shape=(32, 32, 32), radii=(11.0, 8.0, 6.0)):
    """Smooth random texture inside an ellipsoid: structure at every position, so that an affine
    map is determined by the images."""
    grid = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape, np.float32) - 1) / 2
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    texture = ndimage.gaussian_filter(np.random.default_rng(3).random(shape), 1.5)
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    mask = ndimage.gaussian_filter((r2 < 1).astype(np.float32), 1.0)
    return (mask * (0.5 + texture)).astype(np.float32), centre


def test_affine_stage_recovers_a_rotation_and_shift(tmp_path):
    fixed, centre = textured_ellipsoid()
    angle = np.deg2rad(12.0)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    shift = np.array([2.0, -1.5, 1.0])
    # moving(y) = fixed(R y + o): rotated about the centre and shifted by -R^-1 shift
    offset = centre - rotation @ centre + shift
    moving = ndimage.affine_transform(fixed, rotation, offset=offset, order=1)
    out = tmp_path / "out"
    argv = ["--fixed", write(tmp_path / "f.nii.gz", fixed, (1.0, 1.0, 1.0))]
    argv += ["--moving", write(tmp_path / "m.nii.gz", moving, (1.0, 1.0, 1.0))]
    argv += ["--out", str(out), "--affine", "--affine-steps", "150", "--instance-steps", "0"]
    assert main([*argv, "--quiet", "--no-png"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The map found takes fixed voxel x to moving voxel q with R q + o = x: its matrix is R^-1.
    np.testing.assert_allclose(metrics["affine_matrix"], rotation.T, atol=0.05)
    assert metrics["ncc_after"] > metrics["ncc_before"] + 0.1


def test_mutual_information_registers_across_a_contrast_change(pair, tmp_path):
    # The moving scan in another "modality": a one-to-one but non-monotonic intensity map of the
    # shifted blob (background 0.6, rim up to 1, core down to 0.1); local NCC assumes a linear
    # relation, MI only that intensities correspond.
    values = np.asarray(nib.load(pair["moving"]).dataobj)
    other = np.where(values < 0.5, 0.6 + 0.8 * values, 0.5 - 0.8 * (values - 0.5))
    moving = write(tmp_path / "t2.nii.gz", other.astype(np.float32))
    argv = ["--fixed", pair["fixed"], "--moving", moving, "--out", str(pair["out"])]
    argv += ["--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"]]
    argv += ["--similarity", "mi", "--instance-steps", "40", "--quiet", "--no-png"]
    assert main(argv) == 0
    metrics = json.loads((pair["out"] / "metrics.json").read_text())
    assert metrics["mi_objective_after"] > metrics["mi_objective_before"]
    assert metrics["dice_mean"] > metrics["dice_mean_before"] + 0.1
    assert metrics["folding_percent"] < 0.1


# --- issue 14: levels from the scan, modality, masks, bad inputs --------------------------------


def test_levels_shrink_fine_axes_first_and_stop_by_cost_and_motion():
    from adreg_jax.registration import levels

    # 0.5 x 0.5 x 3 mm slices: in-plane shrunk to near-isotropic voxels, the slices kept; the
    # finest level near isotropic (1 x 1 x 3 mm is not: 2 x 2 x 3 mm), the coarsest at >= 10 /
    # 2.5 mm
    thick = ((384, 384, 19), (0.5, 0.5, 3.0))
    assert levels.deformable_levels(*thick, motion_mm=10.0) == [(8, 8, 1), (4, 4, 1)]
    # the small lung CT, 2.7 x 2.7 x 5 mm: no full-resolution level (2.7 x 2.7 x 5 mm voxels)
    lung = ((57, 78, 64), (2.732, 2.732, 5.0))
    assert levels.deformable_levels(*lung, 20.0, finest_mm=2.732) == [(4, 4, 2), (2, 2, 1)]
    # a moving scan of 2 mm voxels: nothing finer than 2 mm
    assert levels.deformable_levels(*thick, 10.0, finest_mm=2.0) == [(8, 8, 1), (4, 4, 1)]
    assert levels.affine_levels(*thick) == [(16, 16, 1), (8, 8, 1)]
    # a 1 mm brain: 4 and 2 (2 mm: 860 k voxels); a DIR-Lab-sized CT, 20 mm of motion: 4 and 2
    assert levels.deformable_levels((160, 192, 224), (1.0,) * 3, 10.0) == [(4,) * 3, (2,) * 3]
    dirlab = ((141, 256, 256), (2.0, 1.95, 1.95))
    assert levels.deformable_levels(*dirlab, motion_mm=20.0) == [(4,) * 3, (2,) * 3]
    assert levels.level_shape((384, 384, 19), (8, 8, 1)) == (48, 48, 19)
    np.testing.assert_allclose(levels.level_spacing((384, 384, 19), (0.5, 0.5, 3.0), (8, 8, 1)),
                               (4.0, 4.0, 3.0))  # fmt: skip
    # steps by a level's cost: 60 while cheap, fewer on larger levels, never below 20
    assert levels.default_steps([8_512, 69_888]) == (60, 60)
    assert levels.default_steps([107_520, 860_160]) == (47, 20)
    assert levels.default_steps([100_000_000]) == (20,)
    # CT: a larger budget (the DIR-Lab-sized phantom's levels get 60 and 20, not 35 and 8)
    assert levels.default_steps([143_360, 1_146_880], "ct") == (60, 20)
    assert levels.default_steps([8_512, 69_888], "ct") == (60, 60)
    assert levels.level_voxels((160, 224, 192), [(4, 4, 4), (2, 2, 2)]) == [107_520, 860_160]
    # the affine stage: 100 at its coarsest level, by cost at the finer
    assert levels.affine_steps([13_440, 107_520]) == (100, 37)
    assert levels.affine_steps([200_000, 8_000]) == (100, 100)


def test_resampling_between_grids_shifted_by_whole_voxels_is_a_copy():
    from adreg_jax.registration.loading import resample_to_grid

    rng = np.random.default_rng(0)
    volume = rng.random((9, 10, 11)).astype(np.float32)
    labels = rng.integers(0, 4, (9, 10, 11)).astype(np.int32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-98.0, -134.0, -72.0)
    for shift in ((3, -2, 1), (0, 0, 0), (12, 0, 0)):
        target = affine.copy()
        target[:3, 3] += shift
        for image, order in ((volume, 1), (labels, 0)):
            got = resample_to_grid(image, affine, (7, 12, 10), target, order)
            grid = np.indices((7, 12, 10), dtype=np.float64).reshape(3, -1) + np.reshape(
                shift, (3, 1)
            )
            expected = ndimage.map_coordinates(image, grid, order=order, mode="constant")
            assert got.dtype == image.dtype
            np.testing.assert_array_equal(got, expected.reshape(7, 12, 10))


def test_resize_linear_matches_jax_image_resize():
    import jax
    import jax.numpy as jnp

    from adreg_jax import ops
    from adreg_jax.ops.resample import resize_linear

    rng = np.random.default_rng(0)
    for source, target in (((10, 14, 12), (20, 28, 24)), ((57, 8, 9), (14, 19, 32))):
        x = jnp.asarray(rng.normal(size=(2, *source, 3)), jnp.float32)
        expected = jax.image.resize(x, (2, *target, 3), "linear")
        np.testing.assert_allclose(resize_linear(x, target), expected, atol=2e-5)
        scale = jnp.asarray([t / s for t, s in zip(target, source, strict=True)]).reshape(
            1, 1, 1, 1, 3
        )
        np.testing.assert_allclose(ops.resize_ddf(x, target), expected * scale, atol=2e-5)


@pytest.mark.slow
def test_the_deformable_steps_shortcuts_give_the_plain_values_and_gradients():
    """What the deformable step does for speed computes what the plain code does: the warp's
    cells computed once (``index_once``), the image gradient's in-place scatter-adds (against
    autodiff of gathers), NCC with the fixed image's box sums reused, MI with its Parzen weights."""
    import jax
    import jax.numpy as jnp

    from adreg_jax import ops
    from adreg_jax.registration.similarity import fixed_statistics, similarity_fn

    rng = np.random.default_rng(0)
    shape = (2, 7, 9, 6)

    def plain_sample(image, ddf, mode):  # 8 gathers, differentiated by autodiff
        b, d, h, w, c = image.shape
        coords = np.indices((d, h, w)).astype(np.float32).transpose(1, 2, 3, 0)[None] + ddf
        low, high = (-1.0, (d, h, w)) if mode == "constant" else (0.0, (d - 1, h - 1, w - 1))
        coords = jnp.clip(coords, low, jnp.asarray(high, jnp.float32).reshape(1, 1, 1, 1, 3))
        lower = jnp.floor(coords)
        t = coords - lower
        pad = "constant" if mode == "constant" else "edge"
        padded = jnp.pad(image, ((0, 0), (1, 2), (1, 2), (1, 2), (0, 0)), mode=pad)
        i = lower.astype(jnp.int32) + 1
        out = 0.0
        for corner in np.ndindex(2, 2, 2):
            weight = 1.0
            for axis, bit in enumerate(corner):
                weight = weight * (t[..., axis] if bit else 1.0 - t[..., axis])
            idx = [i[..., axis] + bit for axis, bit in enumerate(corner)]
            values = jax.vmap(lambda p, a, b_, c_: p[a, b_, c_])(padded, *idx)
            out = out + weight[..., None] * values
        return out

    for channels, mode in ((1, "constant"), (3, "border")):
        image = jnp.asarray(rng.normal(size=(*shape, channels)), jnp.float32)
        ddf = jnp.asarray(rng.normal(size=(*shape, 3)) * 3, jnp.float32)
        weights = jnp.asarray(rng.normal(size=(*shape, channels)), jnp.float32)

        def plain_loss(i, d, mode=mode, weights=weights):
            return jnp.sum(plain_sample(i, d, mode) * weights)

        want = jax.grad(plain_loss, (0, 1))(image, ddf)
        for once in (False, True):

            def loss(i, d, mode=mode, weights=weights, once=once):
                return jnp.sum(ops.warp(i, d, mode=mode, index_once=once) * weights)

            value = ops.warp(image, ddf, mode=mode, index_once=once)
            np.testing.assert_allclose(value, plain_sample(image, ddf, mode), atol=1e-5)
            got = jax.grad(loss, (0, 1))(image, ddf)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, atol=2e-4)

    ncc = similarity_fn("ncc")
    a, b = (jnp.asarray(rng.random((1, 9, 10, 8, 1)), jnp.float32) for _ in range(2))
    np.testing.assert_allclose(
        ncc(a, b, stats=fixed_statistics("ncc", b)), ncc(a, b), rtol=1e-5, atol=1e-6
    )
    mi = similarity_fn("mi")
    mask = jnp.asarray(rng.random((1, 9, 10, 8, 1)) > 0.3, jnp.float32)
    for weight in (None, mask):  # the fixed image's Parzen weights reused: same value, gradient
        with_stats = jax.value_and_grad(mi)(a, b, weight, fixed_statistics("mi", b))
        plain = jax.value_and_grad(mi)(a, b, weight)
        for got, want in zip(with_stats, plain, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_smoothness_is_measured_in_millimetres():
    import jax.numpy as jnp

    from adreg_jax import ops
    from adreg_jax.registration.deformable import smoothness_mm

    velocity = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 7, 8, 3)), jnp.float32)
    # isotropic voxels of any size: the voxel-unit regulariser
    for size in (1.0, 3.0):
        got = smoothness_mm(velocity, jnp.full((3,), size))
        np.testing.assert_allclose(got, ops.smoothness(velocity), rtol=1e-5)
    # a ramp along axis 0 of 0.5 voxels per voxel, voxels 2 mm along it: 1 mm per 2 mm = 0.5
    # mm/mm in one of 3 components along one of 3 axes -> 0.5^2 / 3 / 3
    ramp = jnp.zeros((1, 6, 7, 8, 3)).at[..., 0].set(0.5 * jnp.arange(6.0)[None, :, None, None])
    got = smoothness_mm(ramp, jnp.asarray([2.0, 1.0, 1.0]))
    np.testing.assert_allclose(got, 0.25 / 9.0, rtol=1e-5)


def test_ct_is_detected_and_windowed_in_hounsfield_units():
    from adreg_jax.registration.loading import detect_modality, normalise

    ct = np.full((16, 16, 16), -1000.0, np.float32)
    ct[4:12, 4:12, 4:12] = 40.0
    ct[6:10, 6:10, 6:10] = -850.0
    ct[0, 0, :4] = (-400.0, 200.0, 1500.0, -3024.0)
    assert detect_modality(ct) == "ct"
    assert detect_modality(np.random.default_rng(0).random((16, 16, 16))) == "mr"
    out = normalise(ct, "ct.nii.gz", "ct")  # -1000..200 HU -> 0..1, clipped
    np.testing.assert_allclose(out[0, 0, :4], (0.5, 1.0, 1.0, 0.0))
    np.testing.assert_allclose(out[7, 7, 7], 150.0 / 1200.0, rtol=1e-6)  # lung, -850 HU
    np.testing.assert_allclose(out[4, 4, 4], 1040.0 / 1200.0, rtol=1e-6)  # soft tissue


def test_masked_similarities_ignore_what_lies_outside_the_mask():
    import jax
    import jax.numpy as jnp

    from adreg_jax import ops
    from adreg_jax.registration.similarity import similarity_fn

    rng = np.random.default_rng(1)
    a = jnp.asarray(ndimage.gaussian_filter(rng.random((20, 20, 20)), 1.0), jnp.float32)
    b = jnp.asarray(ndimage.gaussian_filter(rng.random((20, 20, 20)), 1.0), jnp.float32)
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())
    a, b = a[None, ..., None], b[None, ..., None]
    mask = jnp.zeros_like(a).at[:, 4:12, 3:15, 5:16].set(1.0)
    # weight 1: the unweighted MI; inside a box mask, the MI of the box cut out (independent truth)
    np.testing.assert_allclose(
        ops.mutual_information(a, b, weight=jnp.ones_like(a)),
        ops.mutual_information(a, b),
        rtol=1e-4,
    )
    box = (slice(None), slice(4, 12), slice(3, 15), slice(5, 16))
    np.testing.assert_allclose(
        ops.mutual_information(a, b, weight=mask),
        ops.mutual_information(a[box], b[box]),
        rtol=1e-4,
    )
    # the gradient with respect to the warped image vanishes outside the mask (NCC: beyond
    # the window's reach of 2 voxels)
    far = np.ones(a.shape, bool)
    far[:, 2:14, 1:17, 3:18] = False
    for name in ("ncc", "mi"):
        grad = jax.grad(lambda x, name=name: similarity_fn(name)(x, b, mask))(a)
        assert float(jnp.abs(grad).max()) > 0
        assert float(jnp.abs(jnp.asarray(grad)[far]).max()) == 0.0


def test_masks_restrict_the_registration(pair, tmp_path):
    # Moving: the fixed blob shifted +2 voxels along axis 0, and a second blob, in the corner
    # outside the fixed mask, that the fixed image does not have: with the mask it is ignored,
    # the shift is recovered; the mask must lie on its image's grid.
    moving = np.asarray(nib.load(pair["moving"]).dataobj).copy()
    grid = np.indices(SHAPE).astype(np.float32)
    moving += ndimage.gaussian_filter(
        (np.sqrt(((grid - 20.0) ** 2).sum(0)) < 3).astype(np.float32), 1.0
    )
    mask = np.zeros(SHAPE, np.int16)
    mask[3:21, 3:21, 3:21] = 1
    mask[16:, 16:, 16:] = 0
    argv = ["--fixed", pair["fixed"], "--moving", write(tmp_path / "m.nii.gz", moving)]
    argv += ["--fixed-seg", pair["fixed_seg"], "--moving-seg", pair["moving_seg"]]
    argv += ["--instance-steps", "40", "--quiet", "--no-png", "--out", str(pair["out"])]
    masked = [*argv, "--fixed-mask", write(tmp_path / "mask.nii.gz", mask)]
    assert main(masked) == 0
    metrics = json.loads((pair["out"] / "metrics.json").read_text())
    assert metrics["dice_mean"] > metrics["dice_mean_before"] + 0.1
    assert metrics["folding_percent"] < 0.1
    centre_mm = np.asarray(nib.load(str(pair["out"] / "ddf.nii.gz")).dataobj)[12, 12, 12]
    assert centre_mm[0] == pytest.approx(4.0, abs=1.5)  # +2 voxels of 2 mm
    other_grid = write(tmp_path / "mask_small.nii.gz", np.ones((12, 12, 12), np.int16))
    assert main([*argv, "--moving-mask", other_grid]) == 1


def test_bad_files_and_points_fail_in_one_line_and_write_nothing(pair, tmp_path, capsys):
    out = tmp_path / "new_out"
    base = ["--fixed", pair["fixed"], "--moving", pair["moving"], "--out", str(out), "--quiet"]
    # a truncated .nii.gz
    whole = (tmp_path / "moving.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    assert main([*base[:2], "--moving", str(tmp_path / "cut.nii.gz"), *base[4:]]) == 1
    error = capsys.readouterr().err.strip()
    assert "cut.nii.gz" in error and "not a readable NIfTI" in error and "\n" not in error
    # --out naming an existing file: left as it was
    existing = tmp_path / "results.txt"
    existing.write_text("keep")
    assert main([*base[:4], "--out", str(existing)]) == 1
    assert "results.txt" in capsys.readouterr().err and existing.read_text() == "keep"
    # a point outside its image, named by file and line (comments and blank lines counted)
    inside = "# x y z\n3 4 5\n\n6 7 8\n1 1 1\n"
    outside = "# x y z\n3 4 5\n\n6 7 8\n1000 1 1\n"
    for flag, other in (
        ("--fixed-points", "--moving-points"),
        ("--moving-points", "--fixed-points"),
    ):
        (tmp_path / "bad.txt").write_text(outside)
        (tmp_path / "good.txt").write_text(inside)
        argv = [*base, flag, str(tmp_path / "bad.txt"), other, str(tmp_path / "good.txt")]
        assert main(argv) == 1
        error = capsys.readouterr().err
        assert f"{flag} {tmp_path / 'bad.txt'} line 5" in error and "outside" in error
    # a mask on another grid than its image
    small = write(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.int16))
    assert main([*base, "--fixed-mask", small]) == 1
    assert "--fixed-mask" in capsys.readouterr().err
    assert not out.exists()


def test_the_console_script_ends_with_the_commands_code_and_its_files_written(pair, tmp_path):
    # adreg-register's entry point (commands.cli) ends the process without Python's teardown,
    # its output flushed: the exit code is the command's, every file is whole
    import subprocess
    import sys

    script = "from adreg_jax.registration.commands import cli; cli()"
    out = tmp_path / "cli_out"
    argv = [sys.executable, "-c", script, "--fixed", pair["fixed"], "--moving", pair["moving"]]
    argv += ["--out", str(out), "--affine", "--affine-steps", "2", "--instance-steps", "0"]
    done = subprocess.run([*argv, "--quiet", "--cache-dir", ""], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["folding_percent"] == 0.0
    assert json.loads((out / "metrics.json").read_text())["affine_matrix"]
    assert nib.load(str(out / "ddf_itk.nii.gz")).get_fdata().shape == (*SHAPE, 1, 3)
    assert (out / "overview.png").read_bytes()[-8:] == b"IEND\xaeB`\x82"  # the PNG's last chunk
    failed = subprocess.run(
        [sys.executable, "-c", script, "--fixed", str(tmp_path / "nope.nii.gz")]
        + ["--moving", pair["moving"], "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "nope.nii.gz" in failed.stderr


def test_affine_then_a_field_is_their_composition():
    # the exact composition (the affine map evaluated where points land) against ops.compose,
    # which interpolates a full-resolution affine DDF: equal wherever p + b(p) stays inside
    import jax.numpy as jnp

    from adreg_jax import ops
    from adreg_jax.registration.affine import affine_ddf, affine_then

    shape = (12, 14, 10)
    rng = np.random.default_rng(2)
    field = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 2.0) for _ in range(3)], -1)
    field = (2.0 * field / np.abs(field).max()).astype(np.float32)[None]
    matrix = jnp.asarray([[0.05, -0.03, 0.0], [0.02, -0.04, 0.01], [0.0, 0.03, 0.02]])
    translation = jnp.asarray([0.05, -0.04, 0.02])
    exact = np.asarray(affine_then(matrix, translation, field))
    reference = np.asarray(ops.compose(affine_ddf(matrix, translation, shape), jnp.asarray(field)))
    landing = np.indices(shape).transpose(1, 2, 3, 0) + field[0]
    inside = np.all((landing > 0) & (landing < np.asarray(shape) - 1), axis=-1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(exact[0][inside], reference[0][inside], atol=1e-4)


@pytest.mark.slow
def test_masks_restrict_the_affine_stage(tmp_path):
    # A textured ellipsoid shifted by `shift`, and in each image a bright sphere elsewhere that
    # moved another way (a table, an arm): without masks the affine map compromises between the
    # two motions; with masks that leave the spheres out it is the ellipsoid's shift.
    fixed, _ = textured_ellipsoid()
    shift = np.array([2.0, -1.5, 1.0])
    moving = ndimage.shift(fixed, shift, order=1)  # fixed point y <-> moving point y + shift
    grid = np.indices(fixed.shape).astype(np.float32)

    def sphere(centre, radius):
        offset = grid - np.asarray(centre, np.float32)[:, None, None, None]
        inside = np.sqrt((offset**2).sum(0)) < radius
        return ndimage.gaussian_filter(inside.astype(np.float32), 1.0)

    masks = {}
    for name, centre in (("fixed", (27, 5, 16)), ("moving", (27, 27, 16))):
        image = fixed if name == "fixed" else moving
        path = write(tmp_path / f"{name}.nii.gz", image + 1.5 * sphere(centre, 4.0), (1, 1, 1))
        mask = (sphere(centre, 6.5) < 0.05).astype(np.int16)
        masks[name] = (path, write(tmp_path / f"{name}_mask.nii.gz", mask, (1, 1, 1)))
    argv = ["--fixed", masks["fixed"][0], "--moving", masks["moving"][0], "--affine"]
    argv += ["--instance-steps", "0", "--quiet", "--no-png"]
    centre = (np.asarray(fixed.shape) - 1) / 2
    probes = centre + np.array([[0, 0, 0], [6, 0, 0], [0, -6, 0], [0, 0, 5]])
    errors = {}
    for name, extra in (
        ("unmasked", []),
        ("masked", ["--fixed-mask", masks["fixed"][1], "--moving-mask", masks["moving"][1]]),
    ):
        assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        world = np.asarray(metrics["affine_world"])
        mapped = probes @ world[:3, :3].T + world[:3, 3]  # voxels = world mm here
        errors[name] = np.linalg.norm(mapped - (probes + shift), axis=1).max()
    assert errors["masked"] < 0.3
    assert errors["unmasked"] > 1.0


def test_levels_take_one_factor_per_axis_or_one_for_all(pair, tmp_path, capsys):
    from adreg_jax.registration.levels import parse_levels

    assert parse_levels(["4x4x1", "2X2x1", "1"]) == [(4, 4, 1), (2, 2, 1), (1, 1, 1)]
    base = ["--fixed", pair["fixed"], "--moving", pair["moving"], "--quiet", "--no-png"]
    for bad in ("4x4", "0", "2x2x-1", "two", "4x4x1x1"):
        assert main([*base, "--out", str(tmp_path / "bad"), "--levels", bad]) == 1
        error = capsys.readouterr().err.strip()
        assert f"--levels {bad!r}" in error and "AxBxC" in error and "\n" not in error
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "per_axis"
    argv = [*base, "--out", str(out), "--levels", "4x4x2", "2x2x1", "--instance-steps", "5"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["levels"] == [[4, 4, 2], [2, 2, 1]] and metrics["instance_steps"] == [5, 5]


def test_dice_report_matches_plain_dice_for_few_and_many_labels():
    from adreg_jax.registration.metrics import dice_report

    rng = np.random.default_rng(0)
    for count in (3, 12):  # one comparison per label, and the joint histogram beyond 8 labels
        fixed, moving, warped = (rng.integers(0, count + 1, size=(9, 10, 11)) for _ in range(3))
        report = dice_report(fixed, moving, warped)
        for key, other in (("dice", warped), ("dice_before", moving)):
            assert list(report[key]) == [str(label) for label in range(1, count + 1)]
            for label, value in report[key].items():
                a, b = fixed == int(label), other == int(label)
                np.testing.assert_allclose(value, 2 * (a & b).sum() / (a.sum() + b.sum()))
        np.testing.assert_allclose(report["dice_mean"], np.mean(list(report["dice"].values())))


def test_a_network_field_that_lowers_the_similarity_is_dropped_unless_kept(capsys):
    """The network's field as the result (--instance-steps 0) is checked against the image after
    the affine stage alone, on the network's grid: a field that undoes a known shift raises NCC
    and MI and is kept; its opposite lowers them and is dropped, unless --keep-network. Masks
    count as in the deformable stage: a field that only moves what lies outside them gains
    nothing."""
    import argparse

    import jax.numpy as jnp

    from adreg_jax.registration.deformable import NetworkField
    from adreg_jax.registration.metrics import network_objective_gain
    from adreg_jax.registration.pipeline import _checked_network_field

    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.asarray(SHAPE, np.float32)[:, None, None, None] / 2
    blob = (np.sqrt(((grid - centre) ** 2).sum(0)) < 6).astype(np.float32)
    fixed = ndimage.gaussian_filter(blob, 1.0)
    source = ndimage.shift(fixed, (2.0, 0.0, 0.0), order=1)  # source(p) = fixed(p - 2 e0)
    fixed_j, source_j = (jnp.asarray(x)[None, ..., None] for x in (fixed, source))
    undo = np.zeros((1, *SHAPE, 3), np.float32)
    undo[..., 0] = 2.0  # warped(p) = source(p + 2 e0) = fixed(p)
    for similarity in ("ncc", "mi"):
        right = network_objective_gain(fixed_j, source_j, undo, similarity)
        wrong = network_objective_gain(fixed_j, source_j, -undo, similarity)
        assert float(right) > 0 > float(wrong), similarity
    outside = np.zeros(SHAPE, np.float32)
    outside[:2] = 1.0  # a corner where both images are empty
    masks = tuple(jnp.asarray(outside)[None, ..., None] for _ in range(2))
    assert abs(float(network_objective_gain(fixed_j, source_j, undo, "ncc", masks))) < 1e-4

    # the network's grid half the fixed one: the check runs there, the field kept is the full one
    half = tuple(n // 2 for n in SHAPE)
    small = [np.asarray(ndimage.zoom(x, 0.5, order=1))[None, ..., None] for x in (fixed, source)]
    full_field = jnp.asarray(undo)

    def field(sign):
        return NetworkField(sign * full_field, *small, sign * np.ones((1, *half, 3)) * [1, 0, 0])

    args = argparse.Namespace(similarity="ncc", quiet=False, keep_network=False)
    kept, record = _checked_network_field(field(1.0), args, None)
    assert kept is not None and float(kept[0, 0, 0, 0, 0]) == 2.0
    assert record["network_kept"] and record["network_objective_gain"] > 0
    dropped, record = _checked_network_field(field(-1.0), args, masks=None)
    assert dropped is None and not record["network_kept"]
    assert "lowered the ncc similarity" in capsys.readouterr().err
    args.keep_network = True
    kept, record = _checked_network_field(field(-1.0), args, (jnp.ones((1, *SHAPE, 1)),) * 2)
    assert kept is not None and record["network_kept"] and record["network_objective_gain"] < 0


def test_network_passes_see_the_moving_image_warped_by_the_passes_before(monkeypatch):
    """``network_field(scales=...)``, one pass per scale, with a stand-in network that finds half
    of a blob's shift (from the centres of mass of what it is shown): one pass finds 1/2 of it,
    two 3/4, three 7/8, as each pass sees what the ones before left; a pass on a grid twice as
    fine per axis finds the same millimetres, and the field comes back on the fixed grid in its
    voxels."""
    import jax.numpy as jnp
    import ml_collections

    from adreg_jax.registration import deformable

    def half_the_shift(variables, fixed, moving):
        grid = jnp.stack(jnp.meshgrid(*(jnp.arange(n) for n in fixed.shape[1:4]), indexing="ij"))

        def centre(image):
            weights = image[None, 0, ..., 0]
            return (grid * weights).sum((1, 2, 3)) / weights.sum()

        shift = 0.5 * (centre(moving) - centre(fixed))  # pulls the moving blob onto the fixed
        return {"ddf": jnp.broadcast_to(shift, (1, *fixed.shape[1:4], 3))}

    config = ml_collections.ConfigDict(
        {"data": {"image_size": (12, 12, 12)}, "model": {"channels": (4, 8)}}
    )
    monkeypatch.setattr(deformable, "restored_network", lambda c, m: (config, half_the_shift, {}))
    grid = np.indices(SHAPE).astype(np.float32)
    centre = np.asarray(SHAPE, np.float32)[:, None, None, None] / 2
    fixed = ndimage.gaussian_filter((np.sqrt(((grid - centre) ** 2).sum(0)) < 5) * 1.0, 1.5)
    shift = np.asarray([3.0, -2.0, 1.0])  # voxels of the fixed grid
    moving = ndimage.shift(fixed, shift, order=1)
    fixed_j, moving_j = (jnp.asarray(x, jnp.float32)[None, ..., None] for x in (fixed, moving))
    for scales, found in (((1,), 0.5), ((1, 1), 0.75), ((1, 1, 1), 0.875), ((2, 2), 0.75)):
        field = deformable.network_field(None, fixed_j, moving_j, model="stub", scales=scales)
        assert field.ddf.shape == (1, *SHAPE, 3)
        assert field.grid_ddf.shape == (1, *(12 * scales[-1],) * 3, 3), scales
        centre_ddf = field.ddf[0, 12, 12, 12]
        np.testing.assert_allclose(centre_ddf, found * shift, atol=0.1, err_msg=str(scales))
    with pytest.raises(ValueError, match="give one or more numbers > 0"):
        deformable.network_field(None, fixed_j, moving_j, model="stub", scales=(1, 0))

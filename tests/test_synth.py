"""Synthesised brain pairs (adreg_jax.data.synth) and the soft Dice label loss, on small grids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adreg_jax import ops
from adreg_jax.data import build_dataset, dataset_labels, load_atlas, synth
from adreg_jax.data.generated import _resample, compose
from adreg_jax.losses import field_error, registration_loss, soft_dice
from configs import default

SHAPE = (24, 28, 24)
SMALL = (32, 40, 32)


def synth_config(shape=SHAPE):
    config = default.get_config()
    config.data.dataset = "synth_brain"
    config.data.image_size = shape
    config.data.val_size = 3
    return config


def correlation_ratio(image, seg):
    """eta^2: the share of the image's variance explained by the label regions."""
    image, seg = image.ravel().astype(np.float64), seg.ravel()
    mean = image.mean()
    between = sum(
        (seg == label).sum() * (image[seg == label].mean() - mean) ** 2 for label in np.unique(seg)
    )
    return between / ((image - mean) ** 2).sum()


def test_pairs_are_deterministic_and_shaped_as_generated_brains():
    config = synth_config()
    source = build_dataset(config.data, "val", seed=0)
    pair = source[1]
    assert set(pair) == {
        "fixed", "moving", "fixed_seg", "moving_seg", "true_ddf", "spacing", "same_contrast"
    }  # fmt: skip
    assert pair["true_ddf"].shape == (*SHAPE, 3) and pair["true_ddf"].dtype == np.float32
    for key in ("fixed", "moving"):
        assert pair[key].shape == (*SHAPE, 1) and pair[key].dtype == np.float32
        assert pair[key].min() == 0.0 and pair[key].max() == pytest.approx(1.0)
    for key in ("fixed_seg", "moving_seg"):
        assert pair[key].shape == SHAPE and pair[key].dtype == np.int32
        assert set(np.unique(pair[key])) == {0, 1, 2, 3}
    # the 96 x 112 x 96 grid of 2 mm resampled to 24 x 28 x 24: 8 mm voxels
    np.testing.assert_allclose(pair["spacing"], [8.0, 8.0, 8.0])
    again = build_dataset(config.data, "val", seed=0)[1]  # a fresh source: same (seed, index)
    for key, value in pair.items():
        np.testing.assert_array_equal(again[key], value)
    other = source[2]
    assert not np.array_equal(other["fixed"], pair["fixed"])
    assert not np.array_equal(build_dataset(config.data, "val", seed=1)[1]["fixed"], pair["fixed"])
    assert dataset_labels(config.data) == (1, 2, 3)


def test_atlas_is_padded_at_its_own_spacing_to_the_full_extent():
    image, labels, spacing = synth.atlas_on_grid()
    atlas_image, atlas_labels, atlas_spacing = load_atlas()
    assert labels.shape == synth.FULL_EXTENT and tuple(atlas_labels.shape) < synth.FULL_EXTENT
    np.testing.assert_array_equal(spacing, atlas_spacing)
    for label in range(4):
        if label:  # zero padding adds background only
            assert np.sum(labels == label) == np.sum(atlas_labels == label)
    assert image.sum() == pytest.approx(atlas_image.sum(), rel=1e-6)


def test_zero_deformation_gives_the_atlas_labels():
    source = synth.SynthBrainPairs(SHAPE, length=2, max_mm=0.0, affine=(0.0, 0.0, 0.0))
    _, labels, _ = synth.atlas_on_grid(SHAPE)
    for index in range(2):
        pair = source[index]
        np.testing.assert_array_equal(pair["fixed_seg"], labels)
        np.testing.assert_array_equal(pair["moving_seg"], labels)


def test_the_pair_map_has_its_own_size_and_affine():
    # no map between the pair's images: fixed = moving, whatever the subject's own map
    still = synth.SynthBrainPairs(SHAPE, length=1, pair_max_mm=0.0, pair_affine=(0.0, 0.0, 0.0))
    pair = still[0]
    np.testing.assert_array_equal(pair["true_ddf"], 0.0)
    np.testing.assert_array_equal(pair["fixed_seg"], pair["moving_seg"])
    assert (pair["moving_seg"] != synth.atlas_on_grid(SHAPE)[1]).any()  # the subject still moves
    # a purely affine pair map, A p + b, has det J = det A (affine maps of 5 %: |det - 1| > 0)
    affine = synth.SynthBrainPairs(SHAPE, length=1, pair_max_mm=0.0, pair_affine=(5.0, 0.05, 2.0))
    ddf = affine[0]["true_ddf"]
    det = jacobian_det_numpy(ddf)
    assert np.ptp(det) < 1e-4 and abs(float(det.mean()) - 1.0) > 1e-3
    # the config fields reach the source
    config = synth_config()
    config.data.synth_pair_max_mm = 0.0
    config.data.synth_pair_affine = (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(build_dataset(config.data, "val", 0)[0]["true_ddf"], 0.0)


def jacobian_det_numpy(ddf):
    """det(I + grad ddf) with numpy.gradient (the convention of DESIGN.md), written apart."""
    grads = np.stack([np.stack(np.gradient(ddf[..., k]), axis=-1) for k in range(3)], axis=-2)
    return np.linalg.det(grads + np.eye(3))


def test_subject_maps_are_the_affine_and_diffeomorphic_maps_asked_for():
    rng = np.random.default_rng(0)
    spacing = np.asarray([2.0, 2.0, 2.0], np.float32)
    # a shift alone: constant, at most 4 mm = 2 voxels per axis
    shift = synth.subject_ddf(rng, SMALL, spacing, 0.0, (0.0, 0.0, 4.0))
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0, 0, 0], shift.shape), atol=1e-5)
    assert np.all(np.abs(shift[0, 0, 0]) <= 2.0) and np.any(shift[0, 0, 0] != 0)
    # a rotation alone: det J = 1 everywhere, the grid centre does not move
    rotation = synth.subject_ddf(rng, (33, 33, 33), spacing, 0.0, (10.0, 0.0, 0.0))
    np.testing.assert_allclose(jacobian_det_numpy(rotation), 1.0, atol=1e-4)
    np.testing.assert_allclose(rotation[16, 16, 16], 0.0, atol=1e-5)
    assert np.abs(rotation).max() > 1.0  # 10 degrees at 16 voxels from the centre
    # the smooth deformation: displacements of a few voxels, no folding
    ddf = synth.subject_ddf(rng, SMALL, spacing, 8.0, (0.0, 0.0, 0.0))
    assert 0.5 < np.abs(ddf).max() < 3 * 8.0 / 2.0
    assert jacobian_det_numpy(ddf).min() > 0.0


def relative_roughness(ddf):
    """Mean |grad ddf| over mean |ddf - its mean|: 1 / the length (voxels) over which it varies."""
    grads = np.stack([np.stack(np.gradient(ddf[..., k]), axis=-1) for k in range(3)], axis=-2)
    centred = ddf - ddf.mean(axis=(0, 1, 2))
    return np.linalg.norm(grads, axis=(-2, -1)).mean() / np.linalg.norm(centred, axis=-1).mean()


def test_the_detail_map_is_finer_diffeomorphic_and_off_by_default():
    spacing = np.asarray([2.0, 2.0, 2.0], np.float32)
    still = (0.0, 0.0, 0.0)

    def draw(max_mm, detail_mm, seed=0):
        rng = np.random.default_rng(seed)
        return synth.subject_ddf(rng, SMALL, spacing, max_mm, still, (32.0, 32.0), detail_mm)

    coarse, detail = draw(8.0, 0.0), draw(0.0, 8.0)
    assert np.abs(detail).max() > 0.5  # a deformation of its own, up to 8 mm = 4 voxels
    assert jacobian_det_numpy(detail).min() > 0.0 and jacobian_det_numpy(draw(8.0, 8.0)).min() > 0
    # control points 8-16 mm apart against 32 mm: it varies over a shorter length
    assert relative_roughness(detail) > 1.5 * relative_roughness(coarse)
    # off by default, and then no random number more is drawn: earlier recipes' pairs stay
    rng = np.random.default_rng(0)
    synth.subject_ddf(rng, SMALL, spacing, 8.0, still, (32.0, 32.0))
    reference = rng.random()
    rng = np.random.default_rng(0)
    synth.subject_ddf(rng, SMALL, spacing, 8.0, still, (32.0, 32.0), 0.0)
    assert rng.random() == reference
    # the config field reaches both maps of a pair (the subject's and the pair's)
    config = synth_config()
    plain = build_dataset(config.data, "val", 0)[0]
    config.data.synth_detail_mm = 6.0
    detailed = build_dataset(config.data, "val", 0)[0]
    assert not np.allclose(plain["true_ddf"], detailed["true_ddf"])
    assert not np.array_equal(plain["moving_seg"], detailed["moving_seg"])


def test_labels_follow_each_subjects_deformation():
    """Each image is drawn from its own label map: its intensities are explained by its own
    segmentation better than by the other subject's (differently deformed) one."""
    source = synth.SynthBrainPairs(SMALL, length=4, max_mm=12.0)
    _, atlas_labels, _ = synth.atlas_on_grid(SMALL)
    for index in range(4):
        pair = source[index]
        fixed, moving = pair["fixed"][..., 0], pair["moving"][..., 0]
        assert correlation_ratio(fixed, pair["fixed_seg"]) > correlation_ratio(
            fixed, pair["moving_seg"]
        )
        assert correlation_ratio(moving, pair["moving_seg"]) > correlation_ratio(
            moving, pair["fixed_seg"]
        )
        dice = np.asarray(ops.dice(pair["fixed_seg"], atlas_labels, (1, 2, 3)))
        assert 0.3 < dice.mean() < 0.98  # deformed, still the same anatomy


def test_true_ddf_warps_the_moving_labels_onto_the_fixed_ones():
    """fixed = moving o (id + true_ddf): warping the moving labels by the true field recovers the
    fixed labels up to nearest-neighbour resampling, far better than no field or a wrong one."""
    source = synth.SynthBrainPairs(SMALL, length=3, max_mm=12.0)
    for index in range(3):
        pair = source[index]
        assert np.abs(pair["true_ddf"]).max() > 1.0  # a real deformation (6 mm voxels)

        def dice_after(ddf, pair=pair):
            warped = _resample(pair["moving_seg"], ddf, order=0)
            return float(np.mean(ops.dice(warped, pair["fixed_seg"], (1, 2, 3))))

        recovered = dice_after(pair["true_ddf"])
        assert recovered > dice_after(np.zeros_like(pair["true_ddf"])) + 0.05
        assert recovered > dice_after(-pair["true_ddf"]) + 0.05
        assert recovered > 0.6  # labels of 6 mm voxels, resampled to the nearest twice


def test_compose_is_the_map_then_the_other():
    """compose(a, b)(p) = a(p) + b(p + a(p)): two constant shifts add; a shift then a field
    samples the field at the shifted point."""
    a = np.zeros((8, 8, 8, 3), np.float32)
    a[..., 0] = 1.0
    b = np.zeros((8, 8, 8, 3), np.float32)
    b[..., 1] = np.arange(8, dtype=np.float32)[:, None, None]  # b_y(p) = p_x
    out = compose(a, b)
    np.testing.assert_allclose(out[..., 0], 1.0)
    np.testing.assert_allclose(out[:7, :, :, 1], b[1:, :, :, 1])  # sampled one voxel on
    np.testing.assert_allclose(out[7, :, :, 1], 7.0)  # beyond the grid: the border value


def test_contrasts_differ_unless_shared_and_real_t1_is_in_the_mix():
    def correlations(same_contrast, real_contrast=0.0):
        source = synth.SynthBrainPairs(
            SMALL,
            length=6,
            max_mm=0.0,
            affine=(0.0, 0.0, 0.0),
            same_contrast=same_contrast,
            real_contrast=real_contrast,
        )
        pairs = [source[i] for i in range(6)]
        return [np.corrcoef(p["fixed"].ravel(), p["moving"].ravel())[0, 1] for p in pairs]

    independent, shared = correlations(0.0), correlations(1.0)
    # the flag that tells the loss where an intensity similarity is right: set for a shared map
    # and for the atlas's T1 drawn twice, not for two drawn maps
    for same, real, flag in ((1.0, 0.0, 1.0), (0.0, 0.0, 0.0), (0.0, 1.0, 1.0)):
        source = synth.SynthBrainPairs(
            SHAPE, length=3, max_mm=0.0, same_contrast=same, real_contrast=real
        )
        assert [float(source[i]["same_contrast"]) for i in range(3)] == [flag] * 3
    assert min(independent) < 0.0  # some pair has an inverted contrast on the same anatomy
    assert np.mean(shared) > np.mean(independent) + 0.3
    t1, _, _ = synth.atlas_on_grid(SMALL)
    source = synth.SynthBrainPairs(
        SMALL, length=3, max_mm=0.0, affine=(0.0, 0.0, 0.0), real_contrast=1.0
    )
    for index in range(3):
        assert np.corrcoef(source[index]["fixed"].ravel(), t1.ravel())[0, 1] > 0.9


def _boxes(shape=(16, 16, 16), shift=0):
    seg = np.zeros(shape, np.int32)
    seg[4 + shift : 12 + shift, 4:12, 2:7] = 1
    seg[4 + shift : 12 + shift, 4:12, 9:14] = 2
    return jnp.asarray(seg)[None]


def test_soft_dice_loss_closed_forms():
    fixed = _boxes()
    moving = _boxes(shift=2)  # moving(p) = fixed(p - 2 along D): ddf = +2 undoes it
    zero = jnp.zeros((1, 16, 16, 16, 3))
    shift = zero.at[..., 0].set(2.0)
    labels = (1, 2, 3)  # 3 is absent from both maps: left out of the mean
    dice_fn = jax.jit(lambda fixed, moving, ddf: soft_dice(fixed, moving, ddf, labels)[0])
    assert float(dice_fn(fixed, fixed, zero)) == pytest.approx(1.0, abs=1e-6)
    # boxes 8 voxels long overlapping by 6: 2 * 6 / (8 + 8) for each label
    assert float(dice_fn(fixed, moving, zero)) == pytest.approx(0.75, abs=1e-6)
    assert float(dice_fn(fixed, moving, shift)) == pytest.approx(1.0, abs=1e-6)
    grad = jax.jit(jax.grad(dice_fn, argnums=2))(fixed, moving, zero)
    assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad).max()) > 0
    assert float(jnp.sum(grad[..., 0])) > 0  # pushing towards +2 along D raises the overlap

    config = default.get_config()
    config.loss.dice_weight = 1.0
    batch = {"fixed": jnp.zeros((1, 16, 16, 16, 1)), "fixed_seg": fixed, "moving_seg": moving}
    outputs = {"warped": batch["fixed"], "ddf": zero}
    loss_fn = jax.jit(lambda outputs, batch: registration_loss(outputs, batch, config.loss, labels))
    loss_zero, terms = loss_fn(outputs, batch)
    loss_shift, _ = loss_fn({**outputs, "ddf": shift}, batch)
    assert float(terms["dice_soft"]) == pytest.approx(0.75, abs=1e-6)
    # the constant shift costs no smoothness or Jacobian: the loss falls by exactly 1 - 0.75
    assert float(loss_zero - loss_shift) == pytest.approx(0.25, abs=1e-5)
    config.loss.dice_weight = 0.0  # off (the default): no term
    assert (
        "dice_soft"
        not in jax.eval_shape(
            lambda outputs, batch: registration_loss(outputs, batch, config.loss, labels),
            outputs,
            batch,
        )[1]
    )


def test_field_error_term_closed_form():
    """The supervised term: mean end-point error in voxels, |(3, 4, 0)| = 5 everywhere."""
    true_ddf = jnp.zeros((1, 8, 8, 8, 3)).at[..., 0].set(3.0).at[..., 1].set(4.0)
    zero = jnp.zeros_like(true_ddf)
    assert float(field_error(zero, true_ddf)[0]) == pytest.approx(5.0, abs=1e-5)
    assert float(field_error(true_ddf, true_ddf)[0]) == pytest.approx(0.0, abs=1e-5)
    grad = jax.grad(lambda d: field_error(d, true_ddf)[0])(true_ddf)
    assert np.all(np.isfinite(np.asarray(grad)))  # differentiable at an exact match

    config = default.get_config()
    config.loss.ddf_weight = 0.5
    batch = {"fixed": jnp.zeros((1, 8, 8, 8, 1)), "true_ddf": true_ddf}
    outputs = {"warped": batch["fixed"], "ddf": zero}
    loss_fn = jax.jit(lambda outputs, batch: registration_loss(outputs, batch, config.loss))
    loss_zero, terms = loss_fn(outputs, batch)
    loss_true, _ = loss_fn({**outputs, "ddf": true_ddf}, batch)
    assert float(terms["ddf_error"]) == pytest.approx(5.0, abs=1e-5)
    # a constant field has no smoothness or Jacobian cost: the loss falls by 0.5 * 5
    assert float(loss_zero - loss_true) == pytest.approx(2.5, abs=1e-4)


def test_image_terms_weighted_zero_are_reported_without_gradient():
    """A label-only recipe (ncc_weight = ssim_weight = 0) still logs NCC and SSIM, but the loss's
    gradient does not flow through them: no backward pass is spent on a term that weighs 0."""
    config = default.get_config()
    rng = np.random.default_rng(0)
    fixed = jnp.asarray(rng.uniform(size=(1, 12, 12, 12, 1)), jnp.float32)
    outputs = {"warped": fixed[:, ::-1], "ddf": jnp.zeros((1, 12, 12, 12, 3))}

    def gradient(ncc_weight, ssim_weight):
        config.loss.ncc_weight, config.loss.ssim_weight = ncc_weight, ssim_weight

        def loss(warped):
            value, terms = registration_loss(
                {**outputs, "warped": warped}, {"fixed": fixed}, config.loss
            )
            return value, terms

        return jax.grad(loss, has_aux=True)(outputs["warped"])

    grad, terms = gradient(0.0, 0.0)
    assert float(jnp.abs(grad).max()) == 0.0
    assert 0.0 < float(terms["ncc"]) < 1.0 and np.isfinite(float(terms["ssim"]))
    for weights in ((1.0, 0.0), (0.0, 1.0)):
        assert float(jnp.abs(gradient(*weights)[0]).max()) > 0.0


def test_image_terms_count_only_pairs_that_share_a_contrast():
    """With a batch's ``same_contrast`` flags (synth_brain), NCC and SSIM enter the loss on the
    flagged pairs only: a cross-contrast pair adds nothing to them and gets no gradient from
    them; without flags, or with ``loss.same_contrast_only`` off, every pair counts."""
    config = default.get_config()
    config.loss.smooth_weight = config.loss.jacobian_weight = 0.0
    rng = np.random.default_rng(1)
    fixed = jnp.asarray(rng.uniform(size=(2, 12, 12, 12, 1)), jnp.float32)
    warped = jnp.asarray(rng.uniform(size=(2, 12, 12, 12, 1)), jnp.float32)
    ddf = jnp.zeros((2, 12, 12, 12, 3))

    def loss(warped, flags):
        batch = {"fixed": fixed} if flags is None else {"fixed": fixed, "same_contrast": flags}
        return registration_loss({"warped": warped, "ddf": ddf}, batch, config.loss)

    ncc = ops.ncc_local(warped, fixed, window=int(config.loss.ncc_window))
    ssim = ops.ssim(warped, fixed)
    expected_all = float(jnp.mean(1.0 - ncc) + jnp.mean(1.0 - ssim))
    assert float(loss(warped, None)[0]) == pytest.approx(expected_all, rel=1e-5)
    flags = jnp.asarray([1.0, 0.0])
    value, terms = loss(warped, flags)
    # the mean over the batch of the flagged pair's terms alone
    assert float(value) == pytest.approx(float(2.0 - ncc[0] - ssim[0]) / 2.0, rel=1e-5)
    assert float(terms["ncc"]) == pytest.approx(float(jnp.mean(ncc)), rel=1e-6)  # logged: all
    grad = jax.grad(lambda w: loss(w, flags)[0])(warped)
    assert float(jnp.abs(grad[0]).max()) > 0.0 and float(jnp.abs(grad[1]).max()) == 0.0
    config.loss.same_contrast_only = False  # every pair, flags or not (the loss before the flag)
    assert float(loss(warped, flags)[0]) == pytest.approx(expected_all, rel=1e-5)


def relative_gradient_per_mm(ddf: np.ndarray, spacing_mm: float) -> float:
    """mean |d u / d x| over mean |u| (1 / mm) of a field in voxels on an isotropic grid: how
    fast the field changes, in millimetres, whatever the voxel size."""
    grads = [np.gradient(ddf[..., k], axis=a) for k in range(3) for a in range(3)]
    return float(np.mean(np.abs(grads)) / np.mean(np.abs(ddf)) / spacing_mm)


def test_deformations_vary_over_the_same_millimetres_on_any_grid():
    """``scale_mm`` fixes how local a deformation is in mm: the same on a 1.5 mm and a 6 mm grid
    over one field of view, and 3 times faster-varying at 16 mm than at 48 mm."""

    def rate(shape, spacing_mm, scale_mm):
        spacing = np.full(3, spacing_mm, np.float32)
        rates = [
            relative_gradient_per_mm(
                synth.subject_ddf(
                    np.random.default_rng(seed), shape, spacing, 8.0, (0, 0, 0), scale_mm
                ),
                spacing_mm,
            )
            for seed in range(4)
        ]
        return float(np.mean(rates))

    fine = rate((64, 64, 64), 1.5, (16.0, 16.0))
    coarse = rate((16, 16, 16), 6.0, (16.0, 16.0))
    smooth = rate((64, 64, 64), 1.5, (48.0, 48.0))
    assert 0.7 < coarse / fine < 1.3, (coarse, fine)
    assert 2.0 < fine / smooth < 4.5, (fine, smooth)

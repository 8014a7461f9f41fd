"""The ops core against independent truth: closed forms, scipy references, published values."""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import ndimage

from adreg_jax import ops

SHAPE = (10, 11, 12)
DIRLAB = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dirlab"


def ramp(shape=SHAPE, coeffs=(1.0, 2.0, 3.0)):
    """f(i, j, k) = c0 i + c1 j + c2 k: linear, so trilinear interpolation of it is exact."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return (grid.astype(np.float32) @ np.asarray(coeffs, np.float32))[..., None]


def constant_ddf(vector, shape=SHAPE):
    return np.broadcast_to(np.asarray(vector, np.float32), (*shape, 3)).copy()


def random_field(key, shape, scale):
    return jax.random.normal(jax.random.key(key), shape, dtype=jnp.float32) * scale


def smooth_field(seed, shape, amplitude):
    rng = np.random.default_rng(seed)
    field = rng.normal(size=(*shape, 3)).astype(np.float32)
    for k in range(3):
        field[..., k] = ndimage.gaussian_filter(field[..., k], 2.0)
    return field / np.abs(field).max() * amplitude


# --- warp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(1.0, 0.0, 0.0), (0.0, -2.0, 1.0), (0.5, 0.25, -0.75)])
def test_warp_translates_a_ramp_exactly(shift):
    image = ramp()
    warped = ops.warp(jnp.asarray(image), jnp.asarray(constant_ddf(shift)))
    expected = image[..., 0] + np.dot(shift, (1.0, 2.0, 3.0))
    inner = (slice(2, -2),) * 3
    np.testing.assert_allclose(np.asarray(warped)[..., 0][inner], expected[inner], atol=1e-4)


def test_warp_identity_field_returns_the_image():
    image = np.random.default_rng(0).random((2, *SHAPE, 3), dtype=np.float32)
    zero = jnp.zeros((2, *SHAPE, 3))
    np.testing.assert_array_equal(np.asarray(ops.warp(jnp.asarray(image), zero)), image)
    labels = np.random.default_rng(1).integers(0, 5, (*SHAPE, 1)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(ops.warp(labels, zero[0], order=0)), labels)


def test_warp_matches_scipy_map_coordinates():
    rng = np.random.default_rng(3)
    image = rng.random(SHAPE, dtype=np.float32)
    ddf = rng.normal(scale=2.0, size=(*SHAPE, 3)).astype(np.float32)
    coords = np.moveaxis(np.indices(SHAPE).astype(np.float32) + np.moveaxis(ddf, -1, 0), 0, 0)
    for mode, scipy_mode in (("constant", "grid-constant"), ("border", "nearest")):
        expected = ndimage.map_coordinates(image, coords, order=1, mode=scipy_mode, cval=0.0)
        got = ops.warp(jnp.asarray(image[..., None]), jnp.asarray(ddf), mode=mode)[..., 0]
        np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    expected = ndimage.map_coordinates(image, coords, order=0, mode="grid-constant", cval=0.0)
    got = ops.warp(jnp.asarray(image[..., None]), jnp.asarray(ddf), order=0)[..., 0]
    # Rounding at exact .5 ties may differ; elsewhere nearest neighbour is exact.
    ties = np.any(np.isclose(np.abs(np.mod(coords, 1.0)), 0.5, atol=1e-4), axis=0)
    np.testing.assert_array_equal(np.asarray(got)[~ties], expected[~ties])


def test_warp_outside_reads_zero_or_border():
    image = jnp.ones((*SHAPE, 1))
    far = jnp.asarray(constant_ddf((100.0, 0.0, 0.0)))
    assert float(jnp.abs(ops.warp(image, far)).max()) == 0.0
    assert float(jnp.abs(ops.warp(image, far, mode="border") - 1.0).max()) == 0.0


def test_warp_batch_dims_channels_and_bfloat16():
    rng = np.random.default_rng(4)
    image = jnp.asarray(rng.random((2, 3, 8, 8, 8, 2), dtype=np.float32))
    ddf = random_field(0, (2, 3, 8, 8, 8, 3), 1.5)
    batched = ops.warp(image, ddf)
    single = ops.warp(image[1, 2], ddf[1, 2])
    np.testing.assert_allclose(np.asarray(batched[1, 2]), np.asarray(single), atol=1e-6)
    low = ops.warp(image.astype(jnp.bfloat16), ddf.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(batched), atol=0.05)


@pytest.mark.parametrize("mode", ["constant", "border"])
def test_warp_gradients_match_finite_differences(mode):
    with jax.enable_x64(True):
        image = jax.random.uniform(jax.random.key(1), (1, 6, 7, 8, 2), dtype=jnp.float64)
        ddf = jax.random.normal(jax.random.key(2), (1, 6, 7, 8, 3), dtype=jnp.float64) * 2.0
        check_grads(lambda d: ops.warp(image, d, mode=mode), (ddf,), order=1, modes=["rev"])
        check_grads(lambda im: ops.warp(im, ddf, mode=mode), (image,), order=1, modes=["rev"])


def test_warp_ddf_gradient_has_no_scatter():
    image = jnp.ones((1, 8, 8, 8, 1))
    ddf = jnp.zeros((1, 8, 8, 8, 3))
    grad_fn = jax.jit(jax.grad(lambda d: jnp.sum(ops.warp(image, d) ** 2)))
    assert "scatter" not in grad_fn.lower(ddf).as_text()
    both = jax.jit(jax.grad(lambda im, d: jnp.sum(ops.warp(im, d) ** 2), argnums=(0, 1)))
    assert "scatter" in both.lower(image, ddf).as_text()


def test_warp_traces_once_per_shape():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(image, ddf):
        return ops.warp(image, ddf)

    for seed in range(3):
        step(jnp.ones((1, 8, 8, 8, 1)) * seed, jnp.zeros((1, 8, 8, 8, 3)))


def test_warp_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"ddf.*\(1, 8, 8, 8, 2\)"):
        ops.warp(jnp.ones((1, 8, 8, 8, 1)), jnp.zeros((1, 8, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"image has shape \(1, 8, 8, 9, 1\)"):
        ops.warp(jnp.ones((1, 8, 8, 9, 1)), jnp.zeros((1, 8, 8, 8, 3)))


# --- compose, resize, integrate -------------------------------------------------------------------


def test_compose_of_translations_adds_them():
    a, b = constant_ddf((1.0, 0.5, 0.0)), constant_ddf((0.0, -1.0, 2.0))
    composed = ops.compose(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(composed), a + b, atol=1e-6)


def test_compose_matches_warping_twice():
    shape = (16, 16, 16)
    image = jnp.asarray(ndimage.gaussian_filter(np.random.default_rng(5).random(shape), 2.0))
    image = image.astype(jnp.float32)[..., None]
    a = jnp.asarray(smooth_field(6, shape, 1.5))
    b = jnp.asarray(smooth_field(7, shape, 1.5))
    twice = ops.warp(ops.warp(image, a), b)
    once = ops.warp(image, ops.compose(a, b))
    inner = (slice(4, -4),) * 3
    error = np.abs(np.asarray(twice - once)[inner]).max()
    assert error < 0.05 * float(jnp.abs(image).max())


def test_resize_ddf_scales_values_with_the_grid():
    small = jnp.asarray(constant_ddf((1.0, -0.5, 2.0), (4, 5, 6)))
    big = ops.resize_ddf(small, (8, 10, 18))
    assert big.shape == (8, 10, 18, 3)
    np.testing.assert_allclose(np.asarray(big[3, 4, 5]), [2.0, -1.0, 6.0], atol=1e-5)
    batched = ops.resize_ddf(small[None], (8, 10, 18))
    assert batched.shape == (1, 8, 10, 18, 3)


def test_integrate_small_velocity_is_the_velocity_itself():
    velocity = jnp.asarray(smooth_field(8, (12, 12, 12), 0.05))
    ddf = ops.integrate_velocity(velocity, steps=7)
    np.testing.assert_allclose(np.asarray(ddf), np.asarray(velocity), atol=2e-3)


def test_integrate_translation_is_exact_and_large_field_does_not_fold():
    velocity = jnp.asarray(constant_ddf((0.7, -0.3, 0.2), (8, 8, 8)))
    np.testing.assert_allclose(
        np.asarray(ops.integrate_velocity(velocity)), np.asarray(velocity), atol=1e-5
    )
    big = jnp.asarray(smooth_field(9, (16, 16, 16), 6.0))
    assert float(ops.folding_fraction(big)) > 0.0  # used directly, this field folds
    assert float(ops.folding_fraction(ops.integrate_velocity(big))) == 0.0


# --- Jacobian and regularisers --------------------------------------------------------------------


def test_jacobian_of_affine_field_is_det_a():
    a_minus_i = np.array([[0.1, 0.2, 0.0], [-0.1, 0.05, 0.3], [0.2, 0.0, -0.2]], np.float32)
    grid = np.indices(SHAPE).astype(np.float32)
    ddf = np.einsum("kl,l...->...k", a_minus_i, grid)
    det = ops.jacobian_determinant(jnp.asarray(ddf))
    expected = np.linalg.det(np.eye(3) + a_minus_i)
    np.testing.assert_allclose(np.asarray(det), expected, rtol=1e-5)


def test_jacobian_matches_numpy_gradient_reference():
    ddf = smooth_field(10, SHAPE, 3.0)
    grads = [np.gradient(ddf[..., k]) for k in range(3)]
    jac = np.stack([np.stack(g, -1) for g in grads], -2) + np.eye(3)
    np.testing.assert_allclose(
        np.asarray(ops.jacobian_determinant(jnp.asarray(ddf))), np.linalg.det(jac), atol=1e-4
    )


def test_folded_field_is_detected():
    # ddf_0 = -2 i on the middle slab maps i -> -i there: det = -1 inside the slab.
    ddf = np.zeros((*SHAPE, 3), np.float32)
    ddf[3:7, ..., 0] = -2.0 * np.arange(3, 7, dtype=np.float32)[:, None, None]
    det = np.asarray(ops.jacobian_determinant(jnp.asarray(ddf)))
    assert np.all(det[4:6] < 0)
    stats = ops.jacobian_stats(jnp.asarray(ddf))
    assert float(stats["percent_nonpositive"]) == pytest.approx(100.0 * np.mean(det <= 0), rel=1e-6)
    assert float(ops.folding_fraction(jnp.asarray(ddf))) == pytest.approx(np.mean(det <= 0))
    assert float(ops.negative_jacobian_penalty(jnp.asarray(ddf))) == pytest.approx(
        np.mean(np.maximum(-det, 0.0)), rel=1e-5
    )
    assert float(ops.negative_jacobian_penalty(jnp.zeros((*SHAPE, 3)))) == 0.0


def test_smoothness_is_mean_squared_forward_difference():
    ddf = smooth_field(11, SHAPE, 2.0)
    expected = np.mean([np.mean(np.diff(ddf, axis=a) ** 2) for a in range(3)])
    assert float(ops.smoothness(jnp.asarray(ddf))) == pytest.approx(expected, rel=1e-5)
    assert float(ops.smoothness(jnp.asarray(constant_ddf((1.0, 2.0, 3.0))))) == 0.0


# --- similarity --------------------------------------------------------------------------------


def textured(shape=(16, 16, 16), seed=12):
    return np.random.default_rng(seed).random((*shape, 1)).astype(np.float32)


def test_ncc_of_affine_intensity_change_is_one():
    image = textured()
    # Zero padding breaks the affine relation only in windows that reach past the border.
    ncc_map = ops.ncc_local_map(jnp.asarray(image), jnp.asarray(2.5 * image + 0.3))
    np.testing.assert_allclose(np.asarray(ncc_map)[4:-4, 4:-4, 4:-4], 1.0, atol=1e-3)
    scaled = ops.ncc_local(jnp.asarray(image), jnp.asarray(2.5 * image))
    assert float(scaled) == pytest.approx(1.0, abs=1e-3)
    other = textured(seed=13)
    unrelated = ops.ncc_local_map(jnp.asarray(image), jnp.asarray(other))
    assert float(jnp.mean(unrelated[4:-4, 4:-4, 4:-4])) < 0.05
    assert float(ops.ncc_global(jnp.asarray(image), jnp.asarray(-image + 1))) == pytest.approx(
        -1.0, abs=1e-5
    )


def test_ncc_local_matches_brute_force_window_sums():
    a, b = textured((9, 10, 11), 14), textured((9, 10, 11), 15)
    window, n = 5, 125.0
    ones = np.ones((window,) * 3)

    def box(x):  # zero-padded window sums, written as a convolution
        return ndimage.convolve(x[..., 0].astype(np.float64), ones, mode="constant")

    sa, sb, saa, sbb, sab = box(a), box(b), box(a * a), box(b * b), box(a * b)
    cross = sab - sa * sb / n
    cc = cross**2 / ((saa - sa**2 / n) * (sbb - sb**2 / n) + 1e-5)
    got = ops.ncc_local(jnp.asarray(a), jnp.asarray(b), window=window)
    assert float(got) == pytest.approx(cc.mean(), rel=1e-4)


def test_ssim_of_identical_images_is_one_and_matches_reference():
    image = textured()
    assert float(ops.ssim(jnp.asarray(image), jnp.asarray(image))) == pytest.approx(1.0, abs=1e-5)
    other = np.clip(image + 0.1 * textured(seed=16), 0, 1)
    taps = ops.gaussian_taps()

    def blur(x):
        x = x.astype(np.float64)
        for axis in range(3):
            x = ndimage.correlate1d(x, taps, axis=axis, mode="constant")
        return x

    x, y = image[..., 0], other[..., 0]
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ref = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = ops.ssim(jnp.asarray(image), jnp.asarray(other))
    assert float(got) == pytest.approx(ref.mean(), rel=1e-4)


def test_similarities_are_per_batch_item_and_differentiable():
    a = jnp.asarray(np.stack([textured(seed=17), textured(seed=18)]))
    b = jnp.asarray(np.stack([textured(seed=19), textured(seed=17)]))
    for fn in (ops.ncc_local, ops.ncc_global, ops.mse, ops.ssim):
        values = fn(a, b)
        assert values.shape == (2,)
        grad = jax.grad(lambda x, fn=fn: jnp.sum(fn(x, b)))(a)
        assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(ops.mse(a, a).max()) == 0.0
    with pytest.raises(ValueError, match="b has shape"):
        ops.ncc_local(a, b[0])


def mutual_information_reference(a, b, bins=32, sigma_ratio=0.5):
    """Parzen MI by explicit loops over bin pairs, in float64."""
    a, b = np.clip(a.ravel(), 0, 1).astype(np.float64), np.clip(b.ravel(), 0, 1).astype(np.float64)
    centres = np.linspace(0.0, 1.0, bins)
    sigma = sigma_ratio / (bins - 1)

    def parzen(x):
        w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / sigma) ** 2)
        return w / w.sum(axis=1, keepdims=True)

    wa, wb = parzen(a), parzen(b)
    joint = np.zeros((bins, bins))
    for i in range(bins):
        for j in range(bins):
            joint[i, j] = np.mean(wa[:, i] * wb[:, j])
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    mi = 0.0
    for i in range(bins):
        for j in range(bins):
            if joint[i, j] > 0:
                mi += joint[i, j] * np.log(joint[i, j] / (pa[i] * pb[j]))
    return mi


def test_mutual_information_matches_reference_and_ignores_intensity_mapping():
    image = textured(seed=21)
    image = (image - image.min()) / (image.max() - image.min())
    noise = np.random.default_rng(5).uniform(size=image.shape).astype(np.float32)
    mi = lambda x, y: float(ops.mutual_information(jnp.asarray(x), jnp.asarray(y)))  # noqa: E731
    assert mi(image, noise) == pytest.approx(mutual_information_reference(image, noise), rel=1e-3)
    self_mi = mi(image, image)
    assert self_mi == pytest.approx(mutual_information_reference(image, image), rel=1e-3)
    # An inverted copy (a different "modality" with the same structure) shares all information
    # with the image; independent noise shares almost none.
    assert mi(image, 1.0 - image) == pytest.approx(self_mi, rel=1e-3)
    assert mi(image, noise) < 0.1 * self_mi
    grad = jax.grad(lambda x: ops.mutual_information(x, jnp.asarray(image)))(jnp.asarray(noise))
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0


def test_parzen_weights_gradient_is_autodiffs_of_the_plain_formula():
    """``ops.parzen_weights`` has a hand-written backward pass: it must give autodiff's gradient
    of the plain formula (clip, Gaussian logits, softmax), at the clip's bounds and beyond too."""
    rng = np.random.default_rng(3)
    x = rng.random((1, 6, 5, 4, 1)).astype(np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 0.0, 1.0, 1.4  # ties with the bounds, and outside
    x[0, 3, 0] = -0.2
    x = jnp.asarray(x)
    bins, ratio = 16, 0.7
    centres = np.linspace(0.0, 1.0, bins, dtype=np.float32).reshape(1, 1, bins)
    sigma = ratio / (bins - 1)

    def plain(v):
        v = jnp.clip(v.reshape(1, -1), 0.0, 1.0)[..., None]
        return jax.nn.softmax(-0.5 * ((v - centres) / sigma) ** 2, axis=-1)

    cotangent = jnp.asarray(rng.normal(size=(1, x.size, bins)), jnp.float32)
    np.testing.assert_allclose(ops.parzen_weights(x, bins, ratio), plain(x), atol=1e-6)
    got = jax.grad(lambda v: jnp.sum(ops.parzen_weights(v, bins, ratio) * cotangent))(x)
    want = jax.grad(lambda v: jnp.sum(plain(v) * cotangent))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    assert float(jnp.abs(got[0, 2]).max()) == 0.0  # beyond the range: clipped, no gradient


# --- Dice and TRE --------------------------------------------------------------------------------


def test_dice_of_known_overlaps():
    a = np.zeros((4, 4, 4), np.int32)
    b = np.zeros((4, 4, 4), np.int32)
    a[:2] = 1  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    a[3, 3, 3] = 2
    b[3, 3, 3] = 2
    scores = np.asarray(ops.dice(jnp.asarray(a), jnp.asarray(b), labels=[1, 2, 7]))
    np.testing.assert_allclose(scores[:2], [0.5, 1.0])
    assert np.isnan(scores[2])  # absent from both: left out of means
    batched = ops.dice(jnp.stack([a, a]), jnp.stack([b, a]), labels=[1])
    np.testing.assert_allclose(np.asarray(batched)[:, 0], [0.5, 1.0])
    with pytest.raises(ValueError, match="seg_a must hold integer"):
        ops.dice(jnp.asarray(a, jnp.float32), jnp.asarray(b), labels=[1])
    with pytest.raises(ValueError, match="labels must be integers"):
        ops.dice(jnp.asarray(a), jnp.asarray(b), labels=[1.5])


def test_tre_of_a_translation():
    fixed = jnp.asarray([[2.0, 3.0, 4.0], [5.0, 5.0, 5.0]])
    moving = fixed + jnp.asarray([[1.0, 0.0, 0.0]])
    spacing = (2.5, 1.0, 1.0)
    before = ops.tre(fixed, moving, jnp.zeros((*SHAPE, 3)), spacing)
    np.testing.assert_allclose(np.asarray(before), [2.5, 2.5], rtol=1e-6)
    after = ops.tre(fixed, moving, jnp.asarray(constant_ddf((1.0, 0.0, 0.0))), spacing)
    np.testing.assert_allclose(np.asarray(after), [0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="spacing must hold 3 values"):
        ops.tre(fixed, moving, jnp.zeros((*SHAPE, 3)), (1.0, 1.0))


# Published DIR-Lab spacings (x = y in-plane, z = 2.5 mm) and "before" TREs (mm).
DIRLAB_CASES = {
    1: (0.97, 3.89),
    2: (1.16, 4.34),
    3: (1.15, 6.94),
    4: (1.13, 9.83),
    5: (1.10, 7.48),
    6: (0.97, 10.89),
    7: (0.97, 11.03),
    8: (0.97, 14.99),
    9: (0.97, 7.92),
    10: (0.97, 7.30),
}


def read_xyz(path: Path) -> np.ndarray:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.skipif(not DIRLAB.exists(), reason="real DIR-Lab landmarks not present")
@pytest.mark.parametrize("case", sorted(DIRLAB_CASES))
def test_tre_with_zero_field_reproduces_published_dirlab_before(case):
    inplane, published = DIRLAB_CASES[case]
    folder = next(DIRLAB.glob(f"Case{case}[PD]*/ExtremePhases"))  # Case1Pack, not Case10Pack
    t00 = read_xyz(next(folder.glob("*T00*.txt")))[:, ::-1] - 1.0  # x y z 1-based -> D H W
    t50 = read_xyz(next(folder.glob("*T50*.txt")))[:, ::-1] - 1.0
    shape = (int(t00[:, 0].max()) + 2, int(t00[:, 1].max()) + 2, int(t00[:, 2].max()) + 2)
    errors = ops.tre(
        jnp.asarray(t00), jnp.asarray(t50), jnp.zeros((*shape, 3)), (2.5, inplane, inplane)
    )
    assert float(jnp.mean(errors)) == pytest.approx(published, abs=0.01)


def test_ncc_with_the_references_sums_given_is_the_same_map():
    rng = np.random.default_rng(3)
    a, b = (jnp.asarray(rng.random((1, 9, 10, 11, 1)), jnp.float32) for _ in range(2))
    stats = ops.ncc_reference_stats(b, 5)
    given = ops.ncc_local_map(a, b, 5, b_stats=stats)
    np.testing.assert_array_equal(np.asarray(given), np.asarray(ops.ncc_local_map(a, b, 5)))
    with pytest.raises(ValueError, match="odd"):
        ops.ncc_reference_stats(b, 4)

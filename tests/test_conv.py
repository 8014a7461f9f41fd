"""The models' convolutions: the CPU (depth-folded) and native formulations against
``lax.conv_general_dilated`` / ``flax.linen.ConvTranspose`` as independent truth, values and
gradients, and the model built either way (same parameters, same outputs and gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import lax

from adreg_jax.models import build_model
from adreg_jax.models.conv import ConvTranspose, conv3d_folded, kernel_gradient, resolve_conv_impl
from tests.test_models import pair, tiny_config

CHANNELS_LAST = ("NDHWC", "DHWIO", "NDHWC")


@pytest.mark.parametrize(
    "shape, kernel, strides, padding",
    [
        ((2, 7, 9, 10, 3), (3, 3, 3), (1, 1, 1), ((1, 1),) * 3),
        ((1, 9, 8, 11, 4), (3, 3, 3), (2, 2, 2), ((1, 1),) * 3),
        ((1, 9, 8, 7, 2), (3, 3, 3), (2, 1, 2), "SAME"),
        ((1, 6, 5, 4, 3), (1, 1, 1), (1, 1, 1), "VALID"),
        ((1, 8, 6, 6, 2), (2, 3, 1), (1, 1, 1), ((0, 1), (1, 1), (0, 0))),
    ],
)
def test_folded_convolution_equals_lax_in_value_and_both_gradients(shape, kernel, strides, padding):
    key_x, key_k, key_c = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, shape)
    k = jax.random.normal(key_k, (*kernel, shape[-1], 5))

    def native(x, k):
        return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=CHANNELS_LAST)

    def folded(x, k):
        return conv3d_folded(x, k, strides, padding)

    expected, native_vjp = jax.vjp(native, x, k)
    got, folded_vjp = jax.jit(lambda x, k: jax.vjp(folded, x, k))(x, k)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    cotangent = jax.random.normal(key_c, expected.shape)
    for want, have in zip(native_vjp(cotangent), folded_vjp(cotangent), strict=True):
        np.testing.assert_allclose(have, want, atol=1e-4 * float(jnp.abs(want).max()))


def test_kernel_gradient_is_the_correlation_of_input_patches_with_the_cotangent():
    # A slow loop over output voxels, written from the definition.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 5, 3, 2)).astype(np.float32)
    cotangent = rng.normal(size=(1, 4, 5, 3, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((3, 3, 3, 2, 3))
    for d, h, w in np.ndindex(4, 5, 3):
        patch = padded[0, d : d + 3, h : h + 3, w : w + 3]
        expected += patch[..., :, None] * cotangent[0, d, h, w][None, None, None, None, :]
    got = kernel_gradient(
        jnp.asarray(x), jnp.asarray(cotangent), (3, 3, 3), (1, 1, 1), ((1, 1),) * 3
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["folded", "native"])
def test_conv_transpose_matches_flax_with_the_same_parameters(impl):
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 5, 6))
    reference = nn.ConvTranspose(7, (2, 2, 2), strides=(2, 2, 2))
    ours = ConvTranspose(7, (2, 2, 2), (2, 2, 2), impl)
    variables = reference.init(jax.random.key(1), x)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, variables, ours.init(jax.random.key(1), x)))
    expected, reference_vjp = jax.vjp(lambda v, x: reference.apply(v, x), variables, x)
    got, ours_vjp = jax.vjp(lambda v, x: ours.apply(v, x), variables, x)
    assert got.shape == (2, 6, 8, 10, 7)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(2), got.shape)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
        reference_vjp(cotangent),
        ours_vjp(cotangent),
    )


@pytest.mark.slow
def test_model_is_the_same_function_with_the_same_parameters_for_every_conv_impl_and_remat():
    fixed, moving = pair((16, 16, 16), seed=2)
    # Folded without remat is checked against lax above (each convolution) and against remat
    # below (a chain of blocks).
    variants = {
        "native": tiny_config(conv_impl="native"),
        "folded+remat": tiny_config(conv_impl="folded", remat=True),
    }
    models = {name: build_model(config) for name, config in variants.items()}
    params = jax.jit(models["native"].init)(jax.random.key(0), fixed, moving)["params"]
    # DDF heads far from their near-identity init, so that the field is far from zero.
    flat = traverse_util.flatten_dict(params, sep="/")
    for index, path in enumerate(p for p in flat if "ddf_head" in p and p.endswith("kernel")):
        flat[path] = 0.05 * jax.random.normal(jax.random.key(index), flat[path].shape)
    params = traverse_util.unflatten_dict(flat, sep="/")
    for name, model in models.items():
        shapes = jax.eval_shape(model.init, jax.random.key(0), fixed, moving)["params"]
        assert jax.tree.structure(shapes) == jax.tree.structure(params), name

    def loss_and_grads(model):
        def loss(p):
            out = model.apply({"params": p}, fixed, moving)
            return jnp.mean((out["warped"] - fixed) ** 2) + jnp.mean(out["ddf"] ** 2), out["ddf"]

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, ddf_native), grads_native = loss_and_grads(models["native"])
    assert float(jnp.abs(ddf_native).max()) > 0.1
    flat_native = traverse_util.flatten_dict(grads_native, sep="/")
    # Relative to the largest gradient: some are zero in exact arithmetic (an attention key's
    # bias) and only rounding noise remains of them.
    scale = max(float(jnp.abs(g).max()) for g in flat_native.values())
    for name in ("folded+remat",):
        (_, ddf), grads = loss_and_grads(models[name])
        np.testing.assert_allclose(ddf, ddf_native, atol=1e-4, err_msg=name)
        for path, grad in traverse_util.flatten_dict(grads, sep="/").items():
            want = flat_native[path]
            np.testing.assert_allclose(grad / scale, want / scale, atol=1e-4, err_msg=path)


def test_conv_impl_resolves_by_backend_and_size_and_rejects_unknown_names():
    cpu = jax.default_backend() == "cpu"
    assert resolve_conv_impl("auto") == ("folded" if cpu else "native")
    assert resolve_conv_impl("auto", 32 * 40 * 32 * 16 * 16) == ("folded" if cpu else "native")
    assert resolve_conv_impl("auto", 16 * 16 * 16 * 4 * 8) == "native"
    assert resolve_conv_impl("folded", 8) == "folded"
    assert resolve_conv_impl("native") == "native"
    with pytest.raises(ValueError, match="model.conv_impl"):
        resolve_conv_impl("cudnn")


def test_rematerialised_blocks_keep_only_their_inputs_for_the_backward_pass():
    """The compiled gradient of a chain of ConvBlocks needs less temporary memory with
    ``rematerialised`` blocks (XLA's own memory analysis), and gives the same gradients."""
    from adreg_jax.models.backbone import ConvBlock, RematConvBlock

    class Chain(nn.Module):
        block: type

        @nn.compact
        def __call__(self, x):
            for index in range(4):
                x = self.block(8, conv_impl="folded", name=f"ConvBlock_{index}")(x)
            return x

    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 16, 8))
    params = Chain(ConvBlock).init(jax.random.key(1), x)["params"]
    temp_bytes, grads = {}, {}
    for block in (ConvBlock, RematConvBlock):
        gradient = jax.jit(
            jax.grad(lambda p, b=block: jnp.mean(Chain(b).apply({"params": p}, x) ** 2))
        )
        temp_bytes[block] = gradient.lower(params).compile().memory_analysis().temp_size_in_bytes
        grads[block] = gradient(params)
    assert temp_bytes[RematConvBlock] < 0.7 * temp_bytes[ConvBlock], temp_bytes
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        grads[ConvBlock],
        grads[RematConvBlock],
    )

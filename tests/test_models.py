"""AD-RegNet on tiny volumes: shapes, identity at init, gradients, ablations, dtype, tracing."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from adreg_jax import ops
from adreg_jax.models import build_model


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """Three levels: every kind of block (convolutions, BCAM, RAA, upsampling, the
    multi-resolution heads and blends) at the least compilation time, which is the suite's."""
    config = ml_collections.ConfigDict(
        dict(
            channels=(4, 8, 8),
            convs_per_level=1,
            norm="instance",
            leaky_relu_slope=0.2,
            use_cross_attention=True,
            cross_attention_levels=(1, 2),
            attention_heads=2,
            attention_window=2,
            global_attention_max_tokens=16,
            use_regional_attention=True,
            region_size=(1, 1, 1),
            region_heads=2,
            use_multires=True,
            diffeomorphic=False,
            integration_steps=4,
            dtype="float32",
        )
    )
    config.update(overrides)
    return config


def pair(shape, seed=0):
    key_f, key_m = jax.random.split(jax.random.key(seed))
    return (
        jax.random.uniform(key_f, (1, *shape, 1)),
        jax.random.uniform(key_m, (1, *shape, 1)),
    )


def init_with_output(model, fixed, moving, seed=0):
    """The parameters and the forward pass at them, as one compiled program: the tests' time is
    compilation, and ``init`` compiles the forward pass anyway."""
    return jax.jit(model.init_with_output)(jax.random.key(seed), fixed, moving)


def param_paths(config, shape=(16, 16, 16)):
    fixed, moving = pair(shape)
    shapes = jax.eval_shape(build_model(config).init, jax.random.key(0), fixed, moving)
    return set(traverse_util.flatten_dict(shapes["params"], sep="/"))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(16, 16, 16), (12, 20, 17)])
def test_outputs_have_the_documented_shapes_and_start_at_identity(shape):
    model = build_model(tiny_config())
    fixed, moving = pair(shape)
    out, _ = init_with_output(model, fixed, moving)
    assert out["ddf"].shape == (1, *shape, 3)
    assert out["warped"].shape == (1, *shape, 1)
    assert len(out["level_ddfs"]) == 3 and len(out["blend_weights"]) == 2
    # the finest level is padded to a multiple of 2 ** (levels - 1)
    assert out["level_ddfs"][-1].shape[1:4] == tuple(-(-n // 4) * 4 for n in shape)
    assert set(out["alphas"]) == {"level1", "level2"}
    for alpha in out["alphas"].values():
        assert 0.0 < float(alpha) < 1.0
    weights = out["region_weights"]
    np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-5)
    # Untrained: near-zero field, warped close to moving.
    assert float(jnp.abs(out["ddf"]).max()) < 0.05
    assert float(jnp.abs(out["warped"] - moving).max()) < 0.05


@pytest.mark.slow
def test_every_ablation_variant_runs_and_diffeomorphic_outputs_velocity():
    fixed, moving = pair((16, 16, 16))
    for overrides in (
        dict(use_cross_attention=False),
        dict(use_regional_attention=False),
        dict(use_multires=False),
        dict(use_cross_attention=False, use_regional_attention=False, use_multires=False),
        dict(diffeomorphic=True),
    ):
        model = build_model(tiny_config(**overrides))
        # Eager init: its small programs are shared by the five variants (one program each
        # would compile five times as much).
        variables = model.init(jax.random.key(0), fixed, moving)
        out = jax.jit(model.apply)(variables, fixed, moving)
        assert out["ddf"].shape == (1, 16, 16, 16, 3), overrides
        if overrides.get("use_multires") is False:
            assert len(out["level_ddfs"]) == 1 and out["blend_weights"] == []
        if overrides.get("use_regional_attention") is False:
            assert out["region_weights"] is None
        if overrides.get("diffeomorphic"):
            assert out["velocity"].shape == (1, 16, 16, 16, 3)


def test_each_ablation_switch_removes_exactly_its_parameters():
    full = param_paths(tiny_config())
    no_cross = param_paths(tiny_config(use_cross_attention=False))
    no_raa = param_paths(tiny_config(use_regional_attention=False))
    no_multi = param_paths(tiny_config(use_multires=False))
    assert full - no_cross and all(p.startswith("bcam_level") for p in full - no_cross)
    assert not no_cross - full
    assert full - no_raa and all(p.startswith("raa/") for p in full - no_raa)
    assert not no_raa - full
    removed = full - no_multi
    assert removed and all(p.startswith(("blend", "ddf_head_level")) for p in removed)
    assert not any(p.startswith("ddf_head_level0") for p in removed)
    assert no_multi - full == set()


@pytest.mark.slow
def test_every_parameter_gets_a_gradient_after_a_few_steps():
    config = tiny_config()
    model = build_model(config)
    fixed, moving = pair((16, 16, 16), seed=3)
    params = jax.jit(model.init)(jax.random.key(1), fixed, moving)["params"]
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    def loss_fn(p):
        out = model.apply({"params": p}, fixed, moving)
        return -jnp.mean(ops.ncc_local(out["warped"], fixed, window=5))

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, grads

    for _ in range(3):
        params, opt_state, grads = step(params, opt_state)
    flat = traverse_util.flatten_dict(grads, sep="/")
    zero = [path for path, g in flat.items() if not bool(jnp.any(g != 0))]
    assert not zero, f"parameters without gradient: {zero}"


@pytest.mark.slow
def test_bfloat16_variant_runs_with_float32_parameters():
    model = build_model(tiny_config(dtype="bfloat16"))
    fixed, moving = pair((16, 16, 16))
    out, variables = init_with_output(model, fixed, moving)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert out["ddf"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out["ddf"])))


def test_apply_traces_once_per_shape():
    model = build_model(tiny_config(use_cross_attention=False))
    fixed, moving = pair((16, 16, 16))
    variables = jax.jit(model.init)(jax.random.key(0), fixed, moving)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(v, f, m):
        return model.apply(v, f, m)["ddf"]

    for seed in range(3):
        f, m = pair((16, 16, 16), seed)
        apply(variables, f, m)


def test_bad_config_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown config.model fields"):
        build_model(tiny_config(chanels=(4, 8)))
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match=r"\(B, D, H, W, 1\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 16, 2)), jnp.zeros((1, 16, 16, 16, 2)))

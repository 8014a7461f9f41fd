"""Packaged pretrained models: export a tiny train.py run, load it by name, --model."""

import json
import shutil

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from adreg_jax import ops, pretrained, training
from adreg_jax.data import dataset_labels, make_iterator
from adreg_jax.models import build_model
from adreg_jax.registration import commands
from tests.test_training import tiny_config

# The tests share a module fixture: one xdist worker runs them all (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("tiny_run_pretrained")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A train.py-style run directory (config.json, an Orbax checkpoint) of a tiny model with
    random parameters, made without compiling the model's init or training step (a minute each
    on this CPU), exported as a model."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config()
    config.data.dataset = "synth_brain"
    model = build_model(config.model)
    image = jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), image, image)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(scale=0.1, size=s.shape).astype(np.float32)), shapes
    )
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _save_checkpoint(workdir, config, params, step=1)
    path = pretrained.export(workdir, "tiny", tmp_path_factory.mktemp("weights"))
    return workdir, path


def _save_checkpoint(workdir, config, params, step):
    """A checkpoint as train.py writes it, of ``params`` and a fresh optimiser state."""
    tree = {
        "step": step - 1,
        "params": params,
        "opt_state": training.make_optimizer(config.train).init(params),
    }
    manager = training._checkpoint_manager(workdir, config.train)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), progress=ocp.args.JsonSave({"best": None})
        ),
    )
    manager.wait_until_finished()


class ConstantField:
    """A stand-in for the network whose one parameter is the DDF itself: the train step's
    plumbing (batch keys -> loss -> gradient) without compiling a U-Net."""

    def apply(self, variables, fixed, moving):
        ddf = jnp.broadcast_to(variables["params"]["ddf"], (*fixed.shape[:-1], 3))
        return {"ddf": ddf, "warped": ops.warp(moving, ddf)}


def test_the_label_loss_reaches_the_training_step():
    config = tiny_config()
    config.data.dataset = "synth_brain"
    config.loss.dice_weight = 1.0
    config.loss.ncc_weight = config.loss.ssim_weight = 0.0  # the gradient comes from Dice alone
    batch = next(make_iterator(config.data, "train", seed=0))
    assert {"fixed_seg", "moving_seg"} <= set(batch)
    model = ConstantField()
    params = {"ddf": jnp.zeros((1, 16, 16, 16, 3))}
    state = training.TrainState.create(
        apply_fn=model.apply, params=params, tx=training.make_optimizer(config.train)
    )
    step = training.make_train_step(model, config.loss, dataset_labels(config.data))
    _, terms = step(state, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    assert 0.0 < float(terms["dice_soft"]) < 1.0
    assert float(terms["grad_norm"]) > 0.0
    config.data.dataset = "dirlab"  # no label maps: the weight cannot apply
    with pytest.raises(ValueError, match="dice_weight=1.0 needs a data set with label maps"):
        training.make_train_step(model, config.loss, dataset_labels(config.data))


def test_export_and_load_give_the_run_back_in_float16(tiny_run):
    workdir, path = tiny_run
    assert path.name == "tiny.npz" and path.stat().st_size < pretrained.MAX_BYTES
    card = path.with_suffix(".md").read_text()
    assert str(workdir) in card and "synth_brain" in card
    config, model, variables = pretrained.load_file(path)
    run_config, run_model, run_variables = training.restore_for_inference(workdir)
    assert tuple(config.data.image_size) == (16, 16, 16)
    np.testing.assert_allclose(config.data.spacing, [12.0, 14.0, 12.0])  # 192 x 224 x 192 mm
    assert config.model.to_dict() == run_config.model.to_dict()
    loaded = traverse_util.flatten_dict(variables["params"])
    original = traverse_util.flatten_dict(jax.device_get(run_variables["params"]))
    assert loaded.keys() == original.keys()
    for key, value in original.items():
        assert loaded[key].dtype == np.float32
        np.testing.assert_allclose(loaded[key], value, rtol=1e-3, atol=1e-4)  # float16 precision
    rng = np.random.default_rng(0)
    fixed, moving = (jnp.asarray(rng.random((1, 16, 16, 16, 1), np.float32)) for _ in range(2))
    ddf = jax.jit(model.apply)(variables, fixed, moving)["ddf"]
    expected = jax.jit(run_model.apply)(run_variables, fixed, moving)["ddf"]
    scale = float(jnp.abs(expected).max())
    assert scale > 0 and float(jnp.abs(ddf - expected).max()) < 0.01 * scale


def test_unknown_or_broken_models_fail_in_one_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available models: brain$"):
        pretrained.load("nope")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip file")
    monkeypatch.setattr(pretrained, "MODELS", {"brain": broken, "other": tmp_path / "none.npz"})
    for name, reason in (("brain", "weights do not load"), ("other", "weights file missing")):
        with pytest.raises(ValueError, match=reason) as error:
            pretrained.load(name)
        message = str(error.value)
        assert "\n" not in message and message.endswith("available models: brain, other")


def test_export_command_refuses_weights_over_the_limit(tiny_run, tmp_path, monkeypatch, capsys):
    workdir, _ = tiny_run
    monkeypatch.setattr(pretrained, "MAX_BYTES", 100)
    argv = ["export", "--workdir", str(workdir), "--name", "big", "--out-dir", str(tmp_path)]
    assert pretrained.main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "big.npz" in error and "at most 0 MB" in error
    assert not list(tmp_path.glob("*.npz"))


def test_export_averages_the_parameters_of_the_steps_asked_for(tiny_run, tmp_path, capsys):
    """A second checkpoint whose parameters are the first's + 1: their average is the first's
    + 0.5; a step the run does not hold is refused, naming those it holds."""
    source, _ = tiny_run
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    config, _, variables = training.restore_for_inference(workdir)
    _save_checkpoint(workdir, config, jax.tree.map(lambda p: p + 1.0, variables["params"]), 2)
    out = tmp_path / "weights"
    argv = ["export", "--workdir", str(workdir), "--name", "soup", "--out-dir", str(out)]
    assert pretrained.main([*argv, "--average", "1", "2"]) == 0
    _, _, averaged = pretrained.load_file(out / "soup.npz")
    loaded = traverse_util.flatten_dict(averaged["params"])
    first = traverse_util.flatten_dict(jax.device_get(variables["params"]))
    for key, value in first.items():
        np.testing.assert_allclose(loaded[key], value + 0.5, rtol=1e-3, atol=1e-3, err_msg=key)
    assert "the mean of steps [1, 2]" in (out / "soup.md").read_text()
    assert pretrained.main([*argv, "--average", "1", "3"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "no checkpoint of step 3; it holds steps [1, 2]" in error


def _write(path, array):
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return str(path)


def test_register_command_with_a_model(tiny_run, tmp_path, monkeypatch, capsys):
    workdir, path = tiny_run
    rng = np.random.default_rng(1)
    fixed = _write(tmp_path / "f.nii.gz", rng.random((20, 24, 20)).astype(np.float32))
    moving = _write(tmp_path / "m.nii.gz", rng.random((20, 24, 20)).astype(np.float32))
    base = ["--fixed", fixed, "--moving", moving, "--cache-dir", "", "--quiet", "--no-png"]

    assert commands.main([*base, "--out", str(tmp_path / "x"), "--model", "nope"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == "adreg-register: error: unknown model 'nope'; available models: brain"
    both = ["--model", "brain", "--checkpoint", str(workdir)]
    assert commands.main([*base, "--out", str(tmp_path / "x"), *both]) == 1
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    monkeypatch.setattr(pretrained, "MODELS", {"tiny": path})
    # the network's field as the result, whatever it does to these random images' similarity
    steps = ["--instance-steps", "0", "--keep-network"]
    assert commands.main([*base, "--out", str(tmp_path / "m"), "--model", "tiny", *steps]) == 0
    assert (
        commands.main([*base, "--out", str(tmp_path / "c"), "--checkpoint", str(workdir), *steps])
        == 0
    )
    by_model = np.asarray(nib.load(str(tmp_path / "m" / "ddf.nii.gz")).dataobj)
    by_checkpoint = np.asarray(nib.load(str(tmp_path / "c" / "ddf.nii.gz")).dataobj)
    assert by_model.shape == (20, 24, 20, 3) and np.abs(by_checkpoint).max() > 0
    # the same network, resampled to its grid and back the same way (float16 parameters)
    np.testing.assert_allclose(by_model, by_checkpoint, atol=0.01 * np.abs(by_checkpoint).max())
    for run in ("m", "c"):
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert metrics["network_kept"] and np.isfinite(metrics["network_objective_gain"])


def test_a_run_starts_from_a_trained_run_or_a_packaged_model(tiny_run, monkeypatch):
    workdir, path = tiny_run
    config = tiny_config()
    model = build_model(config.model)
    image = jax.ShapeDtypeStruct((1, 16, 16, 16, 1), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), image, image)["params"]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    state = training.TrainState.create(
        apply_fn=model.apply, params=zeros, tx=training.make_optimizer(config.train)
    )
    _, _, run_variables = training.restore_for_inference(workdir)
    monkeypatch.setattr(pretrained, "load", lambda name: pretrained.load_file(path, name))
    # a run, a packaged model's name, an exported file (float16 in the last two)
    for source, tolerance in ((str(workdir), 0.0), ("tiny", 1e-3), (str(path), 1e-3)):
        started = training._initialised_from(state, source, config.model)
        want = traverse_util.flatten_dict(jax.device_get(run_variables["params"]))
        got = traverse_util.flatten_dict(jax.device_get(started.params))
        assert got.keys() == want.keys()
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=tolerance, atol=tolerance)
        assert int(started.step) == 0
    other = tiny_config().model
    other.attention_heads = 1
    expected = r"init_from=.*differs from this config's in \['attention_heads'\]"
    with pytest.raises(ValueError, match=expected):
        training._initialised_from(state, str(workdir), other)


def test_the_network_grid_keeps_the_scans_extent_in_mm():
    """A network's grid has the fixed scan's extent in mm, so its voxels are about as wide along
    every axis as the training grid's: for a 1 mm scan, as many voxels as training with the
    scan's aspect; for a thick-slice one, no longer six times thinner along the slices."""
    from adreg_jax.registration.deformable import network_grid

    assert network_grid((160, 224, 192), (1.0, 1.0, 1.0), 32 * 40 * 32, 8) == (32, 40, 32)
    thick = network_grid((320, 384, 18), (0.5, 0.5, 3.0), 32 * 40 * 32, 8)
    widths = np.array([160.0, 192.0, 54.0]) / np.array(thick)  # mm per network voxel
    assert widths.max() / widths.min() < 1.3, (thick, widths)
    assert 0.7 < np.prod(thick) / (32 * 40 * 32) < 1.4
    assert network_grid((8, 8, 8), (1.0, 1.0, 1.0), 32 * 40 * 32, 8) == (32, 32, 32)

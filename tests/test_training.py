"""The training loop: the loss terms, one real step, data parallelism, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adreg_jax import training
from adreg_jax.losses import registration_loss
from adreg_jax.models import build_model
from configs import default

ROOT = Path(__file__).resolve().parents[1]


def tiny_config():
    config = default.get_config()
    config.model.channels = (4, 8, 8)
    config.model.convs_per_level = 1
    config.model.cross_attention_levels = (1, 2)
    config.model.attention_heads = 2
    config.model.region_size = (2, 2, 2)
    config.model.region_heads = 2
    config.data.image_size = (16, 16, 16)
    config.data.val_size = 1
    config.loss.ncc_window = 5
    config.train.learning_rate = 1e-3
    config.train.max_steps = 6
    config.train.log_every = 1
    config.train.eval_every = 3
    config.train.checkpoint_every = 1
    config.train.early_stopping_patience = 0
    return config


def random_batch(batch_size=1, shape=(16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "fixed": rng.random((batch_size, *shape, 1), dtype=np.float32),
        "moving": rng.random((batch_size, *shape, 1), dtype=np.float32),
    }


def test_loss_terms_and_weights():
    config = tiny_config()
    image = jnp.asarray(random_batch()["fixed"])
    zero = jnp.zeros((1, 16, 16, 16, 3))
    loss, terms = registration_loss({"warped": image, "ddf": zero}, {"fixed": image}, config.loss)
    assert float(terms["ssim"]) == pytest.approx(1.0, abs=1e-5)
    assert float(loss) == pytest.approx(1.0 - float(terms["ncc"]), abs=1e-5)
    shift = zero.at[..., 0].set(jnp.arange(16.0)[None, :, None, None] * -2.0)  # folds
    batch = {
        "fixed": image,
        "fixed_points": jnp.asarray([[[4.0, 4.0, 4.0]]]),
        "moving_points": jnp.asarray([[[5.0, 4.0, 4.0]]]),
        "spacing": jnp.asarray([[2.0, 1.0, 1.0]]),
    }
    config.loss.landmark_weight = 1.0
    loss, terms = registration_loss({"warped": image, "ddf": shift}, batch, config.loss)
    assert float(terms["negative_jacobian"]) > 0 and float(terms["smoothness"]) > 0
    # p + ddf(p) = 4 - 8 = -4 along D; the moving point is 5: 9 voxels * 2 mm.
    assert float(terms["tre_mm"]) == pytest.approx(18.0, rel=1e-5)


def sgd_state(config, model, batch, mesh):
    """The initial train state with plain SGD, placed on ``mesh``. Plain SGD: Adam would turn
    float-rounding differences of near-zero gradients into full-size steps, hiding what the
    two-device test checks (the sharded gradient itself)."""
    state = training.create_train_state(config, model, batch)
    state = state.replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init(state.params))
    return training.replicate(state, mesh)


@pytest.mark.slow
def test_train_step_learns_and_does_not_recompile():
    # The same program as the one-device run of the next test: compiled once for both.
    config = tiny_config()
    model = build_model(config.model)
    batch = random_batch(batch_size=2, seed=1)
    mesh = training.data_mesh(jax.devices()[:1])
    state = sgd_state(config, model, batch, mesh)
    before = jax.tree.map(np.asarray, state.params)
    step = training.make_train_step(model, config.loss)
    losses = []
    for index in range(3):
        state, metrics = step(state, training.shard_batch(batch, mesh), jax.random.key(index))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1  # one compilation for the three calls
    assert int(state.step) == 3
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), before, state.params)
    assert any(jax.tree.leaves(changed))


@pytest.mark.slow
def test_two_devices_give_the_same_parameters_as_one():
    assert jax.device_count() >= 2
    config = tiny_config()
    model = build_model(config.model)
    batch = random_batch(batch_size=2, seed=1)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:2]):
        mesh = training.data_mesh(devices)
        state = sgd_state(config, model, batch, mesh)
        step = training.make_train_step(model, config.loss)
        for index in range(2):
            state, metrics = step(state, training.shard_batch(batch, mesh), jax.random.key(index))
            jax.block_until_ready(metrics)  # never queue collectives (JAX-NOTES.md)
        results.append(jax.tree.map(np.asarray, state.params))
    for one, two in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-6)


TINY_CONFIG_FILE = """
from tests.test_training import tiny_config

def get_config():
    config = tiny_config()
    config.train.max_steps = 4
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    return config
"""


def run_train(config_file: Path, workdir: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"--config={config_file}",
            f"--workdir={workdir}",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), process.communicate()[0][-2000:]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG_FILE)
    reference = run_train(config_file, tmp_path / "reference")
    # The second run starts once the first has compiled its programs (the session's
    # compilation cache, tests/conftest.py), so that it loads them instead of compiling them too.
    wait_for(tmp_path / "reference" / "checkpoints" / "2", reference)
    killed = run_train(config_file, tmp_path / "killed")
    wait_for(tmp_path / "killed" / "checkpoints" / "2", killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()  # waits, and closes its output pipe
    # resumed with a Grain worker process where the killed run read in-process: the same batches
    resumed = run_train(config_file, tmp_path / "killed", "--config.data.num_workers=1")
    resumed_log = resumed.communicate(timeout=300)[0]
    reference_log = reference.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_log[-2000:]
    assert reference.returncode == 0, reference_log[-2000:]
    assert "resuming from step" in resumed_log
    _, _, final = training.restore_for_inference(tmp_path / "killed", which="latest")
    _, _, expected = training.restore_for_inference(tmp_path / "reference", which="latest")
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    log = (tmp_path / "killed" / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in log.splitlines()]
    assert any("val/dice" in line for line in lines)
    # every training line says what share of its time went to waiting for batches
    waits = [line["data_wait_fraction"] for line in lines if "train/loss" in line]
    assert waits and all(0.0 <= wait <= 1.0 for wait in waits)

    # the resumed steps read the batches the uninterrupted run read (each step's loss is its own)
    def losses(workdir):  # the last logged value per step: the resumed run's
        logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {line["step"]: line["train/loss"] for line in logged if "train/loss" in line}

    resumed_losses, reference_losses = losses(tmp_path / "killed"), losses(tmp_path / "reference")
    assert sorted(resumed_losses) == sorted(reference_losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [resumed_losses[s] for s in (3, 4)], [reference_losses[s] for s in (3, 4)], rtol=1e-5
    )


def test_workdir_of_another_config_is_refused(tmp_path):
    config = tiny_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    other = tiny_config()
    other.model.channels = (4, 8, 16)
    with pytest.raises(ValueError, match="holds a run of another config"):
        training.train_and_evaluate(other, tmp_path)


def test_a_run_saved_before_a_config_field_existed_resumes_and_names_it(tmp_path, capsys):
    """A field added to the code after the run began is not compared (the run resumes), and a
    line names it with the value the resumed run takes."""
    config = tiny_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["data"]["synth_detail_mm"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    training._check_workdir(tmp_path, config)
    out = capsys.readouterr().out
    assert "predates config fields data.synth_detail_mm=0.0" in out
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    training._check_workdir(tmp_path, config)  # a run saved with every field: silent
    assert capsys.readouterr().out == ""


def test_non_finite_loss_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    real_make_iterator = training.make_iterator

    class PoisonedIterator:
        """The real stream with NaN images."""

        def __init__(self, *args, **kwargs):
            self.inner = real_make_iterator(*args, **kwargs)

        def __next__(self):
            batch = dict(next(self.inner))
            batch["fixed"] = batch["fixed"] * np.nan
            return batch

    monkeypatch.setattr(training, "make_iterator", PoisonedIterator)
    config = tiny_config()
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 1"):
        training.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "checkpoints" / "1").exists()


@pytest.mark.slow
def test_sigterm_and_the_time_limit_stop_the_run_after_saving(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) during step 2 ends the run once step 2 is saved; the
    same call resumes it, and ``train.max_minutes`` stops it the same way (here after its first
    step)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    real_make_iterator = training.make_iterator

    class SignalledIterator:
        """The real stream; SIGTERM to this process as batch 2 is read."""

        def __init__(self, *args, **kwargs):
            self.inner, self.read = real_make_iterator(*args, **kwargs), 0

        def __next__(self):
            self.read += 1
            if self.read == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.inner)

    monkeypatch.setattr(training, "make_iterator", SignalledIterator)
    before = signal.getsignal(signal.SIGTERM)
    config = tiny_config()
    config.train.checkpoint_every = 100  # only the stops save
    with pytest.raises(training.TrainingInterrupted) as stop:
        training.train_and_evaluate(config, tmp_path)
    assert stop.value.signum == signal.SIGTERM
    assert "stopped by SIGTERM at step 2/6" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2]

    monkeypatch.setattr(training, "make_iterator", real_make_iterator)
    config.train.max_minutes = 1e-9
    training.train_and_evaluate(config, tmp_path)
    out = capsys.readouterr().out
    assert "resuming from step 2" in out and "stopped by train.max_minutes at step 3/6" in out
    assert max(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == 3

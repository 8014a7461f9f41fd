"""Training: the train state, the jitted step, validation, Orbax checkpoints, the loop.

Where this sits: ``train.py`` calls ``train_and_evaluate(config, workdir)``. Data comes from
``adreg_jax.data.make_iterator``; the model from ``adreg_jax.models.build_model``; the loss from
``adreg_jax.losses``. ``restore_for_inference`` gives evaluation and ``adreg-register`` the best
trained model of a run directory.

The update is one pure function ``(state, batch, rng) -> (state, metrics)`` under ``jax.jit`` with
the state donated. The batch is sharded over a ``jax.make_mesh`` of all devices (axis "data") and
the state replicated, so the same code runs on one CPU or several accelerators. The step's RNG is
``fold_in(key(seed), step)``: a resumed run is the same run.

Workdir layout: ``config.json`` (the resolved config), ``checkpoints/`` (Orbax: train state and
the data stream's position; the latest and the best ``keep_best`` by ``train.best_metric`` are
kept), ``metrics.jsonl`` (one JSON object per log or validation), ``tensorboard/``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state as flax_train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers

from adreg_jax import ops
from adreg_jax.data import batched_dataset, build_dataset, dataset_labels, make_iterator
from adreg_jax.losses import field_error, mean_tre, registration_loss
from adreg_jax.models import build_model

TrainState = flax_train_state.TrainState


# --- the pure pieces ---------------------------------------------------------------------------


def make_optimizer(train_config) -> optax.GradientTransformation:
    """Adam; the rate is multiplied by ``lr_decay_factor`` every ``lr_decay_epochs`` epochs."""
    schedule = optax.exponential_decay(
        init_value=float(train_config.learning_rate),
        transition_steps=max(1, int(train_config.lr_decay_epochs * train_config.steps_per_epoch)),
        decay_rate=float(train_config.lr_decay_factor),
        staircase=True,
    )
    return optax.adam(schedule)


def create_train_state(config, model, batch: dict[str, np.ndarray]) -> TrainState:
    # Jitted: run eagerly, init compiles every operation of the forward pass and one random
    # generator per parameter shape separately (measured on the tests' tiny model, loaded 2-core
    # CPU: 326 compilations, 81 s eager against one program, 66 s jitted; with
    # jax_threefry_partitionable=False, whose generators compile ~10x faster, 17 s against 7 s).
    # The non-partitionable generator is used here (the initial values are drawn once, on one
    # device, and resuming restores them from the checkpoint) and for the device pairs
    # (synth_device), whatever the process's setting; training's own draws keep JAX's default.
    with jax.threefry_partitionable(False):
        variables = jax.jit(model.init)(
            jax.random.key(config.seed), jnp.asarray(batch["fixed"]), jnp.asarray(batch["moving"])
        )
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=make_optimizer(config.train)
    )


def make_train_step(model, loss_config, labels: tuple[int, ...] = ()):
    """The jitted update ``(state, batch, rng) -> (state, metrics)``, state donated.

    ``labels``: the data set's label ids, for the soft Dice term (``loss.dice_weight``)."""
    if float(loss_config.get("dice_weight", 0.0)) > 0 and not labels:
        raise ValueError(
            f"config.loss.dice_weight={loss_config.dice_weight} needs a data set with label "
            "maps (generated_brain, synth_brain, ixi, ...); this one has no labels"
        )

    def train_step(state: TrainState, batch: dict[str, jnp.ndarray], rng: jax.Array):
        del rng  # the model is deterministic; kept so that stochastic extensions fit the step

        def loss_fn(params):
            outputs = model.apply({"params": params}, batch["fixed"], batch["moving"])
            return registration_loss(outputs, batch, loss_config, labels)

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        terms["grad_norm"] = optax.tree.norm(grads)
        return state.apply_gradients(grads=grads), terms

    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(model, labels: tuple[int, ...] | None):
    """Jitted per-pair validation metrics (before and after registration)."""

    def eval_step(params, batch):
        outputs = model.apply({"params": params}, batch["fixed"], batch["moving"])
        ddf, fixed, moving = outputs["ddf"], batch["fixed"], batch["moving"]
        metrics = {
            "ncc_before": ops.ncc_local(moving, fixed),
            "ncc": ops.ncc_local(outputs["warped"], fixed),
            "ssim": ops.ssim(outputs["warped"], fixed),
            "mse": ops.mse(outputs["warped"], fixed),
            "folding_percent": 100.0 * ops.folding_fraction(ddf),
        }
        if labels and "fixed_seg" in batch:
            warped_seg = ops.warp(batch["moving_seg"][..., None], ddf, order=0)[..., 0]
            metrics["dice_before"] = jnp.nanmean(
                ops.dice(batch["moving_seg"], batch["fixed_seg"], labels), axis=-1
            )
            metrics["dice"] = jnp.nanmean(ops.dice(warped_seg, batch["fixed_seg"], labels), axis=-1)
        if "true_ddf" in batch:
            metrics["ddf_error_before"] = field_error(jnp.zeros_like(ddf), batch["true_ddf"])
            metrics["ddf_error"] = field_error(ddf, batch["true_ddf"])
        if "fixed_points" in batch:
            metrics["tre_mm_before"] = mean_tre(batch, jnp.zeros_like(ddf))[None]
            metrics["tre_mm"] = mean_tre(batch, ddf)[None]
        return metrics

    return jax.jit(eval_step)


# --- devices ---------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Join a multi-host run when the usual coordinator variables say so."""
    import os

    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def data_mesh(devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    # Auto axes: XLA propagates the batch sharding through the model (explicit axes would need
    # an out_sharding on every reshape of the attention windows).
    return jax.make_mesh(
        (len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )


def shard_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Split the batch axis over the mesh's "data" axis (replicated if it does not divide)."""
    size = mesh.devices.size
    leading = next(iter(batch.values())).shape[0]
    spec = P("data") if leading % size == 0 else P()
    return jax.device_put(batch, NamedSharding(mesh, spec))


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


# --- checkpoints ---------------------------------------------------------------------------------


class _SavedWithoutMetrics(logging.Filter):
    """Orbax warns at each save without validation metrics ("Requested `tracked_metric`; did not
    provide metrics."): here by design, every ``checkpoint_every`` step between validations and
    at a stop (the best checkpoints are chosen among the validated ones)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_SavedWithoutMetrics())  # Orbax logs through absl


def _checkpoint_manager(workdir: Path, train_config) -> ocp.CheckpointManager:
    metric = str(train_config.best_metric)
    sign = 1.0 if train_config.best_mode == "max" else -1.0
    # max_to_keep with best_fn can delete the latest step (JAX-NOTES.md): a preservation policy
    # keeps the latest AND the best K.
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(1),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: sign * metrics[metric],
                reverse=False,
                n=int(train_config.keep_best),
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        best_fn=lambda metrics: metrics[metric],
        best_mode=str(train_config.best_mode),
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), options=options, item_names=("state", "progress")
    )


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _restore(manager, step: int, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()
        ),
    )
    tree = restored["state"]
    state = state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"])
    return state, restored["progress"]


# data fields that change how fast batches come, not which: a run resumes with other values
_SPEED_ONLY = ("num_workers", "prefetch")


def _initialised_from(
    state: TrainState, source: str, model_config: ml_collections.ConfigDict
) -> TrainState:
    """``state`` with the parameters of ``source`` (``train.init_from``: a train.py run
    directory, its best checkpoint, or one checkpoint's directory; a weights file written by
    ``adreg_jax.pretrained.export``; or a packaged model's name) and a fresh optimiser state;
    ``ValueError`` naming ``source`` when its model differs from ``model_config``."""
    if Path(source).is_dir():
        config, _, variables = restore_for_inference(source)
    elif source.endswith(".npz"):
        from adreg_jax.pretrained import load_file

        config, _, variables = load_file(source)
    else:
        from adreg_jax.pretrained import load

        config, _, variables = load(source)
    theirs, ours = (json.loads(c.to_json_best_effort()) for c in (config.model, model_config))
    if theirs != ours:
        differs = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(
            f"train.init_from={source}: its model differs from this config's in {differs}; "
            "expected the same config.model"
        )
    params = jax.tree.map(
        lambda new, old: jnp.asarray(new, old.dtype), variables["params"], state.params
    )
    print(f"parameters from {source}")
    return TrainState.create(apply_fn=state.apply_fn, params=params, tx=state.tx)


def _check_workdir(workdir: Path, config) -> None:
    """Refuse a workdir that holds another config's run, unless train.overwrite is set (the
    model, data and loss sections must match, but for ``_SPEED_ONLY`` data fields and fields
    that the run's saved config does not have, added to the code since: those are not compared,
    so a value given for one on the command line is taken as it is, and a line names them with
    the values the resumed run takes: a field that changes the data or the loss changes what the
    run sees from here on)."""
    saved = workdir / "config.json"
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    current = json.loads(config.to_json_best_effort())
    for run in (previous, current):
        for field in _SPEED_ONLY:
            run.get("data", {}).pop(field, None)
    added = []
    for section in ("model", "data", "loss"):  # fields added since the run began: not compared
        for field in sorted(set(current.get(section, {})) - set(previous.get(section, {}))):
            added.append(f"{section}.{field}={current[section].pop(field)!r}")
    differs = [s for s in ("model", "data", "loss") if previous.get(s) != current.get(s)]
    if added and not differs:
        print(
            f"{saved} predates config fields {', '.join(added)}: the resumed run takes these "
            "values (the code's defaults unless given on the command line)"
        )
    if not differs:
        return
    if config.train.overwrite:
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        (workdir / "metrics.jsonl").unlink(missing_ok=True)
        return
    raise ValueError(
        f"workdir {workdir} holds a run of another config (sections {differs} differ from "
        f"{saved}); use another --workdir or pass --config.train.overwrite=True to start over"
    )


def run_of(path: str | Path) -> tuple[Path, int | None]:
    """(the run directory, the step) of a path to a run (step None) or to one of its
    checkpoints' directories, ``RUN/checkpoints/N`` (step N)."""
    path = Path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    return path, None


def restore_for_inference(
    workdir: str | Path, which: str | int = "best"
) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """(config, module, variables) of a run dir: its best checkpoint by ``train.best_metric``
    (the latest when none has a validation metric), with ``which="latest"`` the latest, or with
    a step number that step's. ``workdir`` may also be one checkpoint's directory,
    ``RUN/checkpoints/N`` (that step; ``which`` is then not used), so that whatever takes a run
    directory (``adreg-register --checkpoint``, ``train.init_from``) takes a step too."""
    workdir, step = run_of(workdir)
    which = which if step is None else step
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: no config.json; is {workdir} a training workdir?")
    if which not in ("best", "latest") and not isinstance(which, int):
        raise ValueError(f"which must be 'best', 'latest' or a step number; got {which!r}")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    manager = _checkpoint_manager(workdir, config.train)
    if isinstance(which, int):
        if which not in manager.all_steps():
            raise FileNotFoundError(
                f"{workdir / 'checkpoints'}: no checkpoint of step {which}; it holds steps "
                f"{sorted(manager.all_steps())}"
            )
        step = which
    else:
        step = manager.best_step() if which == "best" else None
        if step is None:
            step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint to restore")
    model = build_model(config.model)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return config, model, {"params": restored["state"]["params"]}


# --- the loop ------------------------------------------------------------------------------------


def total_steps(train_config) -> int:
    if int(train_config.max_steps) > 0:
        return int(train_config.max_steps)
    return int(train_config.epochs) * int(train_config.steps_per_epoch)


def evaluate(eval_step, params, dataset, mesh) -> dict[str, float]:
    """Mean of each validation metric over the held-out pairs."""
    sums: dict[str, list[float]] = {}
    for index in range(len(dataset)):
        batch = {k: v[None] for k, v in dataset[index].items()}
        metrics = jax.device_get(eval_step(params, replicate(batch, mesh)))
        for key, value in metrics.items():
            sums.setdefault(key, []).append(float(np.mean(value)))
    return {f"val/{k}": float(np.mean(v)) for k, v in sums.items()}


# --- stopping before the end ---------------------------------------------------------------------


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGTERM or SIGINT after saving the checkpoint of the step it had begun
    (``signum``: the signal). Not an error: the same command resumes from there."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _StopSignals:
    """While training: SIGTERM (what a scheduler's preemption or ``timeout`` sends) and SIGINT
    (Ctrl-C) ask the loop to stop after the step under way and save it; a second signal acts as
    it did before (Ctrl-C twice: KeyboardInterrupt at once). Only the main thread can take
    signals: elsewhere the handlers are left as they are."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(signum, self._take)
                # None: a handler set outside Python, which cannot be set back from it
                self._previous[signum] = signal.SIG_DFL if previous is None else previous
        return self

    def _take(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, self._previous[signum])

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _agreed(stop: bool) -> bool:
    """Whether to stop, the same on every process of a multi-process run (each decides on its own
    clock and signals; one that stopped alone would leave the others waiting in a collective)."""
    if jax.process_count() == 1:
        return stop
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(stop))))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, float]:
    """Train (or resume) the run of ``config`` in ``workdir``; returns the final metrics.

    The run stops early, saving the checkpoint of its last step so that the same call resumes it,
    after ``train.max_minutes`` of wall time in this call (0: no limit; it returns) or on SIGTERM
    or SIGINT (it raises ``TrainingInterrupted``)."""
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    called = time.perf_counter()
    budget_s = 60.0 * float(config.train.get("max_minutes", 0.0))

    maybe_initialize_distributed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir(workdir, config)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    mesh = data_mesh()
    model = build_model(config.model)
    val_data = build_dataset(config.data, "val", config.seed)
    # the first batch, read here, only for the shapes
    state = create_train_state(config, model, batched_dataset(config.data, "train", config.seed)[0])
    progress = {"batches_read": 0, "best": None, "since_best": 0}
    manager = _checkpoint_manager(workdir, config.train)

    start = manager.latest_step()
    if start is not None:
        state, progress = _restore(manager, start, state)
        print(f"resuming from step {start} ({workdir / 'checkpoints'})")
    elif config.train.get("init_from"):
        state = _initialised_from(state, str(config.train.init_from), config.model)
    start = int(state.step)
    # one batch per step (checkpoints written before 2026-11-28 hold Grain's iterator state
    # instead, which was at the same batch)
    train_iter = make_iterator(
        config.data, "train", config.seed, start=progress.pop("batches_read", start)
    )
    progress.pop("iterator", None)
    state = replicate(state, mesh)

    train_step = make_train_step(model, config.loss, dataset_labels(config.data))
    eval_step = make_eval_step(model, dataset_labels(config.data))
    rng = jax.random.key(config.seed)
    steps = total_steps(config.train)
    writer = SummaryWriter(str(workdir / "tensorboard"))
    log_path = workdir / "metrics.jsonl"
    best_metric = str(config.train.best_metric)
    sign = 1.0 if config.train.best_mode == "max" else -1.0
    patience = int(config.train.early_stopping_patience)
    last: dict[str, float] = {}
    stopped_early = False
    stopped_by = None  # "train.max_minutes", or the signal's name

    def log(step: int, values: dict[str, float]) -> None:
        with log_path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    signals = _StopSignals().install()
    try:
        bar = tqdm(total=steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        started = time.perf_counter()
        step = start
        # the share of the training time since the last log line (validation and saving left
        # out) spent waiting for batches: near 1, the accelerator waits for its data (raise
        # data.num_workers, if the host has the cores, or for synth_brain draw the pairs on the
        # device, data.synth_on_device, whose synthesis is then inside the step's time)
        waited, since = 0.0, started
        while step < steps:
            asked = time.perf_counter()
            batch = shard_batch(next(train_iter), mesh)
            waited += time.perf_counter() - asked
            state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
            metrics = {f"train/{k}": float(v) for k, v in jax.device_get(metrics).items()}
            step += 1
            if not math.isfinite(metrics["train/loss"]):
                raise FloatingPointError(
                    f"non-finite training loss {metrics['train/loss']} at step {step}; the last "
                    f"good checkpoint (step {manager.latest_step()}) in "
                    f"{workdir / 'checkpoints'} is intact"
                )
            last.update(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if step % int(config.train.log_every) == 0 or step == steps:
                now = time.perf_counter()
                rate = (step - start) / max(now - started, 1e-9)
                data_wait = waited / max(now - since, 1e-9)
                log(step, {**metrics, "steps_per_s": rate, "data_wait_fraction": data_wait})
                waited, since = 0.0, None  # restarted after this step's validation and save
            at_eval = step % int(config.train.eval_every) == 0 or step == steps
            over_time = budget_s > 0 and time.perf_counter() - called >= budget_s
            if step < steps and _agreed(over_time or signals.received is not None):
                if signals.received is not None:
                    stopped_by = signal.Signals(signals.received).name
                else:
                    stopped_by = "train.max_minutes" if over_time else "another process's signal"
            at_save = at_eval or step % int(config.train.checkpoint_every) == 0 or stopped_by
            val = None
            if at_eval:
                val = evaluate(eval_step, state.params, val_data, mesh)
                log(step, val)
                last.update(val)
                shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(val.items()))
                bar.write(f"{shown} (step {step})")
                if best_metric in val:
                    value = sign * val[best_metric]
                    if progress["best"] is None or value > progress["best"]:
                        progress["best"], progress["since_best"] = value, 0
                    else:
                        progress["since_best"] += 1
            if at_save:
                progress["batches_read"] = step
                manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(_state_tree(state)),
                        progress=ocp.args.JsonSave(progress),
                    ),
                    metrics=val if val and best_metric in val else None,
                )
            if since is None:
                since = time.perf_counter()
            if stopped_by:
                break
            if patience > 0 and progress["since_best"] >= patience:
                bar.write(
                    f"early stopping at step {step}: {best_metric} has not improved for "
                    f"{patience} validations"
                )
                stopped_early = True
                break
        bar.close()
        manager.wait_until_finished()
    finally:  # also when the run fails: an open writer errs at interpreter exit
        writer.close()
        signals.restore()
    if stopped_by:
        message = (
            f"stopped by {stopped_by} at step {step}/{steps}, its checkpoint saved in "
            f"{workdir / 'checkpoints'}: the same command resumes the run from there"
        )
        print(message)
        if signals.received is not None:
            raise TrainingInterrupted(message, signals.received)
        return last
    summary = {k: v for k, v in last.items() if k.startswith("val/")}
    parts = [f"done: step {step}/{steps}" + (" (early stop)" if stopped_early else "")]
    parts += [f"{k}={v:.4f}" for k, v in sorted(summary.items())]
    parts += [f"best step {manager.best_step()}", f"workdir {workdir}"]
    print(", ".join(parts))
    return last

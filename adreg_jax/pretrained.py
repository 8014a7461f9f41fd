"""Pretrained networks shipped inside the package: export a train.py run, load a model by name.

    python -m adreg_jax.pretrained export --workdir runs/brain --name brain
    config, model, variables = adreg_jax.pretrained.load("brain")
    adreg-register --fixed F.nii.gz --moving M.nii.gz --out DIR --model brain

Where this sits: train.py's run directory -> **export** (the best checkpoint, parameters in
float16) -> ``adreg_jax/weights/NAME.npz`` (+ its model card ``NAME.md``) -> **load** ->
``adreg-register --model`` (``registration.deformable.network_field``) and ``eval.py --model``.

File format: one flat npz, no pickles. ``params/<module path>`` holds each parameter (float16);
``config.json`` holds the UTF-8 bytes (uint8) of ``{"model": config.model, "data": {"dataset",
"image_size", "spacing"}, "source": {...}}``: what ``network_field`` needs to resample any scan to
the network's training grid and back.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODELS: dict[str, Path] = {"brain": WEIGHTS / "brain.npz"}  # name -> packaged weights file
MAX_BYTES = 30 * 1024 * 1024  # what the repository accepts per model
_PARAM_PREFIX = "params/"


def available() -> str:
    return ", ".join(sorted(MODELS))


def weights_path(name: str) -> Path:
    """The weights file of a registered model; ``ValueError`` naming the known ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {available()}")
    return Path(MODELS[name])


def _training_spacing(config: ml_collections.ConfigDict) -> list[float] | None:
    """mm per voxel of the training images, from one validation pair of a generated data set
    (None for data sets read from files, whose spacing varies)."""
    if config.data.dataset not in ("generated_brain", "synth_brain", "generated_lung"):
        return None
    from adreg_jax.data import build_dataset

    return [float(s) for s in build_dataset(config.data, "val", int(config.seed))[0]["spacing"]]


def export(
    workdir: str | Path,
    name: str,
    out_dir: str | Path = WEIGHTS,
    which: str | int = "best",
    average: Sequence[int] = (),
) -> Path:
    """Write ``out_dir/NAME.npz`` from the best (``which="latest"``: the latest; a number: that
    step's) checkpoint of the train.py run in ``workdir``, or with ``average`` the mean of the
    parameters of those steps' checkpoints (a uniform average of weights along one run, as
    stochastic weight averaging takes it), parameters in float16, and, when none exists, a model
    card ``NAME.md`` with what the run recorded; returns the npz path. Refuses a file over 30 MB."""
    import jax

    from adreg_jax.training import restore_for_inference

    workdir, out_dir = Path(workdir), Path(out_dir)
    steps = [int(step) for step in average] or [which]
    flats = []
    for step in steps:
        config, model, variables = restore_for_inference(workdir, step)
        flats.append(traverse_util.flatten_dict(jax.device_get(variables["params"]), sep="/"))
    flat = {
        key: np.mean([np.asarray(f[key], np.float64) for f in flats], axis=0) for key in flats[0]
    }
    arrays = {_PARAM_PREFIX + key: np.asarray(value, np.float16) for key, value in flat.items()}
    for key, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{workdir}: parameter {key} is not finite in float16")
    record = {
        "model": config.model.to_dict(),
        "data": {
            "dataset": config.data.dataset,
            "image_size": list(config.data.image_size),
            "spacing": _training_spacing(config),
        },
        "source": {
            "workdir": str(workdir),
            "checkpoint": f"the mean of steps {steps}" if average else f"{which} checkpoint",
            "seed": int(config.seed),
            "loss": config.loss.to_dict(),
        },
    }
    arrays["config.json"] = np.frombuffer(json.dumps(record).encode(), np.uint8)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.npz"
    partial = out_dir / f"{name}.partial.npz"
    np.savez_compressed(partial, **arrays)
    size = partial.stat().st_size
    if size > MAX_BYTES:
        partial.unlink()
        raise ValueError(
            f"{path}: {size / 2**20:.1f} MB of weights; at most {MAX_BYTES / 2**20:.0f} MB fit "
            "in the repository (fewer config.model.channels)"
        )
    partial.replace(path)
    card = out_dir / f"{name}.md"
    if not card.exists():
        card.write_text(_model_card(name, workdir, record, flat))
    count = sum(int(np.size(v)) for v in flat.values())
    print(f"wrote {path} ({size / 2**20:.2f} MB, {count} parameters, float16)")
    return path


def _model_card(name: str, workdir: Path, record: dict, flat: dict) -> str:
    """A first model card from what the run recorded (its last validation line, if any)."""
    validation = None
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        val = [line for line in lines if any(k.startswith("val/") for k in line)]
        validation = val[-1] if val else None
    count = sum(int(np.size(v)) for v in flat.values())
    parts = [
        f"# Model card: {name}",
        "",
        f"- Exported from the train.py run `{workdir}` ({record['source']['checkpoint']}), "
        "parameters in float16.",
        f"- Parameters: {count}.",
        f"- Training data: `{record['data']['dataset']}` at {record['data']['image_size']} "
        f"voxels, spacing {record['data']['spacing']} mm.",
        f"- Model config: `{json.dumps(record['model'])}`",
        f"- Loss: `{json.dumps(record['source']['loss'])}`",
    ]
    if validation:
        values = ", ".join(f"{k} {v:.4f}" for k, v in sorted(validation.items()) if k != "step")
        parts.append(f"- Last validation (step {validation['step']}): {values}.")
    return "\n".join(parts) + "\n"


def load(name: str) -> tuple[ml_collections.ConfigDict, Any, dict]:
    """(config with ``model`` and ``data``, the Flax module, variables in float32) of a packaged
    model; ``ValueError`` in one line listing the available models when the name is unknown or
    its file is missing or unreadable."""
    path = weights_path(name)
    return load_file(path, name)


def load_file(path: str | Path, name: str | None = None) -> tuple[Any, Any, dict]:
    """``load`` of a weights file written by ``export``."""
    from adreg_jax.models import build_model

    path = Path(path)
    label = f"model {name!r} ({path})" if name else str(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            record = json.loads(bytes(data["config.json"]).decode())
            flat = {
                key[len(_PARAM_PREFIX) :]: np.asarray(data[key], np.float32)
                for key in data.files
                if key.startswith(_PARAM_PREFIX)
            }
        if not flat:
            raise ValueError("no parameters in the file")
        config = ml_collections.ConfigDict({"model": record["model"], "data": record["data"]})
        model = build_model(config.model)
    except FileNotFoundError:
        raise ValueError(
            f"{label}: weights file missing; available models: {available()}"
        ) from None
    except Exception as error:  # a truncated zip, a foreign npz, a config of another version
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"{label}: weights do not load ({reason}); available models: {available()}"
        ) from None
    params = traverse_util.unflatten_dict(flat, sep="/")
    return config, model, {"params": params}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adreg_jax.pretrained")
    commands = parser.add_subparsers(dest="command", required=True)
    export_parser = commands.add_parser(
        "export", help="package the best checkpoint of a train.py run as a named model"
    )
    export_parser.add_argument("--workdir", required=True, help="the train.py run directory")
    export_parser.add_argument("--name", required=True, help="the model's name (e.g. brain)")
    export_parser.add_argument(
        "--out-dir", default=str(WEIGHTS), help="where NAME.npz and NAME.md go"
    )
    which = export_parser.add_mutually_exclusive_group()
    which.add_argument(
        "--checkpoint", choices=("best", "latest"), default="best", help="which checkpoint"
    )
    which.add_argument(
        "--average",
        type=int,
        nargs="+",
        default=(),
        metavar="STEP",
        help="the mean of these steps' parameters instead of one checkpoint",
    )
    args = parser.parse_args(argv)
    try:
        export(args.workdir, args.name, args.out_dir, args.checkpoint, args.average)
    except (ValueError, FileNotFoundError) as error:
        print(f"adreg_jax.pretrained: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

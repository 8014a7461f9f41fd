"""Training throughput: steps per second and peak memory of real training steps (the Grain
pipeline on generated brains, the jitted step with the config's loss and Adam), per ablation
variant, each variant in a fresh process so that its peak memory is its own.

    python benchmarks/bench_train.py                                  # demo config, all variants
    python benchmarks/bench_train.py --config ixi --dataset generated_brain --steps 3

Peak memory is the process's peak resident set (CPU) or, on a GPU, the device's peak bytes.

Side by side with VoxelMorph 0.3.4 on PyTorch (CPU build), in one process, same U-Net channels,
batch 1, random volumes (``pip install -e ".[bench]"``):

    python benchmarks/bench_train.py --vs-voxelmorph --sizes 64 96x128x96

VoxelMorph: ``VxmPairwise`` (its defaults: velocity integrated in 5 steps), loss = neurite's
local NCC (window 9) + 0.01 * ``SpatialGradient`` L2, Adam. Ours: the U-Net baseline and the full
AD-RegNet of ``ABLATIONS`` with the paper's loss (configs/default.py: NCC + SSIM + smoothness +
negative-Jacobian) and Adam. Each row is the median of ``--steps`` steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from adreg_jax.models import ABLATIONS

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ABLATIONS


def run_variant(config_name: str, overrides: dict, dataset: str, steps: int, dtype: str) -> dict:
    """In this process: compile, warm up one step, then time ``steps`` steps."""
    import importlib
    import resource

    import jax

    from adreg_jax import training
    from adreg_jax.data import dataset_labels, make_iterator
    from adreg_jax.models import build_model

    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.model.update(overrides)
    config.model.dtype = dtype
    if dataset:
        config.data.dataset = dataset
    config.data.num_workers = 0
    model = build_model(config.model)
    batches = make_iterator(config.data, "train", config.seed)
    batch = next(batches)
    state = training.create_train_state(config, model, batch)
    step = training.make_train_step(model, config.loss, dataset_labels(config.data))
    start = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for index in range(steps):
        state, metrics = step(state, next(batches), jax.random.key(index))
        jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        peak_gb = stats["peak_bytes_in_use"] / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GB
    return {
        "steps_per_s": steps / seconds,
        "compile_s": compile_s,
        "peak_gb": peak_gb,
        "shape": list(config.data.image_size),
        "platform": device.platform,
    }


def median_seconds(step, runs: int) -> float:
    """Median wall time of ``step()`` (which must block until its work is done) after 2 warm-ups."""
    import statistics

    for _ in range(2):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def voxelmorph_step_s(shape, channels, runs: int) -> float:
    import neurite
    import torch
    import voxelmorph

    torch.manual_seed(0)
    model = voxelmorph.nn.models.VxmPairwise(3, 1, 1, nb_features=tuple(channels))
    ncc = neurite.nn.modules.NCC(window_size=9)
    gradient = neurite.nn.modules.SpatialGradient("l2")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    source, target = torch.rand(2, 1, 1, *shape).unbind(0)

    def step():
        optimizer.zero_grad()
        field, warped = model(source, target, return_warped_source=True)
        loss = -ncc(warped, target).mean() + 0.01 * gradient(field)
        loss.backward()
        optimizer.step()

    return median_seconds(step, runs)


def adreg_step_s(shape, channels, overrides: dict, runs: int) -> float:
    import jax
    import numpy as np

    from adreg_jax import training
    from adreg_jax.models import build_model
    from configs import default

    config = default.get_config()
    config.model.update(overrides)
    config.model.channels = tuple(channels)
    model = build_model(config.model)
    rng = np.random.default_rng(0)
    batch = {
        key: jax.numpy.asarray(rng.random((1, *shape, 1), dtype=np.float32))
        for key in ("fixed", "moving")
    }
    holder = {"state": training.create_train_state(config, model, batch)}
    train_step = training.make_train_step(model, config.loss)

    def step():
        holder["state"], metrics = train_step(holder["state"], batch, jax.random.key(0))
        jax.block_until_ready(metrics)

    return median_seconds(step, runs)


def compare_with_voxelmorph(sizes, channels, runs: int) -> None:
    import jax
    import torch

    rows = []
    for text in sizes:
        parts = [int(p) for p in text.lower().split("x")]
        shape = tuple(parts * 3) if len(parts) == 1 else tuple(parts)
        peer = voxelmorph_step_s(shape, channels, runs)
        for name in ("U-Net baseline", "AD-RegNet (full)"):
            ours = adreg_step_s(shape, channels, VARIANTS[name], runs)
            rows.append(("x".join(map(str, shape)), name, ours, peer))
            print(f"  {rows[-1][0]} {name}: {ours:.2f} s, VoxelMorph {peer:.2f} s", flush=True)
    threads = torch.get_num_threads()
    print(
        f"\ntraining step, batch 1, channels {tuple(channels)}, jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({threads} threads), "
        f"median of {runs} steps\n"
    )
    print("| size | adreg_jax variant | adreg_jax s/step | VoxelMorph s/step | ratio |")
    print("|---|---|---|---|---|")
    for size, name, ours, peer in rows:
        print(f"| {size} | {name} | {ours:.2f} | {peer:.2f} | {ours / peer:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="a module in configs/")
    parser.add_argument("--dataset", default="generated_brain")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--vs-voxelmorph", action="store_true")
    parser.add_argument("--sizes", nargs="*", default=["64", "96x128x96"])
    parser.add_argument("--channels", type=int, nargs="*", default=[16, 32, 32, 32, 32])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vs_voxelmorph:
        sys.path.insert(0, str(ROOT))  # configs/ lives beside adreg_jax/
        compare_with_voxelmorph(args.sizes, args.channels, max(args.steps, 1))
        return
    if args.child:
        result = run_variant(
            args.config, VARIANTS[args.child], args.dataset, args.steps, args.dtype
        )
        print("RESULT " + json.dumps(result))
        return
    rows = []
    for name in args.variants:
        command = [
            sys.executable,
            __file__,
            "--config", args.config,
            "--dataset", args.dataset,
            "--steps", str(args.steps),
            "--dtype", args.dtype,
            "--child", name,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((name, json.loads(lines[-1][len("RESULT ") :])))
    if not rows:
        sys.exit(1)
    shape = "x".join(map(str, rows[0][1]["shape"]))
    print(
        f"\ntraining steps, configs/{args.config}.py on {args.dataset} at {shape}, {args.dtype}, "
        f"{rows[0][1]['platform']}, {args.steps} timed steps after one compiled step\n"
    )
    print("| variant | steps/s | s/step | compile s | peak memory GB |")
    print("|---|---|---|---|---|")
    for name, result in rows:
        print(
            f"| {name} | {result['steps_per_s']:.3f} | {1 / result['steps_per_s']:.2f} | "
            f"{result['compile_s']:.1f} | {result['peak_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()

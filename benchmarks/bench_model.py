"""AD-RegNet variants: parameter counts, step times on this machine, and the device memory of one
full training step from XLA's compiled memory analysis (works without a GPU).

    python benchmarks/bench_model.py                       # params, times at 64^3, memory
    python benchmarks/bench_model.py --time-sizes 64 160x192x224 --memory-sizes 160x192x224
    python benchmarks/bench_model.py --variants "AD-RegNet (full)" --remat off on --dtypes float32

Memory = arguments + outputs + temporaries - aliased (donated) bytes of the compiled step
(model forward and backward, the configs/default.py loss, Adam update), batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adreg_jax import training
from adreg_jax.models import ABLATIONS, build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ lives beside adreg_jax/
from configs import default  # noqa: E402

VARIANTS = ABLATIONS
DTYPE_NAMES = {"float32": "f32", "bfloat16": "bf16"}


def parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    return tuple(parts * 3) if len(parts) == 1 else tuple(parts)


def config_for(overrides: dict, dtype: str = "float32"):
    config = default.get_config()
    config.model.update(overrides)
    config.model.dtype = dtype
    return config


def with_conv_impl(overrides: dict, conv_impl: str) -> dict:
    return {**overrides, "conv_impl": conv_impl}


def make_step(config, shape):
    model = build_model(config.model)
    batch = {
        "fixed": jnp.zeros((1, *shape, 1), jnp.float32),
        "moving": jnp.zeros((1, *shape, 1), jnp.float32),
    }
    state = jax.eval_shape(lambda b: training.create_train_state(config, model, b), batch)
    step = training.make_train_step(model, config.loss)
    return model, step, state, batch


def count_params(overrides) -> int:
    config = config_for(overrides)
    model = build_model(config.model)
    x = jnp.zeros((1, 32, 32, 32, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, x)
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def step_memory_gb(overrides, shape, dtype) -> float:
    config = config_for(overrides, dtype)
    _, step, state, batch = make_step(config, shape)
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    stats = compiled.memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**30


def time_model(overrides, shape, runs: int) -> tuple[float, float]:
    """(forward s, forward+backward training step s), medians after one warm-up."""
    config = config_for(overrides)
    model = build_model(config.model)
    rng = np.random.default_rng(0)
    batch = {
        "fixed": jnp.asarray(rng.random((1, *shape, 1), dtype=np.float32)),
        "moving": jnp.asarray(rng.random((1, *shape, 1), dtype=np.float32)),
    }
    state = training.create_train_state(config, model, batch)
    forward = jax.jit(model.apply)
    step = training.make_train_step(model, config.loss)

    def median(fn):
        jax.block_until_ready(fn())
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    variables = {"params": state.params}
    fwd = median(lambda: forward(variables, batch["fixed"], batch["moving"])["ddf"])
    holder = {"state": state}

    def train_once():
        holder["state"], metrics = step(holder["state"], batch, jax.random.key(0))
        return metrics["loss"]

    return fwd, median(train_once)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-sizes", nargs="*", default=["64"])
    parser.add_argument("--memory-sizes", nargs="*", default=["160x192x224", "256x256x112"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument(
        "--conv-impls", nargs="*", default=["auto"], help="model.conv_impl values, a row each"
    )
    parser.add_argument(
        "--remat", nargs="*", default=["off"], choices=["off", "on"], help="model.remat, a row each"
    )
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    args = parser.parse_args()
    time_sizes = [parse_size(s) for s in args.time_sizes]
    memory_sizes = [parse_size(s) for s in args.memory_sizes]
    platform = jax.devices()[0].platform

    header = ["variant", "conv_impl", "remat", "params"]
    header += [f"fwd s {'x'.join(map(str, s))}" for s in time_sizes]
    header += [f"train step s {'x'.join(map(str, s))}" for s in time_sizes]
    header += [
        f"step GB {'x'.join(map(str, s))} {DTYPE_NAMES[d]}"
        for s in memory_sizes
        for d in args.dtypes
    ]
    print(
        f"\nAD-RegNet variants, configs/default.py channels, batch 1, jax {jax.__version__}, "
        f"{platform}\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = [
        (name, impl, remat)
        for name in args.variants
        for impl in args.conv_impls
        for remat in args.remat
    ]
    for name, conv_impl, remat in rows:
        overrides = {**with_conv_impl(VARIANTS[name], conv_impl), "remat": remat == "on"}
        cells = [name, conv_impl, remat, f"{count_params(overrides):,}"]
        timings = [time_model(overrides, s, args.runs) for s in time_sizes]
        cells += [f"{fwd:.2f}" for fwd, _ in timings] + [f"{bwd:.2f}" for _, bwd in timings]
        for shape in memory_sizes:
            for dtype in args.dtypes:
                cells.append(f"{step_memory_gb(overrides, shape, dtype):.2f}")
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Data throughput of a config's data set: time to make one training pair in this process, and
the pipeline's pairs per second with each number of worker processes.

    python benchmarks/bench_data.py                                   # configs/default.py
    python benchmarks/bench_data.py --config configs/brain.py --workers 0 1 2 --pairs 16
    python benchmarks/bench_data.py --sizes 32,64,96                  # other grids, D x 7D/6 x D
    python benchmarks/bench_data.py --config configs/brain.py --device 1 8 --pairs 16

``--device B ...``: also the training pairs drawn on the default JAX device
(``data.synth_on_device``, synth_brain only) in batches of B, and the two generators' pairs side
by side (the pair's field inside the brain: mean mm, mean |gradient| per mm; Dice of the tissue
labels before registration; the share of pairs in one contrast), over the ``--pairs`` pairs.

A training run whose accelerator waits for data goes at the pipeline's rate, whatever the
accelerator: on one H200 the five ablation variants of configs/brain.py trained at 2.0-2.5 steps
per second each, the GPU mostly idle (README, "The paper's ablation"). Run this first on a
machine lent for training: batches per second = pipeline pairs/s / batch size.

Config fields are overridden as in train.py (``--config.data.num_workers=...`` has no effect
here: ``--workers`` sets it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ and benchmarks/

from benchmarks.ablation import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    from adreg_jax.data import pipeline

    if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--config", default="configs/default.py", help="a configs/*.py file")
    parser.add_argument(
        "--sizes", default=None, help="edges D of D x (D + D // 6) x D grids; default: the config's"
    )
    parser.add_argument("--pairs", type=int, default=4, help="pairs timed per row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--device", type=int, nargs="*", default=[], metavar="B", help="batch sizes on the device"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        data = load_config(args.config, overrides).data
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.sizes:
        shapes = [(e, e + e // 6, e) for e in (int(s) for s in args.sizes.split(","))]
    else:
        shapes = [tuple(int(n) for n in data.image_size)]
    print(f"{data.dataset}, batch size 1")
    print(f"{'size':>12} | {'one pair (s)':>12} | {'pipeline pairs/s':>16} | workers")
    print("-" * 62)
    for shape in shapes:
        data.image_size, data.batch_size = shape, 1
        source = pipeline.build_source(data, "train", 0)
        source[0]  # warm-up (the atlas, allocations, caches)
        start = time.perf_counter()
        for i in range(1, args.pairs + 1):
            source[i]
        one = (time.perf_counter() - start) / args.pairs
        for workers in args.workers:
            data.num_workers = workers
            iterator = pipeline.make_iterator(data, "train", seed=0)
            next(iterator)  # the workers' start-up
            start = time.perf_counter()
            for _ in range(args.pairs):
                next(iterator)
            rate = args.pairs / (time.perf_counter() - start)
            print(f"{'x'.join(map(str, shape)):>12} | {one:12.3f} | {rate:16.2f} | {workers}")
        if args.device:
            device_rows(data, args.device, args.pairs, source)
    return 0


def device_rows(data, batch_sizes, pairs: int, source) -> None:
    """The on-device generator's rows (pairs/s, compilation) and the two generators' pairs."""
    import jax
    import numpy as np

    from adreg_jax.data import pipeline

    shape = "x".join(map(str, data.image_size))
    data.synth_on_device = True
    drawn = []
    for batch_size in batch_sizes:
        data.batch_size = batch_size
        stream = pipeline.make_iterator(data, "train", seed=0)
        start = time.perf_counter()
        jax.block_until_ready(next(stream))
        compiled = time.perf_counter() - start
        count = max(1, pairs // batch_size)
        start = time.perf_counter()
        batches = jax.block_until_ready([next(stream) for _ in range(count)])  # as training does
        rate = count * batch_size / (time.perf_counter() - start)
        for batch in jax.device_get(batches):
            drawn += [{k: v[i] for k, v in batch.items()} for i in range(batch_size)]
        print(
            f"{shape:>12} | {'':>12} | {rate:16.2f} | on {jax.devices()[0].platform}, batch "
            f"{batch_size} (first batch {compiled:.1f} s, compilation)"
        )
    data.synth_on_device = False
    print(f"\n{pairs} pairs | field mm | gradient /mm | Dice before | one contrast")
    print("-" * 62)
    for name, elements in (
        ("numpy", [source[i] for i in range(1, pairs + 1)]),
        ("device", drawn[:pairs]),
    ):
        rows = np.array([pair_statistics(e) for e in elements])
        print(f"{name:>8} | " + " | ".join(f"{v:.3f}" for v in rows.mean(axis=0)))


def pair_statistics(element: dict) -> tuple[float, float, float, float]:
    """The pair's field inside the fixed brain (mean mm, mean |gradient| per mm), the mean Dice
    of CSF / GM / WM before registration, and whether it shares one contrast."""
    import numpy as np

    from adreg_jax import ops
    from adreg_jax.data.generated import BRAIN_LABELS

    spacing = np.asarray(element["spacing"], np.float64)
    mm = np.asarray(element["true_ddf"], np.float64) * spacing
    fixed, moving = np.asarray(element["fixed_seg"]), np.asarray(element["moving_seg"])
    size = np.linalg.norm(mm, axis=-1)[fixed > 0].mean()
    gradient = np.mean([np.abs(np.diff(mm, axis=a)).mean() / spacing[a] for a in range(3)])
    dice = float(np.mean(ops.dice(fixed, moving, BRAIN_LABELS)))
    return size, gradient, dice, float(element["same_contrast"])


if __name__ == "__main__":
    sys.exit(main())

"""Data throughput: time to generate one brain pair, and pipeline pairs/s.

python benchmarks/bench_data.py [--sizes 32,64,96] [--pairs 8] [--workers 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from adreg_jax.data import generated, pipeline


def _default_data_config():
    spec = importlib.util.spec_from_file_location(
        "default_config", Path(__file__).resolve().parents[1] / "configs" / "default.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="32,64,96")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    print(f"{'size':>12} | {'one pair (s)':>12} | {'pipeline pairs/s':>16} | workers")
    print("-" * 62)
    for edge in (int(s) for s in args.sizes.split(",")):
        shape = (edge, edge + edge // 6, edge)
        source = generated.GeneratedBrainPairs(shape, length=args.pairs, seed=0)
        source[0]  # warm-up (allocations, caches)
        start = time.perf_counter()
        for i in range(args.pairs):
            source[i]
        one = (time.perf_counter() - start) / args.pairs
        data = _default_data_config()
        data.image_size, data.num_workers, data.batch_size = shape, args.workers, 1
        iterator = pipeline.make_iterator(data, "train", seed=0)
        next(iterator)
        start = time.perf_counter()
        for _ in range(args.pairs):
            next(iterator)
        rate = args.pairs / (time.perf_counter() - start)
        print(f"{'x'.join(map(str, shape)):>12} | {one:12.3f} | {rate:16.2f} | {args.workers}")


if __name__ == "__main__":
    main()

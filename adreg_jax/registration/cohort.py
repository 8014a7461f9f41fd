"""Cohorts: ``adreg-register --pairs pairs.csv --out DIR`` registers many pairs in one process.

Where this sits: a pair list -> **cohort** -> ``pipeline.register_pair`` per pair -> one folder per
pair under DIR and one table, ``DIR/metrics.csv``.

What one process saves over one command per pair: the interpreter and JAX start once; every
compiled program (the stages' jitted steps are cached by their options, then by shapes) is traced
and compiled, or read from the persistent cache, once; a scan named by several pairs (an atlas)
is read and normalised once. A pair whose folder holds ``metrics.json`` (written last) is done:
a rerun after a kill registers only the rest. Pairs come from one queue, taken by
``WORKERS_PER_DEVICE`` threads per local device (``jax.default_device``): with several devices
the pairs are spread over them.

The pair list is ``data.nifti.read_pair_list``'s format: CSV with a header (or JSON), columns
``fixed``, ``moving`` and optionally ``fixed_seg``, ``moving_seg``, ``fixed_points``,
``moving_points``; relative paths are resolved against the list's folder.
"""

from __future__ import annotations

import argparse
import collections
import copy
import csv
import json
import sys
import threading
import time
from pathlib import Path

import jax

from adreg_jax.data.nifti import PAIR_KEYS, read_pair_list
from adreg_jax.registration.pipeline import Loaded, check_options, load_scan, register_pair

TABLE = "metrics.csv"
# Pairs in flight per device: more than one lets one pair's host work (gzip, matplotlib) overlap
# another's optimisation. Ten 1 mm brain pairs on the 2-core CPU (benchmarks/registration_outputs.py
# --parts cohort, the console script as users run it): 43.1-44.8 s with three, 49.4-51.2 s with
# one, 69.5-70.4 s as ten commands. Measured earlier without the console script's malloc tuning:
# three 56.9-57.8 s, two 58.9-60.2 s, four 58.4-58.8 s. Each holds its pair's volumes.
WORKERS_PER_DEVICE = 3


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_cohort(path: str) -> list[tuple[str, dict[str, str]]]:
    """(folder name, pair) for each row of the pair list; every file named must exist. Names are
    ``NNN_<moving>_to_<fixed>`` (row number and file stems), stable across reruns."""
    rows = read_pair_list(path)
    if not rows:
        raise ValueError(f"{path}: no pairs (expected a header with 'fixed' and 'moving')")
    pairs = []
    for number, row in enumerate(rows, start=1):
        pair = {key: row[key] for key in PAIR_KEYS if key in row}
        for key, file in pair.items():
            if not Path(file).is_file():
                raise FileNotFoundError(f"{path}: pair {number}: {key} file {file} missing")
        name = f"{number:03d}_{_stem(pair['moving'])}_to_{_stem(pair['fixed'])}"
        pairs.append((name, pair))
    return pairs


class _ScanCache:
    """``load_scan`` that keeps the scans named by more than one pair (an atlas)."""

    def __init__(self, pairs: list[tuple[str, dict[str, str]]]):
        uses = collections.Counter(p[k] for _, p in pairs for k in ("fixed", "moving"))
        self._shared = {path for path, count in uses.items() if count > 1}
        self._scans: dict[str, Loaded] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str, name: str) -> Loaded:
        if path not in self._shared:
            return load_scan(path, name)
        with self._lock:
            if path not in self._scans:
                self._scans[path] = load_scan(path, name)
            return self._scans[path]


def write_table(out: Path, pairs: list[tuple[str, dict[str, str]]]) -> int:
    """``out/metrics.csv``: one row per finished pair (its scalar metrics); returns the rows."""
    rows = []
    for name, pair in pairs:
        path = out / name / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
            rows.append({"pair": name, "fixed": pair["fixed"], "moving": pair["moving"], **scalars})
    columns = list(dict.fromkeys(key for row in rows for key in row))
    partial = out / (TABLE + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(out / TABLE)
    return len(rows)


def run_cohort(
    args: argparse.Namespace, devices: list | None = None, workers_per_device: int | None = None
) -> dict:
    """Register every pair of ``args.pairs`` not done yet into ``args.out/<name>/``; the table of
    all finished pairs in ``args.out/metrics.csv``. ``devices``: default all local devices;
    ``workers_per_device``: default ``WORKERS_PER_DEVICE``."""
    started = time.perf_counter()
    check_options(args)
    pairs = read_cohort(args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = collections.deque(
        (name, pair) for name, pair in pairs if not (out / name / "metrics.json").is_file()
    )
    skipped = len(pairs) - len(todo)
    devices = list(devices or jax.local_devices())
    per_device = workers_per_device or WORKERS_PER_DEVICE
    workers = [device for _ in range(per_device) for device in devices][: max(1, len(todo))]
    options = copy.copy(args)
    options.quiet = args.quiet or len(workers) > 1  # no interleaved progress bars
    load = _ScanCache(pairs)
    lock = threading.Lock()
    failures: list[BaseException] = []
    finished = [0]

    def work(device) -> None:
        with jax.default_device(device):
            while True:
                with lock:
                    if failures or not todo:
                        return
                    name, pair = todo.popleft()
                try:
                    metrics = register_pair(
                        pair, options, out / name, load, extra={"device": str(device)}
                    )
                except Exception as error:  # noqa: BLE001 - re-raised in the caller, pair named
                    with lock:
                        failures.append(_named(error, args.pairs, name))
                    return
                with lock:
                    finished[0] += 1
                    write_table(out, pairs)
                    print(
                        f"adreg-register: {skipped + finished[0]}/{len(pairs)} {name} "
                        f"({metrics['time_s']:.1f} s, {device})",
                        file=sys.stderr,
                    )

    if len(workers) == 1:
        work(workers[0])
    else:
        threads = [threading.Thread(target=work, args=(device,)) for device in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    rows = write_table(out, pairs)
    if failures:
        raise failures[0]
    return {
        "pairs": len(pairs),
        "registered": finished[0],
        "skipped_done": skipped,
        "table": str(out / TABLE),
        "rows": rows,
        "devices": sorted({str(device) for device in workers}),
        "workers": len(workers),
        "time_s": time.perf_counter() - started,
    }


def _named(error: Exception, pairs_path: str, name: str) -> Exception:
    """The error of one pair, with the pair list and the pair's folder name in its message."""
    if isinstance(error, (ValueError, FileNotFoundError)):
        return type(error)(f"{pairs_path}: pair {name}: {error}")
    return error

"""Makes JAX strict for every test: rank promotion raises, and two CPU devices exist so that the
data-parallel code paths run here as they would on two GPUs.

Everything is set through the environment before JAX is imported, so that it holds alike in this
process, in every pytest-xdist worker and in the ``train.py`` / ``adreg-register`` subprocesses
that some tests start (they inherit the environment).

Compilation dominates the suite: its programs are tiny and run in milliseconds, but XLA:CPU
takes seconds to compile each. Three settings cut that without changing what any test computes:

- ``JAX_THREEFRY_PARTITIONABLE=0``. The partitionable threefry (JAX's default) costs XLA:CPU
  2-5 s of compilation per generator shape (measured: 3-11 s for one ``jax.random.normal`` of a
  3x3x3x4x8 kernel, 0.3 s without), and a model's ``init`` draws one per parameter shape. The
  flag changes only which bits a key gives.
- One persistent compilation cache for the session (``JAX_COMPILATION_CACHE_DIR``, a fresh
  temporary folder, removed at the end): a program that several tests compile alike (the tiny
  model's initialisation and training step, the evaluation step, a registration at one size) is
  compiled once, by whichever process meets it first, and loaded by the others. A fresh folder,
  so that a run never depends on what an earlier one left behind.
- ``--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false``: no LLVM
  optimisation of the generated CPU code, and XLA:CPU's older loop emitters for fusions instead
  of its MLIR fusion emitters. Together they cut the compilation of the tiny model's training
  step from 10.5 s (19 s of CPU) to 2.2 s (2.6 s of CPU), and buy nothing at the tests' sizes.
  XLA's HLO passes (fusion, buffer assignment, which the memory tests read) run as always; the
  code computes the same values, within the tests' float tolerances.
"""

import gc
import os
import shutil
import tempfile
from importlib.metadata import version

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "2")
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set here by the first process (pytest itself, or the xdist controller), inherited by the
    # workers and subprocesses, and removed by that same process when the session ends.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="adreg-jax-tests-xla-")
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWN_CACHE = None
_FLAGS = ["--xla_backend_optimization_level=0"]
# jaxlib 0.11 dropped the older emitters and ends the process on a flag it does not know
if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 11):
    _FLAGS.append("--xla_cpu_use_fusion_emitters=false")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # noqa: E402

assert jax.config.jax_threefry_partitionable is False
assert jax.config.jax_numpy_rank_promotion == "raise"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` first (a stable sort: the rest keep their order), so that the
    xdist workers take the long ones early and finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    """One full garbage collection, then the heap frozen: pytest's own cleanup, which runs after
    this hook, collects five times to report exceptions raised in finalizers (its
    unraisableexception plugin), and a worker's heap after its share of the suite (JAX's traced
    and compiled programs: about 0.8 million objects after a third of it) took about 0.7 s a
    collection. Five took long enough that pytest-xdist's controller, which waits 5 s for a
    worker to end, sent the worker SIGINT, and pytest printed the KeyboardInterrupt it raised
    inside JAX's garbage-collection callback. The one collection here still reports exceptions
    raised in finalizers: pytest's hook that catches them is still installed. From the last
    test's end to the summary: 9.4 and 11.6 s before, 3.3 s after (full suite, 2 workers)."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None and not hasattr(session.config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

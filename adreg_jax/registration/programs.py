"""Compiled programs kept whole on disk, so that a later run neither traces nor lowers them.

Where this sits: the jitted functions of the registration stages (``affine``, ``deformable``,
``transform``, ``metrics``, ``pipeline``) are declared with ``programs.jit`` instead of
``jax.jit``; ``commands`` chooses the folder (``--cache-dir``).

JAX's persistent compilation cache saves XLA's compilation, but every process still traces each
jitted function and lowers it to StableHLO, whose hash is the cache key, before it finds the
executable on disk: a 1 mm brain command spent 1.9-2.1 s tracing and 0.9-1.4 s lowering its 29
programs with a warm cache (the deformable stage's two steps most of it), on a 2-core CPU. Here
the executable is serialised (``jax.experimental.serialize_executable``) together with its
argument and result tree structures, under a key made of the function's name, the caller's
``key`` (what its closure captures: options, not arrays), the static arguments, the shape, dtype
and weak type of every array argument, the device, and the versions of the code (a hash of the
source files of ``adreg_jax.ops`` and ``adreg_jax.registration``, which the programs are made
of), JAX, jaxlib, Optax and ``XLA_FLAGS``. A later process (or a later call
with other shapes) with the same key loads the executable and calls it directly.

The folder keeps at most ``MAX_BYTES`` of programs: after a program is written, the least
recently used (by modification time, which a load renews) are deleted until a quarter of that
is free again. (A 1 mm brain command keeps about 30 programs, 0.1-1 MB each.)

Without a folder (``set_directory(None)``, ``--cache-dir ''``), with keyword arguments, with
arrays on another device than the default one (``jax.default_device``), or inside another
traced function, a call is a plain ``jax.jit`` call.

On a CPU every program is compiled without XLA's YNNPACK fusions (``CPU_COMPILER_OPTIONS``):
these programs are gathers, box sums, histograms and small reductions, not convolutions, and
XLA:CPU (jaxlib 0.10.2) handed parts of them to YNNPACK with broadcast operands written out in
full. Measured on the 2-core CPU, idle, warm, 1 mm brain pairs, the option set for the whole
process (``XLA_FLAGS``): the T1 pair's registration 3.5 -> 2.9 s, the T2-like pair's (mutual
information) 17.6 -> 9.1 s; the gradient of the mutual information of two 40 x 56 x 48 images
81 -> 38 ms. The networks (``jax.jit`` of a Flax module, outside this
module) keep them: their convolutions gain from YNNPACK.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import pickle
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

SUFFIX = ".program"
MAX_BYTES = 1 << 30
# XLA:CPU options of every program (module docstring); an empty fusion-type list: no YNNPACK
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_directory: Path | None = None
_compile_lock = threading.Lock()


def set_directory(directory: str | Path | None) -> None:
    """Where compiled programs are kept (created when first written); None: nowhere."""
    global _directory
    _directory = Path(directory) if directory else None


def directory() -> Path | None:
    return _directory


@functools.cache
def _code_version() -> str:
    """A hash of the Python source of the registration stages, the array functions and the
    models (a network's forward pass is a program too), and of the versions that decide what a
    program computes and how it was compiled."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    # what the programs are made of: the registration stages and the functions they call
    for folder in ("ops", "registration", "models"):
        for path in sorted((package / folder).rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode())
            digest.update(path.read_bytes())
    for name in ("jax", "jaxlib", "optax", "flax"):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}={version};".encode())
    digest.update(os.environ.get("XLA_FLAGS", "").encode())
    return digest.hexdigest()


@functools.cache
def compiler_options() -> dict | None:
    """``CPU_COMPILER_OPTIONS`` where the default backend is a CPU whose XLA knows them; else
    None (a GPU, or a jaxlib without the option: its defaults)."""
    if jax.default_backend() != "cpu":
        return None
    try:  # a jaxlib that does not know an option refuses to compile with it
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # noqa: BLE001 (JaxRuntimeError: "No such compile option")
        return None
    return dict(CPU_COMPILER_OPTIONS)


def _default_device():
    chosen = jax.config.jax_default_device
    return chosen if isinstance(chosen, jax.Device) else jax.local_devices()[0]


def _leaf_signature(leaf, default: int) -> tuple:
    """(shape, dtype, weak type, devices) of an argument leaf; devices () for host values and
    arrays on the default device (``default``, its id), where host values go."""
    aval = jax.typeof(leaf)
    devices = ()
    if isinstance(leaf, jax.Array):
        devices = tuple(sorted(device.id for device in leaf.devices()))
        devices = () if devices == (default,) else devices
    return (tuple(aval.shape), str(aval.dtype), bool(aval.weak_type), devices)


class Program:
    """A jitted function whose compiled executables are also kept on disk (module docstring).
    ``key``: what else decides the program (the values its closure captures)."""

    def __init__(self, fun: Callable, static_argnums: Sequence[int] = (), key=()):
        self._fun = fun
        self._static = frozenset(static_argnums)
        self._name = f"{fun.__module__}.{fun.__qualname__}"
        self._key = repr(key)
        self._compiled: dict = {}
        functools.update_wrapper(self, fun)

    @functools.cached_property
    def _jitted(self):  # made on first use: the options need the backend, not known at import
        return jax.jit(
            self._fun, static_argnums=tuple(self._static), compiler_options=compiler_options()
        )

    @functools.cached_property
    def _nested(self):  # called inside another program: inlined there, compiled with its options
        return jax.jit(self._fun, static_argnums=tuple(self._static))

    def __getattr__(self, name):  # lower, trace, eval_shape, ... of the jitted function
        if name.startswith("_"):  # not set yet (during __init__, copying): no recursion
            raise AttributeError(name)
        return getattr(self._jitted, name)

    def __call__(self, *args, **kwargs):
        dynamic = tuple(arg for i, arg in enumerate(args) if i not in self._static)
        leaves, tree = jax.tree.flatten(dynamic)  # once per call: this is every Adam step's path
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves + jax.tree.leaves(kwargs)):
            return self._nested(*args, **kwargs)  # inside another program
        folder = _directory
        if folder is None or kwargs:
            return self._jitted(*args, **kwargs)
        static = tuple(arg for i, arg in enumerate(args) if i in self._static)
        default = _default_device()
        signature = [_leaf_signature(leaf, default.id) for leaf in leaves]
        if any(leaf[3] for leaf in signature):  # arrays elsewhere than the default device
            return self._jitted(*args)
        key = (static, tree, tuple(signature), default.id)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._load_or_compile(folder, key, args)
            self._compiled[key] = compiled
        return compiled(*dynamic)

    def _load_or_compile(self, folder: Path, key: tuple, args: tuple):
        static, tree, signature, default = key
        text = repr(
            (self._name, self._key, static, str(tree), signature, default, compiler_options())
        )
        digest = hashlib.sha256(f"{_code_version()}|{text}".encode()).hexdigest()[:40]
        path = folder / f"{self._name.rsplit('.', 1)[-1]}-{digest}{SUFFIX}"
        if path.is_file():
            try:
                from jax.experimental.serialize_executable import deserialize_and_load

                payload, in_tree, out_tree = pickle.loads(path.read_bytes())
                device = _default_device()  # the one device it was compiled for (the key's)
                loaded = deserialize_and_load(
                    payload, in_tree, out_tree, execution_devices=[device]
                )
                _touch(path)
                return loaded
            except Exception:  # unreadable or from another runtime: compiled anew below
                pass
        lowered = self._jitted.lower(*args)
        fresh = _compile_fresh(lowered)
        if fresh is None:
            return lowered.compile()
        _store(path, fresh)
        return fresh


def _compile_fresh(lowered):
    """``lowered.compile()`` by XLA itself, not read from JAX's persistent cache: an executable
    read from there serialises incompletely on XLA:CPU (measured with jax 0.10.2: the copy
    loaded back fails with "Function wrapped_pad not found"). None where JAX's internals
    differ from what this expects (the program is then only not kept)."""
    try:
        from jax._src import compilation_cache
    except ImportError:
        return None
    if not callable(getattr(compilation_cache, "is_cache_used", None)):
        return None
    with _compile_lock:  # the switch is process-wide: one such compilation at a time
        used = compilation_cache.is_cache_used
        compilation_cache.is_cache_used = lambda backend: False
        try:
            return lowered.compile()
        finally:
            compilation_cache.is_cache_used = used


def _store(path: Path, compiled) -> None:
    """Write the serialised executable under ``path`` (atomically: a temporary name, renamed);
    a program that cannot be serialised (closed-over constants, ...) is only not kept."""
    try:
        from jax.experimental.serialize_executable import serialize

        record = pickle.dumps(serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        temporary.write_bytes(record)
        os.replace(temporary, path)
    except (OSError, ValueError, NotImplementedError, TypeError, pickle.PicklingError):
        return
    _prune(path.parent)


def _touch(path: Path) -> None:
    """Mark a program used now (its modification time), for ``_prune``."""
    try:
        os.utime(path)
    except OSError:
        pass


def _prune(folder: Path, limit: int | None = None) -> None:
    """Delete the least recently used programs of ``folder`` while they take more than
    ``limit`` (default ``MAX_BYTES``) bytes, down to three quarters of it. Another process may
    be deleting or reading the same files: a file gone meanwhile is skipped (a program deleted
    under a reader is only compiled again)."""
    limit = MAX_BYTES if limit is None else limit
    entries = []
    for path in folder.glob(f"*{SUFFIX}"):
        try:
            status = path.stat()
        except OSError:
            continue
        entries.append((status.st_mtime, status.st_size, path))
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):
        if total <= limit * 3 // 4:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size


def jit(fun: Callable | None = None, *, static_argnums: int | Sequence[int] = (), key=()):
    """``jax.jit`` whose executables are kept on disk (``Program``); usable as a decorator,
    with or without arguments."""
    if isinstance(static_argnums, int):
        static_argnums = (static_argnums,)
    if fun is None:
        return lambda f: Program(f, static_argnums, key)
    return Program(fun, static_argnums, key)


__all__ = ["Program", "directory", "jit", "set_directory"]

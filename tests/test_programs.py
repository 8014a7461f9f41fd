"""programs.jit: compiled programs kept whole on disk and loaded by a later process (here: a new
``Program`` of the same function) without tracing."""

import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from adreg_jax.registration import commands, programs


@pytest.fixture
def folder(tmp_path):
    previous = programs.directory()
    programs.set_directory(tmp_path / "programs")
    yield tmp_path / "programs"
    programs.set_directory(previous)


def _scaled(traced: list):
    """A new function object each call (JAX's in-memory trace cache goes by the object), with
    one name (the programs' key goes by the name, as for the same function in a new process)."""

    def scaled(x, factor, n):
        traced.append(n)  # runs when JAX traces the function, not when a program runs
        return jnp.sum(x * factor) * n, x[:n]

    return scaled


def test_a_program_is_traced_once_then_read_from_disk(folder):
    traced = []
    x = np.arange(8, dtype=np.float32)
    first = programs.jit(_scaled(traced), static_argnums=2, key="a")
    total, head = first(x, 2.0, 3)
    assert float(total) == pytest.approx(float(np.sum(x * 2.0) * 3))
    np.testing.assert_array_equal(head, x[:3])
    assert len(traced) == 1 and len(list(folder.glob("*.program"))) == 1
    # a device array of the same shape, another value of the (weakly typed) scalar: same program
    assert float(first(jnp.asarray(x), 5.0, 3)[0]) == pytest.approx(float(np.sum(x * 5.0) * 3))
    assert len(traced) == 1
    # another process's view: a new Program of the same function reads the file
    second = programs.jit(_scaled(traced), static_argnums=2, key="a")
    assert float(second(x + 1.0, 2.0, 3)[0]) == pytest.approx(float(np.sum((x + 1) * 2.0) * 3))
    assert len(traced) == 1
    # another static argument, key or shape: compiled and kept apart
    second(x, 2.0, 4)
    programs.jit(_scaled(traced), static_argnums=2, key="b")(x, 2.0, 3)
    second(x[:6], 2.0, 3)
    assert len(traced) == 4 and len(list(folder.glob("*.program"))) == 4
    # inside another traced function it is traced there, as jax.jit would be
    assert float(jax.jit(lambda y: second(y, 1.0, 3)[0])(x)) == pytest.approx(float(x.sum() * 3))
    # an unreadable file is compiled anew and replaced
    for path in folder.glob("*.program"):
        path.write_bytes(b"not a program")
    third = programs.jit(_scaled(traced), static_argnums=2, key="a")
    assert float(third(x, 2.0, 3)[0]) == pytest.approx(float(np.sum(x * 2.0) * 3))
    assert any(path.stat().st_size > 100 for path in folder.glob("*.program"))


def test_the_least_recently_used_programs_go_beyond_the_limit(folder, monkeypatch):
    import os

    folder.mkdir(parents=True)
    for age in range(8):  # eight old programs of 1000 bytes, program 0 the least recently used
        path = folder / f"old{age}{programs.SUFFIX}"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1e9 + 100 * age, 1e9 + 100 * age))
    (folder / "notes.txt").write_bytes(b"x" * 5000)  # not a program: never counted or deleted
    x = np.arange(8, dtype=np.float32)
    programs.jit(_scaled([]), static_argnums=2, key="a")(x, 2.0, 3)  # writes one program
    new = [p for p in folder.glob("*.program") if not p.name.startswith("old")]
    assert len(new) == 1
    monkeypatch.setattr(programs, "MAX_BYTES", 6000 + new[0].stat().st_size)
    programs._prune(folder)  # 9 programs over the limit: down to 3/4 of it, oldest first
    left = sorted(p.name for p in folder.glob("old*"))
    total = sum(p.stat().st_size for p in folder.glob("*.program"))
    assert total <= programs.MAX_BYTES * 3 // 4 < total + 1000
    assert left == [f"old{age}{programs.SUFFIX}" for age in range(8 - len(left), 8)]
    assert new[0].exists() and (folder / "notes.txt").exists()
    # loading a program marks it used: it outlives older ones
    os.utime(new[0], (1.0, 1.0))
    programs.jit(_scaled([]), static_argnums=2, key="a")(x, 2.0, 3)
    assert new[0].stat().st_mtime > 1e9


def run_without_warnings(code: str) -> None:
    """Run ``code`` in a fresh Python with every UserWarning an error (a cache read or write
    that fails only warns) and without conftest's JAX_COMPILATION_CACHE_DIR."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def commands_cache_program(directory, body: str) -> str:
    """Code that enables the commands' compilation cache in ``directory`` and runs ``body``."""
    return (
        "from adreg_jax.registration import commands; import jax, jax.numpy as jnp; "
        f"commands._enable_compilation_cache({str(directory)!r}); print({body})"
    )


def test_the_commands_compilation_cache_reads_back_without_warnings(tmp_path):
    # JAX's size limit on its cache needs the filelock package; without it every cache read
    # and write only warned (a fresh install compiled everything again, every time)
    code = commands_cache_program(
        tmp_path, "float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum())"
    )
    for _ in range(2):  # the first writes the cache, the second reads it
        run_without_warnings(code)
    assert list(tmp_path.glob("*-cache")), "nothing was written to JAX's cache"


def test_a_cache_written_without_a_size_limit_still_takes_new_programs(tmp_path):
    # entries of a cache written without JAX's size limit (adreg_jax before it) have no access
    # time; JAX's eviction then failed on every write, which only warned: nothing new was kept
    run_without_warnings(
        "import jax, jax.numpy as jnp; "
        f"jax.config.update('jax_compilation_cache_dir', {str(tmp_path)!r}); "
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0); "
        "print(float(jax.jit(lambda x: jnp.cos(x) + 1)(jnp.ones(3)).sum()))"
    )
    run_without_warnings(
        commands_cache_program(
            tmp_path, "float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(4)).sum())"
        )
    )
    entries = list(tmp_path.glob("*-cache"))
    assert len(entries) >= 2, entries  # the second program was written beside the first
    assert all(e.with_name(e.name[: -len("-cache")] + "-atime").exists() for e in entries)


def test_programs_compile_without_ynnpack_fusions_and_compute_the_same(folder):
    """On a CPU the programs are compiled without XLA's YNNPACK fusions (``programs``
    docstring: slower here), from disk or not, and give jax.jit's values."""
    from adreg_jax import ops

    if programs.compiler_options() is None:
        pytest.skip("not a CPU, or this jaxlib has no YNNPACK fusion option")
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.random((1, 12, 10, 8, 1)), jnp.float32) for _ in range(2))

    def gradient(x, y):
        return jax.grad(lambda x: ops.mutual_information(x, y)[0])(x)

    want = jax.jit(gradient)(a, b)
    # the fusions sum in another order: float32 rounding, relative to the gradient's scale (on
    # an AMD EPYC one element of 960 differed by 1.5e-6 where the largest is 0.05)
    atol = 1e-4 * float(jnp.abs(want).max())
    for directory in (folder, None):
        programs.set_directory(directory)
        program = programs.jit(gradient)
        np.testing.assert_allclose(program(a, b), want, rtol=1e-4, atol=atol)
        assert "__ynn_fusion" not in program.lower(a, b).compile().as_text()
    # what the option removes: jax.jit's own executable has them
    assert "__ynn_fusion" in jax.jit(gradient).lower(a, b).compile().as_text()


def test_without_a_folder_it_is_jax_jit(folder):
    programs.set_directory(None)
    double = programs.jit(lambda x: 2 * x)
    assert float(double(np.float32(2.0))) == 4.0
    assert "mul" in double.lower(np.float32(2.0)).as_text()
    assert not folder.exists()


def test_a_second_command_reads_the_programs_and_gives_the_same_result(tmp_path):
    # a tiny pair; the first run compiles and keeps the programs, the second reads them
    rng = np.random.default_rng(0)
    grid = np.indices((16, 16, 16)).astype(np.float32)
    blob = np.exp(-(((grid - 8.0) ** 2).sum(0)) / 18.0).astype(np.float32)
    moving = np.roll(blob, 1, axis=0) + 0.01 * rng.random(blob.shape, dtype=np.float32)
    paths = {}
    for name, array in (("fixed", blob), ("moving", moving)):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), paths[name])
    cache = tmp_path / "cache"
    results = []
    previous = programs.directory()
    try:
        for run in ("first", "second"):
            out = tmp_path / run
            argv = ["--fixed", paths["fixed"], "--moving", paths["moving"], "--out", str(out)]
            argv += ["--affine", "--affine-steps", "3", "--instance-steps", "3", "--quiet"]
            assert commands.main([*argv, "--no-png", "--cache-dir", str(cache)]) == 0
            results.append(
                (
                    json.loads((out / "metrics.json").read_text()),
                    np.asarray(nib.load(str(out / "ddf.nii.gz")).dataobj),
                )
            )
            kept = sorted(path.name for path in programs.directory().glob("*.program"))
            results.append(kept)
    finally:
        programs.set_directory(previous)
    (first, first_ddf), first_kept, (second, second_ddf), second_kept = results
    assert len(first_kept) >= 5 and second_kept == first_kept  # nothing compiled the second time
    np.testing.assert_array_equal(first_ddf, second_ddf)
    assert first["ncc_after"] == second["ncc_after"]

"""Makes JAX strict for every test: rank promotion raises, and two CPU devices exist so that the
data-parallel code paths run here as they would on two GPUs (in every pytest-xdist worker too:
each is its own process and reads this file).

Random bits: ``jax_threefry_partitionable=False``. The partitionable threefry (JAX's default)
costs XLA:CPU 2-5 s of compilation per generator shape (measured: 3-11 s for one
``jax.random.normal`` of a 3x3x3x4x8 kernel, 0.3 s without), and a model's ``init`` draws one
per parameter shape: most of a tiny model's start-up was compiling random number generators. The
flag changes only which bits a key gives, not any code under test; set in the environment as well
so that the ``train.py`` subprocesses of the resume test draw the same bits as the tests do.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", os.environ["JAX_THREEFRY_PARTITIONABLE"] != "0")

"""Makes JAX strict for every test: rank promotion raises, and two CPU devices exist so that the
data-parallel code paths run here as they would on two GPUs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_numpy_rank_promotion", "raise")

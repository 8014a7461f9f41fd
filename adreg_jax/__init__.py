"""adreg_jax: AD-RegNet (attention-driven deformable 3D registration) in JAX and Flax."""

__version__ = "0.1.0"

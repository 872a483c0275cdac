"""rt2_jax: RT-2 style Vision-Language-Action models in JAX/Flax."""

__version__ = '0.1.0'

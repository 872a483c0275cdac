"""Models: ViT image encoder, T5 encoder-decoder and the VLA that joins them (flax linen)."""

from rt2_jax.models.layout import stack_layers, unstack_layers  # noqa: F401

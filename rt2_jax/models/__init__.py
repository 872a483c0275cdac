"""Models: ViT image encoder, T5 encoder-decoder and the VLA that joins them (flax linen)."""

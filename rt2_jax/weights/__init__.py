"""Pretrained weight import: Hugging Face T5 / SigLIP / ViT safetensors -> VLA parameters.

`python -m rt2_jax.weights.convert --help`; the trainer reads the result with `load_converted`.
"""


def load_converted(out_dir: str, target=None) -> dict:
  """Params dict written by `python -m rt2_jax.weights.convert` (see convert.load_converted)."""
  from rt2_jax.weights import convert  # orbax is imported only when needed

  return convert.load_converted(out_dir, target)

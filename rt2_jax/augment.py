"""Training-time image augmentation that keeps the pointing labels true.

`shift` translates each image by a random whole number of pixels (edge pixels repeated into the
gap) and moves its `pointer_xy` points with it. On the tabletop the pointing head fits its 1,200
training layouts (the pooling's argmax on the right patch 81% of training steps, 56% of held-out
ones: docs/tabletop.md, Measurement 10); a shifted board is a new layout with the same
geometry, so the actions (board-frame deltas between objects) stay right too. Runs inside the
jitted train step, so any input pipeline gets it and resume stays exact (the offsets come from
the step's key).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def shift(rng, images, points, max_px: int):
  """images [B, H, W, C], points [B, K, 2] or [B, 2] ((x, y) in [0, 1] of the image, NaN where
  absent) -> both moved by per-example offsets drawn uniformly from [-max_px, max_px]."""
  b, h, w, c = images.shape
  offsets = jax.random.randint(rng, (b, 2), -max_px, max_px + 1)  # (dx, dy): content moves by it
  m = max_px
  padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode='edge')

  def crop(image, offset):  # output[r, q] = image[r - dy, q - dx]
    return lax.dynamic_slice(image, (m - offset[1], m - offset[0], 0), (h, w, c))

  moved = jax.vmap(crop)(padded, offsets)
  delta = offsets.astype(jnp.float32) / jnp.array([w, h], jnp.float32)
  if points.ndim == 3:
    delta = delta[:, None]
  return moved, points + delta.astype(points.dtype)

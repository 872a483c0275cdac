"""The compiled token loop's step does no copying of its KV cache (issue 19): structure of the
compiled HLO, not time.

Before the fix a greedy step of the tiny configs ran 213 (T5) / 226 (decoder-only) ops, 71 / 83
of them copies: the step's PRNG key hashed inside the loop (threefry is a rolled loop on a
CPU: 94 ops, 69 of them copies), and for the decoder-only model its key caches copied three
times a layer a step (a reshape into the attention's matmul fused with the cache's in-place
update). Now both run 111 ops with 2 scalar copies.
"""

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT

from rt2_jax import config_flags, decoding, partitioning, train
from rt2_jax.models.vla import VLA


def _roofline():
  path = os.path.join(REPO_ROOT, 'benchmarks', 'roofline.py')
  spec = importlib.util.spec_from_file_location('benchmarks_roofline', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _compiled_loop(config_name: str, batch: int) -> str:
  """HLO text of the compiled 'action' token loop (8 positions x 256 rows), from shapes only."""
  config = config_flags.load_config(config_name)
  model = VLA(config.model)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *train.dummy_inputs(config))
  params = partitioning.unbox(abstract)['params']
  size, length = config.model.image_size, config.data.max_input_len
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  encoded, mask = jax.eval_shape(
    lambda p, i, t: model.apply({'params': p}, i, t, method=VLA.encode), params, images, tokens
  )
  allowed = np.arange(3, 3 + 8 * 256, dtype=np.int32).reshape(8, 256) % config.model.vocab_size
  callback = decoding.ActionCallback(allowed, np.full((8,), 256, np.int32), eos_id=1)
  loop = jax.jit(functools.partial(decoding.decode_from_encoded, model, callback=callback))
  lowered = loop.lower(params, encoded, mask, jax.random.key(1), temperature=jnp.float32(0))
  return lowered.compile().as_text()


def _body_copies(roofline, text: str, body: str) -> list[int]:
  """Elements moved by each copy op directly in the loop body."""
  comps, _ = roofline.parse_hlo(text)
  sizes = []
  for op, line in comps[body]:
    if op == 'copy':
      dims = re.search(r'= \w+\[([\d,]*)\]', line).group(1)
      sizes.append(int(np.prod([int(d) for d in dims.split(',') if d])))
  return sizes


@pytest.mark.parametrize(
  'config_name,batch',
  [
    ('configs/tiny.py', 1),
    ('configs/tiny_decoder_only.py', 1),  # one KV head, batch 1: caches [length, head_dim]
    ('configs/tiny_decoder_only.py', 2),  # [batch * kv_heads, length, head_dim]
  ],
)
def test_greedy_step_copies_no_cache(config_name, batch):
  roofline = _roofline()
  text = _compiled_loop(config_name, batch)
  kernels = roofline.token_loop_kernels(text)
  copies = kernels['by_opcode_greedy'].get('copy', 0)
  # Before: 71 (T5) and 83 (decoder-only) copies, 213 and 226 ops a greedy step at batch 1.
  assert copies <= 4, kernels['by_opcode_greedy']
  assert kernels['per_step_greedy'] <= 150, kernels['by_opcode_greedy']
  # What copies remain are loop-carried scalars, nothing the size of a cache row.
  assert max(_body_copies(roofline, text, kernels['body']), default=0) <= 8

"""A training loop in miniature over the real `rt2_jax.checkpoints.Checkpointer`, for the kill -9
fault tests (test_train_faults.py): it starts in ~2 s where the trainer takes ~10 s, so a test
can kill it many times.

State: two float32 vectors (16 MB together, so a save takes long enough to be interrupted) and
a step; each step draws a "batch" from the data cursor (the data iterator's state, saved with the
checkpoint) and updates both vectors, so the result depends on every step and every batch being
resumed exactly once. Saves are asynchronous every `every` steps, as the trainer's are.

  python tests/fault_driver.py WORKDIR TOTAL_STEPS EVERY [STEP_SLEEP_S]

prints `resumed from N`, `step N`, `saving N` and finally `done N`.
"""

import sys
import time

import numpy as np

SIZE = 1 << 21  # float32 elements per vector: 8 MB


def initial_state() -> dict:
  rng = np.random.default_rng(0)
  return {
    'w': rng.normal(size=SIZE).astype(np.float32),
    'm': np.zeros(SIZE, np.float32),
    'step': np.int32(0),
  }


def train_step(state: dict, cursor: int) -> dict:
  batch = np.random.default_rng(cursor).normal(size=SIZE).astype(np.float32)
  w = state['w'] * np.float32(0.999) + batch * np.float32(0.01)
  m = state['m'] * np.float32(0.9) + w * np.float32(0.1)
  return {'w': w, 'm': m, 'step': np.int32(state['step'] + 1)}


def reference(total_steps: int) -> dict:
  """The uninterrupted result, in this process."""
  state = initial_state()
  for cursor in range(total_steps):
    state = train_step(state, cursor)
  return state


def _abstract(state):
  import jax

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), state
  )


def run(workdir: str, total_steps: int, every: int, step_sleep_s: float = 0.0) -> dict:
  from rt2_jax import checkpoints

  ckpt = checkpoints.Checkpointer(workdir, keep=2, async_save=True)
  restored = ckpt.restore_latest(_abstract(initial_state()))
  if restored is None:
    state, cursor = initial_state(), 0
  else:
    state = {k: np.asarray(v) for k, v in restored.state.items()}
    cursor = restored.data_state['cursor']
    print(f'resumed from {restored.step}', flush=True)
  while int(state['step']) < total_steps:
    state = train_step(state, cursor)
    cursor += 1
    step = int(state['step'])
    print(f'step {step}', flush=True)
    if step % every == 0 or step == total_steps:
      ckpt.save(step, state, {'cursor': cursor}, {'driver': 'fault_driver'})
      print(f'saving {step}', flush=True)
    time.sleep(step_sleep_s)
  ckpt.close()
  print(f'done {int(state["step"])}', flush=True)
  return state


def final_state(workdir: str) -> dict:
  from rt2_jax import checkpoints

  ckpt = checkpoints.Checkpointer(workdir)
  restored = ckpt.restore_latest(_abstract(initial_state()))
  ckpt.close()
  return {k: np.asarray(v) for k, v in restored.state.items()}


if __name__ == '__main__':
  run(
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]) if len(sys.argv) > 4 else 0.0,
  )

"""Training on a seqio mixture (data.mixture, issue 18): a custom seqio Task registered in a few
lines by a module named in data.seqio_modules, mixed with the robot data, trains with the tiny
config."""

import json
import math
import re
import sys

import numpy as np
import pytest
import train_testlib as lib

from rt2_jax import config_flags, metrics
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import pipeline

# The user's module: its own source (an in-memory set of images and colour names) and its own
# preprocessor, then the project's output features and web_preprocessors().
COLOUR_TASK = """
import numpy as np
import seqio
import tensorflow as tf
from rt2_jax.data import seqio_mixture

COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 60), 'blue': (40, 60, 220)}


def colour_images(split, shuffle_files, seed=None):
  images = np.stack([np.full((24, 24, 3), rgb, np.uint8) for rgb in COLOURS.values()])
  return tf.data.Dataset.from_tensor_slices({'pixels': images, 'name': list(COLOURS)})


def caption(ds):
  return ds.map(lambda ex: {
    'image': ex['pixels'],
    'inputs': 'What colour is the image?',
    'targets': ex['name'],
  })


seqio.TaskRegistry.add(
  'colour_captions',
  seqio.FunctionDataSource(colour_images, splits=['train']),
  preprocessors=[caption, *seqio_mixture.web_preprocessors()],
  output_features=seqio_mixture.output_features(),
)
seqio.MixtureRegistry.add(
  'colours_and_robot',
  [('colour_captions', 1.0), (seqio_mixture.robot_task_name('bridge_dataset'), 1.0)],
)
"""
COLOURS = {'red': (220, 30, 30), 'green': (30, 200, 60), 'blue': (40, 60, 220)}
MIXTURE = {'data.mixture': 'colours_and_robot', 'data.seqio_modules': 'colour_task'}


@pytest.fixture(scope='module')
def module_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('user_module')
  (root / 'colour_task.py').write_text(COLOUR_TASK)
  return root


def test_custom_task_rows_come_from_its_source_and_preprocessor(module_dir):
  config = config_flags.load_config('configs/tiny.py', dict(lib.SMALL, **MIXTURE, batch_size=8))
  sys.path.insert(0, str(module_dir))
  try:
    stats = pipeline.norm_stats(config, progress=None)
    vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
    it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
    batches = [next(it) for _ in range(6)]
  finally:
    sys.path.remove(str(module_dir))
  size = config.model.image_size
  web_rows = 0
  for batch in batches:
    for j in np.flatnonzero(~batch['is_robot']):
      web_rows += 1
      assert vocab.decode(batch['encoder_input_tokens'][j]) == 'What colour is the image?'
      colour = vocab.decode(batch['decoder_target_tokens'][j])
      assert colour in COLOURS
      # 24 px images resized to the model's 32: still the one colour of that name
      assert batch['image'][j].shape == (size, size, 3)
      np.testing.assert_array_equal(
        batch['image'][j], np.broadcast_to(COLOURS[colour], (size,) * 2 + (3,))
      )
      assert not batch['action_loss_mask'][j].any() and not batch['actions'][j].any()
    robot = batch['is_robot']
    np.testing.assert_array_equal(
      batch['action_loss_mask'][robot].sum(1), action_vocab.num_positions
    )
  assert 0 < web_rows < 6 * config.batch_size  # both tasks are drawn


def _losses(stdout: str) -> list[float]:
  return [float(x) for x in re.findall(r'\| loss ([0-9.naninf]+) \|', stdout)]


def test_trains_on_a_custom_task_mixed_with_robot_data(module_dir, tmp_path):
  steps = 30
  overrides = dict(MIXTURE, total_steps=steps, log_every=1, **{'ckpt.every': steps})
  result = lib.run_train(
    tmp_path, overrides, devices=None, extra_env={'PYTHONPATH': f'{lib.REPO_ROOT}:{module_dir}'}
  )
  assert 'seqio mixture colours_and_robot (colour_captions x 1, rt2_robot_bridge_dataset x 1' in (
    result.stdout
  )
  assert f'step {steps}/{steps}' in result.stdout
  losses = _losses(result.stdout)
  assert len(losses) == steps and all(math.isfinite(x) for x in losses)
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  # The share of each log interval spent in next(iterator): every line but the first (which
  # starts the clock), on the console and in TensorBoard.
  waits = metrics.read_scalars(str(tmp_path / 'tensorboard'))['data_wait_fraction']
  assert [s for s, _ in waits] == list(range(2, steps + 1))
  assert all(0.0 <= w <= 1.0 for _, w in waits), waits
  assert len(re.findall(r'\| data_wait [01]\.\d\d$', result.stdout, re.M)) == steps - 1


# Slow (70 s): CI keeps the same kill-and-resume on the default mixture rt2_config
# (test_train_resume.py) and the seqio iterator's own resume (test_data_seqio_mixture.py).
@pytest.mark.slow
def test_sigterm_then_sigkill_then_restart_gives_identical_parameters(module_dir, tmp_path):
  """The runs of tests/test_train_resume.py on the seqio mixture: the tf.data position saved
  with each checkpoint (the custom task's shuffle buffer, the sampler, batches in flight)
  makes the resumed runs draw the uninterrupted run's batches."""
  env = {'PYTHONPATH': f'{lib.REPO_ROOT}:{module_dir}'}

  def run(workdir, **kwargs):
    return lib.run_train(workdir, MIXTURE, devices=None, extra_env=env, **kwargs)

  run(tmp_path / 'straight')
  stopped = run(tmp_path / 'resumed', fault=dict(at_batch=3, signal='SIGTERM'))
  assert 'saving checkpoint 3 (preempted)' in stopped.stdout
  state = json.loads(
    json.loads((tmp_path / 'resumed/checkpoints/3/data/metadata').read_text())['states'][0]
  )['json']
  assert state['kind'] == 'seqio' and state['step'] == 3
  killed = run(
    tmp_path / 'resumed', fault=dict(at_batch=2, signal='SIGKILL', after_ckpt=4), check=False
  )
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert f'resumed from {tmp_path}/resumed/checkpoints/3' in killed.stdout
  resumed = run(tmp_path / 'resumed')
  assert f'resumed from {tmp_path}/resumed/checkpoints/4' in resumed.stdout
  lib.assert_same_params(
    tmp_path / 'straight', tmp_path / 'resumed', steps=lib.SMALL['total_steps']
  )

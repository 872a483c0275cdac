"""The config's tasks registered with seqio give the same ids as the training pipeline."""

import os

import numpy as np

from rt2_jax import config_flags
from rt2_jax import vocab as vocab_lib
from rt2_jax.data import fixtures, pipeline, seqio_tasks


def test_seqio_tasks_match_pipeline_tokens(tmp_path):
  import seqio

  config = config_flags.load_config(
    'tiny',
    overrides={
      'data.robot.data_dir': fixtures.write_bridge(
        str(tmp_path / 'd'), num_episodes=2, num_steps=3
      ),
      'data.web.jsonl': fixtures.write_web_jsonl(str(tmp_path / 'w'), num_examples=4),
      'data.cache_dir': '',
      'model.image_size': 16,
    },
  )
  stats = pipeline.norm_stats(config, progress=None)
  vocab, action_vocab = vocab_lib.from_config(config, pipeline.action_space(config))
  name = seqio_tasks.register(config, vocab, action_vocab, stats, progress=None)
  mixture = seqio.get_mixture_or_task(name)
  assert sorted(t.name for t in mixture.tasks) == ['rt2_robot_bridge_dataset', 'rt2_web_jsonl']
  lengths = {'inputs': config.data.max_input_len, 'targets': config.data.max_target_len}
  it = pipeline.make_train_iterator(config, vocab, action_vocab, stats, 0, 1, progress=None)
  for task_data in it.tasks:
    task = seqio.get_mixture_or_task(seqio_tasks.seqio_name(task_data.name))
    examples = list(task.get_dataset(lengths, shuffle=False).as_numpy_iterator())
    assert len(examples) == len(task_data)
    for i, ex in enumerate(examples):
      np.testing.assert_array_equal(
        ex['inputs'], [t for t in task_data.encoder_table[task_data.encoder_index[i]] if t]
      )
      np.testing.assert_array_equal(ex['targets'], [t for t in task_data.targets[i] if t])
      assert ex['targets'][-1] == 1 and ex['image'].shape == (16, 16, 3)
      assert bool(ex['is_robot']) == task_data.is_robot
  assert os.path.exists(vocab.path)

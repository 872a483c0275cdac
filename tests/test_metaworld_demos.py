"""Meta-World demonstrations: the RLDS builder dir, the web JSONL and reuse by settings."""

import json
import os

import numpy as np
import pytest

from rt2_jax.data import metaworld_demos as demos

TASK = 'button-press-topdown-v3'  # the expert needs ~70 steps


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('mw_demos'))
  settings = demos.DemoSettings(
    tasks=(TASK,), episodes=1, val_episodes=1, image_size=32, web_frames=3
  )
  manifest = demos.generate(settings, out, workers=2, progress=False)
  return out, manifest


def test_rlds_layout_flags_and_manifest(demo_dir):
  import tensorflow_datasets as tfds

  out, manifest = demo_dir
  assert manifest['splits'] == {'train': {TASK: [0]}, 'val': {TASK: [demos.VAL_SEED_BASE]}}
  builder = tfds.builder_from_directory(demos.builder_dir(out))
  assert set(builder.info.splits) == {'train', 'val'}
  episode = next(iter(tfds.as_numpy(builder.as_dataset(split='train'))))
  steps = list(episode['steps'])
  n = len(steps)
  assert 20 < n < 200
  assert episode['episode_metadata']['task'] == TASK.encode()
  assert episode['episode_metadata']['num_steps'] == n
  image = steps[0]['observation']['image']
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.std() > 10
  assert steps[0]['language_instruction'] == b'press the button from the top'
  assert [s['is_first'] for s in steps] == [True] + [False] * (n - 1)
  assert [s['is_last'] for s in steps] == [False] * (n - 1) + [True]
  assert [s['is_terminal'] for s in steps] == [s['is_last'] for s in steps]
  assert [s['terminate_episode'] for s in steps] == [0.0] * (n - 1) + [1.0]
  assert [s['success'] for s in steps] == [False] * (n - 1) + [True]
  assert [s['reward'] for s in steps][-3:] == [0.0, 1.0, 1.0]
  actions = np.stack([s['action'] for s in steps])
  assert actions.shape == (n, 4) and np.abs(actions).max() <= 1.0
  np.testing.assert_array_equal(actions[-1, :3], 0.0)  # the terminate step stands still
  assert np.abs(actions[:-1, :3]).mean() > 0.1  # the expert moves


def test_read_through_the_data_spec_and_web_reader(demo_dir):
  from rt2_jax.data import rlds, web
  from rt2_jax.data.spec import load_spec

  out, manifest = demo_dir
  spec = load_spec('metaworld')
  records = rlds.read_split(spec, out, 'train', 32, progress=lambda *a: None)
  assert records.actions.shape[1] == 5  # xyz, gripper, terminate
  assert records.actions[:, 4].sum() == 1.0 and records.actions[-1, 4] == 1.0
  assert records.instructions == ['press the button from the top']
  val = rlds.read_split(spec, out, spec.eval_split, 32, progress=lambda *a: None)
  assert len(val.actions) > 0

  lines = [json.loads(x) for x in open(os.path.join(out, 'web', 'train.jsonl'))]
  images = sorted({x['image'] for x in lines})
  assert len(images) == 3  # web_frames per episode
  answers = {x['question']: x['answer'] for x in lines if 'question' in x and x['step'] == 0}
  assert answers['What object is on the table?'] == 'button'
  assert answers['Is the gripper open?'] == 'yes'
  assert answers['Is the task done?'] == 'no'
  last_step = max(x['step'] for x in lines)
  done = [
    x['answer']
    for x in lines
    if x['step'] == last_step and x.get('question') == 'Is the task done?'
  ]
  assert done == ['yes']
  assert any('caption' in x for x in lines)
  records = web.read_jsonl(os.path.join(out, 'web', 'train.jsonl'), 32, progress=lambda *a: None)
  assert len(records) == len(lines) and set(records.kinds) == {'vqa', 'caption'}


def test_ensure_reuses_matching_demos_and_refuses_to_overwrite(demo_dir):
  out, manifest = demo_dir
  settings = demos.DemoSettings(**{**manifest['settings'], 'tasks': (TASK,)})
  messages = []
  again = demos.ensure_demos(settings, out, log=messages.append)
  assert again == manifest and 'reusing' in messages[0]
  with pytest.raises(FileExistsError, match='--overwrite'):
    demos.generate(settings, out)
  assert 'train: 1 episodes' in demos.summary(manifest)


def test_regions_and_settings_errors():
  assert demos._region(2, 2, 64) == 'top left'
  assert demos._region(32, 32, 64) == 'center'
  assert demos._region(60, 32, 64) == 'bottom'
  assert demos._region(32, 60, 64) == 'right'
  with pytest.raises(ValueError, match='unknown Meta-World task'):
    demos.DemoSettings(tasks=('press-v3',))
  with pytest.raises(ValueError, match='episodes >= 1'):
    demos.DemoSettings(tasks=(TASK,), episodes=0)

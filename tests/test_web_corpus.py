"""The drawn web corpus of the tabletop recipe: reproducible, readable, answers that hold."""

import json
import math

import numpy as np

from rt2_jax.data import web, web_corpus
from rt2_jax.envs import concepts


def test_same_seed_same_pictures_and_questions():
  a = web_corpus.sample(np.random.default_rng(3), 64)
  b = web_corpus.sample(np.random.default_rng(3), 64)
  c = web_corpus.sample(np.random.default_rng(4), 64)
  assert np.array_equal(a[0], b[0]) and a[1] == b[1]
  assert not np.array_equal(a[0], c[0])
  assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8


def test_answers_match_the_scene():
  rng = np.random.default_rng(0)
  kinds_seen = set()
  for _ in range(60):
    _, qas, scene = web_corpus.sample(rng, 64)
    objs = scene.objects
    for kind, question, answer, point in qas:
      kinds_seen.add(kind)
      assert (point is not None) == question.startswith('Where is'), question
      if point is not None:  # the answer's cell holds the point
        assert answer == web_corpus.location_text(*point)
      if kind == 'grounding':
        name = question[len('Where is the ') : -1]
        matches = [o for i, o in enumerate(objs) if scene.name_of(i) == name]
        assert len(matches) == 1, (question, objs)
        o = matches[0]
        col, row = (int(v) for v in answer.split())
        x, y = web_corpus.image_position(scene, o.x, o.y)
        assert (col, row) == (int(x * web_corpus.GRID), int(y * web_corpus.GRID))
      elif kind == 'colour':
        shape = question.split()[-1][:-1]
        assert {o.colour for o in objs if o.shape == shape} == {answer}
      elif kind == 'count':
        assert answer == web_corpus.NUMBER_WORDS[len(objs)]
      elif kind == 'relation' and 'biggest' in question:
        big = max(objs, key=lambda o: o.radius)
        x, y = web_corpus.image_position(scene, big.x, big.y)
        assert answer == web_corpus.location_text(x, y)
  # Every kind of question comes up, and every concept is named somewhere.
  assert kinds_seen == set(web_corpus.KINDS)


def test_every_concept_appears_in_the_corpus():
  rng = np.random.default_rng(1)
  text = ' '.join(q + ' ' + a for _ in range(150) for _, q, a, _ in web_corpus.sample(rng, 32)[1])
  words = set(text.replace('?', ' ').replace(',', ' ').split())
  for concept in (
    *concepts.COLOURS,
    *concepts.SHAPES,
    *concepts.DIGITS,
    'biggest',
    'leftmost',
    'closest',
  ):
    assert concept in words, concept


def test_generate_writes_the_web_jsonl_format(tmp_path):
  info = web_corpus.generate(str(tmp_path), images=12, val_images=3, image_size=32, progress=None)
  assert info['counts']['train/grounding'] > 0
  records = web.read_jsonl(str(tmp_path / 'train.jsonl'), 32, progress=None)
  assert len(records) == sum(v for k, v in info['counts'].items() if k.startswith('train/'))
  assert records.images.shape[1:] == (32, 32, 3)
  assert set(records.kinds) == {'vqa', 'caption'}
  with open(tmp_path / 'train.jsonl') as f:
    rows = [json.loads(line) for line in f]
  where = np.array(['point' in r for r in rows])  # every 'Where is' line, and only those
  assert (
    where.any() and (where == [r.get('question', '').startswith('Where is') for r in rows]).all()
  )
  np.testing.assert_array_equal(
    records.points[where], np.float32([r['point'] for r in rows if 'point' in r])
  )
  assert np.isnan(records.points[~where]).all()
  with open(tmp_path / 'val.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert all(r['image'].startswith('images/val_') for r in rows)
  # Squashed pictures keep their objects inside the frame.
  scene = web_corpus.random_scene(np.random.default_rng(5))
  for o in scene.objects:
    x, y = web_corpus.image_position(scene, o.x, o.y)
    assert 0 <= x <= 1 and 0 <= y <= 1 and not math.isnan(x)

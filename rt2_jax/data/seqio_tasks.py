"""The config's robot and web tasks as seqio Tasks and a seqio Mixture, for seqio tooling.

  name = seqio_tasks.register(config, vocab, action_vocab, stats)
  ds = seqio.get_mixture_or_task(name).get_dataset(
      {'inputs': 32, 'targets': 16}, split='train', shuffle=False)

Each example: 'inputs' (the prompt text, tokenized by `seqio.SentencePieceVocabulary` of the same
model, which gives the ids of `rt2_jax.vocab.Vocab`), 'targets' (the action / plan / answer ids,
EOS appended by seqio), 'image' uint8, 'is_robot', 'actions', and the '*_pretokenized' texts.
Training itself uses `rt2_jax.data.pipeline`, whose resumable state is a few integers; this
module is for seqio-based inspection, caching and evaluation tools. Task names are
'rt2_<task>' with non-word characters replaced by '_' (seqio's naming rule).
"""

from __future__ import annotations

import re

import numpy as np

from rt2_jax.data import pipeline, tasks


def seqio_name(name: str) -> str:
  return 'rt2_' + re.sub(r'[^\w]', '_', name)


def _tokenize_inputs(dataset, output_features):
  """Tokenizes the prompt text only; targets arrive as ids (action tokens are ids, not text)."""
  vocabulary = output_features['inputs'].vocabulary

  def tokenize(example):
    example = dict(example)
    example['inputs_pretokenized'] = example['inputs']
    example['inputs'] = vocabulary.encode_tf(example['inputs'])
    return example

  return dataset.map(tokenize)


def _examples(data: tasks.TaskData, vocab):
  for i in range(len(data)):
    target = data.targets[i]
    target = target[: int(np.flatnonzero(target == tasks.EOS_ID)[0])]  # seqio adds EOS back
    info = data.describe(i)
    yield {
      'inputs': info['prompt'],
      'targets': target.astype(np.int32),
      'targets_pretokenized': vocab.decode(data.targets[i]),
      'image': np.asarray(data.images[data.image_index[i]]),
      'is_robot': data.is_robot,
      'actions': (data.actions[i] if data.actions is not None else np.zeros(0, np.float32)).astype(
        np.float32
      ),
    }


def register(
  config, vocab, action_vocab, stats, process_index: int = 0, process_count: int = 1, progress=print
) -> str:
  """Registers seqio Tasks for the config's mixture (this process's shard) and the Mixture."""
  import seqio
  import tensorflow as tf

  mixture = tasks.get_mixture(pipeline.register_from_config(config, progress))
  context = tasks.Context(
    config, vocab, action_vocab, stats, process_index, process_count, progress
  )
  vocabulary = seqio.SentencePieceVocabulary(vocab.path, extra_ids=vocab.extra_ids)
  output_features = {
    'inputs': seqio.Feature(vocabulary, add_eos=False),
    'targets': seqio.Feature(vocabulary, add_eos=True),
  }
  size = config.model.image_size
  names = []
  for (task_name, rate), data in zip(mixture.tasks, mixture.build(context), strict=False):
    dim = data.actions.shape[1] if data.actions is not None else 0
    signature = {
      'inputs': tf.TensorSpec([], tf.string),
      'targets': tf.TensorSpec([None], tf.int32),
      'targets_pretokenized': tf.TensorSpec([], tf.string),
      'image': tf.TensorSpec([size, size, 3], tf.uint8),
      'is_robot': tf.TensorSpec([], tf.bool),
      'actions': tf.TensorSpec([dim], tf.float32),
    }

    def dataset_fn(split, shuffle_files, seed=None, data=data, signature=signature):
      del split, shuffle_files, seed
      return tf.data.Dataset.from_generator(
        lambda: _examples(data, vocab), output_signature=signature
      )

    name = seqio_name(task_name)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
      name,
      seqio.FunctionDataSource(
        dataset_fn, splits=('train',), num_input_examples={'train': len(data)}
      ),
      output_features=output_features,
      preprocessors=[_tokenize_inputs, seqio.preprocessors.append_eos_after_trim],
    )
    names.append((name, rate))
  mixture_name = seqio_name(mixture.name)
  seqio.MixtureRegistry.remove(mixture_name)
  seqio.MixtureRegistry.add(mixture_name, names)
  return mixture_name

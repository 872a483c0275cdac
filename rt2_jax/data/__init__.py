"""Robot (RLDS) and web data for co-fine-tuning.

spec.py        DatasetSpec: where a dataset keeps image, instruction, action (data_specs/NAME.py)
rlds.py        TFDS builder folder -> flat step records; bad-data checks; record cache
web.py         captioning / VQA examples from a JSONL file or a TFDS dataset
tasks.py       tokenized tasks (robot / web) that the config's seqio tasks read
pipeline.py    the training iterator (the seqio mixture), the config's tasks and rates; norm stats
stats.py       python -m rt2_jax.data.stats: NormStats JSON of a dataset's actions
inspect.py     python -m rt2_jax.data.inspect: sizes, realized rates, decoded examples, PNG grid
fixtures.py    tiny datasets in the real fractal / language_table / bridge layouts
synthetic.py   generated data for configs with empty data paths
seqio_mixture.py   output features, the config's tasks as seqio Tasks (mixture 'rt2_config')
seqio_iterator.py  data.mixture through one feature converter into the batch; tf.data position as JSON
metaworld_demos.py  Meta-World scripted-expert demos as RLDS + web JSONL (evaluation owns it)
tabletop_demos.py   tabletop scripted-expert demos (plans on multistep) as RLDS
"""

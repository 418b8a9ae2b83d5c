"""`python run.py` with no flags: the whole idea on CPU in a few minutes.

This machine's 8 CPU devices are described as a small heterogeneous cluster
(configs/clusters/local_hetero.json: a slow, a mid and a fast host with unequal speeds and links).
The scheduler plans a 6-layer GPT over it (uneven stages, tensor parallelism inside hosts), the
pipeline runtime trains it on the shipped corpus with progress output, and a sample is printed."""

from configs import base


def get_config():
  c = base.add_training_data_fields(base.get_config())
  c.mode = 'train'
  c.model_overrides.num_layers = 6
  c.train = base.train_fields()
  c.train.steps = 300
  c.pipeline = base.pipeline_fields()
  c.pipeline.plan = 'search'
  c.pipeline.cluster = 'local_hetero'
  c.pipeline.profile_every = 100
  c.ckpt = base.checkpoint_fields()
  c.generate = base.generate_fields()
  c.generate.prompt = 'hacker: n. '
  c.generate.max_new_tokens = 200
  c.generate.temperature = 0.8
  c.generate.top_k = 40
  return c

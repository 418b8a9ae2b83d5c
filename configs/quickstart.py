"""`python run.py` with no flags: train a tiny GPT on the corpus for a few minutes, then sample."""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'train'
  c.train = base.train_fields()
  c.generate = base.generate_fields()
  c.generate.prompt = 'hacker: n. '
  c.generate.max_new_tokens = 200
  c.generate.temperature = 0.8
  c.generate.top_k = 40
  return c

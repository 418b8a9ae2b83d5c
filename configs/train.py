"""Single-device training on the shipped corpus, e.g.
python run.py --config=configs/train.py --config.model=tiny_llama --config.train.steps=500"""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'train'
  c.train = base.train_fields()
  c.generate = base.generate_fields()
  c.generate.max_new_tokens = 0  # > 0: print a sample after training
  return c

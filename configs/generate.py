"""Generation from a text prompt or raw token ids; prints the new ids as one JSON line.
python run.py --config=configs/generate.py --config.prompt_ids=1,2,3 --config.generate.max_new_tokens=8"""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'generate'
  c.generate = base.generate_fields()
  c.prompt_ids = ''    # shorthand for generate.prompt_ids
  return c

"""Parameter counts and memory of a preset without allocating it.
python run.py --config=configs/model_info.py --config.model=llama2_70b"""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'model_info'
  return c

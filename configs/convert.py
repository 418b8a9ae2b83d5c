"""Hugging Face <-> hetjax checkpoint conversion; the direction follows from what src is.
python run.py --config=configs/convert.py --config.src=HF_DIR --config.dst=CKPT_DIR   # import
python run.py --config=configs/convert.py --config.src=CKPT_DIR --config.dst=HF_DIR   # export
CKPT_DIR may also be a training workdir. A destination that exists is refused unless overwrite."""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'convert'
  c.src = ''
  c.dst = ''
  c.dtype = ''          # 'float32' or 'bfloat16'; default: the source's dtype
  c.overwrite = False
  return c

"""Generation from a text prompt or raw token ids; prints the new ids (and text) as JSON lines.
python run.py --config=configs/generate.py --config.prompt_ids=1,2,3 --config.generate.max_new_tokens=8
With --config.checkpoint=PATH (a training workdir or a converted checkpoint) the weights and the
model config come from the checkpoint; otherwise the model is --config.model, randomly initialised."""

from configs import base


def get_config():
  c = base.get_config()
  c.mode = 'generate'
  c.generate = base.generate_fields()
  c.prompt_ids = ''    # shorthand for generate.prompt_ids
  c.checkpoint = ''    # a checkpoint to load (its latest step)
  return c

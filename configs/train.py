"""Training on the shipped corpus, on one device or through the pipeline over a Plan.
python run.py --config=configs/train.py --config.model=tiny_llama --config.train.steps=500

Pipeline training over a Plan: --config.pipeline.plan=plan.json, or =search to plan over
--config.pipeline.cluster first (see configs/base.py pipeline_fields); multi-controller runs start
through `python -m hetjax.launch`.

Checkpoints go to <workdir>/checkpoints (--config.ckpt.every/keep/async_save). A run whose workdir
holds a checkpoint resumes from it; --config.resume=true insists on resuming, false refuses to."""

from ml_collections import config_dict

from configs import base


def get_config():
  c = base.add_training_data_fields(base.get_config())
  c.mode = 'train'
  c.train = base.train_fields()
  c.pipeline = base.pipeline_fields()
  c.ckpt = base.checkpoint_fields()
  c.resume = config_dict.placeholder(bool)  # None: resume when the workdir holds a checkpoint
  c.generate = base.generate_fields()
  c.generate.max_new_tokens = 0  # > 0: print a sample after training
  return c

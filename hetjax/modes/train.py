"""mode=train: train on the shipped corpus, then (if generate.max_new_tokens > 0) print a sample."""

from hetjax.data import ByteTokenizer
from hetjax.models.config import model_config_from
from hetjax.modes.generate import parse_prompt, sample
from hetjax.train import train


def run(cfg, workdir: str) -> None:
  mcfg = model_config_from(cfg)
  gcfg = cfg.get('generate')
  if gcfg is not None and gcfg.max_new_tokens > 0:
    parse_prompt(gcfg)  # a bad prompt fails now, not after training
  print(f'model {cfg.model}: {mcfg.num_params():,} parameters; workdir {workdir}')
  state = train(mcfg, cfg.train, workdir, seed=cfg.seed, ckpt_cfg=cfg.get('ckpt'),
                resume=cfg.get('resume'))
  if gcfg is not None and gcfg.max_new_tokens > 0:
    ids = sample(state.model(), gcfg, cfg.seed)
    print('--- sample ---')
    print(gcfg.prompt + ByteTokenizer().decode(ids[0]))

"""Hugging Face import/export against real, randomly initialised `transformers` models."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from safetensors import safe_open  # noqa: E402

from hetjax.checkpoint import hf  # noqa: E402
from hetjax.checkpoint.manager import Checkpointer, load_model  # noqa: E402
from hetjax.errors import HetjaxError  # noqa: E402
from hetjax.inference.generate import generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96


def _hf_models():
  return {
      'gpt2': transformers.GPT2LMHeadModel(transformers.GPT2Config(
          n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, layer_norm_epsilon=1e-5,
          bos_token_id=0, eos_token_id=0)),
      # GQA (4 query heads, 2 kv heads), untied head, non-default rope_theta and eps.
      'llama': transformers.LlamaForCausalLM(transformers.LlamaConfig(
          num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
          intermediate_size=80, vocab_size=VOCAB, max_position_embeddings=64, rope_theta=5000.0,
          rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)),
  }


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for family, model in _hf_models().items():
    # Random init leaves biases and norms at 0 / 1; perturb them so every tensor is checked.
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / family)
    out[family] = str(root / family)
  return out


@pytest.fixture(scope='module')
def imported(hf_dirs, tmp_path_factory):
  root = tmp_path_factory.mktemp('ours')
  out = {}
  for family, src in hf_dirs.items():
    hf.import_hf(src, str(root / family), show_progress=False)
    out[family] = str(root / family)
  return out


def _hf_model(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


def _hf_logits(path, ids):
  with torch.no_grad():
    return _hf_model(path)(torch.tensor(ids)).logits.numpy()


def _params(path):
  """{name: numpy array} of a hetjax checkpoint's parameters."""
  ckpt = Checkpointer(path, read_only=True)
  return {n: x for n, x in ckpt.read([n for n in ckpt.meta()['stages'][0]['tensors']]).items()}


def _ids(seed=1, shape=(2, 24)):
  return np.random.default_rng(seed).integers(0, VOCAB, size=shape).astype(np.int32)


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_imported_logits_and_greedy_tokens_match_transformers(family, hf_dirs, imported):
  ids = _ids()
  model, meta = load_model(imported[family])
  assert meta['step'] == 0 and meta['model']['family'] == family
  ours = np.asarray(model(jnp.asarray(ids))[0])
  theirs = _hf_logits(hf_dirs[family], ids)
  assert np.abs(ours - theirs).max() <= 1e-4
  # Greedy decoding, 20 tokens: HF's generate (its own KV cache) vs ours.
  prompt = ids[:1, :5]
  hf_model = _hf_model(hf_dirs[family])
  hf_model.generation_config.eos_token_id = None  # never stop early
  with torch.no_grad():
    hf_out = hf_model.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                               pad_token_id=0)
  np.testing.assert_array_equal(generate(model, prompt, 20), hf_out.numpy()[:, 5:])


def test_llama_config_fields_survive_import(imported):
  mcfg = load_model(imported['llama'])[0].cfg
  assert (mcfg.num_heads, mcfg.num_kv_heads, mcfg.rope_theta, mcfg.norm_eps) == (4, 2, 5000.0, 1e-5)
  assert not mcfg.tie_embeddings and mcfg.ffn == 80
  gpt = load_model(imported['gpt2'])[0].cfg
  assert gpt.tie_embeddings and gpt.ffn == 128 and gpt.max_len == 64


def test_interleaved_rope_layout_would_break_llama_logits(hf_dirs, imported):
  """The logits test catches a wrong q/k layout: permuting to Meta's interleaved rotary layout
  (what HF's own converter undoes) moves the logits far beyond the tolerance."""
  model, _ = load_model(imported['llama'])
  d = model.cfg.head_dim

  def interleave(kernel):  # [in, heads*d] columns: half-split -> interleaved pairs
    k = np.asarray(kernel).reshape(kernel.shape[0], -1, 2, d // 2)
    return jnp.asarray(k.transpose(0, 1, 3, 2).reshape(kernel.shape))

  for block in model.blocks.values():
    for proj in (block.attn.q, block.attn.k):
      proj.kernel.set_value(interleave(proj.kernel.get_value()))
  ids = _ids()
  assert np.abs(np.asarray(model(jnp.asarray(ids))[0]) - _hf_logits(hf_dirs['llama'], ids)).max() > 1e-3


@pytest.mark.parametrize('family', ['gpt2', 'llama'])
def test_export_reproduces_hf_tensors_and_reimports_bitwise(family, hf_dirs, imported, tmp_path):
  out = str(tmp_path / 'exported')
  # Tiny shards for Llama: exercises the sharded writer and the sharded-index reader.
  hf.export_hf(imported[family], out, show_progress=False,
               shard_bytes=4096 if family == 'llama' else 1 << 30)
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json')) == (family == 'llama')
  original, exported = hf.hf_tensor_files(hf_dirs[family]), hf.hf_tensor_files(out)
  assert set(exported) == set(original)
  for name, file in original.items():
    with safe_open(file, 'np') as a, safe_open(exported[name], 'np') as b:
      np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name), err_msg=name)
  hf.import_hf(out, str(tmp_path / 'again'), show_progress=False)
  a, b = _params(imported[family]), _params(str(tmp_path / 'again'))
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
  # from_pretrained on the export gives hetjax's logits.
  ids = _ids(seed=2)
  ours = np.asarray(load_model(imported[family])[0](jnp.asarray(ids))[0])
  assert np.abs(_hf_logits(out, ids) - ours).max() <= 1e-4


def test_bfloat16_import_and_destination_guard(hf_dirs, tmp_path):
  dst = str(tmp_path / 'bf16')
  mcfg = hf.import_hf(hf_dirs['llama'], dst, dtype='bfloat16', show_progress=False)
  assert mcfg.param_dtype == 'bfloat16'
  model, _ = load_model(dst)
  assert model.blocks['0'].attn.q.kernel.get_value().dtype == jnp.bfloat16
  with pytest.raises(HetjaxError, match='exists; pass --config.overwrite=true'):
    hf.import_hf(hf_dirs['llama'], dst, show_progress=False)
  hf.import_hf(hf_dirs['llama'], dst, overwrite=True, show_progress=False)
  assert load_model(dst)[0].cfg.param_dtype == 'float32'
  assert not [p for p in os.listdir(tmp_path) if 'partial' in p]


@pytest.mark.slow
def test_cli_convert_then_generate(hf_dirs, imported, tmp_path):
  """The CLI path: convert (refusing an existing dst) and generate from the converted checkpoint."""
  def run(*args):
    return subprocess.run([sys.executable, 'run.py', *args, f'--config.workdir={tmp_path / "w"}'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)

  dst = tmp_path / 'ckpt'
  r = run('--config=configs/convert.py', f'--config.src={hf_dirs["gpt2"]}', f'--config.dst={dst}')
  assert r.returncode == 0, r.stderr
  assert 'import [' in r.stderr  # the progress bar
  r = run('--config=configs/convert.py', f'--config.src={hf_dirs["gpt2"]}', f'--config.dst={dst}')
  assert r.returncode == 2 and 'exists; pass --config.overwrite=true' in r.stderr
  prompt = _ids()[0, :5]
  r = run('--config=configs/generate.py', f'--config.checkpoint={dst}',
          '--config.prompt_ids=' + ','.join(map(str, prompt)), '--config.generate.max_new_tokens=8')
  assert r.returncode == 0, r.stderr
  ids = json.loads(r.stdout.strip().splitlines()[-1])['ids']
  np.testing.assert_array_equal(ids, generate(load_model(imported['gpt2'])[0], prompt[None], 8))


def test_tokenizer_travels_with_the_model_text_in_text_out(hf_dirs, tmp_path, capsys):
  """A converted model keeps its Hugging Face tokenizer: generate encodes the text prompt with it,
  prints the decoded text, and export carries the tokenizer back."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ['[UNK]'] + [f'w{i}' for i in range(VOCAB - 1)]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  src = tmp_path / 'hf'
  subprocess.run(['cp', '-r', hf_dirs['llama'], str(src)], check=True)
  tok.save(str(src / 'tokenizer.json'))
  ckpt = tmp_path / 'ckpt'
  hf.import_hf(str(src), str(ckpt), show_progress=False)
  assert (ckpt / 'tokenizer' / 'tokenizer.json').is_file()
  prompt = 'w5 w17 w3 w42'
  r = subprocess.run([sys.executable, 'run.py', '--config=configs/generate.py',
                      f'--config.checkpoint={ckpt}', f'--config.generate.prompt={prompt}',
                      '--config.generate.max_new_tokens=5'], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  ids_line, text_line = r.stdout.strip().splitlines()[-2:]
  ids = json.loads(ids_line)['ids'][0]
  model = transformers.LlamaForCausalLM.from_pretrained(str(src))
  prompt_ids = torch.tensor([tok.encode(prompt).ids])
  want = model.generate(prompt_ids, max_new_tokens=5, do_sample=False)[0, 4:].tolist()
  assert ids == want
  assert json.loads(text_line)['text'] == tok.decode(ids)
  # An end-of-sequence id in the generation config: both stop there, the EOS included.
  k = max(i for i in range(len(ids)) if ids[i] not in ids[:i])   # the last token to show up first
  eos = ids[k]
  (ckpt / 'tokenizer' / 'generation_config.json').write_text(json.dumps({'eos_token_id': eos}))
  from configs import generate as generate_config
  from hetjax.modes import generate as generate_mode
  cfg = generate_config.get_config()
  cfg.checkpoint, cfg.generate.prompt, cfg.generate.max_new_tokens = str(ckpt), prompt, 5
  generate_mode.run(cfg, str(tmp_path / 'w'))
  stopped = json.loads(capsys.readouterr().out.strip().splitlines()[-2])['ids'][0]
  want = model.generate(prompt_ids, max_new_tokens=5, do_sample=False, eos_token_id=eos)[0, 4:].tolist()
  assert stopped == want == ids[:k + 1]
  out = tmp_path / 'back'
  hf.export_hf(str(ckpt), str(out), show_progress=False)
  assert (out / 'tokenizer.json').read_text() == (src / 'tokenizer.json').read_text()

"""Every example config in configs/ builds and trains a few iterations (short overrides, small
data). The default config's full run is not here: its README numbers come from the README
command. Each test runs the config as the CLI does (Config.fromfile + overrides + Runner)."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
STDLIB = Path(sysconfig.get_paths()['stdlib'])
# Two small, long-standing stdlib modules: a few dozen 128-byte blocks each.
TRAIN_FILE, VAL_FILE = str(STDLIB / 'abc.py'), str(STDLIB / 'bisect.py')
SMALL_TEXT = {'train_dataloader.dataset.data_files': TRAIN_FILE,
              'val_dataloader.dataset.data_files': VAL_FILE,
              'test_dataloader.dataset.data_files': VAL_FILE,
              'custom_hooks.0.max_new_tokens': 16,
              'default_hooks.logger.interval': 2}
TESTED = {'char_lm.py', 'char_lm_gpu.py', 'char_lm_epoch.py', 'hf_gpt2_tiny.py', 'digits_cnn.py',
          'spiral_mlp.py', 'char_lm_stream.py'}  # char_lm_stream.py: tests/test_streaming.py


def train(name: str, tmp_path: Path, options: dict):
    from scale_runner.config import Config
    from scale_runner.registry import RUNNERS
    cfg = Config.fromfile(CONFIGS / name)
    cfg.merge_from_dict(dict(options, work_dir=str(tmp_path / 'work')))
    runner = RUNNERS.build(cfg)
    try:
        metrics = runner.train()
    finally:
        runner.close()
    return runner, metrics


def scalars(runner) -> list[dict]:
    return [json.loads(line) for line in (runner.log_dir / 'scalars.jsonl').read_text().splitlines()]


def test_every_config_has_a_test():
    assert {p.name for p in CONFIGS.glob('*.py')} == TESTED


def test_char_lm(tmp_path):
    runner, metrics = train('char_lm.py', tmp_path, dict(
        SMALL_TEXT, **{'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4,
                       'default_hooks.checkpoint.interval': 2}))
    assert runner.iter == 4
    assert set(metrics) == {'perplexity', 'val_loss'}
    assert 0 < metrics['val_loss'] < 6 and metrics['perplexity'] == pytest.approx(
        2.718281828 ** metrics['val_loss'], rel=1e-4)
    rows = scalars(runner)
    assert any('val/loss' in r and 'val/perplexity' in r and r['step'] == 4 for r in rows)
    assert any('lr' in r and 'loss' in r for r in rows)
    assert (runner.work_dir / 'checkpoints' / 'iter_4' / 'model.safetensors').is_file()
    assert list((runner.work_dir / 'tensorboard').rglob('events.out.tfevents.*'))
    sample = (runner.log_dir / 'sample.txt').read_text(encoding='utf-8')
    assert sample.startswith('def ') and len(sample.encode('utf-8', 'replace')) >= 4
    assert [s['type'] for s in runner.cfg['param_scheduler']] == ['LinearLR', 'CosineAnnealingLR']
    assert runner.cfg['optim_wrapper']['clip_grad']['max_norm'] == 1.0


def test_char_lm_gpu_config_on_cpu(tmp_path):
    # The GPU variant's composition (block 256 in model and data, bf16, workers), shrunk for CPU.
    runner, metrics = train('char_lm_gpu.py', tmp_path, dict(
        SMALL_TEXT, **{'train_cfg.max_iters': 2, 'train_cfg.val_interval': 2,
                       'train_dataloader.batch_size': 2, 'model.n_layer': 1, 'model.d_model': 96}))
    assert runner.accelerator.mixed_precision == 'bf16'
    assert runner.cfg['model']['block_size'] == 256
    assert runner.train_loop.dataloader.dataset[0]['input_ids'].shape == (256,)
    assert metrics['val_loss'] > 0


def test_char_lm_epoch(tmp_path):
    runner, metrics = train('char_lm_epoch.py', tmp_path, SMALL_TEXT)
    assert runner.epoch == 1 and runner.iter == len(runner.train_loop.dataloader) > 0
    assert (runner.work_dir / 'checkpoints' / 'epoch_1').is_dir()
    assert 'val_loss' in metrics


def test_hf_gpt2_tiny(tmp_path):
    transformers = pytest.importorskip('transformers')
    runner, metrics = train('hf_gpt2_tiny.py', tmp_path, dict(
        SMALL_TEXT, **{'train_cfg.max_iters': 3, 'train_cfg.val_interval': 3}))
    from scale_runner.model import unwrap
    assert isinstance(unwrap(runner.model), transformers.GPT2LMHeadModel)
    assert runner.iter == 3 and 0 < metrics['val_loss'] < 7
    assert (runner.log_dir / 'sample.txt').read_text(encoding='utf-8').startswith('def ')


def test_digits_cnn(tmp_path):
    pytest.importorskip('sklearn')
    runner, metrics = train('digits_cnn.py', tmp_path, {'train_cfg.max_epochs': 2})
    assert runner.epoch == 2 and 0 <= metrics['accuracy'] <= 1
    best = list((runner.work_dir / 'checkpoints').glob('best_accuracy_*'))
    assert len(best) == 1 and (best[0] / 'model.safetensors').is_file()


def test_spiral_mlp(tmp_path):
    runner, metrics = train('spiral_mlp.py', tmp_path, {'train_cfg.max_epochs': 1})
    assert runner.epoch == 1 and 'accuracy' in metrics


def test_unigram_baseline():
    from scale_runner.config import Config
    from scale_runner.examples.unigram_baseline import unigram_baseline
    out = unigram_baseline(Config.fromfile(CONFIGS / 'char_lm.py'))
    assert out['train_files'] > 50 and out['val_files'] >= 1
    assert 2.0 < out['unigram_nats_per_byte'] < 5.0

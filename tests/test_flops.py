"""MFU (issue 22, part 2): FLOPs per token of the built-in and transformers LMs, the peak table,
and ``mfu`` in the log line and scalars.jsonl of a real run."""
from __future__ import annotations

import json

import pytest
import torch

from scale_runner import Runner
from scale_runner.examples.char_lm import CharTransformerLM
from scale_runner.flops import flops_per_token_fn, matmul_params, peak_flops, transformer_flops_per_token


def test_char_lm_flops_match_a_hand_count():
    V, S, d, L = 16, 8, 8, 2
    model = CharTransformerLM(vocab_size=V, block_size=S, d_model=d, n_layer=L, n_head=2)
    # by hand: per block qkv (d x 3d + 3d), proj (d x d + d), mlp (d x 4d + 4d, 4d x d + d),
    # two LayerNorms (2d each); the final LayerNorm; the tied head/token table (V x d) once;
    # the position table is a lookup (no FLOPs)
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 2 * 2 * d
    n = L * block + 2 * d + V * d
    assert matmul_params(model) == n
    assert model.flops_per_token(S) == 6 * n + 12 * L * d * S
    assert flops_per_token_fn(model)(S) == model.flops_per_token(S)
    # torch's FLOP counter over a real forward + backward counts the matmuls only: 6 x the
    # weight matrices (no biases, LayerNorms), plus the attention term where it has a formula
    # for the attention kernel (not for the CPU's fused one)
    from torch.utils.flop_counter import FlopCounterMode
    ids = torch.randint(0, V, (4, S))
    with FlopCounterMode(display=False) as counter:
        model(ids, labels=ids)['loss'].mean().backward()
    counted = counter.get_total_flops() / ids.numel()
    weights = L * 12 * d * d + V * d
    assert counted in (6 * weights, 6 * weights + 12 * L * d * S), counted


def test_transformers_gpt2_formula_from_its_config():
    pytest.importorskip('transformers')
    from transformers import GPT2Config, GPT2LMHeadModel
    V, P, d, L = 64, 32, 16, 3
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=P, n_embd=d, n_layer=L, n_head=2))
    # c_attn, c_proj, mlp c_fc / c_proj (Conv1D weights + biases), ln_1, ln_2; ln_f; wte tied
    # with lm_head; wpe a lookup
    n = L * (3 * d * d + 3 * d + d * d + d + 4 * d * d + 4 * d + 4 * d * d + d + 4 * d) + 2 * d + V * d
    assert matmul_params(model) == n
    assert flops_per_token_fn(model)(20) == transformer_flops_per_token(n, L, d, 20)
    assert transformer_flops_per_token(n, L, d, 20) == 6 * n + 12 * L * d * 20
    assert flops_per_token_fn(torch.nn.Linear(2, 2)) is None
    assert flops_per_token_fn(torch.nn.Linear(2, 2), override=123.0)(7) == 123.0


def test_peak_table():
    assert peak_flops('NVIDIA H100 80GB HBM3', 'bf16') == 989.5e12
    assert peak_flops('NVIDIA H100 PCIe', 'fp16') == 756.5e12
    assert peak_flops('NVIDIA H100 NVL', 'bf16') == 835.5e12
    assert peak_flops('NVIDIA H200', 'bf16') == 989.5e12
    assert peak_flops('NVIDIA A100-SXM4-80GB', 'no') == 156e12  # tf32 matmuls
    assert peak_flops('NVIDIA A100 80GB PCIe', 'no', tf32=False) == 19.5e12
    assert peak_flops('NVIDIA L4', 'bf16') == 242.5e12
    assert peak_flops('NVIDIA L40S', 'bf16') is None
    assert peak_flops('NVIDIA H100 80GB HBM3', 'fp8') == 989.5e12  # rated at bf16


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {'input_ids': self.ids[i], 'labels': self.ids[i]}


def lm_run(tmp_path, timer):
    model = CharTransformerLM(vocab_size=32, block_size=16, d_model=16, n_layer=2, n_head=2)
    runner = Runner(model=model, work_dir=str(tmp_path), train_dataloader=dict(
        dataset=Tokens(64, 16, 32), batch_size=4), train_cfg=dict(by_epoch=False, max_iters=8),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
        default_hooks=dict(logger=dict(interval=4), checkpoint=None, timer=timer),
        randomness=dict(seed=0), log_level='INFO')
    runner.train()
    lines = [json.loads(x) for x in (runner.log_dir / 'scalars.jsonl').read_text().splitlines()]
    log = (runner.log_dir / f'{runner.experiment_name}.log').read_text()
    runner.close()
    return model, lines, log


def test_mfu_in_scalars_and_log_line_with_an_override(tmp_path):
    peak = 1e9  # a CPU has no table entry: the override is the only peak
    model, lines, log = lm_run(tmp_path, dict(mfu_peak_flops=peak))
    assert len(lines) == 2
    for rec in lines:  # one process: mfu = tokens/s x FLOPs per token / peak
        assert rec['mfu'] == pytest.approx(rec['tokens_per_s'] * model.flops_per_token(16) / peak, rel=1e-9)
    assert 'mfu: ' in log and log.index('tokens_per_s') < log.index('mfu: ')


def test_no_mfu_on_a_cpu_without_an_override(tmp_path):
    _, lines, log = lm_run(tmp_path, dict())
    assert lines and all('mfu' not in rec and 'tokens_per_s' in rec for rec in lines)
    assert 'mfu' not in log
    from scale_runner.hooks import IterTimerHook
    with pytest.raises(Exception, match=r'default_hooks.timer.mfu_peak_flops must be a positive number'):
        IterTimerHook(mfu_peak_flops=-1)

"""A character-level (byte-level) transformer language model and its data pipeline.

Used by ``configs/char_lm*.py`` and ``configs/hf_gpt2_tiny.py``:

- ``char_blocks`` (``FUNCTIONS``): a batched ``Dataset.map`` function that turns documents
  (``datasets``' ``text`` loader with ``sample_by='document'``) into fixed-length blocks of
  UTF-8 byte ids, ``input_ids`` and ``labels`` (equal, as in Hugging Face: the model shifts).
- ``CharTransformerLM`` (``MODELS``): a small GPT-style decoder, a plain ``nn.Module`` with the
  Hugging Face calling convention ``model(input_ids=..., labels=...)``.
- ``tiny_gpt2`` (``MODELS``): a randomly initialised ``transformers`` GPT-2 (no download).
- ``TextSampleHook`` (``HOOKS``): prints a generated sample at the end of training.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..hooks.hook import Hook
from ..model import unwrap
from ..registry import FUNCTIONS, HOOKS, MODELS


@FUNCTIONS.register_module()
def char_blocks(batch: dict, block_size: int = 128, text_key: str = 'text') -> dict:
    """Cut every document into non-overlapping ``block_size`` blocks of byte ids (tails dropped).

    Use with ``map_kwargs=dict(batched=True, remove_columns=['text'])``.
    """
    blocks = []
    for text in batch[text_key]:
        ids = np.frombuffer(text.encode('utf-8'), dtype=np.uint8)
        n = len(ids) // block_size
        if n:
            blocks.append(ids[:n * block_size].reshape(n, block_size).astype(np.int64))
    out = np.concatenate(blocks) if blocks else np.zeros((0, block_size), dtype=np.int64)
    return {'input_ids': out, 'labels': out}


class Block(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, c // self.n_head).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


@MODELS.register_module()
class CharTransformerLM(nn.Module):
    """A GPT-style decoder over byte ids (``vocab_size=256``), tied input/output embeddings.

    ``forward(input_ids, labels=None)``: with ``labels`` (equal to ``input_ids``; shifted here)
    returns ``{'loss': per-sample mean next-token cross-entropy, shape (B,)}`` (nats; the
    runner averages it for training, and per-sample losses make validation exact across
    processes); without, ``{'logits': (B, T, vocab)}``.
    """

    def __init__(self, vocab_size: int = 256, block_size: int = 128, d_model: int = 128,
                 n_layer: int = 4, n_head: int = 4, dropout: float = 0.0):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f'd_model={d_model} must be divisible by n_head={n_head}')
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(('proj.weight', 'mlp.2.weight')):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of ``seq_len``-token sequences, ``6 N + 12 L d s`` (read by
        IterTimerHook for ``mfu``; see :mod:`scale_runner.flops`)."""
        from ..flops import matmul_params, transformer_flops_per_token
        return transformer_flops_per_token(matmul_params(self), len(self.blocks),
                                           self.tok.embedding_dim, seq_len)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> dict:
        t = input_ids.shape[1]
        if t > self.block_size:
            raise ValueError(f'sequence length {t} > block_size {self.block_size}')
        x = self.drop(self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if labels is None:
            return {'logits': logits}
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(),
                               reduction='none')
        return {'loss': loss.view(input_ids.shape[0], -1).mean(1)}


@MODELS.register_module()
def tiny_gpt2(**config) -> nn.Module:
    """A randomly initialised ``transformers.GPT2LMHeadModel`` from ``GPT2Config(**config)``."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise ImportError("tiny_gpt2 needs Hugging Face transformers: "
                          "pip install 'scale_runner[hf]'") from e
    if config.get('vocab_size', 50257) <= 50256:  # GPT-2's bos/eos id 50256 is outside a small vocab
        config.setdefault('bos_token_id', 0)
        config.setdefault('eos_token_id', 0)
    return GPT2LMHeadModel(GPT2Config(**config))


@torch.no_grad()
def generate(model: nn.Module, prompt: str, max_new_tokens: int, block_size: int,
             temperature: float = 0.8, top_k: int | None = 40, seed: int = 0) -> str:
    """Sample bytes from any model called as ``model(input_ids=...)`` returning ``logits``."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt.encode('utf-8'))], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for _ in range(max_new_tokens):
        out = model(input_ids=ids[:, -block_size:])
        logits = (out['logits'] if isinstance(out, dict) else out.logits)[0, -1].float()
        logits = logits / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float('-inf'))
        nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=g)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return bytes(ids[0].tolist()).decode('utf-8', errors='replace')


@HOOKS.register_module()
class TextSampleHook(Hook):
    """After training, the main process prints (and logs) a sample generated from ``prompt``
    and writes it to ``<log_dir>/sample.txt``."""

    priority = 'LOW'

    def __init__(self, prompt: str = 'def ', max_new_tokens: int = 300, temperature: float = 0.8,
                 top_k: int | None = 40, block_size: int | None = None, seed: int = 0):
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.block_size, self.seed = temperature, top_k, block_size, seed

    def after_train(self, runner) -> None:
        if not runner.accelerator.is_main_process or self.max_new_tokens <= 0:
            return
        model = unwrap(runner.model)
        block_size = (self.block_size or getattr(model, 'block_size', None)
                      or getattr(getattr(model, 'config', None), 'n_positions', 128))
        was_training = model.training
        model.eval()
        try:
            with runner.accelerator.autocast():
                text = generate(model, self.prompt, self.max_new_tokens, block_size,
                                self.temperature, self.top_k, self.seed)
        finally:
            model.train(was_training)
        runner.logger.info(f'sample (prompt {self.prompt!r}, {self.max_new_tokens} bytes, '
                           f'temperature {self.temperature}):\n{text}')
        (runner.log_dir / 'sample.txt').write_text(text, encoding='utf-8')

"""The two halves of MFU (model FLOPs utilization, PaLM's appendix B): a language model's
training FLOPs per token, and the accelerator's peak dense FLOP/s for the run's precision.

FLOPs per token, in the order they are looked for (:func:`flops_per_token_fn`):

1. ``IterTimerHook(flops_per_token=...)``: a number, for any model;
2. the model's own ``flops_per_token(seq_len) -> float``: training (forward + backward) FLOPs
   per token of a sequence of ``seq_len`` tokens (``CharTransformerLM`` has one);
3. a Hugging Face ``transformers`` model (a ``config`` with ``num_hidden_layers`` and
   ``hidden_size``): :func:`transformer_flops_per_token` from its parameters and config.

The transformer formula is PaLM's ``6 N + 12 L d s``: ``6 N`` for the matrix multiplications of
``N`` parameters (2 FLOPs per multiply-add forward, twice that backward), ``12 L d s`` for the
attention scores and their weighted sum over ``s`` positions in ``L`` layers of width ``d``
(counted in full: a causal kernel that skips the masked half does less work than this
counts, as everyone's MFU assumes). ``N`` leaves out embedding lookups (no FLOPs) but keeps an
output head tied to the token embedding (a real matmul).
"""
from __future__ import annotations

import re
from typing import Callable

# Peak dense (no 2:4 sparsity) tensor-core TFLOP/s, from NVIDIA's datasheets, which quote
# the sparse figures (twice these) for tf32/bf16/fp16: H100 SXM5 and H200 SXM (the same
# chip): 1,979 sparse -> 989.5 bf16/fp16, 494.5 tf32, 67 fp32 (non-tensor); H100 PCIe: 756.5 /
# 378 / 51; H100 NVL and H200 NVL: 835.5 / 417.5 / 60; A100 (SXM and PCIe, 40 and 80 GB): 312 /
# 156 / 19.5 (A100's datasheet gives dense figures); L4: 242.5 / 60 / 30.3. Matched against
# torch.cuda.get_device_name() in this order.
PEAK_TFLOPS = (
    (r'H200 NVL|H100 NVL', {'bf16': 835.5, 'fp16': 835.5, 'tf32': 417.5, 'fp32': 60.0}),
    (r'H200|GH200', {'bf16': 989.5, 'fp16': 989.5, 'tf32': 494.5, 'fp32': 67.0}),
    (r'H100 PCIe', {'bf16': 756.5, 'fp16': 756.5, 'tf32': 378.0, 'fp32': 51.0}),
    (r'H100', {'bf16': 989.5, 'fp16': 989.5, 'tf32': 494.5, 'fp32': 67.0}),  # SXM5 (HBM3)
    (r'A100', {'bf16': 312.0, 'fp16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
    (r'\bL4\b', {'bf16': 242.5, 'fp16': 242.5, 'tf32': 60.0, 'fp32': 30.3}),
)


def peak_flops(device_name: str, precision: str, tf32: bool = True) -> float | None:
    """Peak dense FLOP/s of the GPU called ``device_name`` for Accelerate's
    ``mixed_precision`` ``precision`` ('no', 'bf16', 'fp16', 'fp8'; fp8 is rated at bf16,
    whose matmuls it keeps for most layers); 'no' is tf32 when ``tf32`` (torch allows tf32
    matmuls), else fp32. ``None`` for a device not in :data:`PEAK_TFLOPS`."""
    kind = {'bf16': 'bf16', 'fp16': 'fp16', 'fp8': 'bf16'}.get(precision, 'tf32' if tf32 else 'fp32')
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks[kind] * 1e12
    return None


def device_peak_flops(device, precision: str) -> float | None:
    """:func:`peak_flops` of a ``torch.device`` (``None`` off a CUDA GPU)."""
    if device is None or getattr(device, 'type', None) != 'cuda':
        return None
    import torch
    tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != 'highest'
    return peak_flops(torch.cuda.get_device_name(device), str(precision), tf32)


def matmul_params(model) -> int:
    """Parameters that take part in matrix multiplications: every parameter (once, if shared)
    except embedding tables, unless one is also a linear layer's weight (a tied output head).
    Sharded parameters count whole (DTensor's ``numel``; DeepSpeed ZeRO-3's ``ds_numel``)."""
    from torch import nn
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (id(p) in tables and id(p) not in heads):
            continue
        seen.add(id(p))
        total += getattr(p, 'ds_numel', None) or p.numel()
    return total


def transformer_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer: ``6 N + 12 L d s``."""
    return 6.0 * n_params + 12.0 * n_layer * d_model * seq_len


def flops_per_token_fn(model, override: float | None = None) -> Callable[[int], float] | None:
    """``seq_len -> training FLOPs per token`` for ``model`` (the unwrapped module), or
    ``None`` when it reports none (see the module's docstring for the order)."""
    if override is not None:
        return lambda seq_len: float(override)
    own = getattr(type(model), 'flops_per_token', None)
    if callable(own):
        return model.flops_per_token
    config = getattr(model, 'config', None)
    n_layer = getattr(config, 'num_hidden_layers', None)
    d_model = getattr(config, 'hidden_size', None)
    if isinstance(n_layer, int) and isinstance(d_model, int):  # a transformers model's config
        n = matmul_params(model)
        return lambda seq_len: transformer_flops_per_token(n, n_layer, d_model, seq_len)
    return None

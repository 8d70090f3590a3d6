"""tests/test_streaming.py's parts: shards of JSON lines written on demand, a tiny dropout LM
over packed token blocks. Configs import it (with sr_resume_parts' kill hooks) through
``custom_imports``, here and in the subprocesses the tests start."""

import json
from pathlib import Path

import torch
from torch import nn

from scale_runner.registry import MODELS

VOCAB = 50


def write_shards(root: Path, shards: int = 4, docs: int = 40, seed: int = 0) -> list[str]:
    """``shards`` JSON-lines files of ``docs`` documents of random token ids each (3..40 ids)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    files = []
    for s in range(shards):
        path = root / f'shard-{s:02d}.jsonl'
        with open(path, 'w') as f:
            for _ in range(docs):
                n = int(torch.randint(3, 41, (1,), generator=g))
                f.write(json.dumps({'ids': torch.randint(1, VOCAB, (n,), generator=g).tolist()}) + '\n')
        files.append(str(path))
    return files


@MODELS.register_module(force=True)
class TinyLM(nn.Module):
    """Embedding, dropout, linear: next-token loss over ``input_ids`` (labels shifted here)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.emb, self.drop, self.out = nn.Embedding(vocab, dim), nn.Dropout(0.2), nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def forward(self, input_ids, labels=None):
        logits = self.out(self.drop(self.emb(input_ids)))
        out = {'logits': logits}
        if labels is not None:
            out['loss'] = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                      labels[:, 1:].reshape(-1))
        return out

"""The unigram baseline of a character-LM config: ``python -m scale_runner.examples.unigram_baseline
[configs/char_lm.py]``.

The cross-entropy (nats per byte, the unit of the model's loss) of the validation bytes under
the training set's byte frequencies (add-one smoothed): what a model that ignores all context
would score. Uses the config's own ``data_files`` and ``char_blocks`` block size, and counts the
validation bytes exactly as the blocks hold them (each file's tail shorter than a block dropped).
"""
from __future__ import annotations

import glob
import math
import sys

import numpy as np


def _files(dataset_cfg) -> list[str]:
    files = dataset_cfg['data_files']
    files = [files] if isinstance(files, str) else list(files)
    return sorted({f for pattern in files for f in glob.glob(pattern)})


def _bytes(path: str, block_size: int | None = None) -> np.ndarray:
    with open(path, encoding='utf-8') as f:  # as datasets' text loader reads it
        ids = np.frombuffer(f.read().encode('utf-8'), dtype=np.uint8)
    return ids if block_size is None else ids[:len(ids) // block_size * block_size]


def unigram_baseline(cfg) -> dict:
    train, val = cfg['train_dataloader']['dataset'], cfg['val_dataloader']['dataset']
    counts = np.ones(256)  # add-one smoothing
    for f in _files(train):
        counts += np.bincount(_bytes(f), minlength=256)
    log_p = np.log(counts / counts.sum())
    val_counts = np.zeros(256)
    for f in _files(val):
        val_counts += np.bincount(_bytes(f, val['map'].get('block_size', 128)), minlength=256)
    nats = float(-(val_counts * log_p).sum() / val_counts.sum())
    return {'unigram_nats_per_byte': nats, 'unigram_perplexity': math.exp(nats),
            'train_files': len(_files(train)), 'val_files': len(_files(val)),
            'val_bytes': int(val_counts.sum())}


def main(argv: list[str] | None = None) -> None:
    from scale_runner.config import Config
    path = (argv if argv is not None else sys.argv[1:] or ['configs/char_lm.py'])[0]
    for k, v in unigram_baseline(Config.fromfile(path)).items():
        print(f'{k}: {v:.4f}' if isinstance(v, float) else f'{k}: {v}')


if __name__ == '__main__':
    main()

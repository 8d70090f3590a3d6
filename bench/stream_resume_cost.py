"""A streamed dataset's resume cost against its position, and the per-batch cost of keeping
its state (issue 20). Run through ``python bench/resume_cost.py --stream`` (or directly).

Stream: 8 JSON-lines shards of 25,000 documents (3-60 token ids each) written to a temporary
directory, ``HFDataset(path='json', streaming=True)``, packed into 64-id blocks (``pack_tokens``,
EOS between documents), shuffled by a 1,000-block buffer, batches of 4: about 31,000 batches a
pass, so position 20,000 lies in the 6th shard of the first pass.

1. Resume cost at positions P (default 100 and 20,000 batches), for 0 and 2 workers: read P
   batches, take the loader's ``state_dict()`` and round-trip it as a checkpoint does (tensors
   + JSON); then time a fresh loader's ``load_state_dict`` + the first batch. That is the part
   of a resume that can grow with the position (the runner's restore of weights and counters
   does not: ``resume_cost.py``). For comparison, the time a "replay" resume (HF ``Trainer``,
   MMEngine: iterate and drop the batches already trained on) needs to skip P batches.
2. Per-batch cost: the ``StreamLoader`` (``StatefulDataLoader``, snapshot every 256 batches, the default)
   against a plain ``torch.utils.data.DataLoader`` over the same ``StreamDataset`` (no state
   kept), read in alternating chunks of 100 batches in one process (``--batches`` each; medians
   of ``--reps``); plus the stateful loader with ``snapshot_every_n_steps=1`` (every worker's
   state at every step).

    python bench/resume_cost.py --stream --reps 3
    python bench/stream_resume_cost.py --reps 3 --resume-reps 3 --batches 3000
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHARDS, DOCS, BLOCK, BATCH, BUFFER = 8, 25_000, 64, 4, 1000


def write_data(root: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    files = []
    for s in range(SHARDS):
        path = root / f'shard-{s}.jsonl'
        lens = torch.randint(3, 61, (DOCS,), generator=g).tolist()
        ids = torch.randint(1, 1000, (sum(lens),), generator=g).tolist()
        with open(path, 'w') as f:
            at = 0
            for n in lens:
                f.write(json.dumps({'ids': ids[at:at + n]}) + '\n')
                at += n
        files.append(str(path))
    return files


def dataset(files):
    from scale_runner.hf_datasets import HFDataset
    return HFDataset(path='json', data_files=files, streaming=True, rename_columns={'ids': 'input_ids'},
                     pack=dict(block_size=BLOCK, eos_id=0), shuffle=dict(buffer_size=BUFFER))


def stream_loader(files, workers, every=256):
    from scale_runner.streaming import build_stream_loader
    return build_stream_loader(dataset(files), dict(batch_size=BATCH, num_workers=workers,
                                                    snapshot_every_n_steps=every),
                               seed=0, rank=0, where='train_dataloader')


def plain_loader(files, workers):
    ds = dataset(files)
    ds.setup(0, 1, workers, seed=0, cycle=True)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers)


def roundtrip(state):
    from scale_runner.checkpoint.format import join_tensors, split_tensors
    tensors: dict = {}
    doc = json.loads(json.dumps(split_tensors(state, tensors)))
    return join_tensors(doc, tensors)


def resume_ms(files, workers, position) -> tuple[float, float]:
    """(ms to load the state and get the first batch, ms a replay resume needs to skip)."""
    loader = stream_loader(files, workers)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(position):
        next(it)
    replay = (time.perf_counter() - t0) * 1e3
    state = roundtrip(loader.state_dict())
    expected = next(it)['input_ids']
    del it, loader
    t0 = time.perf_counter()
    fresh = stream_loader(files, workers)
    fresh.load_state_dict(state)
    first = next(iter(fresh))['input_ids']
    ms = (time.perf_counter() - t0) * 1e3
    assert torch.equal(first, expected), 'the resumed stream differs'
    return ms, replay


def paired_us(makers: dict, n: int, chunk: int = 100) -> dict:
    """µs per batch of each loader, read in alternating chunks of ``chunk`` batches in this
    process (every loader sees the same moments of a shared, noisy machine)."""
    its = {name: iter(make()) for name, make in makers.items()}
    for it in its.values():
        for _ in range(chunk):  # start-up: workers, first shard, the shuffle buffer filled
            next(it)
    total = dict.fromkeys(its, 0.0)
    for _ in range(n // chunk):
        for name, it in its.items():
            t0 = time.perf_counter()
            for _ in range(chunk):
                next(it)
            total[name] += time.perf_counter() - t0
    return {name: t / (n // chunk * chunk) * 1e6 for name, t in total.items()}


def main(reps: int = 3, positions=(100, 20_000), batches: int = 3000, resume_reps: int = 1) -> None:
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    try:
        files = write_data(root)
        print(f'stream: {SHARDS} shards x {DOCS} documents, blocks of {BLOCK}, batch {BATCH}, '
              f'shuffle buffer {BUFFER}')
        for workers in (0, 2):
            res = {p: [resume_ms(files, workers, p) for _ in range(resume_reps)] for p in positions}
            med = {p: statistics.median(r[0] for r in rs) for p, rs in res.items()}
            for p in positions:
                print(f'workers={workers} resume at batch {p:>6}: {med[p]:7.1f} ms (load state + '
                      f'first batch); a replay resume would skip for '
                      f'{statistics.median(r[1] for r in res[p]):8.1f} ms')
            lo, hi = positions[0], positions[-1]
            print(f'workers={workers} resume-time ratio {hi} / {lo}: {med[hi] / med[lo]:.2f}')
        for workers in (0, 2):
            variants = {'plain DataLoader': lambda w=workers: plain_loader(files, w),
                        'StreamLoader (snapshot every 256)': lambda w=workers: stream_loader(files, w),
                        'StreamLoader (snapshot every 1)': lambda w=workers: stream_loader(files, w, 1)}
            runs = [paired_us(variants, batches) for _ in range(reps)]
            base = statistics.median(r['plain DataLoader'] for r in runs)
            for name in variants:
                m = statistics.median(r[name] for r in runs)
                ratio = statistics.median(r[name] / r['plain DataLoader'] for r in runs)
                print(f'workers={workers} {name:<34} {m:7.1f} us/batch  ratio {ratio:.3f} '
                      f'(paired chunks; plain {base:.1f})')
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=3)
    p.add_argument('--positions', default='100,20000')
    p.add_argument('--batches', type=int, default=3000)
    p.add_argument('--resume-reps', type=int, default=1, help='(reading 20,000 batches takes a while)')
    a = p.parse_args()
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    main(a.reps, tuple(map(int, a.positions.split(','))), a.batches, a.resume_reps)

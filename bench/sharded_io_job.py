"""Sharded against gathered checkpoints of an FSDP2 model, on 2 gloo ranks (``checkpoint_io.py
--sharded`` launches it; or directly, from the repository root):

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        bench/sharded_io_job.py --width 2048 --reps 3

The model of ``checkpoint_io.py`` (12 ``Linear(width, width)``, AdamW after one step), each
``Linear`` and the root ``fully_shard``ed, so its parameters and AdamW moments are ``DTensor``
shards (half of each tensor's rows per rank).

- **sharded** (today's checkpoint): every rank calls ``CheckpointWriter.write(dir, None,
  {'model': model.state_dict(), 'optim_wrapper': wrapper.state_dict()}, rank_state)`` and writes
  its own shards (DCP + Hugging Face safetensors storage, ``sharded/``). Load: what
  ``restore_state`` does: ``read_checkpoint`` (verifies every file), ``load_shards`` straight
  into the live ``DTensor``s, ``load_weights``, ``OptimWrapper.load_state_dict``.
- **gathered** (what the runner did before): ``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True`` (whole tensors on
  rank 0, nothing elsewhere), rank 0 writes them (``CheckpointWriter.write(dir, full_model,
  {'optim_wrapper': full_optim}, rank_state)``). Load: every rank ``read_checkpoint``s the whole
  checkpoint, then ``set_model_state_dict`` / ``set_optimizer_state_dict`` (full_state_dict=True:
  each rank keeps its own rows).

Save time includes taking the state dicts; load time includes putting the state back into the
model and optimizer (before every load the live shards are zeroed, so the load must restore
them). Times are the slower rank's. Memory, per rank, for the save and for the load, above the
process's RSS just before (after ``gc.collect()`` and glibc's ``malloc_trim(0)``, so memory
freed by an earlier rep and kept by malloc does not hide a peak):

- ``peak dRSS``: the kernel's own high-water mark, ``VmHWM`` of ``/proc/self/status`` after a
  reset (``echo 5 > /proc/self/clear_refs``): exact, whatever the GIL lets a sampler see;
- ``sampled dRSS`` / ``sampled dAnon``: the maximum of ``/proc/self/statm`` read every ~1 ms by a
  background thread; anon = resident - shared, i.e. without the file pages a rank has mapped
  (checkpoint files are read and checksummed through memory maps: those pages count in RSS but
  are the page cache's, reclaimable, not memory the save allocated).

Rep 0 is a warm-up (imports, first allocations) that also checks correctness: after each
variant's load the full tensors (``full_tensor()`` of every weight and moment) equal those
saved. Medians of the --reps reps after it; rank 0 prints the tables.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from scale_runner.checkpoint import CheckpointWriter, join_tensors, load_weights, read_checkpoint
from scale_runner.checkpoint.format import sharded_keys, sharded_tensors
from scale_runner.checkpoint.sharded import load_shards
from scale_runner.optim import OptimWrapper
from scale_runner.shutdown import register_drain

MiB = 2 ** 20
PAGE = os.sysconf('SC_PAGE_SIZE')
VARIANTS = ('sharded', 'gathered')


# ---- memory ------------------------------------------------------------------------------------
def _statm() -> tuple[int, int]:
    """(resident, resident - shared) bytes of this process."""
    with open('/proc/self/statm') as f:
        _, resident, shared = (int(x) for x in f.read().split()[:3])
    return resident * PAGE, (resident - shared) * PAGE


def _hwm() -> int | None:
    """VmHWM (peak RSS since the last reset) in bytes."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return None


def _reset_hwm() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


try:
    _trim = ctypes.CDLL('libc.so.6').malloc_trim
except (OSError, AttributeError):
    _trim = None


class Peak:
    """Peak RSS (and anon RSS) above the value at entry, while the block runs."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval

    def __enter__(self):
        gc.collect()
        if _trim is not None:
            _trim(0)
        self.hwm_ok = _reset_hwm()
        self.base, self.base_anon = _statm()
        self.max, self.max_anon = self.base, self.base_anon
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss, anon = _statm()
            self.max, self.max_anon = max(self.max, rss), max(self.max_anon, anon)
            self.samples += 1
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        rss, anon = _statm()
        self.max, self.max_anon = max(self.max, rss), max(self.max_anon, anon)
        hwm = _hwm() if self.hwm_ok else None
        self.result = {'s': self.seconds,
                       'hwm': None if hwm is None else (hwm - self.base) / MiB,
                       'rss': (self.max - self.base) / MiB,
                       'anon': (self.max_anon - self.base_anon) / MiB}
        return False


# ---- the model ---------------------------------------------------------------------------------
def build(width: int, rank: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(12)])
    for layer in (*model, model):
        fully_shard(layer)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    wrapper.bind(None, model)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(rank))
    wrapper.update_params(model(x).sum())
    return model, wrapper


def local_tensors(model, opt) -> list[torch.Tensor]:
    """This rank's shards: every parameter and AdamW moment (the tensors the checkpoint holds)."""
    out = []
    for p in model.parameters():
        out.append(p.to_local())
        st = opt.state[p]
        out += [st['exp_avg'].to_local(), st['exp_avg_sq'].to_local()]
    return out


def full_tensors(model, opt) -> dict[str, torch.Tensor]:
    """Every weight and moment put together (collective)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor()
        for k in ('exp_avg', 'exp_avg_sq'):
            out[f'{name}.{k}'] = opt.state[p][k].full_tensor()
        out[f'{name}.step'] = opt.state[p]['step'].clone()
    return out


@torch.no_grad()
def scrub(model, opt) -> None:
    """Zero the live shards, so that a load has to restore every value."""
    for t in local_tensors(model, opt):
        t.zero_()
    for p in model.parameters():
        opt.state[p]['step'].zero_()


# ---- the variants ------------------------------------------------------------------------------
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_sharded(acc, model, wrapper, path: Path) -> None:
    state = {'model': model.state_dict(), 'optim_wrapper': wrapper.state_dict()}
    CheckpointWriter(acc).write(path, None, state, rank_state(acc))


def load_sharded(acc, model, wrapper, path: Path) -> None:
    ckpt = read_checkpoint(path, acc.process_index)
    state = ckpt['state']
    live = {'model': model.state_dict(), 'optim_wrapper': wrapper.state_dict()}
    mine = sharded_tensors(live)
    loaded = load_shards(path / 'sharded', {k: mine.get(k) for k in sharded_keys(state)}, str(path))
    state = join_tensors(state, loaded)
    load_weights(model, state['model'], str(path))
    wrapper.load_state_dict(state['optim_wrapper'])


def save_gathered(acc, model, wrapper, path: Path) -> None:
    full_model = get_model_state_dict(model, options=FULL)
    full_optim = get_optimizer_state_dict(model, wrapper.optimizer, options=FULL)
    CheckpointWriter(acc).write(path, full_model if acc.is_main_process else None,
                                {'optim_wrapper': full_optim}, rank_state(acc))


def load_gathered(acc, model, wrapper, path: Path) -> None:
    ckpt = read_checkpoint(path, acc.process_index)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt['model'], options=options)
    set_optimizer_state_dict(model, wrapper.optimizer, ckpt['state']['optim_wrapper'], options=options)


def rank_state(acc) -> dict:
    return {'rng': {'torch': torch.get_rng_state()}}  # a rank's own part, as the runner saves


SAVE = {'sharded': save_sharded, 'gathered': save_gathered}
LOAD = {'sharded': load_sharded, 'gathered': load_gathered}


# ---- the run -----------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser()
    p.add_argument('--width', type=int, default=2048, help='12 layers of width^2: 2048 -> ~50M params')
    p.add_argument('--reps', type=int, default=3, help='measured reps (after one warm-up rep)')
    p.add_argument('--dir', default=None, help='where to write (default: a temporary directory '
                                               'under $BENCH_DIR or /tmp)')
    args = p.parse_args()
    acc = Accelerator(cpu=True)  # the gloo process group of the two ranks
    register_drain()  # what Runner does: no abort at interpreter exit (scale_runner.shutdown)
    rank, world = acc.process_index, acc.num_processes
    model, wrapper = build(args.width, rank)
    opt = wrapper.optimizer
    shard_bytes = sum(t.nbytes for t in local_tensors(model, opt))
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    n_params = sum(p.numel() for p in model.parameters())

    made = [None]
    if acc.is_main_process:
        made[0] = args.dir or tempfile.mkdtemp(prefix='sharded_io_', dir=os.environ.get('BENCH_DIR'))
    dist.broadcast_object_list(made, src=0)
    root = Path(made[0])

    res: dict = {v: [] for v in VARIANTS}
    checked = {}
    for rep in range(args.reps + 1):
        for variant in VARIANTS:
            path = root / f'{variant}-{rep}'
            expected = full_tensors(model, opt) if rep == 0 else None
            dist.barrier()
            with Peak() as save:
                SAVE[variant](acc, model, wrapper, path)
            dist.barrier()
            scrub(model, opt)
            dist.barrier()
            with Peak() as load:
                LOAD[variant](acc, model, wrapper, path)
            dist.barrier()
            if expected is not None:
                got = full_tensors(model, opt)
                bad = [k for k in expected if not torch.equal(expected[k], got[k])]
                checked[variant] = not bad and set(got) == set(expected)
                del got, expected
            else:
                res[variant].append((save.result, load.result))
            if acc.is_main_process:
                shutil.rmtree(path)
            dist.barrier()
    if acc.is_main_process and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    mine = {'rank': rank, 'res': res, 'shard': shard_bytes, 'checked': checked}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if acc.is_main_process:
        report(everyone, args, n_params, full_bytes)
    dist.barrier()


def report(ranks: list[dict], args, n_params: int, full_bytes: int) -> None:
    med = statistics.median
    print(f'model: {n_params / 1e6:.1f}M parameters (12 x Linear({args.width}, {args.width})), '
          f'AdamW after one step, fully_shard on {len(ranks)} gloo ranks; model + moments '
          f'{full_bytes / MiB:.1f} MiB in all; medians of {args.reps} reps (after a warm-up)')
    ok = all(r['checked'].get(v) for r in ranks for v in VARIANTS)
    print('correctness (warm-up rep): after each load, every full weight and moment equals the '
          'saved one: ' + ('yes' if ok else f'NO {[r["checked"] for r in ranks]}'))
    print()
    print('| variant | save s | load s |')
    print('| --- | ---: | ---: |')
    for v in VARIANTS:
        # the slower rank's time of each rep, then the median over reps
        save_t = med(max(r['res'][v][i][0]['s'] for r in ranks) for i in range(args.reps))
        load_t = med(max(r['res'][v][i][1]['s'] for r in ranks) for i in range(args.reps))
        print(f'| {v} | {save_t:.3f} | {load_t:.3f} |')
    print()
    print('| variant | rank | shards MiB | phase | peak dRSS MiB (VmHWM) | / shards | '
          'sampled dRSS MiB | sampled dAnon MiB | / shards |')
    print('| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |')
    for v in VARIANTS:
        for r in ranks:
            shard = r['shard'] / MiB
            for phase, i in (('save', 0), ('load', 1)):
                rows = [x[i] for x in r['res'][v]]
                hwm = None if rows[0]['hwm'] is None else med(x['hwm'] for x in rows)
                rss, anon = med(x['rss'] for x in rows), med(x['anon'] for x in rows)
                hwm_s = '-' if hwm is None else f'{hwm:.1f}'
                ratio = '-' if hwm is None else f'{hwm / shard:.2f}'
                print(f'| {v} | {r["rank"]} | {shard:.1f} | {phase} | {hwm_s} | {ratio} | '
                      f'{rss:.1f} | {anon:.1f} | {anon / shard:.2f} |')
    sys.stdout.flush()


if __name__ == '__main__':
    main()

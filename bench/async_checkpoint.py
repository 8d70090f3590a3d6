"""Background checkpoints (``default_hooks.checkpoint.async_save=True``) against synchronous ones,
in one real ``Runner.train()`` each, in the same process.

Workload: the model of ``checkpoint_io.py`` (12 ``Linear(width, width)`` layers, width 2048 ->
~50M parameters; the loss is the mean square of the output), AdamW (lr 1e-4), a small batch
(``--batch``, default 4) of an in-memory random map-style dataset (``DefaultSampler``, shuffled),
an iteration loop of ``--iters`` iterations with a checkpoint every ``--interval`` (and at the
end: ``save_last``), the other default hooks as they are (logger every 10 iterations, timer,
NaN guard; log level WARNING), one torch thread (``--threads``). Each round trains a fresh
Runner with ``async_save=False`` and then one with ``async_save=True`` (``--rounds``; the
Accelerate state is reset between them, as ``tests/conftest.py`` does); every round starts from
the same seed.

Measured in place, with ``perf_counter``:

- Two hooks registered in ``HOOKS`` stamp every iteration: ``before_train_iter`` at priority
  HIGHEST and the end of ``after_train_iter`` at LOWEST (after the CheckpointHook, VERY_LOW).
  An iteration's duration runs from the previous iteration's last stamp to its own (so it
  includes fetching its batch). Iteration 1 (AdamW allocates its state) is not counted.
- **Stall of the loop per save** = the duration of an iteration that saved minus the median
  *plain* iteration of the same run (no save in it, no background write overlapping it). With
  ``async_save=False`` that holds the whole write (fsync'ed, checksummed, verified); with
  ``async_save=True`` what the loop waits for: ``collect_state``, the ``before_save_checkpoint``
  hooks, the host copy (``snapshot``), starting the thread, and any wait for the previous
  background write (the hook waits before starting a new save: at most one is in flight).
- Where the stall goes: the bench wraps (in this process only) ``Runner.save_checkpoint``,
  ``Runner.wait_checkpoint``, ``collect_state``, the ``before_save_checkpoint`` dispatch (the
  LoggerHook flushes its scalars file there), ``snapshot`` and ``AsyncCheckpoint``'s start.
- **Per-step cost during a background write**: the median duration of iterations that lie
  entirely inside a background write (from the thread's start to the end of its retention)
  against the median plain iteration of the same run; iterations that overlap a write only in
  part are counted apart.
- The same stall in place: the time of ``CheckpointHook.after_train_iter`` in an iteration that
  saved, minus its median elsewhere (not disturbed by the step's noise).
- The training thread per step, plain and inside a write: its CPU time (``thread_time``), its
  wait on a run queue (runnable, no core free: ``/proc/thread-self/schedstat``) and the rest
  (blocked: waiting for the GIL, a lock, I/O).
- The background write's own duration (``CheckpointWriter.write`` in the thread, then the
  retention), next to the synchronous save's write; the page faults the snapshot takes (this
  thread's minor faults: freshly allocated host memory touched for the first time).

On the project's 2-core VM the writer thread competes with training for the CPU: its
checksums, ``save_file`` serialisation and fsync release the GIL, but the memory bandwidth
and the second core are shared with the step (and with ``--threads 2``, with torch's own
second thread).

    python bench/async_checkpoint.py --rounds 3       # 50M parameters, 60 iterations per run
    python bench/async_checkpoint.py --width 512 --batch 16 --iters 300 --interval 50 --rounds 3
    python bench/async_checkpoint.py --trace          # and every iteration's duration and kind
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch


class RandomData(torch.utils.data.Dataset):
    def __init__(self, n: int, width: int):
        self.x = torch.randn(n, width, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'x': self.x[i]}


class Net(torch.nn.Module):
    """checkpoint_io.py's model: 12 Linear(width, width); returns its loss."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(12)])

    def forward(self, x):
        return self.layers(x).pow(2).mean()


def _hooks():
    from scale_runner import Hook
    from scale_runner.registry import HOOKS

    @HOOKS.register_module(force=True)
    class AsyncBenchIterStart(Hook):
        priority = 'HIGHEST'

        def __init__(self, rec: dict):
            self.rec = rec

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.rec['start'].append(time.perf_counter())

    @HOOKS.register_module(force=True)
    class AsyncBenchIterEnd(Hook):
        priority = 'LOWEST'

        def __init__(self, rec: dict):
            self.rec = rec

        def before_train(self, runner):
            self.rec['t0'], self.rec['cpu0'] = time.perf_counter(), time.thread_time()
            self.rec['rq0'] = _runqueue_wait()
            _instrument(runner, self.rec)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.rec['end'].append(time.perf_counter())
            self.rec['cpu'].append(time.thread_time())
            self.rec['rq'].append(_runqueue_wait())

    return AsyncBenchIterStart, AsyncBenchIterEnd


_depth: dict = {}  # a recursive function (snapshot) is timed at its outermost call only


def _runqueue_wait() -> float:
    """Seconds this thread has waited on a run queue (runnable, no CPU free) so far (Linux)."""
    try:
        with open('/proc/thread-self/schedstat') as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float('nan')


def _timed(rec: dict, key: str, fn):
    def wrapper(*a, **kw):
        if _depth.get(key):
            return fn(*a, **kw)
        _depth[key] = 1
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            _depth[key] = 0
            rec[key] = rec.get(key, 0.0) + time.perf_counter() - t
    return wrapper


def _instrument(runner, rec: dict) -> None:
    """Wrap the pieces of a save (this runner's methods; module functions for this process)."""
    import scale_runner.runner as runner_mod
    from scale_runner.checkpoint import async_save
    cur = {}  # the save in progress: its pieces' durations
    rec['cur'] = cur
    if not hasattr(runner_mod, '_bench_orig'):
        runner_mod._bench_orig = (runner_mod.collect_state, async_save.snapshot,
                                  async_save.AsyncCheckpoint, async_save.CheckpointWriter)
    collect, snap, Async, Writer = runner_mod._bench_orig

    runner_mod.collect_state = lambda *a, **kw: _timed(rec['cur'], 'collect_state', collect)(*a, **kw)
    def snapshot(*a, **kw):  # and the page faults it takes (this thread's)
        outer = not _depth.get('snapshot')
        f = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt if outer else 0
        try:
            return _timed(rec['cur'], 'snapshot', snap)(*a, **kw)
        finally:
            if outer:
                rec['cur']['snapshot faults'] = (resource.getrusage(resource.RUSAGE_THREAD)
                                                 .ru_minflt - f)
    async_save.snapshot = snapshot

    class TimedWriter(Writer):  # in the background thread
        def write(self, *a, **kw):
            write = {'start': time.perf_counter()}
            rec['writes'].append(write)
            try:
                return super().write(*a, **kw)
            finally:
                write['written'] = time.perf_counter()

    class TimedAsync(Async):
        def __init__(self, *a, **kw):
            t = time.perf_counter()
            super().__init__(*a, **kw)
            rec['cur']['thread_start'] = time.perf_counter() - t

    async_save.CheckpointWriter = TimedWriter
    async_save.AsyncCheckpoint = TimedAsync

    call_hook, save, wait = runner.call_hook, runner.save_checkpoint, runner.wait_checkpoint

    def call_hook_(fn_name, **kw):
        if fn_name != 'before_save_checkpoint':
            return call_hook(fn_name, **kw)
        return _timed(rec['cur'], 'before_save hooks', call_hook)(fn_name, **kw)

    def save_(path, *a, then=None, async_save=False, **kw):
        rec['cur'] = cur = {'iter': runner.iter, 'wait_before': rec.pop('wait_pending', 0.0)}

        def then_():
            if then is not None:
                then()
            if async_save:
                rec['writes'][-1]['end'] = time.perf_counter()
        t = time.perf_counter()
        out = save(path, *a, then=then_, async_save=async_save, **kw)
        cur['total'] = time.perf_counter() - t
        if not async_save:
            cur['write (sync)'] = cur['total'] - sum(cur.get(k, 0.0) for k in
                                                      ('collect_state', 'before_save hooks'))
        rec['saves'].append(cur)
        return out

    def wait_():
        busy = runner._pending_checkpoint is not None and not runner._pending_checkpoint.done()
        t = time.perf_counter()
        try:
            return wait()
        finally:
            if busy:  # the loop blocked on a background write still running
                rec['wait_pending'] = rec.get('wait_pending', 0.0) + time.perf_counter() - t

    runner.call_hook, runner.save_checkpoint, runner.wait_checkpoint = call_hook_, save_, wait_

    hook = runner.get_hook('CheckpointHook')  # its after_train_iter: the stall, in place
    inner = hook.after_train_iter

    def after_train_iter(runner, batch_idx, data_batch=None, outputs=None):
        t = time.perf_counter()
        try:
            return inner(runner, batch_idx, data_batch, outputs)
        finally:
            rec['hook'].append(time.perf_counter() - t)
    hook.after_train_iter = after_train_iter


def train(args, root: Path, async_save: bool) -> dict:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from scale_runner import Runner
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()
    Start, End = _hooks()
    rec = {'start': [], 'end': [], 'cpu': [], 'rq': [], 'hook': [], 'saves': [], 'writes': []}
    torch.manual_seed(0)
    work = root / ('async' if async_save else 'sync')
    r = Runner(model=Net(args.width), work_dir=str(work), experiment_name='run',
               train_dataloader=dict(dataset=RandomData(args.batch * 64, args.width),
                                     batch_size=args.batch,
                                     sampler=dict(type='DefaultSampler', shuffle=True)),
               train_cfg=dict(by_epoch=False, max_iters=args.iters),
               optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-4)),
               default_hooks=dict(checkpoint=dict(interval=args.interval, async_save=async_save)),
               custom_hooks=[Start(rec), End(rec)], randomness=dict(seed=0),
               accelerator=dict(cpu=True), log_level='WARNING')
    r.train()
    rec['t_done'] = time.perf_counter()
    rec['params'] = sum(p.numel() for p in r.model.parameters())
    ckpt = work / 'checkpoints' / f'iter_{args.iters}'
    rec['bytes'] = sum(f.stat().st_size for f in ckpt.rglob('*') if f.is_file())
    r.close()
    del r
    gc.collect()
    shutil.rmtree(work, ignore_errors=True)
    return rec


def analyse(rec: dict, args) -> dict:
    """Per-iteration durations, classified: save / plain / inside a write / partly."""
    ends, cpus = rec['end'], rec['cpu']
    prev, prev_cpu = [rec['t0']] + ends[:-1], [rec['cpu0']] + cpus[:-1]
    rqs = [rec['rq0']] + rec['rq']
    saved = {s['iter'] for s in rec['saves']}
    writes = [(w['start'], w.get('end', rec['t_done'])) for w in rec['writes']]
    out = {'plain': [], 'during': [], 'partly': [], 'save': [], 'hook_save': [], 'hook_other': []}
    # the training thread per iteration: CPU time, run-queue wait, the rest (blocked: the GIL,
    # a page fault's I/O, a lock)
    cpu = {'plain': [], 'during': []}
    rq = {'plain': [], 'during': []}
    blocked = {'plain': [], 'during': []}
    for i, (a, b) in enumerate(zip(prev, ends), start=1):
        if i == 1:
            continue
        d, c, h = b - a, cpus[i - 1] - prev_cpu[i - 1], rec['hook'][i - 1]
        q = rqs[i] - rqs[i - 1]
        out['hook_save' if i in saved else 'hook_other'].append(h)
        if i in saved:
            kind = 'S'
            out['save'].append((i, d))
        elif any(ws <= a and b <= we for ws, we in writes):
            kind = 'W'
            out['during'].append(d)
            cpu['during'].append(c)
            rq['during'].append(q)
            blocked['during'].append(d - c - q)
        elif any(a < we and ws < b for ws, we in writes):
            kind = 'w'
            out['partly'].append(d)
        else:
            kind = '.'
            out['plain'].append(d)
            cpu['plain'].append(c)
            rq['plain'].append(q)
            blocked['plain'].append(d - c - q)
        out.setdefault('trace', []).append((i, kind, d))
    plain = med(out['plain'])  # nan when a write overlaps every iteration
    out['plain_median'] = plain
    out['stalls'] = [(i, d - plain) for i, d in out['save']]
    hook = med(out['hook_other'])
    out['hook_stalls'] = [h - hook for h in out['hook_save']]
    for k in ('plain', 'during'):
        out[f'cpu_{k}'], out[f'rq_{k}'], out[f'blocked_{k}'] = cpu[k], rq[k], blocked[k]
    out['write_s'] = [w['written'] - w['start'] for w in rec['writes'] if 'written' in w]
    out['thread_s'] = [w['end'] - w['start'] for w in rec['writes'] if 'end' in w]
    return out


def med(xs):
    return statistics.median(xs) if xs else float('nan')


def ms(x):
    return f'{x * 1e3:8.1f} ms'


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--width', type=int, default=2048, help='12 layers of width^2: 2048 -> ~50M params')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--iters', type=int, default=60)
    p.add_argument('--interval', type=int, default=10, help='checkpoint every N iterations')
    p.add_argument('--rounds', type=int, default=1, help='sync then async, this many times')
    p.add_argument('--threads', type=int, default=1, help='torch threads')
    p.add_argument('--trace', action='store_true', help='print every iteration (ms and kind: '
                   'S saved, W inside a background write, w partly, . plain)')
    args = p.parse_args()
    warnings.filterwarnings('ignore')
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(dir=os.environ.get('BENCH_DIR')))
    res = {False: [], True: []}
    try:
        for _ in range(args.rounds):
            for flag in (False, True):
                res[flag].append(train(args, root, flag))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    A = {flag: [analyse(r, args) for r in recs] for flag, recs in res.items()}

    def pool(flag, key):
        return [x for a in A[flag] for x in a[key]]

    def pieces(flag):
        keys = {}
        for rec in res[flag]:
            for s in rec['saves']:
                for k, v in s.items():
                    if k != 'iter':
                        keys.setdefault(k, []).append(v)
        return keys

    r0 = res[False][0]
    print(f'model: {r0["params"] / 1e6:.1f}M parameters, AdamW; checkpoint {r0["bytes"] / 2**20:.0f} MiB; '
          f'batch {args.batch}, {args.iters} iterations, a save every {args.interval} and at the end; '
          f'{args.rounds} round(s), torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs')
    ss = [d for _, d in pool(False, 'stalls')]
    sa = [d for _, d in pool(True, 'stalls')]
    plain_s = med(pool(False, 'plain'))
    plain_a = med(pool(True, 'plain'))
    during = med(pool(True, 'during'))
    rows = [
        ('step time, sync run (plain iterations, median)', ms(plain_s), f'n={len(pool(False, "plain"))}'),
        ('step time, async run, no write in flight', ms(plain_a), f'n={len(pool(True, "plain"))}'),
        ('step time, async run, inside a background write', ms(during),
         f'n={len(pool(True, "during"))}; ratio {during / plain_a:.2f}x'),
        ('step time, async run, partly inside a write', ms(med(pool(True, 'partly'))),
         f'n={len(pool(True, "partly"))}'),
        ('sync save: stall per save (median)', ms(med(ss)), f'n={len(ss)}'),
        ('async save: stall per save (median)', ms(med(sa)), f'n={len(sa)}'),
        ('ratio async / sync stall (goal <= 0.10)', f'{med(sa) / med(ss):8.3f}', ''),
        ('in place: CheckpointHook.after_train_iter, sync', ms(med(pool(False, 'hook_stalls'))), ''),
        ('in place: CheckpointHook.after_train_iter, async', ms(med(pool(True, 'hook_stalls'))),
         f'ratio {med(pool(True, "hook_stalls")) / med(pool(False, "hook_stalls")):.3f}'),
        ('training thread per step, async, no write: CPU', ms(med(pool(True, 'cpu_plain'))),
         (f'run queue {med(pool(True, "rq_plain")) * 1e3:.1f} ms, '
          f'blocked {med(pool(True, "blocked_plain")) * 1e3:.1f} ms')),
        ('training thread per step, async, in a write: CPU', ms(med(pool(True, 'cpu_during'))),
         (f'run queue {med(pool(True, "rq_during")) * 1e3:.1f} ms, '
          f'blocked {med(pool(True, "blocked_during")) * 1e3:.1f} ms '
          f'(CPU {med(pool(True, "cpu_during")) / med(pool(True, "cpu_plain")):.2f}x)')),
        ('sync write (CheckpointWriter.write + retention)', ms(med(pieces(False)['write (sync)'])), ''),
        ('background write (CheckpointWriter.write)', ms(med(pool(True, 'write_s'))), ''),
        ('background thread (write + retention)', ms(med(pool(True, 'thread_s'))),
         f'{med(pool(True, "thread_s")) / plain_a:.1f} plain steps'),
    ]
    for name, v, extra in rows:
        print(f'{name:<52}{v:>12}   {extra}')
    for flag in (False, True):
        name = 'async' if flag else 'sync'
        print(f'{name} stalls per save:',
              ' '.join(f'it{i}:{d * 1e3:.0f}' for i, d in pool(flag, 'stalls')), 'ms')
        waits = [(s['iter'], s['wait_before']) for rec in res[flag] for s in rec['saves']
                 if s['wait_before'] > 1e-3]
        if waits:
            print(f'{name} saves that waited for the previous background write:',
                  ' '.join(f'it{i}:{w * 1e3:.0f}' for i, w in waits), 'ms')
        print(f'{name} save pieces (median):', '  '.join(
            f'{k} {med(v):.0f}' if k.endswith('faults') else f'{k} {med(v) * 1e3:.1f} ms'
            for k, v in pieces(flag).items()))
    if args.trace:
        for flag in (False, True):
            for n, a in enumerate(A[flag]):
                print(f'{"async" if flag else "sync"} round {n + 1}:',
                      ' '.join(f'{i}{k}{d * 1e3:.0f}' for i, k, d in a['trace']))
    print('background writes (ms):', ' '.join(f'{x * 1e3:.0f}' for x in pool(True, 'write_s')),
          '| thread incl. retention:', ' '.join(f'{x * 1e3:.0f}' for x in pool(True, 'thread_s')))


if __name__ == '__main__':
    main()

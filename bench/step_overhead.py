"""Per-step cost of scale_runner against a plain PyTorch loop, a hand-written Accelerate loop and,
when installed, MMEngine's Runner and Lightning (issue 9).

Workload (see ``_peers.py``): a 32->64->32 MLP, batch 64, in-memory ``TensorDataset`` through a
``DataLoader``, AdamW lr 1e-3, one torch thread, one epoch of ``--steps`` steps, the same initial
weights everywhere. Every run is a fresh child process (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``); the variants are interleaved over the repetitions.

    python bench/step_overhead.py --steps 3000 --reps 5        # per-step time, every variant
    python bench/step_overhead.py --steps 3000 --reps 5 --variants scale_runner,mmengine
    python bench/step_overhead.py --paired --steps 6000         # paired chunks, one process
    python bench/step_overhead.py --paired --defaults --steps 6000  # the same, nothing configured
    python bench/step_overhead.py --calls --steps 300           # Python calls per step
    python bench/step_overhead.py --dispatch --steps 3000       # cost of 20 idle hooks
    python bench/step_overhead.py --pieces --steps 3000         # each part of a step, in place
    python bench/step_overhead.py --flat 30000                  # per-step time per sixth
    python bench/step_overhead.py --device cuda --reps 3 --variants accelerate,scale_runner

Variants (``--variants``, comma-separated; ``plain`` always runs, as the baseline):
``plain`` (a plain PyTorch loop), ``accelerate`` (a hand-written Accelerate loop),
``scale_runner`` (``Runner.train()`` with its default hooks: logger every 10 iterations,
checkpoint at the end), ``scale_runner+idle`` (the same with 20 hooks that implement only
``before_train``), ``scale_runner-nan_guard`` (the default hooks without NanGuardHook, whose
per-step host read of the loss is a device sync on a GPU), ``scale_runner-defaults`` (a
run that configures nothing: an iteration loop, SGD, shuffled batches; here against the plain
loop in order, so its ratio includes the data order's cost: ``--paired --defaults`` compares
it with loops that shuffle too), ``mmengine`` (MMEngine's
``Runner`` with its default hooks, logger every 10, checkpoint at the end), ``lightning`` (a
bare ``Trainer``: no progress bar, logger, checkpointing or model summary) and
``lightning-defaults`` (the Trainer's default progress bar, logger and checkpointing,
``log_every_n_steps=10``, the loss ``self.log``'ed every step; with ``rich`` installed
Lightning 2.6 picks ``RichProgressBar``, and the table says what it used).
MMEngine and Lightning are skipped, with a line saying so, when not installed. The children's
stdout is a pipe, so progress bars behave as in a non-interactive job.

Modes:

- default: median and min µs/step over ``--reps`` runs (timed from the start of training to
  the end of its last step, inside the framework: ``before_train`` to ``after_train`` hooks,
  Lightning's ``on_train_start``/``on_train_end``; for scale_runner the window ends before its
  final checkpoint, which is reported apart, with the per-step figure it would give), the
  ratio of medians to the plain loop, and the final loss; then whether scale_runner's final
  loss equals the plain loop's bit for bit.
- ``--paired``: the least noisy ratio. In one process, scale_runner's ``train()`` (default
  hooks, logger every 10) is paused every ``CHUNK`` iterations, before the next batch is
  fetched from its train dataloader, to run ``CHUNK`` steps of the plain loop and ``CHUNK``
  steps of the hand-written Accelerate loop
  (own models, optimizers and data loaders; alternating which goes first). Each chunk of each
  loop is timed, so all three see the same moments of the machine; reported: the median and
  quartiles of the per-chunk ratios to the plain chunk next to it, and the ratio of the sums;
  and, per sixth of the run, the median ratio relative to the first sixth (flat cost with the
  VM's drift divided out: ``--paired --steps 30000``). With ``--defaults`` the runner's
  sampler shuffles (its default), so the baselines read their batches in a random order too
  (their own seeded generator): rows gathered from all over a dataset larger than the caches
  cost a plain step 5-9 % here (bench/README); the plain loop reading in order is
  timed beside them (``plain, in order``), for reference.
  The probe costs scale_runner one generator step per batch (the baselines' batch cycle
  costs the same); ``--hook-probe`` pauses from a lowest-priority ``after_train_iter`` hook
  instead (the probe until 2026-12-02), whose call per iteration is charged to scale_runner.
- ``--calls``: a deterministic complement to the noisy timings. Python function calls
  (``sys.setprofile``: ``call`` and ``c_call`` events, generator resumptions included) from the
  end of step 100 to the end of step 200, per step, split by the package whose code runs (a C
  function counts for the Python code that calls it). Includes the probe's own 2-3 calls.
- ``--dispatch``: in-process. Two Runners with the default hooks, trained one iteration so their
  hooks are registered, one with 20 idle hooks. Times 100,000 ``call_hook`` dispatches (best of
  ``--reps``) of a point no hook implements and of ``before_train_iter`` (IterTimerHook's), with
  0 and 20 idle hooks, and, for reference, dispatch that calls every hook's method (MMEngine's
  way); the difference times the 2 per-iteration points of a step is related to the plain
  loop's step (median of ``--reps`` child runs of ``--steps`` steps).
- ``--device cuda`` (default mode only): the same workload on the GPU. The plain loop copies
  each batch with ``.to('cuda', non_blocking=True)``; Accelerate and scale_runner place it
  themselves. The clock stops after ``torch.cuda.synchronize()``.
- ``--flat STEPS``: one run of STEPS iterations over a dataset of STEPS/6 batches (so it crosses
  five epoch transitions) per variant: the plain loop (6 epochs), scale_runner and MMEngine with
  their iteration-based loops. Per sixth: the median per-step time (robust to the VM's noise
  bursts) relative to the first sixth, and the mean; then the longest epoch-transition gap (the
  first iteration of a new epoch) against the median step.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peers  # noqa: E402
from _peers import BATCH, LR, SEED  # noqa: E402

CALLS_FROM, CALLS_TO = 100, 200  # --calls counts from the end of step 100 to the end of step 200
IDLE_HOOKS = 20
RESULT = 'RESULT '  # prefix of the child's result line (frameworks may print around it)
DEVICE = 'cpu'  # the parent's --device
CUDA = os.environ.get('BENCH_DEVICE') == 'cuda'  # set by the parent's --device for its children


class Work(NamedTuple):
    batches: int          # dataset size in batches
    epochs: int = 1
    iter_based: bool = False  # scale_runner and MMEngine: IterBasedTrainLoop (epochs * batches)


# ---- what a child measures ------------------------------------------------------------------
class Probe:
    """Called by every variant: ``start()``/``stop()`` around training, and ``tick`` after every
    iteration (``None`` when timing, so the timed runs carry no per-iteration probe)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.t0 = self.t1 = None
        self.steps_done = None  # scale_runner: when the last epoch's steps ended (before its hooks)
        self.note = ''  # what the variant used, when it is not obvious (Lightning's defaults)
        self.marks: list[float] = []
        self.ticks = 0
        self.calls: collections.Counter = collections.Counter()
        self.tick = {'time': None, 'calls': self._count_window, 'flat': self._mark}[mode]

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        if CUDA:  # the clock stops when the GPU is done, not when its queue is full
            import torch
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()

    def _mark(self):
        self.marks.append(time.perf_counter())

    def _count_window(self):
        self.ticks += 1
        if self.ticks == CALLS_FROM:
            sys.setprofile(self._profile)
        elif self.ticks == CALLS_TO:
            sys.setprofile(None)

    def _profile(self, frame, event, arg):
        if event == 'call' or event == 'c_call':
            self.calls[frame.f_code.co_filename] += 1

    def result(self, loss: float, work: Work) -> dict:
        import torch
        out = {'loss': loss, 'threads': torch.get_num_threads(), 'note': self.note}
        if self.mode == 'time':  # scale_runner: the steps only, the final checkpoint apart
            out['seconds'] = (self.steps_done or self.t1) - self.t0
            if self.steps_done is not None:
                out['tail'] = self.t1 - self.steps_done
        elif self.mode == 'calls':
            by_package = collections.Counter()
            for filename, n in self.calls.items():
                by_package[_package(filename)] += n
            out['calls'] = {k: v / (CALLS_TO - CALLS_FROM) for k, v in by_package.items()}
        else:
            out.update(_flat_summary([self.t0] + self.marks, work.batches))
        return out


def _package(filename: str) -> str:
    """The package a source file belongs to (``python`` for the standard library)."""
    path = Path(filename)
    if path.name in ('step_overhead.py', '_peers.py') and path.parent.name == 'bench':
        return 'bench'
    parts = path.parts
    if 'site-packages' in parts:
        top = parts[parts.index('site-packages') + 1].removesuffix('.py')
        return 'lightning' if top.startswith(('lightning', 'pytorch_lightning')) else top
    if 'scale_runner' in parts:
        return 'scale_runner'
    return 'python'


def _flat_summary(marks: list[float], per_epoch: int) -> dict:
    """Per-sixth median/mean µs per step and epoch-transition gaps from per-iteration times."""
    steps = [(b - a) * 1e6 for a, b in zip(marks, marks[1:])]
    n = len(steps) // 6
    sixths = [steps[i * n:(i + 1) * n] for i in range(6)]
    gaps = [steps[k] for k in range(per_epoch, len(steps), per_epoch)]
    return {'sixths': [{'median': statistics.median(s), 'mean': statistics.mean(s)} for s in sixths],
            'median_step': statistics.median(steps), 'gaps': gaps}


# ---- the variants (each runs in a child process) ----------------------------------------------
def _hand_written(model, opt, loader, backward, probe: Probe, work: Work) -> float:
    """The loop people write by hand; ``backward`` is ``torch.Tensor.backward`` (the plain loop:
    the same call as ``loss.backward()``) or ``accelerator.backward``."""
    import torch
    mse_loss, tick = torch.nn.functional.mse_loss, probe.tick
    to_gpu = CUDA and backward is torch.Tensor.backward  # Accelerate's loader places batches
    probe.start()
    for _ in range(work.epochs):
        for x, y in loader:
            if to_gpu:
                x, y = x.to('cuda', non_blocking=True), y.to('cuda', non_blocking=True)
            loss = mse_loss(model(x), y)
            backward(loss)
            opt.step()
            opt.zero_grad()
            if tick:
                tick()
    probe.stop()
    return loss.item()


def plain(probe: Probe, work: Work) -> float:
    import torch
    ds = _peers.dataset(work.batches)
    model = _peers.mlp().to('cuda' if CUDA else 'cpu')
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return _hand_written(model, opt, _peers.loader(ds), torch.Tensor.backward, probe, work)


def accelerate_loop(probe: Probe, work: Work) -> float:
    import torch
    from accelerate import Accelerator
    ds = _peers.dataset(work.batches)
    acc = Accelerator(cpu=not CUDA)
    model = _peers.mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model, opt, loader = acc.prepare(model, opt, _peers.loader(ds))
    return _hand_written(model, opt, loader, acc.backward, probe, work)


def loss_model_type():
    """The runner's model: the plain loop's MLP, with the loss computed in ``forward``."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _peers.mlp()

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.net(x), y)
    return Net


def _scale_runner(ds, work: Work, custom_hooks: list, defaults: bool = False, **hooks):
    """A scale_runner Runner with its default hooks (logger every 10 iterations, checkpoint at
    the end), no validation; the model is built after the runner seeds, like the plain loop's.
    ``defaults``: what a user who configures nothing runs instead: an iteration loop, SGD, the
    default hooks exactly as they are (checkpoint policy included), log level INFO."""
    from scale_runner import Runner
    Net = loss_model_type()
    if defaults:
        return Runner(model=dict(type=Net), work_dir=tempfile.mkdtemp(),
                      train_dataloader=dict(dataset=ds, batch_size=BATCH),
                      train_cfg=dict(by_epoch=False, max_iters=work.epochs * work.batches),
                      optim_wrapper=dict(optimizer=dict(type='SGD', lr=LR)),
                      default_hooks=hooks, custom_hooks=custom_hooks, randomness=dict(seed=SEED),
                      accelerator=dict(cpu=not CUDA))
    if work.iter_based:
        train_cfg = dict(by_epoch=False, max_iters=work.epochs * work.batches)
    else:
        train_cfg = dict(by_epoch=True, max_epochs=work.epochs)
    r = Runner(model=dict(type=Net), work_dir=tempfile.mkdtemp(),
               train_dataloader=dict(dataset=ds, batch_size=BATCH,
                                     sampler=dict(type='DefaultSampler', shuffle=False)),
               train_cfg=train_cfg,
               optim_wrapper=dict(optimizer=dict(type='AdamW', lr=LR)),
               default_hooks={'logger': dict(interval=10),
                              'checkpoint': dict(interval=-1, save_last=True), **hooks},
               custom_hooks=custom_hooks, randomness=dict(seed=SEED),
               accelerator=dict(cpu=not CUDA),
               log_level='WARNING')
    return r


def _idle_hooks(n: int) -> list:
    from scale_runner import Hook

    class Idle(Hook):  # implements no per-iteration point
        def before_train(self, runner):
            pass
    return [Idle() for _ in range(n)]


def scale_runner(probe: Probe, work: Work, idle_hooks: int = 0, defaults: bool = False,
                 **hooks) -> float:
    from scale_runner import Hook

    # The clock's window ends with the last step, before the final checkpoint (reported apart):
    # an epoch loop saves it in after_train_epoch, an iteration loop in the last iteration's
    # after_train_iter; this hook runs first at both points.
    iter_loop = defaults or work.iter_based

    class Clock(Hook):
        priority = 'HIGHEST'

        def before_train(self, runner):
            probe.start()

        def after_train_epoch(self, runner):  # before CheckpointHook's: it saves the last one
            if not iter_loop:
                self.stamp()

        def stamp(self):
            if CUDA:
                import torch
                torch.cuda.synchronize()
            probe.steps_done = time.perf_counter()

        def after_train(self, runner):
            probe.stop()

    class LastIter(Clock):  # an iteration loop: only the last iteration's call stamps
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter == runner.max_iters:
                self.stamp()

    class Ticker(Clock):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            probe.tick()
            if iter_loop and runner.iter == runner.max_iters:
                self.stamp()

    clock = Ticker() if probe.tick else LastIter() if iter_loop else Clock()
    hooks_in = [clock] + _idle_hooks(idle_hooks)
    r = _scale_runner(_peers.dataset(work.batches), work, hooks_in, defaults, **hooks)
    r.train()
    return float(r.log_buffer.current['loss'])


def mmengine(probe: Probe, work: Work) -> float:
    r = _peers.mmengine_runner(_peers.dataset(work.batches), tempfile.mkdtemp(),
                               epochs=work.epochs, iter_based=work.iter_based,
                               on_start=probe.start, on_stop=probe.stop, on_iter=probe.tick)
    r.train()
    return _peers.mmengine_last_loss(r)


def lightning(probe: Probe, work: Work, defaults: bool = False) -> float:
    loss, trainer = _peers.lightning_fit(_peers.dataset(work.batches), tempfile.mkdtemp(),
                                         defaults=defaults, epochs=work.epochs,
                                         on_start=probe.start, on_stop=probe.stop,
                                         on_iter=probe.tick)
    probe.note = _peers.describe(trainer)
    return loss


# key: (label, function, package it needs or None)
VARIANTS = {
    'plain': ('plain', plain, None),
    'accelerate': ('accelerate loop', accelerate_loop, None),
    'scale_runner': ('scale_runner', scale_runner, None),
    'scale_runner+idle': (f'scale_runner+{IDLE_HOOKS} idle hooks',
                          lambda p, w: scale_runner(p, w, idle_hooks=IDLE_HOOKS), None),
    'scale_runner-defaults': ('scale_runner, nothing configured',
                              lambda p, w: scale_runner(p, w, defaults=True), None),
    'scale_runner-nan_guard': ('scale_runner, no nan_guard',
                               lambda p, w: scale_runner(p, w, nan_guard=None), None),
    'mmengine': ('mmengine', mmengine, 'mmengine'),
    'lightning': ('lightning (bare)', lightning, 'lightning'),
    'lightning-defaults': ('lightning (defaults)', lambda p, w: lightning(p, w, defaults=True),
                           'lightning'),
}
FLAT_VARIANTS = 'plain,scale_runner,mmengine'


def child_main(args) -> None:
    _peers.quiet()
    work = Work(args.batches, args.epochs, args.iter_based)
    probe = Probe(args.mode)
    loss = VARIANTS[args.one][1](probe, work)
    print(RESULT + json.dumps(probe.result(loss, work)), flush=True)


# ---- the parent -------------------------------------------------------------------------------
def run_child(key: str, mode: str, work: Work) -> dict | None:
    """Run one variant in a fresh process; ``None`` (with its stderr shown) if it failed."""
    env = dict(os.environ, BENCH_DEVICE=DEVICE, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONWARNINGS='ignore',
               TF_CPP_MIN_LOG_LEVEL='3')
    cmd = [sys.executable, __file__, '--one', key, '--mode', mode, '--batches', str(work.batches),
           '--epochs', str(work.epochs)] + (['--iter-based'] if work.iter_based else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)]
    if out.returncode or not lines:
        tail = '\n'.join((out.stderr or out.stdout).strip().splitlines()[-15:])
        print(f'!! {key} failed (exit {out.returncode}):\n{tail}', file=sys.stderr)
        return None
    rec = json.loads(lines[-1][len(RESULT):])
    if rec['threads'] != 1:
        print(f'!! {key} ran with {rec["threads"]} torch threads', file=sys.stderr)
    return rec


def chosen_variants(spec: str | None, default: str | None = None) -> list[str]:
    """The variants asked for (plain always included, as the baseline), installed ones only."""
    keys = (spec or default or ','.join(VARIANTS)).split(',')
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        sys.exit(f'unknown variant(s) {", ".join(unknown)}; choose from {", ".join(VARIANTS)}')
    keys = ['plain'] + [k for k in keys if k != 'plain']
    ready = []
    for key in keys:
        package = VARIANTS[key][2]
        if package and not _peers.installed(package):
            print(f'{VARIANTS[key][0]}: skipped, {package} is not installed')
        else:
            ready.append(key)
    return ready


def time_mode(keys: list[str], steps: int, reps: int) -> None:
    work = Work(steps)
    per_step = {k: [] for k in keys}
    tails = {k: [] for k in keys}  # seconds after the last step: the final checkpoint
    losses, notes = {}, {}
    for _ in range(reps):
        for key in keys:
            rec = run_child(key, 'time', work)
            if rec:
                per_step[key].append(rec['seconds'] / steps * 1e6)
                if 'tail' in rec:
                    tails[key].append(rec['tail'])
                print(f'  {key}: {per_step[key][-1]:.1f} µs/step', file=sys.stderr, flush=True)
                losses[key] = rec['loss']
                notes[key] = rec['note']
    base = statistics.median(per_step['plain']) if per_step['plain'] else None
    print(f'{steps} steps, median of {reps} interleaved runs per variant')
    print(f'{"variant":<28} {"median us/step":>14} {"min us/step":>12} {"ratio":>7}  final loss')
    for key in keys:
        vals = per_step[key]
        if not vals:
            print(f'{VARIANTS[key][0]:<28} failed')
            continue
        med = statistics.median(vals)
        ratio = f'{med / base:7.3f}' if base else '      -'
        print(f'{VARIANTS[key][0]:<28} {med:14.1f} {min(vals):12.1f} {ratio}  {losses[key]!r}')
    for key, vals in tails.items():
        if vals and base:
            tail = statistics.median(vals)
            whole = statistics.median(per_step[key]) + tail / steps * 1e6
            print(f'{VARIANTS[key][0]}: the final checkpoint (not in the figures above) '
                  f'{tail * 1e3:.1f} ms; with it {whole:.1f} µs/step ({whole / base:.3f})')
    for key, note in notes.items():
        if note:
            print(f'{VARIANTS[key][0]}: {note}')
    if 'scale_runner' in losses and 'plain' in losses:
        same = losses['scale_runner'] == losses['plain']
        print(f'scale_runner final loss == plain loop final loss bit for bit: {"yes" if same else "NO"}'
              f' ({losses["scale_runner"]!r} vs {losses["plain"]!r})')


def calls_mode(keys: list[str], steps: int) -> None:
    if steps < CALLS_TO:
        sys.exit(f'--calls needs --steps >= {CALLS_TO}')
    counts = {}
    for key in keys:
        rec = run_child(key, 'calls', Work(steps))
        if rec:
            counts[key] = rec['calls']
    totals = collections.Counter()
    for c in counts.values():
        totals.update(c)
    columns = [p for p, _ in totals.most_common(7)]
    print(f'Python calls per step (steps {CALLS_FROM}-{CALLS_TO}), by package of the running code')
    print(f'{"variant":<28} {"total":>7} ' + ' '.join(f'{c[:12]:>12}' for c in columns) + f' {"other":>7}')
    for key, c in counts.items():
        shown = [c.get(col, 0) for col in columns]
        other = sum(c.values()) - sum(shown)
        print(f'{VARIANTS[key][0]:<28} {sum(c.values()):7.1f} '
              + ' '.join(f'{v:12.1f}' for v in shown) + f' {other:7.1f}')
    if 'scale_runner' in counts and 'scale_runner+idle' in counts:
        a, b = sum(counts['scale_runner'].values()), sum(counts['scale_runner+idle'].values())
        print(f'scale_runner calls/step with {IDLE_HOOKS} idle hooks: {b:.1f} vs {a:.1f} without: '
              f'{"identical" if a == b else f"{b - a:+.1f}"}')


def flat_mode(keys: list[str], steps: int) -> None:
    per_epoch = steps // 6
    work = Work(per_epoch, epochs=6, iter_based=True)
    recs = {}
    for key in keys:
        rec = run_child(key, 'flat', work)
        if rec:
            recs[key] = rec
    iter_loops = ('scale_runner', 'scale_runner+idle', 'mmengine')
    labels = {k: VARIANTS[k][0] + (' (iter loop)' if k in iter_loops else '') for k in recs}
    width = 30
    print(f'{per_epoch * 6} steps, {per_epoch} per epoch; per-step µs: median (vs 1st sixth) / mean')
    print('sixth ' + ''.join(f'{labels[k][:width]:>{width}}' for k in recs))
    for i in range(6):
        cells = []
        for rec in recs.values():
            s, first = rec['sixths'][i], rec['sixths'][0]['median']
            cells.append(f'{s["median"]:.1f} ({s["median"] / first:.3f}) / {s["mean"]:.1f}')
        print(f'{i + 1:>5} ' + ''.join(f'{c:>{width}}' for c in cells))
    print('longest epoch-transition step (first step of epochs 2-6) vs the median step:')
    for key, rec in recs.items():
        gap, med = max(rec['gaps']), rec['median_step']
        print(f'  {labels[key]:<32} {gap / 1e3:9.2f} ms vs {med:.1f} µs ({gap / med:.1f}x); '
              f'extra ≈ {(gap - med) / 1e3:.2f} ms')


CHUNK = 100
IN_ORDER = 'plain, in order'  # --paired --defaults: the plain loop without shuffling


def paired_mode(steps: int, defaults: bool = False, hook_probe: bool = False) -> None:
    import torch
    from scale_runner import Hook
    _peers.quiet()
    F = torch.nn.functional
    optimizer = torch.optim.SGD if defaults else torch.optim.AdamW

    def cycle(loader):
        while True:
            yield from loader

    def baseline(model, opt, loader, backward):
        batches = cycle(loader)

        def chunk() -> float:
            t0 = time.perf_counter()
            for _ in range(CHUNK):
                x, y = next(batches)
                loss = F.mse_loss(model(x), y)
                backward(loss)
                opt.step()
                opt.zero_grad()
            return time.perf_counter() - t0
        return chunk

    times = {'scale_runner': [], 'plain': [], 'accelerate loop': []}
    if defaults:
        times[IN_ORDER] = []

    def pause() -> None:
        """End scale_runner's chunk, run one chunk of each baseline (alternating which goes
        first), start the next chunk."""
        times['scale_runner'].append(time.perf_counter() - pair.mark)
        order = list(pair.loops) if len(times['plain']) % 2 == 0 else list(pair.loops)[::-1]
        for name in order:
            times[name].append(pair.loops[name]())
        pair.mark = time.perf_counter()

    class Chunked:
        """The runner's train dataloader, pausing before every ``CHUNK``-th batch is fetched:
        the chunk then holds ``CHUNK`` whole iterations, hooks included, and the probe costs
        one generator step per batch (the baselines' ``cycle`` costs the same) instead of a
        hook call per iteration."""

        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i and i % CHUNK == 0:
                    pause()
                yield batch

        def __len__(self):
            return len(self.loader)

        def __getattr__(self, name):  # sampler, batch_size, ...: the loader's
            return getattr(self.loader, name)

    class Pair(Hook):
        priority = 'LOWEST'  # after every other hook: the last chunk holds the final checkpoint

        def before_train(self, runner):
            # Defaults: the runner's DefaultSampler shuffles, so the baselines read their
            # batches in random order too (scattered rows cost several % of this step, see
            # bench/README); the plain loop in order is timed beside them, for reference.
            def parts(shuffle: bool):
                model = _peers.mlp()
                return (model, optimizer(model.parameters(), lr=LR),
                        _peers.loader(_peers.dataset(steps), shuffle=shuffle))

            self.loops = {'plain': baseline(*parts(defaults), torch.Tensor.backward)}
            acc = runner.accelerator  # a hand-written loop on the same Accelerator
            self.loops['accelerate loop'] = baseline(*acc.prepare(*parts(defaults)), acc.backward)
            if defaults:
                self.loops[IN_ORDER] = baseline(*parts(False), torch.Tensor.backward)
            if not hook_probe:
                runner.train_loop.dataloader = Chunked(runner.train_loop.dataloader)
            self.mark = time.perf_counter()

        def after_train(self, runner):
            if not hook_probe:
                pause()  # the last chunk

        def _probe(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter % CHUNK == 0:
                pause()

        if hook_probe:
            after_train_iter = _probe

    pair = Pair()
    _scale_runner(_peers.dataset(steps), Work(steps), [pair], defaults=defaults).train()
    plain = times['plain']
    what = ('defaults: iteration loop, SGD, default hooks, INFO, shuffled batches (the '
            'baselines shuffle too)' if defaults
            else 'tuned: epoch loop, AdamW, logger every 10, checkpoint at the end, WARNING')
    print(f'{steps} steps of each loop in {len(plain)} paired chunks of {CHUNK} steps, one '
          f'process; scale_runner {what}')
    print(f'{"loop":<18} {"us/step (median chunk)":>23} {"ratio to plain: median":>23} '
          f'{"quartiles":>15} {"of sums":>8}')
    for name, vals in times.items():
        ratios = sorted(v / b for v, b in zip(vals, plain))
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        print(f'{name:<18} {statistics.median(vals) / CHUNK * 1e6:23.1f} {med:23.3f} '
              f'{f"{q1:.3f}-{q3:.3f}":>15} {sum(vals) / sum(plain):8.3f}')
    if len(plain) >= 12:
        # Flat cost without the VM's drift: each loop's ratio to the plain chunk beside it,
        # per sixth of the run, relative to the first sixth.
        n = len(plain) // 6
        print('per sixth of the run: median ratio to plain (relative to the first sixth)')
        for name in [k for k in times if k != 'plain']:
            ratios = [v / b for v, b in zip(times[name], plain)]
            meds = [statistics.median(ratios[i * n:(i + 1) * n]) for i in range(6)]
            print(f'  {name:<16} ' + '  '.join(f'{m:.3f} ({m / meds[0]:.3f})' for m in meds))


def dispatch_mode(steps: int, reps: int, calls: int = 100_000) -> None:
    _peers.quiet()
    runners = {}
    for n in (0, IDLE_HOOKS):  # a one-iteration run registers the hooks and fills the cache
        runners[n] = _scale_runner(_peers.dataset(1), Work(1), _idle_hooks(n))
        runners[n].train()
    points = ('before_train_iter', 'after_train_iter')
    for n, r in runners.items():
        called = sum(sum(h.overrides(p) for h in r.hooks) for p in points)
        print(f'{n:>2} idle hooks: {len(r.hooks)} hooks registered, {called} hook methods called '
              f'per step ({" + ".join(points)})')

    def dispatch(point):
        def run(r):
            for _ in range(calls):
                r.call_hook(point, batch_idx=0, data_batch=None)
        return run

    def every_hook(r):  # dispatch that calls every hook's method (MMEngine's way), for reference
        hooks = r.hooks
        for _ in range(calls):
            for h in hooks:
                getattr(h, 'before_train_iter')(r, batch_idx=0, data_batch=None)

    rows = {'call_hook, a point no hook implements': dispatch('unimplemented_iter_point'),
            'call_hook("before_train_iter")': dispatch('before_train_iter'),  # IterTimerHook's
            'calling every hook (uncached)': every_hook}
    timings = {(label, n): [] for label in rows for n in runners}
    for _ in range(reps):
        for label, f in rows.items():
            for n, r in runners.items():
                t0 = time.perf_counter()
                f(r)
                timings[label, n].append((time.perf_counter() - t0) / calls * 1e9)
                r.log_buffer.clear_window('train')
    ns = {key: min(v) for key, v in timings.items()}  # noise only ever adds time
    plain_runs = [run_child('plain', 'time', Work(steps)) for _ in range(reps)]
    plain_us = statistics.median(r['seconds'] / steps * 1e6 for r in plain_runs if r)
    print(f'{calls:,} dispatches, best of {reps}; plain loop: {plain_us:.1f} µs/step '
          f'({steps} steps, median of {reps} child runs); 2 per-iteration points per step')
    print(f'{"dispatch":<40} {"0 idle ns":>10} {f"{IDLE_HOOKS} idle ns":>11} {"per step":>12} '
          f'{"% of plain step":>16}')
    for label in rows:
        a, b = ns[label, 0], ns[label, IDLE_HOOKS]
        per_step_us = 2 * (b - a) / 1e3
        print(f'{label:<40} {a:10.1f} {b:11.1f} {per_step_us:+9.3f} µs {per_step_us / plain_us:+15.2%}')


def pieces_mode(steps: int, defaults: bool = False) -> None:
    """Where scale_runner's per-step time goes, timed in place: every part of ``steps`` real
    iterations (after a warm-up) is stamped with ``perf_counter`` as the loop runs, so each part
    is measured with the caches as a real step leaves them (a hot micro-benchmark of the same
    code reads 3-5x lower). Beside it, ``steps`` iterations of the plain loop in the same process."""
    import torch
    from scale_runner import Hook
    from scale_runner.hooks.hook import bind_point
    from scale_runner.model import train_step_of
    _peers.quiet()
    F, pc = torch.nn.functional, time.perf_counter
    parts: dict = collections.defaultdict(list)

    class Pieces(Hook):
        priority = 'LOWEST'

        def before_train(self, runner):
            model = _peers.mlp()
            opt = (torch.optim.SGD if defaults else torch.optim.AdamW)(model.parameters(), lr=LR)
            plain_batches = iter(_peers.loader(_peers.dataset(steps), shuffle=defaults))
            loop, state, call = runner.train_loop, runner.state, runner.call_hook
            step, ow = train_step_of(runner.model), runner.optim_wrapper
            after = [bind_point(h, 'after_train_iter', runner) for h in runner.hooks
                     if h.overrides('after_train_iter')]  # what call_hook calls, in its order
            batches = iter(loop.dataloader)
            for i in range(2 * steps):
                if i >= steps:  # the plain loop, same process, after scale_runner's
                    t0 = pc()
                    x, y = next(plain_batches)
                    t1 = pc()
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    t2 = pc()
                    parts['plain loop: data'].append(t1 - t0)
                    parts['plain loop: forward, backward, step'].append(t2 - t1)
                    parts['plain loop step'].append(t2 - t0)
                    continue
                t0 = pc()
                batch = next(batches)
                t1 = pc()
                call('before_train_iter', batch_idx=i, data_batch=batch)
                t2 = pc()
                out = step(batch, ow)
                t3 = pc()
                state.iter += 1
                state.inner_iter = i + 1
                stamps = [pc()]
                for fn in after:
                    fn(batch_idx=i, data_batch=batch, outputs=out)
                    stamps.append(pc())
                parts['data'].append(t1 - t0)
                parts['before_train_iter hooks'].append(t2 - t1)
                parts['train_step (forward, backward, step)'].append(t3 - t2)
                for fn, a, b in zip(after, stamps, stamps[1:]):
                    hook = type(getattr(fn, 'func', fn).__self__).__name__
                    parts[f'after_train_iter: {hook}'].append(b - a)
                parts['scale_runner step'].append(stamps[-1] - t0)
            raise _Done

    class _Done(Exception):
        pass

    try:
        _scale_runner(_peers.dataset(2 * steps), Work(2 * steps), [Pieces()], defaults=defaults).train()
    except _Done:
        pass
    warm = steps // 10
    print(f'{steps} iterations timed in place (the first {warm} dropped), one process')
    print(f'{"part":<48} {"median µs":>10} {"mean µs":>9}')
    for name, vals in parts.items():
        vals = vals[warm:]
        print(f'{name:<48} {statistics.median(vals) * 1e6:10.2f} {statistics.mean(vals) * 1e6:9.2f}')


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--variants', help=f'comma-separated subset of: {", ".join(VARIANTS)} '
                                      '(plain is always run: it is the baseline)')
    p.add_argument('--calls', action='store_true', help='instead: Python calls per step')
    p.add_argument('--dispatch', action='store_true', help='instead: cost of 20 idle hooks')
    p.add_argument('--pieces', action='store_true',
                   help="instead: each part of scale_runner's step, timed in place")
    p.add_argument('--defaults', action='store_true',
                   help='with --paired or --pieces: scale_runner as configured by nobody (iteration '
                        'loop, SGD, default hooks, INFO, shuffled batches; the baselines use SGD '
                        'and shuffle too)')
    p.add_argument('--paired', action='store_true',
                   help='instead: scale_runner, plain and Accelerate loops in paired chunks in one process')
    p.add_argument('--hook-probe', action='store_true',
                   help="with --paired: pause scale_runner from a hook called every iteration (the "
                        "probe before 2026-12-02; its call is charged to scale_runner) instead of "
                        "from its batch stream")
    p.add_argument('--flat', type=int, metavar='STEPS',
                   help=f'instead: per-sixth step time of one run of STEPS iterations (e.g. 30000); '
                        f'variants default to {FLAT_VARIANTS}')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'),
                   help='default mode: run the workload on this device (cuda: one GPU)')
    p.add_argument('--one', help=argparse.SUPPRESS)
    p.add_argument('--mode', default='time', choices=('time', 'calls', 'flat'), help=argparse.SUPPRESS)
    p.add_argument('--batches', type=int, help=argparse.SUPPRESS)
    p.add_argument('--epochs', type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument('--iter-based', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == 'cuda' and (args.dispatch or args.pieces or args.paired or args.flat
                             or args.calls):
        p.error('--device cuda times the default mode only')
    if args.one:
        child_main(args)
    elif args.dispatch:
        dispatch_mode(args.steps, args.reps)
    elif args.pieces:
        pieces_mode(args.steps, args.defaults)
    elif args.paired:
        paired_mode(args.steps, args.defaults, args.hook_probe)
    elif args.flat:
        flat_mode(chosen_variants(args.variants, FLAT_VARIANTS), args.flat)
    elif args.calls:
        calls_mode(chosen_variants(args.variants), args.steps)
    else:
        time_mode(chosen_variants(args.variants), args.steps, args.reps)


if __name__ == '__main__':
    main()

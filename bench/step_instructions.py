"""Instructions per step of the default run against the plain loop, counted by valgrind's
callgrind: deterministic where ``step_overhead.py``'s timings move by +-2 % from run to run, so
a change of a few thousand instructions per step (0.1 % of a step) can be seen and attributed.

    python bench/step_instructions.py                         # plain, plain+model, defaults
    python bench/step_instructions.py --variants defaults,defaults-logger,defaults-no-hooks
    python bench/step_instructions.py --steps 300              # quicker (about 1 min a variant)
    python bench/step_instructions.py --steps 300 --cache      # + cache/branch simulation (~2x slower)

Each variant runs in its own process under ``valgrind --tool=callgrind --instr-atstart=no``
(``setarch -R``: no address randomisation, so hash tables lay out alike); counting is switched
on with ``callgrind_control`` at iteration 300 and off ``--steps`` iterations later, so imports,
setup and the final checkpoint are not counted. The workload is ``step_overhead.py``'s
(``_peers``: 32->64->32 MLP, batch 64, a ``DataLoader`` over an in-memory ``TensorDataset``,
SGD, one thread). Variants: ``plain`` (the hand-written loop), ``plain+model`` (the same with
the loss computed inside the model's ``forward``, as the runner's model does it), ``defaults``
(``Runner.train()`` configured by nobody, as ``step_overhead.py --paired --defaults``),
``defaults-<hook>`` (that default hook removed), ``defaults-no-hooks`` (every default hook
removed). Instructions are not time: the runner's Python runs at a lower rate than torch's
kernels, so its share of the time is larger than its share of the instructions (bench/README).
``--cache`` also simulates the caches and branch predictor and reports cachegrind's cycle
estimate per step (``Ir + 10 x (branch misses + L1 misses) + 100 x last-level misses``): nearly
deterministic (within 0.3 %), and it counts what the instructions miss, not the real front end.
Needs ``valgrind`` (with ``callgrind_control``) on the PATH.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
START = 300  # iterations before counting starts (warm-up)


def _toggle(on: bool) -> None:
    subprocess.run(['callgrind_control', '-i', 'on' if on else 'off', str(os.getpid())],
                   stdout=subprocess.DEVNULL, check=True)


def child(variant: str, steps: int) -> None:
    """Run ``variant`` with counting on from iteration START to START + steps."""
    import torch
    import _peers
    import step_overhead
    _peers.quiet()
    end = START + steps
    F = torch.nn.functional
    if variant.startswith('plain'):
        torch.manual_seed(0)
        inside = variant == 'plain+model'
        model = step_overhead.loss_model_type()() if inside else _peers.mlp()
        opt = torch.optim.SGD(model.parameters(), lr=_peers.LR)
        for i, (x, y) in enumerate(_peers.loader(_peers.dataset(end + 10))):
            if i in (START, end):
                _toggle(i == START)
            loss = model(x, y) if inside else F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return
    from scale_runner import Hook
    from scale_runner.runner import DEFAULT_HOOKS
    dropped = DEFAULT_HOOKS if variant == 'defaults-no-hooks' else variant.split('-')[1:]

    class Counting(Hook):
        priority = 'LOWEST'

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            if runner.iter in (START, end):
                _toggle(runner.iter == START)

    work = step_overhead.Work(end + 10)
    step_overhead._scale_runner(_peers.dataset(work.batches), work, [Counting()], defaults=True,
                                **{name: None for name in dropped}).train()


def count(variant: str, steps: int, cache: bool = False) -> int:
    """Instructions (``cache``: the estimated cycles) per counted step of ``variant`` (a child
    process under callgrind)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'callgrind.out')
        sim = ['--cache-sim=yes', '--branch-sim=yes'] if cache else []
        cmd = ['setarch', '-R', 'valgrind', '--tool=callgrind', '--instr-atstart=no', *sim,
               f'--callgrind-out-file={out}', sys.executable, os.path.abspath(__file__),
               '--child', variant, '--steps', str(steps)]
        env = dict(os.environ, PYTHONHASHSEED='0', OMP_NUM_THREADS='1')
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f'{variant}: exit {run.returncode}\n{run.stderr[-2000:]}')
        text = open(out).read()
        names = re.search(r'^events:\s+(.*)$', text, re.M).group(1).split()
        totals = dict(zip(names, map(int, re.search(r'^totals:\s+(.*)$', text, re.M).group(1).split())))
        if not cache:
            return totals['Ir'] // steps
        l1 = totals['I1mr'] + totals['D1mr'] + totals['D1mw']
        last_level = totals['ILmr'] + totals['DLmr'] + totals['DLmw']
        branches = totals['Bcm'] + totals['Bim']
        return (totals['Ir'] + 10 * (branches + l1) + 100 * last_level) // steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--steps', type=int, default=1000)
    p.add_argument('--variants', default='plain,plain+model,defaults')
    p.add_argument('--cache', action='store_true',
                   help="cache and branch simulation: cachegrind's estimated cycles per step")
    p.add_argument('--child', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.steps)
    missing = [t for t in ('valgrind', 'callgrind_control', 'setarch') if shutil.which(t) is None]
    if missing:
        raise SystemExit(f'needs {", ".join(missing)} on the PATH')
    variants = args.variants.split(',')
    plain = count('plain', args.steps, args.cache)
    what = 'estimated cycles (cache and branch simulation)' if args.cache else 'instructions'
    print(f'{what} per step, {args.steps} steps counted after {START}, callgrind')
    print(f'{"variant":<28} {"per step":>12} {"vs plain":>10} {"ratio":>7}')
    for v in variants:
        n = plain if v == 'plain' else count(v, args.steps, args.cache)
        print(f'{v:<28} {n:12,d} {n - plain:+10,d} {n / plain:7.4f}')


if __name__ == '__main__':
    main()

"""A real GPU workload (issue 22, part 3): a GPT of 124M parameters on synthetic tokens, bf16,
trained by a hand-written Accelerate loop and by scale_runner with its default hooks, each
also with ``torch.compile`` (Accelerate's dynamo plugin), and by scale_runner under FSDP2 on
one GPU (``launch/fsdp.yaml``). Reports tokens/s, MFU and peak memory per variant and the
ratios to the loop (goal: scale_runner >= 0.98x its tokens/s and <= 1.02x its peak memory).

    python bench/gpu_lm.py                                  # every variant, 2 interleaved reps
    python bench/gpu_lm.py --variants loop,runner --reps 3 --batch 16
    python bench/gpu_lm.py --device cpu --tiny              # a dry run in seconds (the tests')

The model is the repository's ``CharTransformerLM`` at GPT-2 small's shape (12 layers, d=768,
12 heads, context 1024, vocabulary 50,304; tied embeddings: 124M parameters), its FLOPs per
token from its ``flops_per_token`` (``6 N + 12 L d s``, see ``scale_runner/flops.py``), the
peak from the same module's table (or ``--peak-flops``). AdamW (fused on a GPU), no clipping,
no dropout; the same seed, initial weights and batches everywhere. Each variant runs in a fresh
child process, interleaved over ``--reps``; the clock starts after ``--warmup`` steps (the
compilation) and stops after ``--steps`` more, both after ``torch.cuda.synchronize()``. Peak
memory is ``torch.cuda.max_memory_allocated`` over the timed steps (read every step, in both
loops: scale_runner's logger resets the counter at each line). scale_runner's default hooks
run as they are (logger every 50 iterations, NanGuardHook, timer, ...), except that the
checkpoint hook saves nothing (a 1.5 GB save is no part of a step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPT2_SMALL = dict(vocab_size=50304, block_size=1024, d_model=768, n_layer=12, n_head=12)
TINY = dict(vocab_size=64, block_size=32, d_model=32, n_layer=2, n_head=2)
VARIANTS = {  # name: (what, the loop it is compared with)
    'loop': ('hand-written Accelerate loop', None),
    'runner': ('scale_runner, default hooks', 'loop'),
    'loop+compile': ('the loop, torch.compile', None),
    'runner+compile': ('scale_runner, torch.compile', 'loop+compile'),
    'runner+fsdp': ('scale_runner, FSDP2 on 1 device', 'loop'),
}
TOKENS_GOAL, MEMORY_GOAL = 0.98, 1.02
LR, BETAS, WD, SEED = 3e-4, (0.9, 0.95), 0.1, 0


# ---- one child: one variant ---------------------------------------------------------------------
class Clock:
    """Called after every optimizer step by both loops: starts after ``warmup`` steps, stops at
    the last, both after a device sync; keeps the peak allocated memory of the timed steps."""

    def __init__(self, warmup: int, total: int, cuda: bool):
        self.warmup, self.total, self.cuda = warmup, total, cuda
        self.t0 = self.t1 = None
        self.peak = 0
        self.distributed = ''  # Accelerate's distributed type of the run
        self.sharded = False   # whether the model's parameters are FSDP2 shards

    def __call__(self, step: int) -> None:  # step: 1-based, after its update
        import torch
        if self.cuda and step > self.warmup:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        if step == self.warmup or step == self.total:
            if self.cuda:
                torch.cuda.synchronize()
            if step == self.warmup:
                self.t0 = time.perf_counter()
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
            else:
                self.t1 = time.perf_counter()


def tokens(n: int, seq: int, vocab: int):
    import torch

    class Tokens(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(123)
            self.ids = torch.randint(0, vocab, (n, seq), generator=g)

        def __len__(self):
            return n

        def __getitem__(self, i):
            return {'input_ids': self.ids[i], 'labels': self.ids[i]}
    return Tokens()


def hand_loop(args, shape, clock, compiled: bool) -> float:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from scale_runner.examples.char_lm import CharTransformerLM
    cuda = args.device == 'cuda'
    acc = Accelerator(mixed_precision=args.precision, cpu=not cuda,
                      dynamo_backend='inductor' if compiled else 'no')
    set_seed(SEED)
    model = CharTransformerLM(**shape)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=cuda)
    loader = torch.utils.data.DataLoader(tokens(clock.total * args.batch, shape['block_size'],
                                                shape['vocab_size']), batch_size=args.batch)
    model, opt, loader = acc.prepare(model, opt, loader)
    clock.distributed = str(acc.distributed_type)
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch)['loss'].mean()
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock(step)
    return loss.item()


def scale_runner(args, shape, clock, compiled: bool) -> float:
    from scale_runner import Hook, Runner
    from scale_runner.examples.char_lm import CharTransformerLM
    cuda = args.device == 'cuda'

    class Tick(Hook):
        priority = 'HIGHEST'  # before the logger, which resets the peak-memory counter

        def before_train(self, runner):
            from scale_runner.model import unwrap
            from scale_runner.sharding import is_sharded
            clock.distributed = str(runner.accelerator.distributed_type)
            clock.sharded = is_sharded(unwrap(runner.model))

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            clock(runner.iter)

    accelerator = dict(mixed_precision=args.precision, cpu=not cuda)
    if compiled:
        accelerator['dynamo'] = 'inductor'
    if args.fsdp and cuda:  # launch/fsdp.yaml's plugin comes from `accelerate launch`'s environment
        accelerator = {}
    elif args.fsdp:  # a CPU dry run: the runner's own FSDP2 path, which with one process has
        accelerator['fsdp'] = dict(fsdp_version=2)  # nothing to shard (scale_runner.fsdp)
    runner = Runner(
        model=dict(type=CharTransformerLM, **shape), work_dir=tempfile.mkdtemp(),
        train_dataloader=dict(dataset=tokens(clock.total * args.batch, shape['block_size'],
                                             shape['vocab_size']),
                              batch_size=args.batch, sampler=dict(type='DefaultSampler', shuffle=False)),
        train_cfg=dict(by_epoch=False, max_iters=clock.total),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=LR, betas=BETAS, weight_decay=WD, fused=cuda)),
        default_hooks=dict(checkpoint=dict(interval=-1, save_last=False, preemption=False)),
        custom_hooks=[Tick()], randomness=dict(seed=SEED), accelerator=accelerator or None,
        log_level='WARNING')
    runner.train()
    loss = float(runner.log_buffer.current['loss'])
    runner.close()
    return loss


def child(args) -> None:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = TINY if args.tiny else GPT2_SMALL
    cuda = args.device == 'cuda'
    clock = Clock(args.warmup, args.warmup + args.steps, cuda)
    variant = args.child
    run = hand_loop if variant.startswith('loop') else scale_runner
    loss = run(args, shape, clock, compiled=variant.endswith('+compile'))
    if args.fsdp and cuda and not clock.sharded:
        raise SystemExit(f'runner+fsdp: the model was not sharded ({clock.distributed}): is '
                         f'launch/fsdp.yaml FSDP2?')
    from scale_runner.flops import device_peak_flops
    seq = shape['block_size']
    per_s = args.steps * args.batch * seq / (clock.t1 - clock.t0)
    fpt = _meta_model(shape).flops_per_token(seq)
    peak = args.peak_flops or device_peak_flops(torch.device('cuda') if cuda else None, args.precision)
    print(json.dumps({'variant': variant, 'tokens_per_s': per_s, 'loss': loss,
                      'mfu': per_s * fpt / peak if peak else None,
                      'peak_mib': clock.peak / 2 ** 20 if cuda else None,
                      'params': _params(shape), 'distributed': clock.distributed,
                      'sharded': clock.sharded}))


def _meta_model(shape):
    import torch

    from scale_runner.examples.char_lm import CharTransformerLM
    with torch.device('meta'):
        return CharTransformerLM(**shape)


def _params(shape) -> int:
    return sum(p.numel() for p in _meta_model(shape).parameters())


# ---- the parent: interleaved children, one table --------------------------------------------------
def run_child(variant: str, args) -> dict | None:
    cmd = [sys.executable, __file__, '--child', variant, '--device', args.device,
           '--precision', args.precision, '--batch', str(args.batch), '--steps', str(args.steps),
           '--warmup', str(args.warmup)] + (['--tiny'] if args.tiny else [])
    if args.peak_flops:
        cmd += ['--peak-flops', str(args.peak_flops)]
    if variant == 'runner+fsdp' and args.device == 'cpu':
        cmd += ['--fsdp']
    elif variant == 'runner+fsdp':
        launch = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file',
                  str(ROOT / 'launch/fsdp.yaml'), '--num_processes', '1', '--num_machines', '1',
                  '--main_process_port', '0', '--mixed_precision', args.precision,
                  '--dynamo_backend', 'no']
        cmd = launch + cmd[1:] + ['--fsdp']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    if args.device == 'cpu':
        env.setdefault('OMP_NUM_THREADS', '1')
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"variant"')]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        print(f'  {variant}: failed (exit {proc.returncode}): ' + ' | '.join(tail), file=sys.stderr)
        return None
    return json.loads(lines[-1])


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: medians, and the ratios to the loop it is compared with."""
    rows = {}
    for variant, recs in results.items():
        if not recs:
            rows[variant] = {'variant': variant, 'failed': True}
            continue
        med = statistics.median(r['tokens_per_s'] for r in recs)
        mfus = [r['mfu'] for r in recs if r['mfu'] is not None]
        mems = [r['peak_mib'] for r in recs if r['peak_mib'] is not None]
        rows[variant] = {'variant': variant, 'tokens_per_s': med,
                         'mfu': statistics.median(mfus) if mfus else None,
                         'peak_mib': max(mems) if mems else None, 'loss': recs[-1]['loss'],
                         'params': recs[-1]['params'], 'reps': len(recs),
                         'distributed': recs[-1]['distributed'], 'sharded': recs[-1]['sharded']}
    for variant, row in rows.items():
        base = rows.get(VARIANTS[variant][1] or '')
        if base is None or row.get('failed') or base.get('failed'):
            continue
        row['vs'] = base['variant']
        row['tokens_ratio'] = row['tokens_per_s'] / base['tokens_per_s']
        if row['peak_mib'] and base['peak_mib']:
            row['memory_ratio'] = row['peak_mib'] / base['peak_mib']
        row['meets_goal'] = (row['tokens_ratio'] >= TOKENS_GOAL
                             and row.get('memory_ratio', 1.0) <= MEMORY_GOAL)
    return list(rows.values())


def print_table(rows: list[dict], args) -> None:
    params = next((r['params'] for r in rows if 'params' in r), 0)
    shape = TINY if args.tiny else GPT2_SMALL
    print(f"{params / 1e6:.2f}M-parameter GPT, batch {args.batch} x {shape['block_size']} tokens, "
          f'{args.precision}, {args.device}; {args.steps} timed steps after {args.warmup}; median of '
          f'{args.reps} interleaved runs')
    print(f'{"variant":<46} {"tokens/s":>11} {"MFU":>6} {"peak MiB":>9} {"tokens x":>9} {"memory x":>9}'
          f'  final loss')
    for r in rows:
        what = f"{r['variant']} ({VARIANTS[r['variant']][0]})"
        if r.get('failed'):
            print(f'{what:<46} failed')
            continue
        mfu = f"{r['mfu']:6.3f}" if r['mfu'] is not None else '     -'
        mem = f"{r['peak_mib']:9.0f}" if r['peak_mib'] is not None else '        -'
        tok = f"{r['tokens_ratio']:9.3f}" if 'tokens_ratio' in r else '        -'
        memx = f"{r['memory_ratio']:9.3f}" if 'memory_ratio' in r else '        -'
        print(f"{what:<46} {r['tokens_per_s']:11.0f} {mfu} {mem} {tok} {memx}  {r['loss']:.4f}")
    losses = {r['variant']: r['loss'] for r in rows if not r.get('failed')}
    for variant, base in (('runner', 'loop'), ('runner+compile', 'loop+compile')):
        if variant in losses and base in losses:
            same = ('yes' if losses[variant] == losses[base]
                    else f'no ({losses[variant]!r} vs {losses[base]!r})')
            print(f'{variant} final loss == {base} final loss bit for bit: {same}')
    print(f'ratios: to the variant\'s loop (runner: loop, runner+compile: loop+compile, runner+fsdp: '
          f'loop); goal >= {TOKENS_GOAL} tokens/s and <= {MEMORY_GOAL} peak memory')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    ap.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated: {", ".join(VARIANTS)}')
    ap.add_argument('--reps', type=int, default=2)
    ap.add_argument('--batch', type=int, default=None, help='sequences per step (32; --tiny: 4)')
    ap.add_argument('--steps', type=int, default=None, help='timed steps (50; --tiny: 6)')
    ap.add_argument('--warmup', type=int, default=None, help='untimed first steps (10; --tiny: 2)')
    ap.add_argument('--precision', default=None, help="Accelerate's mixed_precision (bf16; on a CPU: no)")
    ap.add_argument('--tiny', action='store_true', help='a 2-layer, d=32 model (a dry run)')
    ap.add_argument('--peak-flops', type=float, default=None,
                    help='peak FLOP/s of one device (default: the table)')
    ap.add_argument('--json', default=None, help='also write the rows to this file')
    ap.add_argument('--timeout', type=int, default=600, help='seconds per child run')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--fsdp', action='store_true', help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.steps = args.steps or (6 if args.tiny else 50)
    args.warmup = args.warmup or (2 if args.tiny else 10)
    args.precision = args.precision or ('bf16' if args.device == 'cuda' else 'no')
    if args.child:
        child(args)
        return 0
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f'--variants: unknown {bad}; choose from {", ".join(VARIANTS)}')
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for variant in variants:
            rec = run_child(variant, args)
            if rec:
                results[variant].append(rec)
                print(f"  {variant}: {rec['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    rows = summarize(results)
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r.get('failed') for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())

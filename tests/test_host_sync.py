"""No host read of the device on the per-step path of the default hooks (issue 22, part 1), and
NanGuardHook's device flag: the first bad iteration is reported and no update is made with it.

On the CPU a host read costs nothing, but the code path is the one a GPU runs: the tests count
the calls that would wait for a GPU (``item``, ``tolist``, ``bool(t)``, ``float(t)``, ...)."""
from __future__ import annotations

import contextlib
import math
import traceback

import pytest
import torch
from conftest import RegressionData
from sr_models import PlainRegressor
from test_hook_library import Poisoned  # a NaN loss at chosen forward calls

from scale_runner import Hook, Runner
from scale_runner.hooks import NanGuardHook, NonFiniteLossError

READS = ('item', 'tolist', 'numpy', 'cpu', '__bool__', '__float__', '__int__', '__index__')
LOG_EVERY = 10


def fused_adamw(lr=0.05):
    return dict(optimizer=dict(type='AdamW', lr=lr, fused=True))


def parts(tmp_path, model=None, iters=40, **over):
    """A Runner's arguments: iteration-based, no validation, no shuffling (no sampler reads),
    fused AdamW (the optimizer NanGuardHook's device flag gates), default hooks."""
    out = dict(model=model if model is not None else PlainRegressor(), work_dir=str(tmp_path),
               train_dataloader=dict(dataset=RegressionData(8 * iters), batch_size=8,
                                     sampler=dict(type='DefaultSampler', shuffle=False)),
               train_cfg=dict(by_epoch=False, max_iters=iters), optim_wrapper=fused_adamw(),
               default_hooks=dict(logger=dict(interval=LOG_EVERY), checkpoint=dict(interval=-1)),
               randomness=dict(seed=0), log_level='WARNING')
    out.update(over)
    return out


class Window(Hook):
    """Opens the counting window around every train iteration that is not a log line's (first
    hook of ``before_train_iter``, last of ``after_train_iter``)."""

    def __init__(self, counter, when):
        self.counter, self.when = counter, when

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.counter.open = (runner.iter + 1) % LOG_EVERY != 0 and runner.iter + 1 < runner.max_iters

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.counter.open = False


class Counter:
    def __init__(self):
        self.open = False
        self.calls: list[str] = []


@contextlib.contextmanager
def counting_reads():
    """Patch torch.Tensor's host reads to record a stack while ``counter.open``."""
    counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def patched(name, real):
        def read(self, *args, **kwargs):
            if counter.open:
                counter.calls.append(f'{name}:\n' + ''.join(traceback.format_stack(limit=8)[:-1]))
            return real(self, *args, **kwargs)
        return read
    try:
        for name, real in saved.items():
            setattr(torch.Tensor, name, patched(name, real))
        yield counter
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)


def train_counting(tmp_path, **over):
    with counting_reads() as counter:
        opens = Window(counter, None), Window(counter, None)
        opens[0].priority, opens[1].priority = 'HIGHEST', 'LOWEST'
        runner = Runner(**parts(tmp_path, custom_hooks=list(opens), **over))
        runner.train()
    return runner, counter


def test_default_hooks_read_nothing_between_log_lines(tmp_path):
    """A real training run with every default hook (fused AdamW): the 36 iterations that log
    no line call no host read of any tensor (the loss included)."""
    runner, counter = train_counting(tmp_path)
    assert runner.get_hook('NanGuardHook').on_device
    assert not counter.calls, f'{len(counter.calls)} host reads, the first at\n{counter.calls[0]}'
    scalars = (runner.log_dir / 'scalars.jsonl').read_text().splitlines()
    assert len(scalars) == 40 // LOG_EVERY
    runner.close()


def test_the_counter_sees_a_host_read(tmp_path):
    """The same run with a non-fused optimizer and the host check (a CPU's default; asked for,
    so that a GPU runs it too): NanGuardHook reads the loss on the host every step, and the
    counter sees it (so the test above can fail). (torch's non-fused AdamW also reads its step
    count, a CPU tensor by design: no device sync.)"""
    runner, counter = train_counting(tmp_path, optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.05)),
                                     default_hooks=dict(logger=dict(interval=LOG_EVERY),
                                                        checkpoint=dict(interval=-1),
                                                        nan_guard=dict(device_flag=False)))
    assert not runner.get_hook('NanGuardHook').on_device
    guard = [c for c in counter.calls if 'nan_guard_hook' in c]
    assert len(guard) == 40 - 40 // LOG_EVERY, counter.calls[:2]
    runner.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('optim', [fused_adamw(), dict(optimizer=dict(type='AdamW', lr=0.05, foreach=True))],
                         ids=['fused', 'foreach'])
def test_no_cuda_sync_between_log_lines(tmp_path, optim):
    """On a GPU: torch's sync debug mode raises on any synchronizing call in the iterations
    that log no line (the data is on the device already, so no host-to-device copy either),
    with a fused optimizer (the flag gates it) and a foreach one (not gated)."""
    class OnDevice(torch.utils.data.Dataset):
        def __init__(self, n):
            base = RegressionData(n)
            self.x, self.y = base.x.cuda(), base.y.cuda()

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {'x': self.x[i], 'y': self.y[i]}

    class Strict(Hook):
        priority = 'HIGHEST'

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            quiet = (runner.iter + 1) % LOG_EVERY and runner.iter + 1 < runner.max_iters
            torch.cuda.set_sync_debug_mode('error' if quiet else 0)

        def after_train(self, runner):
            torch.cuda.set_sync_debug_mode(0)

    class Relax(Hook):
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            torch.cuda.set_sync_debug_mode(0)

    try:
        runner = Runner(**parts(tmp_path, custom_hooks=[Strict(), Relax()], optim_wrapper=optim,
                                train_dataloader=dict(dataset=OnDevice(320), batch_size=8,
                                                      sampler=dict(type='DefaultSampler', shuffle=False))))
        runner.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert runner.get_hook('NanGuardHook').on_device
    runner.close()


# ---- NanGuardHook's device flag ---------------------------------------------------------------
def reference(model, start, steps):
    """Fused AdamW by hand over the first ``steps`` batches ``model`` saw."""
    ref = PlainRegressor()
    ref.load_state_dict(start)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, fused=True)
    for x, y in model.batches[:steps]:
        ref(x, y)['loss'].backward()
        opt.step()
        opt.zero_grad()
    return ref.state_dict(), opt


def test_device_flag_raise_names_the_first_bad_iteration_and_no_update_follows(tmp_path):
    """NaN at iteration 6, flag read every 4: raised at iteration 8, naming 6; the weights and
    AdamW's step count are those of the 5 good updates, bit for bit."""
    model = Poisoned(bad={6})
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runner = Runner(**parts(tmp_path, model=model, iters=12, default_hooks=dict(
        logger=None, checkpoint=dict(interval=-1), nan_guard=dict(check_interval=4))))
    with pytest.raises(NonFiniteLossError, match=r'iteration 6 \[rank 0: NaN\] .*read at iteration 8'):
        runner.train()
    assert runner.iter == 8 and model.calls == 8
    want, opt = reference(model, start, 5)
    for k, v in want.items():
        assert torch.equal(v, model.state_dict()[k]), k
    steps = {float(s['step']) for s in runner.optim_wrapper.optimizer.optimizer.state.values()}
    assert steps == {5.0}
    assert getattr(runner.optim_wrapper.optimizer.optimizer, 'found_inf', None) is None  # released
    assert not (tmp_path / 'checkpoints').exists() or not list((tmp_path / 'checkpoints').glob('iter_*'))
    runner.close()


def test_device_flag_is_read_before_every_checkpoint(tmp_path):
    """A checkpoint every iteration: the flag is read before each save, so the NaN at iteration
    5 raises there, and checkpoints 1-4 are all that exist."""
    model = Poisoned(bad={5})
    runner = Runner(**parts(tmp_path, model=model, iters=12, default_hooks=dict(
        logger=None, checkpoint=dict(interval=1, max_keep_ckpts=-1))))
    with pytest.raises(NonFiniteLossError, match=r'iteration 5 \[rank 0: NaN\] \(seen on rank 0\)'):
        runner.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpts = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.startswith('iter_'))
    assert ckpts == ['iter_1', 'iter_2', 'iter_3', 'iter_4']
    runner.close()


def test_device_flag_read_at_the_end_of_training(tmp_path):
    """A NaN in the last iterations, between two reads: the end of training reads the flag."""
    model = Poisoned(bad={11})
    runner = Runner(**parts(tmp_path, model=model, iters=12, default_hooks=dict(
        logger=None, checkpoint=None, nan_guard=dict(check_interval=50))))
    with pytest.raises(NonFiniteLossError, match=r'iteration 11 .*read at iteration 12'):
        runner.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    runner.close()


def test_host_path_where_the_flag_cannot_gate(tmp_path):
    """'skip' mode, and on a CPU optimizers without found_inf, keep the per-step host check."""
    for mode, optim in (('skip', fused_adamw()), ('raise', dict(optimizer=dict(type='SGD', lr=0.1)))):
        hooks = dict(logger=None, checkpoint=None, nan_guard=dict(mode=mode))
        runner = Runner(**parts(tmp_path / mode, iters=4, optim_wrapper=optim, accelerator=dict(cpu=True),
                                default_hooks=hooks))
        runner.train()
        assert not runner.get_hook('NanGuardHook').on_device
        runner.close()
    with pytest.raises(Exception, match='check_interval must be a positive int'):
        NanGuardHook(check_interval=0)


def test_device_flag_with_an_optimizer_it_cannot_gate(tmp_path):
    """``device_flag=True`` with plain SGD (as a GPU run gets with a foreach or non-torch
    optimizer): no host read per step; the NaN at iteration 6 is reported at the read at 8,
    saying the updates went on, and the flag is read before every save, so no checkpoint
    holds the non-finite weights."""
    sgd = dict(optimizer=dict(type='SGD', lr=0.1))
    model = Poisoned(bad={6})
    runner = Runner(**parts(tmp_path / 'late', model=model, iters=12, optim_wrapper=sgd, default_hooks=dict(
        logger=None, checkpoint=dict(interval=-1), nan_guard=dict(check_interval=4, device_flag=True))))
    with pytest.raises(NonFiniteLossError, match=r'iteration 6 \[rank 0: NaN\] .*read at iteration 8: '
                                                 r'the updates since were made'):
        runner.train()
    assert runner.get_hook('NanGuardHook').on_device and runner.iter == 8
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # not gated: updated
    runner.close()
    model = Poisoned(bad={6})
    runner = Runner(**parts(tmp_path / 'saves', model=model, iters=12, optim_wrapper=sgd, default_hooks=dict(
        logger=None, checkpoint=dict(interval=1, max_keep_ckpts=-1), nan_guard=dict(device_flag=True))))
    with pytest.raises(NonFiniteLossError, match=r'iteration 6 \[rank 0: NaN\] \(seen on rank 0\)'):
        runner.train()
    saved = (tmp_path / 'saves' / 'checkpoints').iterdir()
    assert sorted(p.name for p in saved if p.name.startswith('iter_')) == [f'iter_{i}' for i in range(1, 6)]
    runner.close()


def test_device_flag_false_keeps_the_host_check(tmp_path):
    runner = Runner(**parts(tmp_path, iters=4, default_hooks=dict(
        logger=None, checkpoint=None, nan_guard=dict(device_flag=False))))
    runner.train()
    assert not runner.get_hook('NanGuardHook').on_device  # fused AdamW, but asked for the host
    runner.close()
    for bad in ('yes', 1, 1.0):
        with pytest.raises(Exception, match=r"nan_guard\.device_flag must be None .*got " + repr(bad)):
            NanGuardHook(device_flag=bad)


@pytest.mark.slow
def test_device_flag_on_two_ranks(tmp_path):
    """2 processes (gloo), fused SGD: rank 1's loss is NaN at iteration 11; the flag is read
    every 4 iterations, so both ranks raise at 12 naming rank 1's iteration 11."""
    import os
    import subprocess
    import sys

    from conftest import PARTS_DIR, pythonpath
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', '0', '-m', 'scale_runner', 'train', str(PARTS_DIR / 'hl_cfg.py'),
           '--work-dir', str(tmp_path / 'work'), '--cfg-options', 'optim_wrapper.optimizer.fused=True',
           'default_hooks.checkpoint.interval=-1', 'default_hooks.logger.interval=4',
           'default_hooks.nan_guard.check_interval=4']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for rank in (0, 1):
        assert (f'non-finite loss at iteration 11 (epoch 3) [rank 1: NaN] (seen on rank {rank}; '
                f'read at iteration 12: no update since)') in out, out


@pytest.mark.parametrize('device', ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
def test_device_flag_values(device):
    """The flag is exactly 1 (what a fused optimizer's found_inf must be) after a NaN, +Inf or
    -Inf loss of any float dtype, stays 1 after finite ones, and is 0 for finite losses only."""
    from types import SimpleNamespace
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (math.nan, math.inf, -math.inf):
            guard = NanGuardHook()
            guard._state, guard._gated = SimpleNamespace(iter=0, epoch=0), SimpleNamespace()
            for value in (1.0, 6e4 if dtype == torch.float16 else 3e38 if dtype != torch.bfloat16 else 1e38):
                guard.flag(torch.tensor(value, dtype=dtype, device=device))
            assert guard._found.item() == 0.0 and guard._gated.found_inf is guard._found
            guard.flag(torch.tensor([1.0, bad], dtype=dtype, device=device))  # non-scalar too
            guard.flag(torch.tensor(2.0, dtype=dtype, device=device))
            assert guard._found.item() == 1.0, (dtype, bad)


def test_gpu_runs_default_to_fused_torch_optimizers():
    """On a CUDA device the default (no fused/foreach chosen) is torch's fused step, the one
    whose found_inf gate lets NanGuardHook skip its per-step host read; elsewhere the config
    is left as written."""
    import types
    from scale_runner.optim import fused_on_gpu
    gpu = types.SimpleNamespace(device=torch.device('cuda'), distributed_type='MULTI_GPU')
    cpu = types.SimpleNamespace(device=torch.device('cpu'), distributed_type='NO')
    deepspeed = types.SimpleNamespace(device=torch.device('cuda'), distributed_type='DEEPSPEED')
    for kind in ('AdamW', 'torch.optim.SGD', torch.optim.Adam, 'Adagrad'):
        cfg = dict(optimizer=dict(type=kind, lr=1e-3))
        assert fused_on_gpu(cfg, gpu)['optimizer'] == dict(type=kind, lr=1e-3, fused=True)
        assert fused_on_gpu(cfg, cpu) is cfg and fused_on_gpu(cfg, deepspeed) is cfg
    for opt in (dict(type='AdamW', foreach=True), dict(type='AdamW', fused=False), dict(type='RMSprop'),
                dict(type='my_pkg.AdamW'), dict(type=torch.optim.RMSprop)):
        assert fused_on_gpu(dict(optimizer=opt), gpu) == dict(optimizer=opt)

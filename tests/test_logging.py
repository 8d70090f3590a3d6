"""LoggerHook / IterTimerHook / progress bar: console lines, scalars.jsonl, lazy imports."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import numpy as np
import torch
from torch import nn

from conftest import RegressionData

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'spiral_mlp.py')
NUM = r'-?\d+\.\d{4}(e[-+]\d\d)?'


def _records(runner) -> list[dict]:
    return [json.loads(x) for x in (runner.log_dir / 'scalars.jsonl').read_text().splitlines()]


def _log(runner) -> str:
    return (runner.log_dir / f'{runner.experiment_name}.log').read_text()


class LossRecorder:
    """Keeps every iteration's loss (a custom hook), to check the logged window means."""

    def __new__(cls):
        from scale_runner import Hook

        class _Rec(Hook):
            priority = 'HIGHEST'

            def __init__(self):
                self.losses = {}

            def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
                self.losses[runner.iter] = float(outputs['loss'])
        return _Rec()


def test_epoch_lines_windows_and_scalars_file(tmp_path, tiny_parts):
    from scale_runner import Runner
    rec = LossRecorder()
    runner = Runner(**tiny_parts(tmp_path, log_level='INFO', custom_hooks=[rec],
                                 default_hooks=dict(logger=dict(interval=3, ignore_last=False))))
    runner.train()
    runner.close()
    log = _log(runner)
    # MMEngine's shape: head, two spaces, lr, eta, time, data_time, throughput, loss
    line = re.compile(rf'Epoch\(train\) \[2\]\[3/8\]  lr: 5\.0000e-02  eta: \d+:\d\d:\d\d  '
                      rf'time: {NUM}  data_time: {NUM}  samples_per_s: \d+\.\d  loss: {NUM}$', re.M)
    assert line.search(log), log
    assert re.search(r'Epoch\(train\) \[1\]\[8/8\]  ', log)  # ignore_last=False: partial window
    assert re.search(rf'Epoch\(val\) \[2\]\[3/3\]  mse: {NUM}  .*time: {NUM}  data_time: {NUM}', log)
    assert log.count('Epoch(val) [2][3/3]') == 1
    assert 'memory' not in log  # CPU: no accelerator memory
    records = _records(runner)
    train = [r for r in records if 'loss' in r]
    assert [r['step'] for r in train] == [3, 6, 8, 11, 14, 16]
    assert all(r['step'] == r['iter'] for r in records)
    # window means: losses over the interval (the last window of an epoch is 2 iterations)
    windows = {3: [1, 2, 3], 6: [4, 5, 6], 8: [7, 8], 11: [9, 10, 11], 14: [12, 13, 14], 16: [15, 16]}
    for r in train:
        expect = sum(rec.losses[i] for i in windows[r['step']]) / len(windows[r['step']])
        assert r['loss'] == pytest.approx(expect, rel=1e-6)
        assert r['lr'] == pytest.approx(0.05)
        assert r['time'] > 0 and r['data_time'] >= 0 and r['samples_per_s'] > 0
        assert set(r) == {'step', 'epoch', 'iter', 'lr', 'time', 'data_time', 'samples_per_s', 'loss'}
    val = [r for r in records if 'val/mse' in r]
    assert [(r['step'], r['epoch']) for r in val] == [(8, 1), (16, 2)]
    for r in val:  # only val/ metrics: no train or timing keys mixed in
        assert all(k in ('step', 'epoch', 'iter') or k.startswith('val/') for k in r), r
    # the same numbers on the console and in the file
    last = re.findall(rf'Epoch\(train\) \[2\]\[8/8\].*loss: ({NUM})', log)[-1][0]
    assert float(last) == pytest.approx(train[-1]['loss'], abs=1e-4)


def test_iteration_lines_and_ignore_last(tmp_path, tiny_parts):
    from scale_runner import Runner
    runner = Runner(**tiny_parts(tmp_path, log_level='INFO', val_dataloader=None, val_cfg=None,
                                 val_evaluator=None, train_cfg=dict(by_epoch=False, max_iters=10),
                                 default_hooks=dict(logger=dict(interval=4))))
    runner.train()
    runner.close()
    log = _log(runner)
    assert re.search(rf'Iter\(train\) \[ 4/10\]  lr: 5\.0000e-02  eta: \d+:\d\d:\d\d  time: {NUM}', log), log
    assert 'Iter(train) [ 8/10]' in log and 'Iter(train) [10/10]' not in log  # ignore_last
    assert [r['step'] for r in _records(runner)] == [4, 8]


class TokenData(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        n = 3 + i % 4  # 3..6 real tokens, padded to 6
        ids = torch.arange(6) % 10
        return {'input_ids': ids, 'attention_mask': (torch.arange(6) < n).long()}


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10)

    def forward(self, input_ids, attention_mask):
        logits = self.out(self.emb(input_ids))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten(), reduction='none')
        return {'loss': (loss * attention_mask.flatten()).sum() / attention_mask.sum()}


def test_tokens_per_second_from_attention_mask(tmp_path):
    from scale_runner import Runner
    seen = []
    from scale_runner import Hook

    class Peek(Hook):
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.extend(runner.get_hook('IterTimerHook')._train.tokens)

    runner = Runner(model=TinyLM(), work_dir=str(tmp_path),
                    train_dataloader=dict(dataset=TokenData(), batch_size=4),
                    train_cfg=dict(by_epoch=False, max_iters=4),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                    default_hooks=dict(logger=dict(interval=2), checkpoint=None),
                    custom_hooks=[Peek()], randomness=dict(seed=0), log_level='WARNING')
    runner.train()
    # the token counts stay tensors in the timer's window (read only when a line is logged)
    assert seen and all(isinstance(v, torch.Tensor) for v in seen)
    assert isinstance(runner.log_buffer.current['loss'], torch.Tensor)
    records = _records(runner)
    assert [r['step'] for r in records] == [2, 4]
    for r in records:
        # 4 samples of 3..6 real tokens = 18 tokens per batch, over the same window time
        assert r['tokens_per_s'] / r['samples_per_s'] == pytest.approx(18 / 4, rel=1e-9)
        assert 'memory' not in r


def test_log_buffer_means_tensors_and_floats():
    from scale_runner.logs import LogBuffer
    buf = LogBuffer()
    for v in (1.0, 2.0, 4.0):
        buf.update('loss', torch.tensor(v))
        buf.update('time', v / 10)
    buf.update('time', 0.5, 'val')
    assert buf.means() == pytest.approx({'loss': 7 / 3, 'time': 0.7 / 3})
    assert buf.means('val') == pytest.approx({'time': 0.5})
    buf.clear_window()
    assert buf.means() == {} and buf.means('val') == pytest.approx({'time': 0.5})


def test_to_floats_reads_every_kind_of_value_as_its_mean():
    from scale_runner.logs import to_floats
    # one stack: 0-dim tensors, and same-shape tensors (their means)
    ints = torch.tensor(2, dtype=torch.int64)
    assert to_floats([torch.tensor(1.0), ints, torch.tensor(True)]) == [1.0, 2.0, 1.0]
    assert to_floats([torch.tensor([1.0, 3.0]), torch.tensor([[2.0, 6.0]]).squeeze(0)]) == [2.0, 4.0]
    assert to_floats([torch.tensor(2.0, requires_grad=True) * 2]) == [4.0]
    # mixed: numbers, numpy values, tensors of other shapes
    mixed = [1, 2.5, torch.tensor(3.0), torch.tensor([1.0, 3.0]), np.float32(4), torch.tensor([[5.0]])]
    assert to_floats(mixed) == [1.0, 2.5, 3.0, 2.0, 4.0, 5.0]
    assert to_floats([]) == [] and to_floats([0.5]) == [0.5]


def test_a_long_log_window_holds_floats_not_every_tensor():
    """A window of 1000 iterations (logger interval 1000) pins at most PENDING loss tensors:
    the rest were read as floats, with the same means."""
    import weakref
    from scale_runner.logs import PENDING, LogBuffer
    buf, refs = LogBuffer(), []
    for i in range(1000):
        loss = torch.tensor(float(i))
        refs.append(weakref.ref(loss))
        buf.update_dict({'loss': loss, 'acc': torch.tensor(1.0)})
        del loss
    alive = sum(r() is not None for r in refs)
    assert 0 < alive <= PENDING  # the window's unread rest (and `current`) only
    assert buf.means() == pytest.approx({'loss': 999 / 2, 'acc': 1.0})


def test_imports_stay_lazy():
    code = textwrap.dedent('''
        import sys
        HEAVY = ('wandb', 'tensorboard', 'tensorboardX', 'matplotlib', 'rich', 'tqdm', 'mlflow')
        def loaded():
            return sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))
        import scale_runner
        print('PKG', loaded())
        import torch, accelerate, accelerate.tracking
        base = loaded()  # what torch/accelerate import by themselves (torch.hub imports tqdm)
        from scale_runner import Runner
        import scale_runner.runner, scale_runner.hooks, scale_runner.cli, scale_runner.trackers
        import scale_runner.plot, scale_runner.progress, scale_runner.logs
        print('RUNNER', sorted(set(loaded()) - set(base)))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'PKG []' in proc.stdout, proc.stdout
    assert 'RUNNER []' in proc.stdout, proc.stdout


# ---- progress bar: a real terminal (pty) against CI -------------------------------------------
def _start_in_pty(work_dir: Path, extra_env: dict):
    """Start a CLI training run with a pseudo-terminal as stdout; return (process, pty fd)."""
    import pty
    env = dict(os.environ, TERM='xterm-256color', COLUMNS='120')
    env.pop('CI', None)
    env.update(extra_env)
    master, slave = pty.openpty()
    cmd = [sys.executable, '-m', 'scale_runner', 'train', CONFIG, '--work-dir', str(work_dir),
           '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
           'train_dataloader.dataset.size=512', 'val_dataloader.dataset.size=128',
           'train_dataloader.batch_size=16', 'default_hooks.logger.interval=8',
           'default_hooks.checkpoint=None']
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    return proc, master


def _read_all(procs: dict) -> dict:
    """Read every pty until its process closes it (concurrently: the runs overlap)."""
    import select
    out = {name: [] for name in procs}
    open_fds = {fd: name for name, (_, fd) in procs.items()}
    while open_fds:
        ready, _, _ = select.select(list(open_fds), [], [], 120)
        if not ready:
            break
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b''
            if data:
                out[open_fds[fd]].append(data)
            else:
                os.close(fd)
                del open_fds[fd]
    for fd in open_fds:
        os.close(fd)
    text = {name: b''.join(chunks).decode(errors='replace') for name, chunks in out.items()}
    for name, (proc, _) in procs.items():
        if proc.poll() is None:
            proc.kill()
        assert proc.wait(60) == 0, text[name][-3000:]
    return text


def test_progress_bar_on_terminal_and_not_under_ci(tmp_path):
    out = _read_all({'tty': _start_in_pty(tmp_path / 'tty', {}),
                     'ci': _start_in_pty(tmp_path / 'ci', {'CI': 'true'})})
    tty, ci = out['tty'], out['ci']
    assert '━' in tty and 'train 1/1' in tty, tty[-2000:]  # rich's bar, the train task
    assert 'Epoch(train) [1][' in tty  # log lines are still printed (above the bar)
    assert 'Epoch(train) [1][32/32]' in ci and 'Epoch(val) [1]' in ci
    assert '━' not in ci and 'train 1/1' not in ci and '\x1b[?25l' not in ci, ci[-2000:]


class SlowData(RegressionData):
    """RegressionData whose reads sleep ``delay`` seconds each (data time)."""

    def __init__(self, n: int, delay: float):
        super().__init__(n)
        self.delay = delay

    def __getitem__(self, i):
        import time
        time.sleep(self.delay)
        return super().__getitem__(i)


def test_timer_windows_exclude_validation_and_count_samples(tmp_path, tiny_parts):
    """time = data + compute per iteration; a 0.5 s validation between two windows is charged
    to neither; samples_per_s = the window's samples / the window's time."""
    from conftest import PlainRegressor
    from scale_runner import Hook, Runner

    class SlowRegressor(PlainRegressor):
        def forward(self, x, y=None):
            import time
            if self.training:
                time.sleep(0.03)
            return super().forward(x, y)

    class SlowVal(Hook):
        def after_val_epoch(self, runner, metrics=None):
            import time
            time.sleep(0.5)

    runner = Runner(**tiny_parts(tmp_path, model=SlowRegressor(),
                                 train_dataloader=dict(dataset=SlowData(8, 0.01), batch_size=2),
                                 train_cfg=dict(by_epoch=False, max_iters=6, val_interval=2),
                                 default_hooks=dict(logger=dict(interval=2), checkpoint=None),
                                 custom_hooks=[SlowVal()]))
    runner.train()
    records = [r for r in _records(runner) if 'time' in r and 'val/mse' not in r]
    assert [r['step'] for r in records] == [2, 4, 6]
    for r in records:
        # data: 2 reads x 0.01 s; the iteration adds a 0.03 s forward; validation takes 0.5 s
        assert 0.02 <= r['data_time'] < 0.2, r
        assert 0.05 <= r['time'] < 0.3 and r['time'] > r['data_time'], r
        assert r['samples_per_s'] == pytest.approx(2 / r['time'], rel=1e-9)


def test_timer_window_resume_and_clear():
    from scale_runner.hooks.iter_timer_hook import _Window
    w = _Window(10.0)
    w.ready += [11.0]; w.ends += [13.0]; w.samples += [4]  # data 1, time 3
    w.resume(20.0)                                       # left the loop (validation) until 20
    w.ready += [20.5]; w.ends += [21.0]; w.samples += [4]  # data 0.5, time 1
    assert w.means(procs=2) == pytest.approx({'time': 2.0, 'data_time': 0.75,
                                              'samples_per_s': 8 * 2 / 4.0})
    w.ready += [21.5]  # the next batch is ready, its iteration not finished
    w.clear()
    assert w.means(1) == {} and w.ready == [21.5] and w.start == 21.0
    w.ends += [22.0]; w.samples += [1]
    assert w.means(1) == pytest.approx({'time': 1.0, 'data_time': 0.5, 'samples_per_s': 1.0})
    w.clear()
    w.ready += [22.5]; w.ends += [23.0]; w.samples += [0]  # a batch without a first dimension
    assert w.means(1) == pytest.approx({'time': 1.0, 'data_time': 0.5})


@pytest.mark.parametrize('extra', [{'acc "top-1"/é': 0.5}, {'epoch': 7.0}])
def test_scalars_lines_are_what_json_dumps_writes(tmp_path, extra):
    """scalars.jsonl is written without json.dumps on the common path (it is cheaper per
    line); any key still comes out as json.dumps writes it, and a value named like a position
    field replaces it, as in a dict."""
    import types
    from scale_runner.hooks import LoggerHook
    hook = LoggerHook()
    lines = []
    hook._file = types.SimpleNamespace(write=lines.append)
    hook._flushed = float('inf')
    hook._trackers = types.SimpleNamespace(log=lambda *a: None)
    runner = types.SimpleNamespace(iter=12, epoch=1)
    values = {'lr': 1e-3, 'time': 0.1 + 0.2, 'memory': 123.0, 'loss': torch.tensor(2.5),
              'nan': float('nan'), 'text': 'skipped', **extra}
    hook._emit(runner, values)
    expected = {'step': 12, 'epoch': 1, 'iter': 12, 'lr': 1e-3, 'time': 0.1 + 0.2, 'memory': 123,
                'loss': 2.5, **extra}
    assert lines == [json.dumps(expected) + '\n']

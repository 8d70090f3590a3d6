"""tests/test_resume.py's parts (and test_preemption.py's): a deterministic dataset, a dropout
MLP, and hooks that kill or signal the process at chosen points (``SR_KILL``, ``SR_SIGNAL``).
Configs import it through ``custom_imports``, here and in the subprocesses the tests start."""

import os
import signal

import torch
from torch import nn

from scale_runner.hooks.hook import Hook
from scale_runner.registry import DATASETS, HOOKS, MODELS
from sr_metrics import MSE  # re-exported: importing this module registers the configs' 'MSE'

__all__ = ['ResumeData', 'DropoutNet', 'MSE', 'KillHook', 'LateKillHook', 'SignalHook']


@DATASETS.register_module(force=True)
class ResumeData(torch.utils.data.Dataset):
    """Deterministic regression samples; records every index read in ``reads``."""

    def __init__(self, size=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(size, 1, generator=g)
        self.reads = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(int(i))
        return {'x': self.x[i], 'y': self.y[i]}


@MODELS.register_module(force=True)
class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, y=None):
        pred = self.net(x)
        out = {'pred': pred}
        if y is not None:
            out['loss'] = nn.functional.mse_loss(pred, y)
        return out


@HOOKS.register_module(force=True)
class KillHook(Hook):
    """SR_KILL='point:n': SIGKILL this process there. HIGHEST priority, so 'iter:n' kills
    before CheckpointHook saves iteration n; 'val:n' kills in the validation after iteration n."""

    priority = 'HIGHEST'

    def __init__(self):
        spec = os.environ.get('SR_KILL', '')
        self.points = dict(p.split(':') for p in spec.split(',') if p)

    def _kill(self, point, n):
        if self.points.get(point) == str(n):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._kill('iter', runner.iter)

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._kill('val', runner.iter)


@HOOKS.register_module(force=True)
class LateKillHook(KillHook):
    """LOWEST priority: 'after_save:n' kills right after CheckpointHook saved iteration n,
    'epoch:e' right after epoch e ended (its checkpoint, if any, written)."""

    priority = 'LOWEST'

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._kill('after_save', runner.iter)

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        pass

    def after_train_epoch(self, runner):
        self._kill('epoch', runner.epoch)


@HOOKS.register_module(force=True)
class SignalHook(Hook):
    """SR_SIGNAL='NAME:n[:rank]': send signal NAME to this process after iteration n (only on
    that rank if given); SR_SIGNAL_IN_SAVE='NAME,...': send those while a checkpoint is saved;
    SR_SIGNAL_IN_VAL='NAME:n': send NAME at the first batch of the validation after iteration n
    (and record every validation batch seen after it in $SR_VAL_SEEN)."""

    priority = 'HIGHEST'

    def __init__(self):
        spec = os.environ.get('SR_SIGNAL', '')
        self.spec = spec.split(':') if spec else None
        self.in_save = os.environ.get('SR_SIGNAL_IN_SAVE')
        spec = os.environ.get('SR_SIGNAL_IN_VAL', '')
        self.in_val = spec.split(':') if spec else None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if (self.spec and runner.iter == int(self.spec[1])
                and (len(self.spec) < 3 or int(self.spec[2]) == runner.accelerator.process_index)):
            os.kill(os.getpid(), getattr(signal, self.spec[0]))

    def before_save_checkpoint(self, runner, checkpoint):
        if self.in_save and self.spec and runner.iter >= int(self.spec[1]):
            for name in self.in_save.split(','):
                os.kill(os.getpid(), getattr(signal, name))

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.in_val and runner.iter == int(self.in_val[1]):
            with open(os.environ['SR_VAL_SEEN'], 'a') as f:
                f.write(f'{batch_idx}\n')
            if batch_idx == 0:
                os.kill(os.getpid(), getattr(signal, self.in_val[0]))

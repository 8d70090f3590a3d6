"""tests/test_fault_tolerance.py's parts: a hook that makes one rank fail in a chosen way.

``SR_FAULT='kind:rank:iter[:arg]'`` (several separated by ``,``), only in the launcher's first
attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restarted job runs clean:

- ``kill``: SIGKILL the process after iteration ``iter`` (before it is checkpointed);
- ``hang``: sleep forever before iteration ``iter + 1`` (user code that never returns);
- ``slow``: sleep ``arg`` seconds in every forward pass from iteration ``iter`` on (a straggler);
- ``collective``: enter an all-reduce after iteration ``iter`` that the other ranks never enter.
"""

import os
import signal
import time

from scale_runner.hooks.hook import Hook
from scale_runner.registry import HOOKS


@HOOKS.register_module(force=True)
class FaultHook(Hook):
    priority = 'HIGHEST'

    def __init__(self):
        first = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
        spec = os.environ.get('SR_FAULT', '') if first else ''
        self.faults = [f.split(':') for f in spec.split(',') if f]

    def _mine(self, runner, kind):
        rank = runner.accelerator.process_index
        return [f for f in self.faults if f[0] == kind and int(f[1]) == rank]

    def before_train(self, runner):
        for f in self._mine(runner, 'slow'):
            start, delay = int(f[2]), float(f[3])

            def pre_forward(module, args, kwargs, start=start, delay=delay):
                if runner.iter >= start:
                    time.sleep(delay)
            from scale_runner.model import unwrap
            unwrap(runner.model).register_forward_pre_hook(pre_forward, with_kwargs=True)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        for f in self._mine(runner, 'kill'):
            if runner.iter == int(f[2]):
                os.kill(os.getpid(), signal.SIGKILL)
        for f in self._mine(runner, 'collective'):
            if runner.iter == int(f[2]):
                import torch
                import torch.distributed as dist
                dist.all_reduce(torch.ones(3))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        for f in self._mine(runner, 'hang'):
            if runner.iter == int(f[2]):
                while True:
                    time.sleep(3600)

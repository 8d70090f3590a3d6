"""tests/test_state_protocol.py's hooks: a user hook whose only checkpoint code is
``state_dict`` / ``load_state_dict`` (``StatefulProbe``), and an MMEngine-style hook that adds a
key of its own to the checkpoint and reads it back (``ExtraKeyHook``)."""

import copy

import torch

from scale_runner.hooks.hook import Hook
from scale_runner.registry import HOOKS

__all__ = ['ExtraKeyHook', 'StatefulProbe']


@HOOKS.register_module(force=True)
class StatefulProbe(Hook):
    """Accumulates state every training iteration, of every kind a checkpoint stores: str,
    int (beyond 2**53), float (not exactly representable in fewer digits), bool, None, nested
    lists, a dict with int keys, and float64 / int64 tensors drawn from a generator of its own.
    ``loaded`` is a deep copy of what ``load_state_dict`` received (None: it was not called)."""

    def __init__(self, tag='a', step=1, extra=None):
        self.tag = tag
        self.extra = extra  # more state of the user's choosing, saved as given
        self.step = step
        self.seen = 0
        self.history = []                       # floats, one per iteration
        self.per_epoch = {}                     # int keys
        self.acc = torch.zeros(3, dtype=torch.float64)
        self.counts = torch.zeros(2, 2, dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(1234 + step)
        self.loaded = None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.seen += self.step
        self.history.append(runner.iter / 7 + self.step)
        self.per_epoch[runner.epoch] = self.per_epoch.get(runner.epoch, 0) + self.step
        self.acc += torch.randn(3, dtype=torch.float64, generator=self.gen)
        self.counts[runner.iter % 2, batch_idx % 2] += self.step

    def state_dict(self):
        return {'tag': self.tag, 'seen': self.seen, 'big': 2**62 + self.seen, 'third': 1 / 3,
                'flag': self.seen % 2 == 0, 'nothing': None, 'history': list(self.history),
                'nested': [[self.seen, 'x'], {'deep': [self.step, 0.1]}],
                'per_epoch': dict(self.per_epoch), 'acc': self.acc.clone(),
                'counts': self.counts.clone(), 'gen': self.gen.get_state(),
                **({'extra': self.extra} if self.extra is not None else {})}

    def load_state_dict(self, state):
        self.loaded = copy.deepcopy(state)
        self.tag = state['tag']
        self.seen = state['seen']
        self.history = list(state['history'])
        self.per_epoch = dict(state['per_epoch'])
        self.acc = state['acc'].clone()
        self.counts = state['counts'].clone()
        self.gen.set_state(state['gen'].clone())
        self.extra = state.get('extra')


@HOOKS.register_module(force=True)
class ExtraKeyHook(Hook):
    """MMEngine style: ``before_save_checkpoint`` adds ``checkpoint['my_extra']``;
    ``after_load_checkpoint`` records what the resumed checkpoint holds under that key."""

    def __init__(self):
        self.added = None
        self.got = 'not called'

    def before_save_checkpoint(self, runner, checkpoint):
        self.added = {'note': 'hello', 'iter': runner.iter, 'scores': [0.5, 1 / 3],
                      'vec': torch.arange(4, dtype=torch.float32) * runner.iter}
        checkpoint['my_extra'] = copy.deepcopy(self.added)

    def after_load_checkpoint(self, runner, checkpoint):
        self.got = copy.deepcopy(checkpoint.get('my_extra'))

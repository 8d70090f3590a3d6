"""Hooks: priorities, default/custom hook merging, dispatch, misspelt and custom points."""
from __future__ import annotations

import pytest
from conftest import RegressionData

from scale_runner import ConfigError, Runner
from scale_runner.hooks import (CheckpointHook, DistSamplerSeedHook, Hook, IterTimerHook, LoggerHook,
                                NanGuardHook, ParamSchedulerHook, RuntimeInfoHook, get_priority)
from scale_runner.registry import HOOKS


@HOOKS.register_module(force=True)
class TagHook(Hook):
    def __init__(self, tag='x'):
        self.tag = tag

    def before_train(self, runner):
        pass


def _names(runner):
    return [(type(h).__name__, getattr(h, 'tag', None), h.priority) for h in runner.hooks]


def test_get_priority_names_and_ints():
    assert get_priority('HIGHEST') == 0 and get_priority('very_high') == 10
    assert get_priority('NORMAL') == 50 and get_priority('LOW') == 70
    assert get_priority('LOWEST') == 100 and get_priority(33) == 33
    with pytest.raises(ConfigError, match='NORMAL'):
        get_priority('NORMAAL')
    with pytest.raises(ConfigError, match='0..100'):
        get_priority(101)
    with pytest.raises(ConfigError):
        get_priority(True)
    with pytest.raises(ConfigError):
        get_priority(None)


def test_priority_order_is_stable_among_equals(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path))
    runner.register_hook(TagHook('a'), 'LOW')
    runner.register_hook(TagHook('b'), 10)
    runner.register_hook(TagHook('c'), 70)
    runner.register_hook(TagHook('d'))            # class default NORMAL
    runner.register_hook(dict(type='TagHook', tag='e', priority='VERY_HIGH'))
    runner.register_hook(TagHook('f'), 'HIGHEST')
    runner.register_hook(TagHook('g'), 'NORMAL')
    assert [(h.tag, h.priority) for h in runner.hooks] == [
        ('f', 0), ('b', 10), ('e', 10), ('d', 50), ('g', 50), ('a', 70), ('c', 70)]


def test_default_and_custom_hooks_from_config(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(
        tmp_path,
        default_hooks=dict(logger=dict(interval=3), checkpoint=None,
                           timer=dict(type='TagHook', tag='timer')),
        custom_hooks=[dict(type='TagHook', tag='low', priority='LOW'),
                      dict(type='TagHook', tag='first', priority=0),
                      TagHook('normal')]))
    runner.register_hooks(runner._default_hooks_cfg, runner._custom_hooks_cfg)
    assert _names(runner) == [
        ('TagHook', 'first', 0), ('RuntimeInfoHook', None, 10), ('NanGuardHook', None, 10),
        ('TagHook', 'timer', 50),
        ('DistSamplerSeedHook', None, 50),
        ('TagHook', 'normal', 50),
        ('LoggerHook', None, 60), ('ParamSchedulerHook', None, 70), ('TagHook', 'low', 70)]
    assert runner.get_hook('LoggerHook').interval == 3
    assert runner.get_hook('CheckpointHook') is None
    info = runner.get_hooks_info()
    assert 'before_train:' in info and 'LOW' in info and 'TagHook' in info


def test_default_hooks_are_the_standard_ones(tmp_path, tiny_parts):
    with Runner(**tiny_parts(tmp_path)) as runner:
        runner.train()
        kinds = [type(h) for h in runner.hooks]
        assert kinds == [RuntimeInfoHook, NanGuardHook, IterTimerHook, DistSamplerSeedHook,
                         LoggerHook, ParamSchedulerHook, CheckpointHook]
        assert [h.priority for h in runner.hooks] == [10, 10, 50, 50, 60, 70, 90]


def test_invalid_priority_in_config(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[dict(type='TagHook', priority='MEDIUM')]))
    with pytest.raises(ConfigError, match='MEDIUM'):
        runner.train()
    runner = Runner(**tiny_parts(tmp_path))
    with pytest.raises(ConfigError, match='LOWEST'):
        runner.register_hook(TagHook(), 'LOWER')


def test_default_hook_without_type_unknown_name(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path, default_hooks=dict(visualizer=dict(interval=1))))
    with pytest.raises(ConfigError, match='visualizer'):
        runner.register_hooks(runner._default_hooks_cfg, None)


class OnlyRunPoints(Hook):
    def __init__(self):
        self.calls = []

    def before_run(self, runner):
        self.calls.append('before_run')

    def after_run(self, runner):
        self.calls.append('after_run')


class IterPoint(Hook):
    def __init__(self):
        self.n = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.n += 1


def _hooks_in_cache(runner, point):
    """The hooks dispatched at ``point``: by ``call_hook`` (keyed by name) or, per iteration, by
    ``hook_calls`` (keyed by ``(name, argument names)``)."""
    key = next(k for k in runner._hook_cache if k == point or (isinstance(k, tuple) and k[0] == point))
    return [getattr(fn, 'func', fn).__self__ for fn in runner._hook_cache[key]]


def test_dispatch_only_to_overriding_hooks(tmp_path, tiny_parts):
    quiet, it = OnlyRunPoints(), IterPoint()
    with Runner(**tiny_parts(tmp_path, custom_hooks=[quiet, it])) as runner:
        runner.train()
        assert it.n == runner.iter == 16
        assert quiet.calls == ['before_run', 'after_run']
        in_iter = _hooks_in_cache(runner, 'after_train_iter')
        assert it in in_iter and quiet not in in_iter
        assert quiet not in _hooks_in_cache(runner, 'before_train_iter')
        # IterTimerHook has no after_train_epoch, CheckpointHook has.
        in_epoch = [type(h) for h in _hooks_in_cache(runner, 'after_train_epoch')]
        assert (CheckpointHook in in_epoch and IterTimerHook not in in_epoch
                and IterPoint not in in_epoch)
        assert quiet in _hooks_in_cache(runner, 'before_run')


class Misspelt(Hook):
    def after_train_iters(self, runner, batch_idx, data_batch=None, outputs=None):
        pass


class MisspeltVal(Hook):
    def befor_val_epoch(self, runner):
        pass


def test_misspelt_point_is_an_error_at_registration(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path))
    with pytest.raises(ConfigError, match="'after_train_iter'"):
        runner.register_hook(Misspelt())
    with pytest.raises(ConfigError, match="'before_val_epoch'"):
        runner.register_hook(MisspeltVal())
    assert runner.hooks == []
    # Also through custom_hooks in the config: fails when train() registers the hooks.
    HOOKS.register_module(name='MisspeltHook', force=True, module=Misspelt)
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[dict(type='MisspeltHook')]))
    with pytest.raises(ConfigError, match="'after_train_iter'"):
        runner.train()


def test_declared_custom_point_close_to_a_standard_name(tmp_path, tiny_parts):
    class Declared(Misspelt):
        custom_points = ('after_train_iters',)

    runner = Runner(**tiny_parts(tmp_path))
    runner.register_hook(Declared())
    assert len(runner.hooks) == 1


def test_custom_points(tmp_path, tiny_parts):
    calls = []

    class WithRunner(Hook):
        def before_my_point(self, runner, batch_idx):
            calls.append(('with_runner', runner is rn, batch_idx))

    class WithoutRunner(Hook):
        priority = 'HIGH'

        def before_my_point(self, batch_idx):
            calls.append(('without_runner', batch_idx))

    class Neither(Hook):
        def before_train(self, runner):
            calls.append('wrong')

    rn = Runner(**tiny_parts(tmp_path, default_hooks=dict(logger=None, timer=None,
                                                          param_scheduler=None, checkpoint=None)))
    for h in (WithRunner(), WithoutRunner(), Neither()):
        rn.register_hook(h)
    rn.call_hooks('before_my_point', batch_idx=1)
    rn.call_hook('before_my_point', batch_idx=2)
    rn.call_hooks('a_point_nobody_has')
    assert calls == [('without_runner', 1), ('with_runner', True, 1),
                     ('without_runner', 2), ('with_runner', True, 2)]


def test_hook_helpers_count_completed_work(tmp_path, tiny_parts):
    seen = []

    class Helpers(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.append(('iter', runner.iter, self.every_n_train_iters(runner, 3),
                         self.is_last_train_iter(runner),
                         self.end_of_epoch(runner.train_loop.dataloader, batch_idx),
                         self.every_n_inner_iters(batch_idx, 2)))

        def after_train_epoch(self, runner):
            seen.append(('epoch', runner.epoch, self.every_n_epochs(runner, 2),
                         self.is_last_train_epoch(runner)))

    parts = tiny_parts(tmp_path, custom_hooks=[Helpers()],
                       train_dataloader=dict(dataset=RegressionData(8), batch_size=4),
                       train_cfg=dict(by_epoch=True, max_epochs=3))
    with Runner(**parts) as runner:
        runner.train()
    assert seen == [
        ('iter', 1, False, False, False, False), ('iter', 2, False, False, True, True),
        ('epoch', 1, False, False),
        ('iter', 3, True, False, False, False), ('iter', 4, False, False, True, True),
        ('epoch', 2, True, False),
        ('iter', 5, False, False, False, False), ('iter', 6, True, True, True, True),
        ('epoch', 3, False, True)]


def test_hook_helpers_edge_cases(tmp_path, tiny_parts):
    """start offsets, n <= 0, and the helpers on an iteration-based loop (max_epochs is None)."""
    seen = []

    class Helpers(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.append((runner.iter, self.every_n_train_iters(runner, 2, start=1),
                         self.every_n_train_iters(runner, 0), self.every_n_inner_iters(batch_idx, 0),
                         self.is_last_train_iter(runner), self.is_last_train_epoch(runner)))

        def after_train_epoch(self, runner):
            seen.append(('epoch', self.every_n_epochs(runner, 1, start=1), self.every_n_epochs(runner, -1)))

    parts = tiny_parts(tmp_path, custom_hooks=[Helpers()], val_cfg=None, val_dataloader=None,
                       val_evaluator=None, train_dataloader=dict(dataset=RegressionData(8), batch_size=4),
                       train_cfg=dict(by_epoch=False, max_iters=4))
    with Runner(**parts) as runner:
        runner.train()
    # iter 1 is `start`: nothing done since; iter 3 is 2 after it
    assert seen == [(1, False, False, False, False, False), (2, False, False, False, False, False),
                    (3, True, False, False, False, False), (4, False, False, False, True, False),
                    ('epoch', False, False)]


class KwargsOnly(Hook):
    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, **kwargs):
        self.seen.append(('before', kwargs['batch_idx'], sorted(kwargs)))

    def after_train_iter(self, runner, data_batch=None, outputs=None, batch_idx=None):  # other order
        self.seen.append(('after', batch_idx, isinstance(outputs, dict)))


def test_iteration_points_reach_hooks_of_any_signature(tmp_path, tiny_parts):
    """The per-iteration points are called positionally where the signature is the standard one
    and by keyword otherwise: a hook taking **kwargs or another order gets the right values."""
    odd, std = KwargsOnly(), IterPoint()
    with Runner(**tiny_parts(tmp_path, custom_hooks=[odd, std])) as runner:
        runner.train()
    befores = [s for s in odd.seen if s[0] == 'before']
    afters = [s for s in odd.seen if s[0] == 'after']
    assert std.n == len(afters) == len(befores) == 16
    assert befores[0] == ('before', 0, ['batch_idx', 'data_batch'])
    assert [s[1] for s in afters][:3] == [0, 1, 2] and all(s[2] for s in afters)

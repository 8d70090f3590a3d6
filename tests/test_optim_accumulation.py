"""Gradient accumulation has one source of truth (issue 16): the window is read from the train
state, and "this iteration stepped the optimizer" is published once, as ``state.stepped``."""
from __future__ import annotations

import pytest
import torch
from conftest import PlainRegressor, RegressionData

from scale_runner import OptimWrapper, Runner, TrainState
from scale_runner.hooks import Hook
from scale_runner.optim import updates_per_epoch

NO_HOOKS = dict(logger=None, timer=None, checkpoint=None)


def _standalone(counts: int, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    wrapper = OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1), accumulative_counts=counts,
                           **kwargs)
    wrapper.bind(None, model)
    return model, wrapper


def test_a_wrapper_without_a_runner_counts_its_own_window():
    """MMEngine's use of the wrapper alone: initialize_count_status sets where the window starts
    and where the run ends; update_params counts the micro-batches (on the wrapper's own state)."""
    model, wrapper = _standalone(3)
    wrapper.initialize_count_status(model, 0, 7)
    seen_by_backward = []
    model.weight.register_hook(lambda g: seen_by_backward.append(g.clone()))
    stepped, updates = [], []
    x = torch.ones(1, 3)
    for _ in range(7):
        wrapper.update_params(model(x).sum())
        stepped.append(wrapper.train_state.stepped)
        updates.append(wrapper.update_count)
    assert stepped == [False, False, True, False, False, True, True]
    assert updates == [0, 0, 1, 1, 1, 2, 3] and wrapper.train_state.iter == 7
    # a full window's micro-batches weigh 1/3, the last (one micro-batch) window's 1
    assert [round(float(g.sum()), 4) for g in seen_by_backward] == [1.0] * 6 + [3.0]
    # resuming at micro-batch 4: the window ends after 2 more, as it would have
    wrapper.initialize_count_status(model, 4, 7)
    assert not wrapper.should_update()
    wrapper.update_params(model(x).sum())
    assert wrapper.should_update()


def test_a_runners_wrapper_reads_the_runners_state(tmp_path):
    data = RegressionData(20, seed=3)
    stepped, windows = [], []

    class Watch(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            windows.append(runner.optim_wrapper.should_update())

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            stepped.append(runner.state.stepped)

    with Runner(model=PlainRegressor(), work_dir=str(tmp_path), log_level='WARNING',
                train_dataloader=dict(dataset=data, batch_size=2,
                                      sampler=dict(type='DefaultSampler', shuffle=False)),
                train_cfg=dict(by_epoch=True, max_epochs=1),
                optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1), accumulative_counts=4),
                default_hooks=NO_HOOKS, custom_hooks=[Watch()]) as runner:
        runner.train()
        wrapper = runner.optim_wrapper
        assert wrapper.train_state is runner.state  # one state: no second count of the window
        expected = [False, False, False, True, False, False, False, True, False, True]
        assert stepped == expected and windows == expected
        assert wrapper.update_count == 3
        # MMEngine's initialize_count_status agrees with the state, or says what disagrees
        wrapper.initialize_count_status(runner.model, runner.state.iter, runner.state.max_iters)
        with pytest.raises(ValueError, match='iter=10, max_iters=10'):
            wrapper.initialize_count_status(runner.model, 3, 10)


def test_a_train_step_that_does_not_update_leaves_stepped_false(tmp_path):
    """The loop clears ``stepped`` before every step: a train_step that skips update_params on
    some iterations does not step the schedulers there."""
    lrs = []

    class SkipsOdd(PlainRegressor):
        def train_step(self, data, optim_wrapper):
            from scale_runner.model import parse_losses
            loss, log_vars = parse_losses(self(**data))
            if len(lrs) % 2 == 0:
                optim_wrapper.update_params(loss)
            return log_vars

    class Lr(Hook):
        priority = 'LOWEST'

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            lrs.append((runner.state.stepped, runner.optim_wrapper.get_lr()['lr'][0]))

    with Runner(model=SkipsOdd(), work_dir=str(tmp_path), log_level='WARNING',
                train_dataloader=dict(dataset=RegressionData(12), batch_size=2),
                train_cfg=dict(by_epoch=False, max_iters=6),
                optim_wrapper=dict(optimizer=dict(type='SGD', lr=1.0)),
                param_scheduler=dict(type='StepLR', step_size=1, gamma=0.5, by_epoch=False),
                default_hooks=dict(logger=None, timer=None, checkpoint=None),
                custom_hooks=[Lr()]) as runner:
        runner.train()
    assert lrs == [(True, 0.5), (False, 0.5), (True, 0.25), (False, 0.25), (True, 0.125),
                   (False, 0.125)]


def test_train_state_checkpoint_fields_are_unchanged():
    """``stepped`` describes one iteration: checkpoints hold the same counters as before, and
    an old checkpoint's train state loads."""
    state = TrainState(epoch=1, iter=7, inner_iter=3, max_epochs=2, max_iters=8)
    state.stepped = True
    assert state.state_dict() == {'epoch': 1, 'iter': 7, 'inner_iter': 3, 'max_epochs': 2,
                                  'max_iters': 8}
    fresh = TrainState()
    fresh.load_state_dict({'epoch': 1, 'iter': 7, 'inner_iter': 3, 'max_epochs': 2, 'max_iters': 8})
    assert (fresh.epoch, fresh.iter, fresh.inner_iter, fresh.stepped) == (1, 7, 3, False)


@pytest.mark.parametrize('iters, counts, expected', [(10, 1, 10), (10, 4, 3), (8, 4, 2), (None, 2, None)])
def test_updates_per_epoch(iters, counts, expected):
    assert updates_per_epoch(OptimWrapper(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1),
                                          accumulative_counts=counts), iters) == expected

"""Loops: exact hook call sequences, the seed document's custom loop, early stop."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import PlainRegressor, RegressionData
from sr_metrics import MSE

from scale_runner import Runner
from scale_runner.hooks import STAGES, Hook
from scale_runner.registry import DATASETS, HOOKS, LOOPS, METRICS
from scale_runner.loops import BaseLoop, IterBasedTrainLoop


class Recorder(Hook):
    """Implements every standard point; records (point, epoch, iter, batch_idx)."""

    def __init__(self):
        self.calls = []


def _make_point(point):
    def method(self, runner, batch_idx=None, data_batch=None, outputs=None, metrics=None,
               checkpoint=None):
        self.calls.append((point, runner.epoch, runner.iter, batch_idx))
    method.__name__ = point
    return method


for _point in STAGES:
    setattr(Recorder, _point, _make_point(_point))


def _parts(tiny_parts, tmp_path, **over):
    parts = tiny_parts(
        tmp_path,
        train_dataloader=dict(dataset=RegressionData(8), batch_size=4,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        val_dataloader=dict(dataset=RegressionData(4, seed=1), batch_size=4),
    )
    parts.update(over)
    return parts


def _val(epoch, it):
    return [('before_val', epoch, it, None), ('before_val_epoch', epoch, it, None),
            ('before_val_iter', epoch, it, 0), ('after_val_iter', epoch, it, 0),
            ('after_val_epoch', epoch, it, None), ('after_val', epoch, it, None)]


def test_epoch_based_hook_sequence(tmp_path, tiny_parts):
    rec = Recorder()
    with Runner(**_parts(
            tiny_parts, tmp_path,
            train_cfg=dict(by_epoch=True, max_epochs=5, val_interval=2),
            default_hooks=dict(checkpoint=dict(interval=2)),
            custom_hooks=[rec])) as runner:
        runner.train()
        expected = [('before_run', 0, 0, None), ('before_train', 0, 0, None)]
        for e in range(5):
            it = 2 * e
            expected += [('before_train_epoch', e, it, None),
                         ('before_train_iter', e, it, 0), ('after_train_iter', e, it + 1, 0),
                         ('before_train_iter', e, it + 1, 1), ('after_train_iter', e, it + 2, 1),
                         ('after_train_epoch', e + 1, it + 2, None)]
            if e + 1 in (2, 4, 5):
                expected += [('before_save_checkpoint', e + 1, it + 2, None)]
                expected += _val(e + 1, it + 2)
        expected += [('after_train', 5, 10, None), ('after_run', 5, 10, None)]
        assert rec.calls == expected
        assert sorted(p.name for p in runner.checkpoint_dir.iterdir() if p.is_dir()) == [
            'epoch_2', 'epoch_4', 'epoch_5']


def test_iter_based_hook_sequence(tmp_path, tiny_parts):
    rec = Recorder()
    with Runner(**_parts(
            tiny_parts, tmp_path,
            train_dataloader=dict(dataset=RegressionData(6), batch_size=2,
                                  sampler=dict(type='DefaultSampler', shuffle=True)),
            train_cfg=dict(by_epoch=False, max_iters=7, val_interval=3),
            default_hooks=dict(checkpoint=dict(interval=3)),
            custom_hooks=[rec])) as runner:
        runner.train()
        expected = [('before_run', 0, 0, None), ('before_train', 0, 0, None),
                    ('before_train_epoch', 0, 0, None)]
        for i in range(7):
            epoch, idx = divmod(i, 3)
            expected += [('before_train_iter', epoch, i, idx),
                         ('after_train_iter', epoch, i + 1, idx)]
            if i + 1 in (3, 6, 7):
                expected += [('before_save_checkpoint', epoch, i + 1, None)]
                expected += _val(epoch, i + 1)
        expected += [('after_train_epoch', 2, 7, None), ('after_train', 2, 7, None),
                     ('after_run', 2, 7, None)]
        assert rec.calls == expected
        assert sorted(p.name for p in runner.checkpoint_dir.iterdir() if p.is_dir()) == [
            'iter_3', 'iter_6', 'iter_7']


def test_val_and_test_hook_sequence(tmp_path, tiny_parts):
    rec = Recorder()
    parts = _parts(tiny_parts, tmp_path, custom_hooks=[rec],
                   test_dataloader=dict(dataset=RegressionData(6, seed=2), batch_size=4),
                   test_cfg=dict(), test_evaluator=dict(type='MSE'))
    with Runner(**parts) as runner:
        assert set(runner.val()) == {'mse', 'val_loss'}
        assert set(runner.test()) == {'mse', 'test_loss'}
    test_part = [('before_test', 0, 0, None), ('before_test_epoch', 0, 0, None),
                 ('before_test_iter', 0, 0, 0), ('after_test_iter', 0, 0, 0),
                 ('before_test_iter', 0, 0, 1), ('after_test_iter', 0, 0, 1),
                 ('after_test_epoch', 0, 0, None), ('after_test', 0, 0, None)]
    assert rec.calls == ([('before_run', 0, 0, None)] + _val(0, 0) + [('after_run', 0, 0, None)]
                         + [('before_run', 0, 0, None)] + test_part + [('after_run', 0, 0, None)])


def test_after_val_epoch_receives_metrics(tmp_path, tiny_parts):
    seen = []

    class MetricsHook(Hook):
        def after_val_epoch(self, runner, metrics=None):
            seen.append(dict(metrics))

    with Runner(**_parts(tiny_parts, tmp_path, custom_hooks=[MetricsHook()])) as runner:
        last = runner.train()
    assert len(seen) == 2 and set(seen[-1]) == {'mse', 'val_loss'} and seen[-1] == last


# ---- the seed document's example, verbatim except imports (bodies of `...` record) ----------
SEEN2 = []


@LOOPS.register_module(force=True)
class CustomValLoop(BaseLoop):
    def __init__(self, runner, dataloader, evaluator, dataloader2):
        super().__init__(runner, dataloader, evaluator)
        self.dataloader2 = runner.build_dataloader(dataloader2)

    def run(self):
        self.runner.call_hooks('before_val_epoch')
        for idx, data_batch in enumerate(self.dataloader):
            self.runner.call_hooks(
                'before_val_iter', batch_idx=idx, data_batch=data_batch)
            outputs = self.run_iter(idx, data_batch)
            self.runner.call_hooks(
                'after_val_iter', batch_idx=idx, data_batch=data_batch, outputs=outputs)
        metric = self.evaluator.evaluate()

        # 增加额外的验证循环
        for idx, data_batch in enumerate(self.dataloader2):
            # 增加额外的钩子点位
            self.runner.call_hooks(
                'before_valloader2_iter', batch_idx=idx, data_batch=data_batch)
            self.run_iter(idx, data_batch)
            # 增加额外的钩子点位
            self.runner.call_hooks(
                'after_valloader2_iter', batch_idx=idx, data_batch=data_batch, outputs=outputs)
        metric2 = self.evaluator.evaluate()

        ...

        self.runner.call_hooks('after_val_epoch')


@HOOKS.register_module(force=True)
class CustomValHook(Hook):
    def before_valloader2_iter(self, batch_idx, data_batch):
        SEEN2.append(('before', batch_idx, len(data_batch['x'])))

    def after_valloader2_iter(self, batch_idx, data_batch, outputs):
        SEEN2.append(('after', batch_idx, len(data_batch['x'])))


@DATASETS.register_module(force=True)
class ValDataset2(RegressionData):
    def __init__(self):
        super().__init__(size=10, seed=5)


@METRICS.register_module(force=True)
class CountingMSE(MSE):
    """MSE that records the number of samples of each evaluation."""

    evaluations: list = []

    def compute_metrics(self, results):
        CountingMSE.evaluations.append(len(results))
        return super().compute_metrics(results)


def test_seed_custom_val_loop(tmp_path, tiny_parts):
    SEEN2.clear()
    CountingMSE.evaluations = []
    parts = tiny_parts(tmp_path, val_evaluator=dict(type='CountingMSE'),
                       val_cfg=dict(type='CustomValLoop',
                                    dataloader2=dict(dataset=dict(type='ValDataset2'), batch_size=4)),
                       custom_hooks=[dict(type='CustomValHook')])
    with Runner(**parts) as runner:
        runner.val()
        assert isinstance(runner.val_loop, CustomValLoop)
    # dataloader2: 10 samples in batches of 4 -> 4, 4, 2; every batch seen before and after.
    assert SEEN2 == [('before', 0, 4), ('after', 0, 4), ('before', 1, 4), ('after', 1, 4),
                     ('before', 2, 2), ('after', 2, 2)]
    # Both evaluations ran: the 20 samples of val_dataloader, then the 10 of dataloader2.
    assert CountingMSE.evaluations == [20, 10]


# ---- early stop -----------------------------------------------------------------------------
class StopAt(Hook):
    def __init__(self, at_iter):
        self.at_iter = at_iter

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == self.at_iter:
            runner.train_loop.stop_training = True


def test_early_stop_epoch_based(tmp_path, tiny_parts):
    with Runner(**_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=5),
                         custom_hooks=[StopAt(3)])) as runner:
        runner.train()
        # Stops at the boundary of the epoch in which the flag was set (epoch 2 = iters 3, 4).
        assert (runner.epoch, runner.iter) == (2, 4)


def test_early_stop_iter_based(tmp_path, tiny_parts):
    with Runner(**_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=False, max_iters=20),
                         custom_hooks=[StopAt(3)])) as runner:
        runner.train()
        assert runner.iter == 3


def test_loop_shorthand_and_type(tmp_path, tiny_parts):
    from scale_runner import EpochBasedTrainLoop, IterBasedTrainLoop
    with Runner(**_parts(tiny_parts, tmp_path, train_cfg=dict(max_iters=2))) as runner:
        runner.train()
        assert isinstance(runner.train_loop, IterBasedTrainLoop) and runner.max_iters == 2
    with Runner(**_parts(tiny_parts, tmp_path / 'b',
                         train_cfg=dict(type='EpochBasedTrainLoop', max_epochs=1))) as runner:
        runner.train()
        assert isinstance(runner.train_loop, EpochBasedTrainLoop)
        assert (runner.epoch, runner.iter, runner.max_epochs, runner.max_iters) == (1, 2, 1, 2)


def test_model_mode_switches(tmp_path, tiny_parts):
    modes = []

    class ModeHook(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            modes.append(('train', runner.model.training))

        def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            modes.append(('val', runner.model.training))

    with Runner(**_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=2),
                         custom_hooks=[ModeHook()])) as runner:
        runner.train()
    assert modes == [('train', True)] * 2 + [('val', False)] + [('train', True)] * 2 + [('val', False)]


class DropoutRegressor(PlainRegressor):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x, y=None):
        return super().forward(self.drop(x), y)


def test_validation_does_not_change_training_randomness(tmp_path, tiny_parts):
    """Training with and without validation draws the same dropout masks (so a checkpoint
    written before validation resumes exactly)."""
    weights = []
    for name, val in (('with_val', True), ('without_val', False)):
        torch.manual_seed(0)
        over = {} if val else dict(val_dataloader=None, val_cfg=None, val_evaluator=None)
        with Runner(**tiny_parts(tmp_path / name, model=DropoutRegressor(),
                                 default_hooks=dict(checkpoint=None), **over)) as runner:
            runner.train()
            assert (runner.val_loop is not None) == val
            weights.append(runner.model.linear.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_val_begin_and_dynamic_intervals(tmp_path, tiny_parts):
    rec = Recorder()
    with Runner(**_parts(
            tiny_parts, tmp_path, custom_hooks=[rec], default_hooks=dict(checkpoint=None),
            train_cfg=dict(by_epoch=True, max_epochs=6, val_begin=2, val_interval=1,
                           dynamic_intervals=[(4, 2)]))) as runner:
        runner.train()
    assert [e for p, e, _, _ in rec.calls if p == 'before_val'] == [2, 3, 4, 6]


# ---- one convention: run() fires the hooks, run_iter only steps ------------------------------
@LOOPS.register_module(force=True)
class ScaledLossLoop(IterBasedTrainLoop):
    """A custom train loop that overrides only ``run_iter`` (here: the generic step, counted)."""

    steps = 0

    def run_iter(self, idx, data_batch):
        ScaledLossLoop.steps += 1
        return BaseLoop.run_iter(self, idx, data_batch)


def test_custom_train_loop_overriding_run_iter_keeps_every_hook(tmp_path, tiny_parts):
    seen = []

    class Points(Hook):
        def before_train_iter(self, runner, batch_idx, data_batch=None):
            seen.append(('before', runner.iter))

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            seen.append(('after', runner.iter, 'loss' in outputs))

    ScaledLossLoop.steps = 0
    with Runner(**_parts(tiny_parts, tmp_path, val_cfg=None, val_dataloader=None,
                         val_evaluator=None, custom_hooks=[Points()],
                         train_cfg=dict(type='ScaledLossLoop', max_iters=6),
                         default_hooks=dict(logger=dict(interval=2),
                                            checkpoint=dict(interval=3)),
                         param_scheduler=dict(type='StepLR', step_size=1, gamma=0.5,
                                              by_epoch=False))) as runner:
        runner.train()
    assert ScaledLossLoop.steps == 6
    assert seen == [p for i in range(6) for p in (('before', i), ('after', i + 1, True))]
    assert sorted(p.name for p in (tmp_path / 'checkpoints').glob('iter_*')) == ['iter_3', 'iter_6']
    assert runner.optim_wrapper.get_lr()['lr'][0] == pytest.approx(0.05 * 0.5 ** 6)
    lines = [json.loads(x) for x in next(tmp_path.glob('*/scalars.jsonl')).read_text().splitlines()]
    assert [x['iter'] for x in lines] == [2, 4, 6]

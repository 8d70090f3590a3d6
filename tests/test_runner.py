"""Runner: runner_type, lazy initialization, model contract, optimization, schedulers, metrics."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from conftest import PlainRegressor, RegressionData

from scale_runner import BaseModel, ConfigError, Runner
from scale_runner.evaluation import Accuracy, Evaluator
from scale_runner.hooks import Hook
from scale_runner.registry import RUNNERS

NO_HOOKS = dict(logger=None, timer=None, checkpoint=None)


# ---- runner_type ----------------------------------------------------------------------------
@RUNNERS.register_module(force=True)
class MyRunner(Runner):
    setup_calls = 0

    def setup_env(self):
        super().setup_env()
        type(self).setup_calls += 1
        self.env_ready = self.accelerator is not None


def _test_only(tmp_path, **over):
    from scale_runner.examples.toy import MLPClassifier  # noqa: F401  (registers the toy parts)
    cfg = dict(model=dict(type='MLPClassifier', hidden=8), work_dir=str(tmp_path),
               test_dataloader=dict(dataset=dict(type='SpiralDataset', size=30), batch_size=8),
               test_cfg=dict(), test_evaluator=dict(type='Accuracy'), log_level='WARNING')
    cfg.update(over)
    return cfg


def test_runner_type_selects_registered_subclass(tmp_path):
    MyRunner.setup_calls = 0
    with RUNNERS.build(_test_only(tmp_path, runner_type='MyRunner')) as runner:
        assert type(runner) is MyRunner and MyRunner.setup_calls == 0
        metrics = runner.test()
        assert MyRunner.setup_calls == 1 and runner.env_ready
        assert set(metrics) == {'accuracy'}
    plain = RUNNERS.build(_test_only(tmp_path / 'plain'))
    assert type(plain) is Runner


def test_runner_type_unknown(tmp_path):
    with pytest.raises(ConfigError, match='MyRunner'):
        RUNNERS.build(_test_only(tmp_path, runner_type='MyRuner'))


# ---- lazy initialization --------------------------------------------------------------------
def test_test_only_config(tmp_path):
    with Runner.from_cfg(_test_only(tmp_path)) as runner:
        assert runner.accelerator is None and runner.optim_wrapper is None
        metrics = runner.test()
        assert set(metrics) == {'accuracy'} and 0.0 <= metrics['accuracy'] <= 1.0
        assert runner.optim_wrapper is None and runner.train_loop is None
        assert (runner.log_dir / 'config.py').is_file()


def test_nothing_is_built_at_construction(tmp_path, tiny_parts):
    parts = tiny_parts(tmp_path, train_dataloader=dict(dataset=dict(type='NoSuchDataset'),
                                                      batch_size=2))
    runner = Runner(**parts)  # must not fail: nothing is built yet
    assert runner.accelerator is None and runner.train_loop is None and runner.hooks == []
    with pytest.raises(ConfigError, match='NoSuchDataset'):
        runner.train()


def test_train_without_optim_wrapper_names_it(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path, optim_wrapper=None))
    with pytest.raises(ConfigError, match='optim_wrapper'):
        runner.train()


@pytest.mark.parametrize('missing', ['val_evaluator', 'val_dataloader', 'val_cfg'])
def test_partial_val_triplet_names_missing_key(tmp_path, tiny_parts, missing):
    runner = Runner(**tiny_parts(tmp_path, **{missing: None}))
    with pytest.raises(ConfigError, match=missing):
        runner.train()


def test_val_without_evaluator_names_it(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path, val_evaluator=None))
    with pytest.raises(ConfigError, match='val_evaluator'):
        runner.val()
    runner = Runner(**tiny_parts(tmp_path))
    with pytest.raises(ConfigError, match='test_dataloader'):
        runner.test()


def test_train_without_val_returns_empty(tmp_path, tiny_parts):
    with Runner(**tiny_parts(tmp_path, val_dataloader=None, val_cfg=None, val_evaluator=None,
                             train_cfg=dict(by_epoch=True, max_epochs=1))) as runner:
        assert runner.train() == {}
        assert runner.val_loop is None and runner.iter == 8


# ---- model contract -------------------------------------------------------------------------
class PairData(RegressionData):
    """Samples are tuples (x, y): batches are lists, called as model(*batch)."""

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class MMRegressor(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        pred = self.linear(inputs)
        if mode == 'loss':
            return {'loss': nn.functional.mse_loss(pred, data_samples)}
        if mode == 'predict':
            return {'pred': pred}
        return pred


class TensorLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.linear(x), y)


class DictLosses(TensorLoss):
    def forward(self, x, y):
        err = self.linear(x) - y
        return {'loss_mse': err.pow(2).mean(), 'loss_l1': err.abs().mean(), 'pred': self.linear(x)}


class Output:
    def __init__(self, loss):
        self.loss = loss


class ObjectLoss(TensorLoss):
    def forward(self, x, y):
        return Output(nn.functional.mse_loss(self.linear(x), y))


def _mse(model, data):
    with torch.no_grad():
        return float(nn.functional.mse_loss(model.linear(data.x), data.y))


class OutputsHook(Hook):
    def __init__(self):
        self.outputs = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.outputs.append((outputs, data_batch))


@pytest.mark.parametrize('model_cls', [MMRegressor, TensorLoss, DictLosses, ObjectLoss])
def test_model_contract_trains(tmp_path, model_cls):
    torch.manual_seed(0)
    model, data, hook = model_cls(), PairData(32), OutputsHook()
    before = _mse(model, data)
    with Runner(model=model, work_dir=str(tmp_path), log_level='WARNING',
                train_dataloader=dict(dataset=data, batch_size=8),
                train_cfg=dict(by_epoch=True, max_epochs=5),
                optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                default_hooks=NO_HOOKS, custom_hooks=[hook]) as runner:
        runner.train()
    assert _mse(model, data) < 0.5 * before
    outputs, batch = hook.outputs[-1]
    assert isinstance(batch, list) and len(batch) == 2
    assert 'loss' in outputs and outputs['loss'].ndim == 0
    if model_cls is DictLosses:
        # Every key containing 'loss' is summed into the loss; each is logged too.
        assert set(outputs) == {'loss', 'loss_mse', 'loss_l1'}
        assert torch.allclose(outputs['loss'], outputs['loss_mse'] + outputs['loss_l1'])


def test_base_model_val_uses_predict_mode(tmp_path):
    seen = []

    class PredMetric:
        pass

    from scale_runner import BaseMetric

    class Collect(BaseMetric):
        def process(self, data_batch, data_samples):
            seen.append(sorted(data_samples))
            self.results.append(1)

        def compute_metrics(self, results):
            return {'n': len(results)}

    with Runner(model=MMRegressor(), work_dir=str(tmp_path), log_level='WARNING',
                val_dataloader=dict(dataset=PairData(10), batch_size=4), val_cfg=dict(),
                val_evaluator=Collect(), default_hooks=NO_HOOKS) as runner:
        assert runner.val() == {'n': 3}
    assert seen == [['pred']] * 3


def test_parse_losses_rules():
    from scale_runner.model import parse_losses
    a, b = torch.tensor(1.0), torch.tensor([2.0, 4.0])
    loss, logs = parse_losses({'loss_a': a, 'aux': torch.tensor(7.0)})
    assert float(loss) == 1.0 and float(logs['loss']) == 1.0 and float(logs['aux']) == 7.0
    loss, logs = parse_losses({'loss_a': a, 'loss_b': b})  # a per-sample loss is averaged
    assert float(loss) == 4.0 and float(logs['loss_b']) == 3.0 and float(logs['loss']) == 4.0
    with pytest.raises(TypeError, match='loss'):
        parse_losses({'pred': a})
    with pytest.raises(TypeError, match='loss'):
        parse_losses([a])


# ---- optimization: accumulation, clipping ---------------------------------------------------
class StepCounter:
    def __init__(self, runner_ref):
        self.runner_ref = runner_ref
        self.at = []

    def __call__(self, optimizer, args, kwargs):
        # Called inside the iteration that steps, before runner.iter counts it.
        self.at.append(self.runner_ref[0].iter + 1)


def test_gradient_accumulation_matches_reference(tmp_path):
    data = RegressionData(20, seed=3)
    torch.manual_seed(1)
    model = PlainRegressor()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    ref = [None]
    counter = StepCounter(ref)
    optimizer.register_step_post_hook(counter)
    updates = []

    class UpdateCount(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            updates.append(runner.optim_wrapper.update_count)

    from scale_runner import OptimWrapper
    with Runner(model=model, work_dir=str(tmp_path), log_level='WARNING',
                train_dataloader=dict(dataset=data, batch_size=2,
                                      sampler=dict(type='DefaultSampler', shuffle=False)),
                train_cfg=dict(by_epoch=True, max_epochs=1),
                optim_wrapper=OptimWrapper(optimizer, accumulative_counts=4),
                default_hooks=NO_HOOKS, custom_hooks=[UpdateCount()]) as runner:
        ref[0] = runner
        runner.train()
        assert runner.max_iters == 10 and runner.iter == 10
    assert counter.at == [4, 8, 10]
    assert updates == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3]

    # Reference: a plain PyTorch loop; each window's gradient is the mean over its batches.
    ref_model = PlainRegressor()
    ref_model.load_state_dict(init)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=lr)
    for window in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        ref_opt.zero_grad()
        for b in window:
            x, y = data.x[2 * b:2 * b + 2], data.y[2 * b:2 * b + 2]
            (nn.functional.mse_loss(ref_model.linear(x), y) / len(window)).backward()
        ref_opt.step()
    for k, v in ref_model.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    # And not the 1/4-weighted last window.
    wrong = PlainRegressor()
    wrong.load_state_dict(init)
    wrong_opt = torch.optim.SGD(wrong.parameters(), lr=lr)
    for window in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        wrong_opt.zero_grad()
        for b in window:
            x, y = data.x[2 * b:2 * b + 2], data.y[2 * b:2 * b + 2]
            (nn.functional.mse_loss(wrong.linear(x), y) / 4).backward()
        wrong_opt.step()
    assert not torch.allclose(model.linear.weight, wrong.linear.weight, atol=1e-6)


def test_update_params_direct_path_equals_the_general_one(tmp_path, tiny_parts):
    """One micro-batch per update, no clipping: update_params calls torch directly. A subclass
    that overrides step() takes the general path; both train to the same weights, bit for bit,
    with the NaN guard's skipped updates counted alike."""
    from scale_runner import OptimWrapper

    class Counted(OptimWrapper):
        steps = 0

        def step(self, **kwargs):
            Counted.steps += 1
            super().step(**kwargs)

    results = {}
    for kind, cls in (('direct', OptimWrapper), ('general', Counted)):
        torch.manual_seed(0)
        model = PlainRegressor()
        with Runner(**tiny_parts(tmp_path / kind, model=model,
                                 optim_wrapper=cls(torch.optim.AdamW(model.parameters(), lr=0.01)),
                                 default_hooks=dict(logger=None, checkpoint=None))) as runner:
            runner.train()
            assert (runner.optim_wrapper._direct is not None) == (kind == 'direct')
            results[kind] = ({k: v.clone() for k, v in model.state_dict().items()},
                             runner.optim_wrapper.update_count)
    assert Counted.steps == results['general'][1] == results['direct'][1] == 16
    for k, v in results['direct'][0].items():
        assert torch.equal(v, results['general'][0][k]), k


def test_grad_clipping_logs_grad_norm(tmp_path, tiny_parts):
    torch.manual_seed(0)
    model = PlainRegressor()
    before = [p.detach().clone() for p in model.parameters()]
    lr, max_norm = 0.05, 0.01
    with Runner(**tiny_parts(
            tmp_path, model=model, val_dataloader=None, val_cfg=None, val_evaluator=None,
            train_cfg=dict(by_epoch=False, max_iters=1),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=lr), clip_grad=dict(max_norm=max_norm)),
            default_hooks=dict(logger=dict(interval=1), checkpoint=None))) as runner:
        runner.train()
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        assert float(step.norm()) == pytest.approx(lr * max_norm, rel=1e-4)  # clipped to max_norm
        records = [json.loads(line)
                   for line in (runner.log_dir / 'scalars.jsonl').read_text().splitlines()]
        train = [r for r in records if 'grad_norm' in r]
        assert len(train) == 1 and train[0]['step'] == 1
        assert train[0]['grad_norm'] > max_norm  # the norm before clipping
        assert 'loss' in train[0] and train[0]['lr'] == pytest.approx(lr)


# ---- parameter schedulers -------------------------------------------------------------------
class LrRecorder(Hook):
    def __init__(self):
        self.lrs = []
        self.epochs = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lrs.append(runner.optim_wrapper.get_lr()['lr'][0])
        self.epochs.append(runner.epoch)


def _sched_run(tmp_path, param_scheduler, train_cfg, n=16, batch_size=4, accumulative_counts=1):
    rec = LrRecorder()
    with Runner(model=PlainRegressor(), work_dir=str(tmp_path), log_level='WARNING',
                train_dataloader=dict(dataset=RegressionData(n), batch_size=batch_size),
                train_cfg=train_cfg, param_scheduler=param_scheduler,
                optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1),
                                   accumulative_counts=accumulative_counts),
                default_hooks=NO_HOOKS, custom_hooks=[rec]) as runner:
        runner.train()
    return rec


def test_warmup_then_cosine(tmp_path):
    base = 0.1
    rec = _sched_run(tmp_path, [
        dict(type='LinearLR', start_factor=0.25, by_epoch=False, begin=0, end=5),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=5, end=20)],
        dict(by_epoch=False, max_iters=24))
    # MMEngine's [begin, end): the warmup reaches the base lr at step 4 (end - 1), the cosine
    # (T_max = end - begin) runs steps 5..19 and keeps its step-19 value from 20 on.
    expected = []
    for t in range(24):
        if t < 5:
            expected.append(base * (0.25 + 0.75 * t / 4))
        else:
            expected.append(base * (1 + math.cos(math.pi * (min(t, 19) - 5) / 15)) / 2)
    assert abs(rec.lrs[4] - base) < 1e-12  # warmup ends exactly at the base lr
    assert rec.lrs == pytest.approx(expected, abs=1e-9)


def test_schedulers_step_per_update_with_accumulation(tmp_path):
    base = 0.1
    rec = _sched_run(tmp_path, dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=4),
                     dict(by_epoch=False, max_iters=12), accumulative_counts=2)
    # lr changes once per optimizer update (every 2 micro-batches); [0, 4): base from update 3.
    expected = [base * (0.5 + 0.5 * min(i // 2, 3) / 3) for i in range(12)]
    assert rec.lrs == pytest.approx(expected, abs=1e-12)


def test_by_epoch_schedulers(tmp_path):
    base = 0.1
    rec = _sched_run(tmp_path, dict(type='MultiStepLR', milestones=[1, 2], gamma=0.1),
                     dict(by_epoch=True, max_epochs=3))
    assert rec.epochs == [0] * 4 + [1] * 4 + [2] * 4
    assert rec.lrs == pytest.approx([base] * 4 + [base * 0.1] * 4 + [base * 0.01] * 4, rel=1e-9)


def test_convert_to_iter_based(tmp_path):
    base = 0.1
    # 16 samples / batch 4 = 4 iterations per epoch: warmup over 2 epochs = iterations [0, 8).
    rec = _sched_run(tmp_path, dict(type='LinearLR', start_factor=0.5, by_epoch=True, begin=0,
                                    end=2, convert_to_iter_based=True),
                     dict(by_epoch=True, max_epochs=3))
    expected = [base * (0.5 + 0.5 * min(t, 7) / 7) for t in range(12)]
    assert rec.lrs == pytest.approx(expected, abs=1e-12)


def test_convert_to_iter_based_counts_updates_with_accumulation(tmp_path):
    base = 0.1
    # 4 micro-batches per epoch, 2 per update: 2 updates per epoch, so 2 epochs = updates [0, 4).
    rec = _sched_run(tmp_path, dict(type='LinearLR', start_factor=0.5, by_epoch=True, begin=0,
                                    end=2, convert_to_iter_based=True),
                     dict(by_epoch=True, max_epochs=3), accumulative_counts=2)
    expected = [base * (0.5 + 0.5 * min(i // 2, 3) / 3) for i in range(12)]
    assert rec.lrs == pytest.approx(expected, abs=1e-12)


def test_scheduler_config_errors(tmp_path):
    with pytest.raises(ConfigError, match='begin'):
        _sched_run(tmp_path, dict(type='LinearLR', begin=5, end=5, by_epoch=False),
                   dict(by_epoch=False, max_iters=2))
    with pytest.raises(ConfigError, match='type'):
        _sched_run(tmp_path / 'b', dict(begin=0, end=5), dict(by_epoch=False, max_iters=2))


# ---- evaluation -----------------------------------------------------------------------------
def test_accuracy_metric():
    acc = Accuracy(topk=(1, 2))
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 1, 0, 2])
    acc.process({'labels': labels}, {'logits': logits})
    # top1 hits: row 0; top2 hits: rows 0 and 1 (label 1 is second in row 1).
    assert acc.evaluate() == {'accuracy_top1': 0.25, 'accuracy_top2': 0.5}
    assert acc.results == []
    single = Accuracy()
    single.process({'labels': labels}, logits)  # a bare tensor of scores
    assert single.evaluate(size=2) == {'accuracy': 0.5}


def test_evaluator_duplicate_metric_names():
    ev = Evaluator([dict(type='Accuracy'), dict(type='Accuracy')])
    batch, out = {'labels': torch.tensor([0])}, {'logits': torch.tensor([[1.0, 0.0]])}
    ev.process(out, batch)
    with pytest.raises(ConfigError, match='accuracy'):
        ev.evaluate()
    ev = Evaluator([dict(type='Accuracy'), dict(type='Accuracy', prefix='b')])
    ev.process(out, batch)
    assert ev.evaluate() == {'accuracy': 1.0, 'b/accuracy': 1.0}


def test_runner_writes_config_and_log(tmp_path, tiny_parts):
    from scale_runner import Config
    cfg = Config(dict(tiny_parts(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1))))
    with Runner.from_cfg(cfg) as runner:
        runner.train()
        assert (runner.log_dir / 'config.py').is_file()
        assert (runner.log_dir / f'{runner.experiment_name}.log').is_file()

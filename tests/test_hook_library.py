"""The hook library: EMA, early stopping, the non-finite loss guard, profiler, empty cache."""
from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import PlainRegressor, RegressionData

from scale_runner import ConfigError, Runner
from scale_runner.hooks import (EarlyStoppingHook, EMAHook, EmptyCacheHook, Hook, NanGuardHook,
                                NonFiniteLossError, ProfilerHook)
from scale_runner.model import run_forward, unwrap

QUIET = dict(logger=None, timer=None, checkpoint=None)


def _weights(runner):
    return {k: v.detach().clone() for k, v in unwrap(runner.model).state_dict().items()}


class UpdateRecorder(Hook):
    """The weights after every optimizer update, and those the validation loop runs with."""

    priority = 'LOWEST'

    def __init__(self):
        self.after_updates, self.in_val = [], []
        self._updates = 0

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.optim_wrapper.update_count != self._updates:
            self._updates = runner.optim_wrapper.update_count
            self.after_updates.append(_weights(runner))

    def before_val_iter(self, runner, batch_idx, data_batch=None):
        if batch_idx == 0:
            self.in_val.append(_weights(runner))


# ---- EMA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('accumulate', [1, 2])
def test_ema_is_the_hand_computed_average_and_what_validation_sees(tmp_path, tiny_parts, accumulate):
    rec, m = UpdateRecorder(), 0.25
    ema = EMAHook(momentum=m)
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[ema, rec], default_hooks=QUIET,
                                 train_cfg=dict(by_epoch=True, max_epochs=1),
                                 optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05),
                                                    accumulative_counts=accumulate)))
    runner.train()
    assert len(rec.after_updates) == 8 // accumulate  # once per update, not per micro-batch
    expected = {k: v.double() for k, v in rec.after_updates[0].items()}  # the first update copies
    for w in rec.after_updates[1:]:
        expected = {k: (1 - m) * expected[k] + m * w[k].double() for k in expected}
    got = ema.ema_state_dict
    assert set(got) == {'linear.weight', 'linear.bias'}
    for k in got:
        assert torch.allclose(got[k].double(), expected[k], atol=1e-6), k
        assert not torch.equal(got[k], rec.after_updates[-1][k])  # really an average
        assert torch.equal(rec.in_val[0][k], got[k])  # validation ran with the average
    # ... and training's weights are back, bit for bit
    assert all(torch.equal(v, rec.after_updates[-1][k]) for k, v in _weights(runner).items())
    runner.close()


def test_ema_begin_iter_follows_weights_until_then(tmp_path, tiny_parts):
    rec, ema = UpdateRecorder(), EMAHook(momentum=0.5, begin_iter=6)
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[ema, rec], default_hooks=QUIET,
                                 val_cfg=None, val_dataloader=None, val_evaluator=None,
                                 train_cfg=dict(by_epoch=True, max_epochs=1)))
    runner.train()
    w = rec.after_updates
    expected = {k: 0.5 * (0.5 * w[5][k] + 0.5 * w[6][k]) + 0.5 * w[7][k] for k in w[5]}  # copy at 6
    for k, v in ema.ema_state_dict.items():
        assert torch.allclose(v, expected[k], atol=1e-7), k
    runner.close()


def test_ema_resume_is_exact(tmp_path, tiny_parts):
    """1 epoch, then resume to 2 == 2 epochs uninterrupted: model and EMA, bit for bit."""
    def run(work, epochs, resume=False):
        ema = EMAHook(momentum=0.1, update_buffers=True)
        runner = Runner(**tiny_parts(work, custom_hooks=[ema], resume=resume,
                                     default_hooks=dict(logger=None),
                                     train_cfg=dict(by_epoch=True, max_epochs=epochs)))
        runner.train()
        out = _weights(runner), {k: v.clone() for k, v in ema.ema_state_dict.items()}, ema.steps
        runner.close()
        return out

    w_full, e_full, steps_full = run(tmp_path / 'full', 2)
    run(tmp_path / 'split', 1)
    w_res, e_res, steps_res = run(tmp_path / 'split', 2, resume=True)
    assert steps_full == steps_res == 16
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    for k in e_full:
        assert torch.equal(e_full[k], e_res[k]), k
        assert not torch.equal(e_full[k], w_full[k])


class EvalRecorder(UpdateRecorder):
    def before_test_iter(self, runner, batch_idx, data_batch=None):
        if batch_idx == 0:
            self.in_val.append(_weights(runner))


def _with_test(tiny_parts, work, **over):
    from conftest import RegressionData
    return tiny_parts(work, test_dataloader=dict(dataset=RegressionData(8, seed=3), batch_size=4),
                      test_evaluator=dict(type='MSE'), test_cfg=dict(), **over)


def test_ema_test_after_train_and_from_load_from_use_the_average(tmp_path, tiny_parts):
    """test() after train() on the same runner, and val()/test() of a fresh runner with
    load_from the checkpoint, evaluate the saved average, not the training weights."""
    from scale_runner.checkpoint import read_checkpoint
    rec, ema = EvalRecorder(), EMAHook(momentum=0.25)
    runner = Runner(**_with_test(tiny_parts, tmp_path, custom_hooks=[ema, rec],
                                 train_cfg=dict(by_epoch=True, max_epochs=1),
                                 default_hooks=dict(logger=None, checkpoint=dict(interval=1))))
    runner.train()
    average = {k: v.clone() for k, v in ema.ema_state_dict.items()}
    trained = _weights(runner)
    assert not torch.equal(average['linear.weight'], trained['linear.weight'])
    runner.test()
    assert all(torch.equal(rec.in_val[-1][k], average[k]) for k in average)  # tested the average
    assert all(torch.equal(v, trained[k]) for k, v in _weights(runner).items())  # swapped back
    runner.close()

    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    saved = read_checkpoint(ckpt)['state']['hooks.EMAHook']['ema']
    assert all(torch.equal(saved[k], average[k]) for k in average)
    for entry in ('val', 'test'):
        rec2 = EvalRecorder()
        fresh = Runner(**_with_test(tiny_parts, tmp_path / entry, load_from=str(ckpt),
                                    custom_hooks=[EMAHook(momentum=0.25), rec2],
                                    default_hooks=dict(logger=None)))
        getattr(fresh, entry)()
        assert all(torch.equal(rec2.in_val[0][k], average[k]) for k in average), entry
        assert all(torch.equal(v, trained[k]) for k, v in _weights(fresh).items())
        fresh.close()


def test_export_ema_writes_the_average(tmp_path, tiny_parts, capsys):
    from scale_runner.checkpoint import read_model_weights
    from scale_runner.cli import main
    ema = EMAHook(momentum=0.25)
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[ema], default_hooks=dict(logger=None),
                                 train_cfg=dict(by_epoch=True, max_epochs=1)))
    runner.train()
    average, trained = dict(ema.ema_state_dict), _weights(runner)
    runner.close()
    ckpt, out = tmp_path / 'checkpoints' / 'epoch_1', tmp_path / 'ema.safetensors'
    assert main(['export', str(ckpt), str(out), '--ema']) == 0
    assert 'EMA average' in capsys.readouterr().out
    got = read_model_weights(out)
    assert set(got) == set(trained)
    assert all(torch.equal(got[k], average[k]) for k in average)
    assert not torch.equal(got['linear.weight'], trained['linear.weight'])
    from safetensors import safe_open
    with safe_open(str(out), framework='pt') as f:
        assert f.metadata()['weights'] == 'ema' and f.metadata()['ema_steps'] == '8'
    # a checkpoint written without EMAHook: a clear error, nothing written
    plain = Runner(**tiny_parts(tmp_path / 'plain', default_hooks=dict(logger=None),
                                train_cfg=dict(by_epoch=True, max_epochs=1)))
    plain.train()
    plain.close()
    target = tmp_path / 'none.safetensors'
    assert main(['export', str(tmp_path / 'plain' / 'checkpoints' / 'epoch_1'), str(target), '--ema']) == 1
    assert 'without EMAHook' in capsys.readouterr().err and not target.exists()


def test_ema_strict_load_refuses_a_checkpoint_without_ema(tmp_path, tiny_parts):
    from scale_runner.checkpoint import CheckpointError
    runner = Runner(**tiny_parts(tmp_path, default_hooks=dict(logger=None),
                                 train_cfg=dict(by_epoch=True, max_epochs=1)))
    runner.train()
    runner.close()
    runner = Runner(**tiny_parts(tmp_path, resume=True, default_hooks=dict(logger=None),
                                 custom_hooks=[EMAHook(strict_load=True)]))
    with pytest.raises(CheckpointError, match='no EMA state'):
        runner.train()
    runner.close()


def test_ema_config_errors():
    with pytest.raises(ConfigError, match='momentum'):
        EMAHook(momentum=1.5)
    with pytest.raises(ConfigError, match='not both'):
        EMAHook(begin_iter=2, begin_epoch=1)
    with pytest.raises(ConfigError, match='ExponentialMovingAverage'):
        EMAHook(ema_type='StochasticWeightAverage')


# ---- early stopping ----------------------------------------------------------------------------
# 'score' per validated epoch (less is better, min_delta 0.1, patience 2): best 5, 4, (3.95: wait 1),
# 3.5, (3.45: wait 1), (3.5: wait 2 -> stop after epoch 6). Without the saved state a resumed
# run at epoch 5 would see 3.45 as an improvement and only stop after epoch 7.
SCORES = {1: 5.0, 2: 4.0, 3: 3.95, 4: 3.5, 5: 3.45, 6: 3.5, 7: 3.5, 8: 3.5, 9: 3.5, 10: 3.5}


class Scripted(Hook):
    priority = 'HIGHEST'

    def after_val_epoch(self, runner, metrics=None):
        metrics['score'] = SCORES[runner.epoch]


class CrashAt(Hook):
    priority = 'HIGHEST'

    def __init__(self, it):
        self.it = it

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == self.it:
            raise KeyboardInterrupt('simulated crash')


def _es_parts(tiny_parts, work, *extra, **over):
    return tiny_parts(work, custom_hooks=[Scripted(), EarlyStoppingHook('score', rule='less', min_delta=0.1, patience=2),
                                          *extra],
                      train_dataloader=dict(dataset=RegressionData(16), batch_size=8,
                                            sampler=dict(type='DefaultSampler', shuffle=True)),
                      train_cfg=dict(by_epoch=True, max_epochs=10),
                      default_hooks=dict(logger=None, checkpoint=dict(by_epoch=False, interval=1)), **over)


def test_early_stopping_stops_at_the_expected_epoch_and_resumes(tmp_path, tiny_parts):
    runner = Runner(**_es_parts(tiny_parts, tmp_path / 'full'))
    runner.train()
    es = runner.get_hook('EarlyStoppingHook')
    assert runner.epoch == 6 and runner.train_loop.stop_training
    assert es.rule == 'less' and es.best_score == 3.5 and es.wait_count == 2
    assert 'did not improve' in es.stopped_at['reason']
    full = _weights(runner)
    runner.close()

    # crash in the middle of epoch 5 (2 iterations per epoch): the last checkpoint, iter_9, is
    # after the validation of epoch 4; the resumed run must stop after epoch 6 as well
    runner = Runner(**_es_parts(tiny_parts, tmp_path / 'split', CrashAt(10)))
    with pytest.raises(KeyboardInterrupt):
        runner.train()
    runner.close()
    runner = Runner(**_es_parts(tiny_parts, tmp_path / 'split', resume=True))
    runner.train()
    assert runner.epoch == 6 and runner.iter == 12
    resumed = _weights(runner)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    runner.close()


def test_early_stopping_threshold_finite_and_strict(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path / 'a', custom_hooks=[
        Scripted(), EarlyStoppingHook('score', rule='less', stopping_threshold=3.7)],
        default_hooks=QUIET, train_cfg=dict(by_epoch=True, max_epochs=10)))
    runner.train()
    assert runner.epoch == 4  # 3.5 < 3.7
    runner.close()
    runner = Runner(**tiny_parts(tmp_path / 'b', custom_hooks=[EarlyStoppingHook('nope', rule='less', strict=True)],
                                 default_hooks=QUIET))
    with pytest.raises(ConfigError, match="'nope' is not among"):
        runner.train()
    runner.close()
    with pytest.raises(ConfigError, match="EarlyStoppingHook.*rule='greater'"):
        EarlyStoppingHook('wibble')
    es = EarlyStoppingHook('val_loss', min_delta=0)
    assert es._decide(1.0) == (False, '') and es._decide(math.nan)[0]


# ---- non-finite loss guard ---------------------------------------------------------------------
class Poisoned(PlainRegressor):
    """Returns a NaN (or Inf) loss on the training forward calls listed in ``bad`` (1-based);
    records every training batch it sees."""

    def __init__(self, bad=(), value=math.nan):
        super().__init__()
        self.bad, self.value, self.calls, self.batches = set(bad), value, 0, []

    def forward(self, x, y=None):
        out = super().forward(x, y)
        if self.training:
            self.calls += 1
            self.batches.append((x.clone(), y.clone()))
            if self.calls in self.bad:
                out['loss'] = out['loss'] * self.value
        return out


@pytest.mark.parametrize('value, kind', [(math.nan, 'NaN'), (math.inf, 'Inf')])
def test_guard_raise_stops_at_the_bad_iteration_and_saves_nothing_after(tmp_path, tiny_parts, value, kind):
    model = Poisoned(bad={5}, value=value)
    runner = Runner(**tiny_parts(tmp_path, model=model, default_hooks=dict(
        logger=None, checkpoint=dict(by_epoch=False, interval=1, max_keep_ckpts=-1))))
    with pytest.raises(NonFiniteLossError, match=rf'iteration 5 \(epoch 1\) \[rank 0: {kind}\]'):
        runner.train()
    assert runner.iter == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpts = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.startswith('iter_'))
    assert ckpts == ['iter_1', 'iter_2', 'iter_3', 'iter_4']
    runner.close()


def test_guard_skip_drops_exactly_the_bad_updates(tmp_path, tiny_parts):
    bad = {3, 6, 7}
    model = Poisoned(bad=bad)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runner = Runner(**tiny_parts(tmp_path, model=model, val_cfg=None, val_dataloader=None,
                                 val_evaluator=None, default_hooks=dict(nan_guard=dict(mode='skip')),
                                 optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9))))
    runner.train()
    guard = runner.get_hook('NanGuardHook')
    assert guard.nan_skips == 3 and runner.iter == 16 and runner.optim_wrapper.update_count == 13
    # the reference: plain PyTorch over the same batches, without the bad ones
    ref = PlainRegressor()
    ref.load_state_dict(start)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for i, (x, y) in enumerate(model.batches, start=1):
        if i in bad:
            continue
        ref(x, y)['loss'].backward()
        opt.step()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    scalars = [json.loads(line) for line in (runner.log_dir / 'scalars.jsonl').read_text().splitlines()]
    assert all(math.isfinite(s['loss']) for s in scalars if 'loss' in s)
    log = (runner.log_dir / f'{runner.experiment_name}.log').read_text()
    assert 'non-finite loss at iteration 3 (epoch 1) [rank 0: NaN]' in log and '3 skipped so far' in log
    runner.close()


def test_guard_skip_raises_after_max_consecutive(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path, model=Poisoned(bad={2, 3, 4}), default_hooks=dict(
        QUIET, nan_guard=dict(mode='skip', max_consecutive=2))))
    with pytest.raises(NonFiniteLossError, match='iteration 4 .* 3 in a row, more than max_consecutive=2'):
        runner.train()
    assert runner.get_hook('NanGuardHook').nan_skips == 2
    runner.close()


def test_guard_config_and_removal(tmp_path, tiny_parts):
    with pytest.raises(ConfigError, match="'raise' or 'skip'"):
        NanGuardHook(mode='ignore')
    model = Poisoned(bad={2})
    runner = Runner(**tiny_parts(tmp_path, model=model, default_hooks=dict(QUIET, nan_guard=None),
                                 val_cfg=None, val_dataloader=None, val_evaluator=None))
    runner.train()  # the guard removed: the NaN goes through
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    runner.close()


class OwnStep(Poisoned):
    """A train step of its own that steps the optimizer itself (no update_params)."""

    def train_step(self, data, optim_wrapper):
        loss = run_forward(self, data)['loss']
        loss.backward()
        optim_wrapper.optimizer.step()
        optim_wrapper.optimizer.zero_grad()
        return {'loss': loss.detach()}


def test_guard_and_schedulers_are_called_per_iteration_only_when_they_have_work(tmp_path, tiny_parts):
    """The built-in step checks every loss in update_params, and no scheduler is per iteration:
    neither hook is called after each iteration. A train step of its own (the guard checks
    its logged loss afterwards) or an iteration scheduler brings the call back."""
    def per_iter(runner):
        return {type(h).__name__ for h in runner.hooks if h.overrides('after_train_iter')}

    runner = Runner(**tiny_parts(tmp_path / 'a', default_hooks=QUIET))
    runner.train()
    assert not per_iter(runner) & {'NanGuardHook', 'ParamSchedulerHook'}
    runner.close()
    runner = Runner(**tiny_parts(tmp_path / 'b', default_hooks=QUIET, model=OwnStep(bad={3}),
                                 param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False,
                                                      end=4)))
    with pytest.raises(NonFiniteLossError, match=r'iteration 3 \(epoch 1\) \[rank 0: NaN\]'):
        runner.train()
    assert {'NanGuardHook', 'ParamSchedulerHook'} <= per_iter(runner)
    runner.close()


def test_guard_cost_per_step_is_small():
    """The finite path on one process: isfinite + one host read (measured, printed with -s)."""
    import time
    guard = NanGuardHook()
    loss = torch.tensor(0.5)
    for _ in range(100):
        guard.check(loss)
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        guard.check(loss)
    per_step = (time.perf_counter() - t) / n
    print(f'nan guard, finite loss, 1 process: {per_step * 1e6:.2f} us/step')
    assert per_step < 100e-6


# ---- profiler, empty cache, hooks listing -------------------------------------------------------
def test_profiler_writes_a_chrome_trace(tmp_path, tiny_parts):
    prof = ProfilerHook(by_epoch=False, profile_times=3)
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[prof], default_hooks=QUIET))
    runner.train()
    assert len(prof.trace_files) == 1 and prof.trace_files[0].parent == runner.log_dir / 'profiler'
    trace = json.loads(prof.trace_files[0].read_text())
    names = {e.get('name', '') for e in trace['traceEvents']}
    assert any(n.startswith('aten::') for n in names)  # the model's ops were recorded
    assert prof.profiler is None  # stopped after 3 iterations
    runner.close()


def test_profiler_tensorboard_trace_with_schedule(tmp_path, tiny_parts):
    prof = ProfilerHook(by_epoch=True, schedule=dict(wait=1, warmup=1, active=2, repeat=1),
                        on_trace_ready=dict(type='tb_trace', dir_name=str(tmp_path / 'tb')))
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[prof], default_hooks=QUIET))
    runner.train()
    assert len(list((tmp_path / 'tb').glob('*.pt.trace.json'))) == 1
    runner.close()


def test_empty_cache_hook_runs_at_the_chosen_points(tmp_path, tiny_parts):
    hook = EmptyCacheHook(before_epoch=True, after_epoch=True, after_iter=True)
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[hook], default_hooks=QUIET))
    runner.train()  # 2 epochs x 8 iters, 2 validations x 3 iters; before+after each epoch
    assert hook.calls == 2 * 8 + 2 * 3 + 2 * 2 + 2 * 2
    runner.close()
    assert EmptyCacheHook().calls == 0


def test_hooks_listing_shows_defaults_and_library(tmp_path, tiny_parts):
    from scale_runner.hooks import SyncBuffersHook
    runner = Runner(**tiny_parts(tmp_path, custom_hooks=[EMAHook(), SyncBuffersHook(),
                                                         EarlyStoppingHook('mse')]))
    info = runner.get_hooks_info()
    sections = {}
    for line in info.splitlines():
        if not line.startswith(' '):
            stage = line.rstrip(':')
        else:
            prio, name = line.strip()[1:].split(')')
            sections.setdefault(stage, []).append([f'({prio.strip()})', name.strip()])
    assert ['(VERY_HIGH)', 'NanGuardHook'] in sections['after_train_iter']
    order = sections['before_val_epoch']
    assert order[0] == ['(ABOVE_NORMAL)', 'SyncBuffersHook'] and ['(NORMAL)', 'EMAHook'] in order
    assert ['(LOW)', 'EarlyStoppingHook'] in sections['after_val_epoch']
    assert ['(NORMAL)', 'EMAHook'] in sections['after_load_checkpoint']
    runner.close()

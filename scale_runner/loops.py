"""``BaseLoop`` and the built-in train/val/test loops.

Counters live in ``runner.state`` and count completed work: they advance before the
matching ``after_*`` hook, so no hook ever computes ``iter + 1``.
"""
from __future__ import annotations

import bisect
import contextlib
import random
import sys
from typing import Any

import torch

from .data import get_sampler, set_epoch, streaming
from .checks import bad_value
from .errors import ConfigError
from .model import eval_step, train_step, train_step_of
from .registry import LOOPS

# The per-iteration points with their arguments, as Runner.hook_calls takes them
BEFORE_TRAIN_ITER = ('before_train_iter', ('batch_idx', 'data_batch'))
AFTER_TRAIN_ITER = ('after_train_iter', ('batch_idx', 'data_batch', 'outputs'))


@contextlib.contextmanager
def preserved_rng():
    """Restore the python, numpy and torch (CPU and current CUDA device) RNG states on exit."""
    py_state = random.getstate()
    np_state = _numpy_random().get_state() if _numpy_random() else None
    cpu_state = torch.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_state = torch.cuda.get_rng_state() if cuda else None
    try:
        yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            _numpy_random().set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)


def _stream(loader) -> bool:
    """A streamed loader (``scale_runner.streaming``, imported only once one is built)."""
    stream = streaming()
    return stream is not None and stream.is_stream(loader)


def _numpy_random():
    np = sys.modules.get('numpy')  # only if something imported it: no numpy import here
    return np.random if np is not None else None


class BaseLoop:
    """A loop over ``dataloader`` (a config dict is built through the runner).

    The convention of every loop, built-in or custom: ``run()`` fires the hooks, and
    ``run_iter(idx, data_batch)`` only runs one step in the loop's ``mode`` (``'train'``,
    ``'val'``, ``'test'``; subclasses with an evaluator default to ``'val'``) and returns its
    outputs. So a custom loop that overrides ``run_iter`` keeps every hook of its ``run()``
    (logging, checkpoints, schedulers for a train loop).
    """

    mode: str | None = None

    def __init__(self, runner, dataloader: Any, evaluator: Any = None):
        self._runner = runner
        self.dataloader = runner.build_dataloader(dataloader) if isinstance(dataloader, dict) else dataloader
        if evaluator is not None:
            evaluator = runner.build_evaluator(evaluator)
        self.evaluator = evaluator

    @property
    def runner(self):
        return self._runner

    def run(self) -> Any:
        raise NotImplementedError

    def run_iter(self, idx: int, data_batch: Any) -> Any:
        mode = self.mode or 'val'
        runner = self._runner  # per-step path: no property calls
        model = runner.model
        if mode == 'train':
            if not model.training:
                model.train()
            return train_step(model, data_batch, runner.optim_wrapper)
        if model.training:
            model.eval()
        acc = runner.accelerator
        amp = acc.autocast() if acc is not None and acc.mixed_precision != 'no' else contextlib.nullcontext()
        with torch.no_grad(), amp:
            outputs = eval_step(model, data_batch, mode)
        if self.evaluator is not None:
            self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        return outputs


class _TrainLoop(BaseLoop):
    """Shared parts of the two train loops: validation schedule and resume position."""

    mode = 'train'

    def __init__(self, runner, dataloader, val_begin: int, val_interval: int,
                 dynamic_intervals: list | None):
        super().__init__(runner, dataloader)
        for key, value in (('val_begin', val_begin), ('val_interval', val_interval)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f'train_cfg.{key} = {value!r} is not valid: it takes an int >= 0 '
                                  f'(in epochs for an epoch-based loop, iterations otherwise)')
        self.val_begin = val_begin
        self.val_interval = val_interval
        self.stop_training = False
        self.last_val_metrics: dict = {}
        self._step_model = self._step = None
        pairs = sorted(dynamic_intervals or [])
        self._milestones = [int(m) for m, _ in pairs]
        self._intervals = [int(i) for _, i in pairs]

    def _update_val_interval(self, progress: int) -> None:
        i = bisect.bisect_right(self._milestones, progress)
        if i:
            self.val_interval = self._intervals[i - 1]

    def _validate_if_due(self, progress: int, last: int) -> None:
        if self._milestones:
            self._update_val_interval(progress)
        val_loop = self._runner.val_loop
        if (val_loop is not None and progress >= self.val_begin and self.val_interval > 0
                and (progress % self.val_interval == 0 or progress == last)):
            # Validation must not change training's randomness: a checkpoint written before it
            # (after_train_epoch) resumes with the RNG state training continues from.
            with preserved_rng():
                self.last_val_metrics = val_loop.run()

    def train_iter(self, idx: int, data_batch: Any) -> Any:
        """One iteration with its hooks: ``before_train_iter``, ``run_iter``, the counters,
        ``after_train_iter`` (both train loops' bodies call this). ``state.stepped`` is cleared
        before the step; the optimizer wrapper sets it if the step updated the weights."""
        runner = self._runner
        for fn in runner.hook_calls(BEFORE_TRAIN_ITER):
            fn(idx, data_batch)
        state = runner.state
        state.stepped = False
        outputs = self.run_iter(idx, data_batch)
        state.iter += 1
        state.inner_iter = idx + 1
        for fn in runner.hook_calls(AFTER_TRAIN_ITER):
            fn(idx, data_batch, outputs)
        return outputs

    def run_iter(self, idx: int, data_batch: Any) -> Any:
        """One train step (``BaseLoop.run_iter``'s, with the step function resolved once per
        model instead of every step)."""
        runner = self._runner
        model = runner.model
        if not model.training:
            model.train()
        if model is not self._step_model:
            self._step_model, self._step = model, train_step_of(model)
        return self._step(data_batch, runner.optim_wrapper)

    def _start_at(self, batches_done: int) -> None:
        """Make the next pass over the dataloader skip ``batches_done`` batches, unread (or the
        samples a resume with another global batch size set in ``state.resume_sample``)."""
        state = self._runner.state
        samples, state.resume_sample = state.resume_sample, None
        if _stream(self.dataloader):  # it resumes from its own saved position (rank_state)
            if (batches_done or samples) and not self.dataloader.restored:
                raise ConfigError(f'resuming at iteration {state.iter}: the train data is streamed '
                                  f'but the checkpoint holds no stream position for this rank '
                                  f'(data_<rank> files); resume from a checkpoint written by a '
                                  f'streamed run, or start a new run from its weights (load_from)')
            return
        if not batches_done and not samples:
            return
        sampler = get_sampler(self.dataloader)
        per_batch = getattr(self.dataloader, 'total_batch_size', None) or self.dataloader.batch_size
        if sampler is None or not hasattr(sampler, 'set_start') or per_batch is None:
            raise ConfigError('resuming mid-epoch needs a sampler with set_start() (DefaultSampler '
                              'or InfiniteSampler) and a fixed batch_size in the train dataloader')
        sampler.set_start(batches_done * per_batch if samples is None else samples)

    def _set_epoch(self, epoch: int) -> None:
        set_epoch(self.dataloader, epoch)

    def _pass_done(self) -> bool:
        """Whether the position is the end of a pass: resumed from a checkpoint written after a
        pass's last batch. Such a pass is not iterated again (an empty pass would still draw
        the loader's base seed from the RNG, which the uninterrupted run does not)."""
        try:
            return self._runner.state.inner_iter >= len(self.dataloader) > 0
        except TypeError:  # no length: an iterable dataset
            return False


@LOOPS.register_module()
class EpochBasedTrainLoop(_TrainLoop):
    """Train for ``max_epochs`` passes; validate after epochs ``val_begin, +val_interval, ...``
    and after the last one. ``dynamic_intervals=[(epoch, interval), ...]`` changes the interval.
    ``stop_training`` is checked at epoch boundaries."""

    def __init__(self, runner, dataloader, max_epochs: int, val_begin: int = 1,
                 val_interval: int = 1, dynamic_intervals: list | None = None):
        super().__init__(runner, dataloader, val_begin, val_interval, dynamic_intervals)
        if not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 1:
            raise bad_value('train_cfg.max_epochs', max_epochs, 'a positive int', 'max_epochs=10')
        if _stream(self.dataloader):
            raise ConfigError(
                'train_cfg: an epoch-based loop needs the length of train_dataloader, and its '
                'dataset is streamed (streaming=True: no len()). Train by iterations: '
                'train_cfg=dict(by_epoch=False, max_iters=...); the stream starts a new, '
                'reshuffled pass by itself when it reaches its end')
        state = runner.state
        state.max_epochs = max_epochs
        state.max_iters = max_epochs * len(self.dataloader)

    def run(self) -> torch.nn.Module:
        runner, state = self.runner, self.runner.state
        runner.call_hook('before_train')
        while state.epoch < state.max_epochs and not self.stop_training:
            self.run_epoch()
            self._validate_if_due(state.epoch, state.max_epochs)
        runner.call_hook('after_train')
        return runner.model

    def run_epoch(self) -> None:
        runner, state = self.runner, self.runner.state
        self._set_epoch(state.epoch)
        runner.call_hook('before_train_epoch')
        if not self._pass_done():  # else the epoch only has to end
            self._start_at(state.inner_iter)
            for idx, data_batch in enumerate(self.dataloader, start=state.inner_iter):
                self.train_iter(idx, data_batch)
        state.epoch += 1
        state.inner_iter = 0
        runner.call_hook('after_train_epoch')


@LOOPS.register_module()
class IterBasedTrainLoop(_TrainLoop):
    """Train for ``max_iters`` iterations, cycling through the dataloader (each pass advances
    ``runner.epoch``); validate every ``val_interval`` iterations from ``val_begin`` and at the
    end. ``stop_training`` is checked after every iteration."""

    def __init__(self, runner, dataloader, max_iters: int, val_begin: int = 1,
                 val_interval: int = 1000, dynamic_intervals: list | None = None):
        super().__init__(runner, dataloader, val_begin, val_interval, dynamic_intervals)
        if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
            raise bad_value('train_cfg.max_iters', max_iters, 'a positive int', 'max_iters=1000')
        runner.state.max_iters = max_iters
        runner.state.max_epochs = None

    def run(self) -> torch.nn.Module:
        runner, state = self.runner, self.runner.state
        runner.call_hook('before_train')
        self._set_epoch(state.epoch)
        runner.call_hook('before_train_epoch')
        batches = self._batches()
        validates = runner.val_loop is not None  # else no call per iteration to find it out
        while state.iter < state.max_iters and not self.stop_training:
            idx, data_batch = next(batches)
            self.train_iter(idx, data_batch)
            if validates:
                self._validate_if_due(state.iter, state.max_iters)
        runner.call_hook('after_train_epoch')
        runner.call_hook('after_train')
        return runner.model

    def _batches(self):
        """Endless ``(batch_idx, batch)`` pairs; a new pass bumps ``epoch`` and reshuffles."""
        state = self.runner.state
        if self._pass_done():
            self._next_pass()
        self._start_at(state.inner_iter)
        while True:
            yielded = False
            for idx, data_batch in enumerate(self.dataloader, start=state.inner_iter):
                yielded = True
                yield idx, data_batch
            if not yielded:
                raise ConfigError('the train dataloader is empty: check train_dataloader.dataset '
                                  'and batch_size / drop_last')
            self._next_pass()

    def _next_pass(self) -> None:
        state = self.runner.state
        state.epoch += 1
        state.inner_iter = 0
        self._set_epoch(state.epoch)


class _EvalLoop(BaseLoop):
    def __init__(self, runner, dataloader, evaluator):
        super().__init__(runner, dataloader, evaluator)
        if self.evaluator is None:
            raise ConfigError(f'{self.mode}_evaluator is missing: the {self.mode} loop needs metrics')
        if hasattr(self.evaluator, 'loss_name'):  # report {mode}_loss if the model returns a loss
            self.evaluator.loss_name = f'{self.mode}_loss'

    def run(self) -> dict:
        runner, stage = self.runner, self.mode
        runner.call_hook(f'before_{stage}')
        runner.call_hook(f'before_{stage}_epoch')
        # track() gives the evaluator each batch's dataset indices (exact padding removal)
        batches = self.evaluator.track(self.dataloader) if hasattr(self.evaluator, 'track') else self.dataloader
        for idx, data_batch in enumerate(batches):
            runner.call_hook(f'before_{stage}_iter', batch_idx=idx, data_batch=data_batch)
            outputs = self.run_iter(idx, data_batch)
            runner.call_hook(f'after_{stage}_iter', batch_idx=idx, data_batch=data_batch, outputs=outputs)
        metrics = self.evaluator.evaluate(_dataset_size(self.dataloader))
        runner.call_hook(f'after_{stage}_epoch', metrics=metrics)
        runner.call_hook(f'after_{stage}')
        return metrics


def _dataset_size(dataloader) -> int | None:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return None


@LOOPS.register_module()
class ValLoop(_EvalLoop):
    """One pass over the validation data; returns the evaluator's metrics."""

    mode = 'val'


@LOOPS.register_module()
class TestLoop(_EvalLoop):
    """One pass over the test data; returns the evaluator's metrics."""

    mode = 'test'

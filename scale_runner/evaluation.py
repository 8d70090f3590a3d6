"""``Evaluator`` and metrics with MMEngine's API, exact across processes.

Accelerate's ``prepare`` shards the evaluation data across ranks and, with ``even_batches``
(its default), pads the last batches with samples from the start of the epoch so every rank
runs the same number of equally sized batches. Those padding rows are duplicates of real
samples. The eval loops iterate ``Evaluator.track(dataloader)``, which walks the prepared
dataloader's batch sampler in lockstep with the data and tells the evaluator the dataset index
of every row of every batch. Each result a metric appends in ``process`` is tagged with its
sample index (when a ``process`` call appends exactly one result per sample) or with the
batch's indices (any other number of results: per-batch results). ``evaluate`` orders the
results of every rank in the global order of the data (batch, rank, row: what one process would
have seen) and keeps the first occurrence of each sample index, so the padding duplicates are
dropped exactly, whatever the number of processes.

Per-batch results can only be deduplicated per batch: a batch whose rows are all padding is
dropped; one that mixes real rows and padding (at most one batch per rank, the last) is kept
whole, with a warning. Append one result per sample to be exact.
"""
from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

from .collective import gather
from .errors import ConfigError
from .registry import EVALUATORS, METRICS

_NO_INDEX = None  # tag of a result whose sample indices are unknown


class BaseMetric:
    """Accumulates results in ``self.results`` and reduces them in ``compute_metrics``.

    ``process(data_batch, data_samples)`` appends plain Python / CPU values to ``self.results``
    (ideally one per sample, see the module docstring); ``compute_metrics(results)`` returns
    ``{name: value}``. ``evaluate(size)`` gathers the results of every rank, drops the padding
    duplicates, computes on every rank and prefixes the names (``prefix/name``). While
    ``compute_metrics`` runs, ``self.result_indices`` holds the dataset index of each result
    (``None`` where unknown).
    """

    default_prefix: str | None = None

    def __init__(self, collect_device: str = 'cpu', prefix: str | None = None):
        self.collect_device = collect_device
        self.prefix = prefix or self.default_prefix
        self.results: list = []
        self.result_indices: list | None = None
        self.accelerator = None  # set by the Evaluator when the runner has one
        self._tags: list = []    # parallel to results: (batch_no, row, index | tuple | None)

    def process(self, data_batch: Any, data_samples: Sequence) -> None:
        raise NotImplementedError

    def compute_metrics(self, results: list) -> dict:
        raise NotImplementedError

    # ---- bookkeeping done by the Evaluator ------------------------------------------------------
    def _tag_new_results(self, batch_no: int, start: int, indices: list | None) -> None:
        tags = self.__dict__.setdefault('_tags', [])
        if len(tags) != start:  # results were changed outside process(): stop tagging
            return
        new = len(self.results) - start
        if indices is None:
            tags.extend((batch_no, j, _NO_INDEX) for j in range(new))
        elif new == len(indices):
            tags.extend((batch_no, j, int(i)) for j, i in enumerate(indices))
        else:
            group = tuple(int(i) for i in indices)
            tags.extend((batch_no, j, group) for j in range(new))

    def _strip_indices(self) -> None:
        self._tags = [(b, j, _NO_INDEX) for b, j, _ in getattr(self, '_tags', [])]

    def _payload(self) -> tuple:
        tags = getattr(self, '_tags', [])
        return self.results, (tags if len(tags) == len(self.results) else None)

    def _num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    def _reset(self) -> None:
        self.results.clear()
        self._tags = []

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self, size: int | None = None) -> dict:
        results, tags = self._payload()
        payloads = gather((results, tags))
        keep = merge_tags([t for _, t in payloads], size, type(self).__name__)
        if keep is None:  # untagged results: concatenate in rank order, cut at size
            merged = [r for res, _ in payloads for r in res]
            merged = merged if size is None else merged[:size]
            self.result_indices = None
        else:
            merged = [payloads[rank][0][i] for rank, i, _ in keep]
            self.result_indices = [idx if isinstance(idx, int) else None for _, _, idx in keep]
        try:
            metrics = self.compute_metrics(merged)
        finally:
            self._reset()
            self.result_indices = None
        return self._prefixed(metrics)

    def _prefixed(self, metrics: dict) -> dict:
        if self.prefix:
            metrics = {f'{self.prefix}/{k}': v for k, v in metrics.items()}
        return metrics


def merge_tags(tags_per_rank: list, size: int | None = None, name: str = 'metric') -> list | None:
    """Which results to keep, in the global order of the data: ``[(rank, position, index)]``.

    ``tags_per_rank[r]`` is rank ``r``'s list of ``(batch_no, row, tag)`` (or ``None`` when that
    rank's results are untagged: then the answer is ``None``). Rank ``r``'s ``k``-th batch is the
    global batch ``k * num_ranks + r`` (Accelerate's round-robin sharding; with ``split_batches``
    the ranks hold consecutive slices of batch ``k``), so sorting by ``(batch_no, rank, row)``
    restores the order one process would have seen, in which padding comes last.
    """
    if any(t is None for t in tags_per_rank):
        return None
    entries = sorted(((b, rank, j, pos, tag) for rank, tags in enumerate(tags_per_rank)
                      for pos, (b, j, tag) in enumerate(tags)), key=lambda e: e[:3])
    if all(e[4] is _NO_INDEX for e in entries):  # indices unknown: padding is the tail
        keep = [(rank, pos, None) for _, rank, _, pos, _ in entries]
        return keep if size is None else keep[:size]
    seen: set = set()
    keep, group_done, partial = [], {}, 0
    for b, rank, _, pos, tag in entries:
        if tag is _NO_INDEX:
            keep.append((rank, pos, None))
        elif isinstance(tag, int):
            if tag not in seen:
                seen.add(tag)
                keep.append((rank, pos, tag))
        else:  # per-batch results: decided once per batch
            key = (b, rank)
            if key not in group_done:
                new = set(tag) - seen
                group_done[key] = bool(new) or not tag
                if new and len(new) < len(set(tag)):
                    partial += len(set(tag)) - len(new)
                seen.update(tag)
            if group_done[key]:
                keep.append((rank, pos, None))
    if partial:
        warnings.warn(f'{name} appended per-batch results, so {partial} padding duplicate(s) in '
                      f'batches that mix real samples with padding are counted; append one result '
                      f'per sample in process() for an exact result', stacklevel=3)
    return keep


@EVALUATORS.register_module()
class Evaluator:
    """Runs every metric on each batch's outputs and merges their results.

    ``metrics``: metric configs (``METRICS`` names, classes, dotted paths, or any
    ``torchmetrics`` metric, e.g. ``dict(type='torchmetrics.classification.MulticlassAccuracy',
    num_classes=10)``) or built metrics. ``loss_name`` (set by the eval loops to ``'val_loss'`` /
    ``'test_loss'``) also reports the average of the ``loss`` the model returns, if it does.
    """

    def __init__(self, metrics: Any, loss_name: str | None = None):
        metrics = metrics if isinstance(metrics, (list, tuple)) else [metrics]
        self.metrics = [build_metric(m, f'evaluator.metrics[{i}]') for i, m in enumerate(metrics)]
        self.accelerator = None
        self.loss_name = loss_name
        self._loss_metric: AverageLoss | None = None
        self._batch_no = 0
        self.batch_indices: list | None = None  # dataset indices of the next process() call

    def bind(self, accelerator) -> None:
        self.accelerator = accelerator
        for m in self._all_metrics():
            m.accelerator = accelerator

    def _all_metrics(self) -> list:
        if self.loss_name and (self._loss_metric is None or self._loss_metric.name != self.loss_name):
            self._loss_metric = AverageLoss(name=self.loss_name, missing_ok=True)
            self._loss_metric.accelerator = self.accelerator
        return self.metrics + ([self._loss_metric] if self.loss_name else [])

    def track(self, dataloader) -> Iterator:
        """Iterate ``dataloader``, setting ``batch_indices`` to each batch's dataset indices.

        The indices come from a second pass over the (prepared) dataloader's batch sampler,
        started after the first batch (when Accelerate has set the sampler's epoch). This is
        only done for samplers whose order is a pure function of their state and that never
        repeat a sample (``DefaultSampler``, ``SequentialSampler``); otherwise, and when a
        batch's size disagrees with its indices, indices are unknown and ``evaluate(size)``
        keeps the first ``size`` results in global order instead.
        """
        index_batches = None
        for n, batch in enumerate(dataloader):
            if n == 0:
                index_batches = _index_batches(dataloader)
            indices = next(index_batches, None) if index_batches is not None else None
            if indices is not None:
                rows = _batch_len(batch)
                if rows is not None and rows != len(indices):
                    warnings.warn(f'batch {n} has {rows} rows but its sampler gave {len(indices)} '
                                  f'indices: evaluating without sample indices', stacklevel=2)
                    index_batches = indices = None
                    for m in self._all_metrics():
                        m._strip_indices()
            self.batch_indices = indices
            yield batch
        self.batch_indices = None

    def process(self, data_samples: Any, data_batch: Any = None) -> None:
        indices, self.batch_indices = self.batch_indices, None
        for m in self._all_metrics():
            start = len(m.results)
            m.process(data_batch, data_samples)
            m._tag_new_results(self._batch_no, start, indices)
        self._batch_no += 1

    def evaluate(self, size: int | None = None) -> dict:
        out: dict = {}
        self._batch_no = 0
        for m in self._all_metrics():
            res = m.evaluate(size)
            dup = set(res) & set(out)
            if dup:
                raise ConfigError(f'metric names {sorted(dup)} are produced by more than one metric '
                                  f'({type(m).__name__} among them): give one a prefix=')
            out.update(res)
        return out


def _index_batches(dataloader) -> Iterator | None:
    """A fresh iterator over ``dataloader``'s batches of dataset indices, or ``None``."""
    from torch.utils.data import IterableDataset, SequentialSampler
    from .data import DefaultSampler
    if isinstance(getattr(dataloader, 'dataset', None), IterableDataset):
        return None
    if 'Dispatcher' in type(dataloader).__name__:  # rank 0 reads and scatters whole batches
        return None
    batch_sampler = getattr(dataloader, 'batch_sampler', None)
    inner = batch_sampler
    while getattr(inner, 'batch_sampler', None) is not None:  # Accelerate's BatchSamplerShard
        inner = inner.batch_sampler
    sampler = getattr(inner, 'sampler', None)
    if batch_sampler is None or not isinstance(sampler, (DefaultSampler, SequentialSampler)):
        return None
    if type(sampler).__name__ == 'InfiniteSampler':
        return None
    return iter(batch_sampler)


def _batch_len(batch: Any) -> int | None:
    import torch
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict) or hasattr(batch, 'keys'):
        for v in batch.values():
            n = _batch_len(v) if isinstance(v, torch.Tensor) else None
            if n is not None:
                return n
        return None
    if isinstance(batch, (list, tuple)):
        tensors = [b for b in batch if isinstance(b, torch.Tensor)]
        return _batch_len(tensors[0]) if tensors else len(batch)
    return None


# ---- building ----------------------------------------------------------------------------------
ADAPTER_KEYS = ('pred_key', 'label_key', 'name', 'prefix')


def build_metric(cfg: Any, where: str) -> BaseMetric:
    """A metric from config; a ``torchmetrics`` metric (class or instance) is wrapped."""
    if _is_torchmetric(cfg):
        return TorchMetric(cfg)
    if isinstance(cfg, dict) and 'type' in cfg:
        try:
            cls = METRICS.get(cfg['type'])
        except KeyError as e:
            raise ConfigError(f'{where}.type: {e.args[0]}') from None
        if _is_torchmetric(cls):
            from .registry import call_with_cfg
            args = {k: v for k, v in cfg.items() if k != 'type'}
            adapter = {k: args.pop(k) for k in ADAPTER_KEYS if k in args}
            return TorchMetric(call_with_cfg(cls, args, where), **adapter)
    metric = METRICS.build(cfg, _cfg_path=where)
    if _is_torchmetric(metric):
        return TorchMetric(metric)
    if not isinstance(metric, BaseMetric):
        raise ConfigError(f'{where} built a {type(metric).__name__}, which is not a metric: '
                          f'subclass BaseMetric (process + compute_metrics) or use a torchmetrics '
                          f'Metric')
    return metric


def _is_torchmetric(obj: Any) -> bool:
    tm = sys.modules.get('torchmetrics')
    if tm is None:
        return False
    bases = (tm.Metric, tm.MetricCollection)
    return isinstance(obj, bases) or (isinstance(obj, type) and issubclass(obj, bases))


def build_evaluator(cfg: Any, where: str = 'val_evaluator') -> Evaluator:
    """An ``Evaluator`` from a metric dict, a list of them, or ``dict(type='Evaluator', metrics=...)``."""
    if isinstance(cfg, Evaluator):
        return cfg
    if isinstance(cfg, BaseMetric) or _is_torchmetric(cfg):
        return Evaluator([cfg])
    try:
        if isinstance(cfg, dict) and 'metrics' in cfg:
            cfg = dict(cfg)
            cfg.setdefault('type', 'Evaluator')
            return EVALUATORS.build(cfg, _cfg_path=where)
        if isinstance(cfg, (dict, list, tuple)):
            return Evaluator(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace('evaluator.metrics', f'{where}.metrics')) from None
    raise ConfigError(f'{where} must be a metric config, a list of them or an Evaluator, '
                      f'got {type(cfg).__name__}')


def add_metric(evaluator_cfg: Any, metric_cfg: dict) -> Any:
    """``evaluator_cfg`` (any form ``build_evaluator`` takes) with one more metric."""
    if isinstance(evaluator_cfg, dict) and 'metrics' in evaluator_cfg:
        out = dict(evaluator_cfg)
        metrics = out['metrics']
        out['metrics'] = (list(metrics) if isinstance(metrics, (list, tuple)) else [metrics]) + [metric_cfg]
        return out
    if isinstance(evaluator_cfg, (list, tuple)):
        return list(evaluator_cfg) + [metric_cfg]
    if evaluator_cfg is None:
        return [metric_cfg]
    return [evaluator_cfg, metric_cfg]


# ---- helpers to read model outputs and batches ---------------------------------------------------
_MISSING = object()


def fetch(container: Any, key: Any, default: Any = _MISSING) -> Any:
    """``container[key]`` for a mapping (or a list with an int key), else ``container.key``."""
    if isinstance(container, dict) or hasattr(container, 'keys'):
        if key in container:
            return container[key]
    elif isinstance(key, int) and isinstance(container, (list, tuple)):
        if -len(container) <= key < len(container):
            return container[key]
    elif isinstance(key, str) and getattr(container, key, None) is not None:
        return getattr(container, key)
    if default is not _MISSING:
        return default
    have = list(container.keys()) if hasattr(container, 'keys') else type(container).__name__
    raise KeyError(f'{key!r} not found (have {have})')


def _preds_and_labels(metric, data_batch, data_samples):
    import torch
    if isinstance(data_samples, torch.Tensor):
        preds = data_samples
    else:
        try:
            preds = fetch(data_samples, metric.pred_key)
        except KeyError as e:
            raise KeyError(f'{type(metric).__name__}: the model outputs have no predictions under '
                           f'pred_key={metric.pred_key!r}: {e.args[0]}') from None
    labels = fetch(data_samples, metric.label_key, None) if not isinstance(data_samples, torch.Tensor) else None
    if labels is None:
        try:
            labels = fetch(data_batch, metric.label_key)
        except KeyError as e:
            raise KeyError(f'{type(metric).__name__}: no labels under label_key='
                           f'{metric.label_key!r} in the outputs or the batch: {e.args[0]}') from None
    return preds, torch.as_tensor(labels)


# ---- built-in metrics ------------------------------------------------------------------------------
@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy. Scores come from the outputs (a tensor, ``outputs[pred_key]`` or
    ``outputs.pred_key``); labels from the outputs if present, else from the batch
    (``label_key`` may be an int for tuple batches). Scores of shape ``(N,)`` are taken as
    predicted classes (top-1 only)."""

    def __init__(self, topk: int | Sequence[int] = 1, pred_key: str = 'logits',
                 label_key: str | int = 'labels', **kwargs):
        super().__init__(**kwargs)
        self.topk = (topk,) if isinstance(topk, int) else tuple(topk)
        self.pred_key, self.label_key = pred_key, label_key

    def process(self, data_batch, data_samples) -> None:
        scores, labels = _preds_and_labels(self, data_batch, data_samples)
        labels = labels.detach().cpu().view(-1, 1)
        scores = scores.detach()
        if scores.dim() == 1:  # class predictions
            if max(self.topk) > 1:
                raise ValueError('Accuracy(topk>1) needs scores of shape (N, C), got class predictions')
            hit = scores.cpu().view(-1, 1) == labels
        else:
            top = scores.topk(max(self.topk), dim=-1).indices.cpu()
            hit = top == labels
        for row in hit.tolist():
            self.results.append([any(row[:k]) for k in self.topk])

    def compute_metrics(self, results: list) -> dict:
        n = max(len(results), 1)
        return {('accuracy' if len(self.topk) == 1 else f'accuracy_top{k}'):
                sum(r[i] for r in results) / n for i, k in enumerate(self.topk)}


@METRICS.register_module()
class AverageLoss(BaseMetric):
    """The average of the loss the model returns in evaluation, over samples.

    ``outputs[loss_key]`` (or ``outputs.loss``) may be per-sample losses (shape ``(N,)``, e.g.
    ``reduction='none'``): then the average is exact across ranks. A scalar batch loss counts
    for each sample of the batch (so a batch mixing real samples with padding duplicates
    contributes its mean over all its rows). ``weight_key`` names per-sample weights in the
    outputs or the batch (e.g. token counts, for a per-sample mean token loss) for a weighted
    average. ``missing_ok``: outputs without a loss are skipped instead of being an error.
    """

    def __init__(self, loss_key: str = 'loss', name: str = 'loss', weight_key: str | None = None,
                 missing_ok: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.loss_key, self.name, self.weight_key, self.missing_ok = loss_key, name, weight_key, missing_ok

    def process(self, data_batch, data_samples) -> None:
        import torch
        loss = None if isinstance(data_samples, torch.Tensor) else fetch(data_samples, self.loss_key, None)
        if not isinstance(loss, torch.Tensor):
            if self.missing_ok:
                return
            raise KeyError(f'{type(self).__name__}: the model outputs in evaluation have no '
                           f'{self.loss_key!r} tensor; return it from the eval forward (e.g. a '
                           f"'predict'-mode dict with 'loss', or outputs with .loss)")
        loss = loss.detach().float().cpu().reshape(-1)
        weights = None
        if self.weight_key is not None:
            weights = fetch(data_samples, self.weight_key, None)
            if weights is None:
                weights = fetch(data_batch, self.weight_key)
            weights = torch.as_tensor(weights).detach().float().cpu().reshape(-1)
        n = len(weights) if weights is not None else (_batch_len(data_batch) or len(loss))
        if loss.numel() == 1 and n > 1:
            loss = loss.expand(n)
        if weights is None:
            weights = torch.ones(len(loss))
        for value, w in zip(loss.tolist(), weights.tolist()):
            self.results.append((value, w))

    def _average(self, results: list) -> float:
        total = sum(w for _, w in results)
        return sum(v * w for v, w in results) / total if total else float('nan')

    def compute_metrics(self, results: list) -> dict:
        return {self.name: self._average(results)} if results else {}


@METRICS.register_module()
class Perplexity(AverageLoss):
    """``exp`` of the average loss (a language model's mean token cross-entropy). For an exact
    token-level perplexity return per-sample mean losses and give ``weight_key`` = the
    per-sample token counts."""

    def __init__(self, loss_key: str = 'loss', name: str = 'perplexity', **kwargs):
        super().__init__(loss_key=loss_key, name=name, **kwargs)

    def compute_metrics(self, results: list) -> dict:
        return {self.name: math.exp(self._average(results))} if results else {}


class TorchMetric(BaseMetric):
    """Any ``torchmetrics`` metric (or ``MetricCollection``) as a metric of the Evaluator.

    ``process`` keeps each sample's ``(pred, target)`` row; ``evaluate`` decides which rows are
    padding duplicates from the gathered sample indices only, updates the metric with this
    rank's kept rows and calls ``compute()``, whose own distributed sync combines the ranks.
    Config: ``dict(type='torchmetrics.classification.MulticlassAccuracy', num_classes=10,
    pred_key='logits', label_key='labels', name=None, prefix=None)`` (the last four are ours).
    """

    def __init__(self, metric: Any, pred_key: str = 'logits', label_key: str | int = 'labels',
                 name: str | None = None, prefix: str | None = None):
        super().__init__(prefix=prefix)
        self.metric = metric
        self.pred_key, self.label_key = pred_key, label_key
        self.name = name or re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', type(metric).__name__).lower()

    def process(self, data_batch, data_samples) -> None:
        preds, target = _preds_and_labels(self, data_batch, data_samples)
        self.results.extend(zip(preds.detach().cpu().unbind(0), target.detach().cpu().unbind(0)))

    def evaluate(self, size: int | None = None) -> dict:
        import torch
        results, tags = self._payload()
        tags_per_rank = gather(tags)
        rank = self.accelerator.process_index if self._num_processes() > 1 else 0
        keep = merge_tags(tags_per_rank, size, self.name)
        if keep is None:
            if self._num_processes() > 1:
                warnings.warn(f'{self.name}: results without sample indices on several processes '
                              f'include the padding duplicates', stacklevel=2)
            mine = results if size is None or self._num_processes() > 1 else results[:size]
        else:
            mine = [results[i] for r, i, _ in keep if r == rank]
        metric = self.metric
        device = self.accelerator.device if self.accelerator is not None else None
        if device is not None:
            metric.to(device)
        metric.reset()
        try:
            if mine:
                preds = torch.stack([p for p, _ in mine])
                target = torch.stack([t for _, t in mine])
                if device is not None:
                    preds, target = preds.to(device), target.to(device)
                metric.update(preds, target)
            value = metric.compute()
        finally:
            metric.reset()
            self._reset()
        return self._prefixed(self._named(value))

    def _named(self, value: Any) -> dict:
        if isinstance(value, dict):
            return {str(k): _plain(v) for k, v in value.items()}
        return {self.name: _plain(value)}

    def compute_metrics(self, results: list) -> dict:  # pragma: no cover - evaluate() is overridden
        raise NotImplementedError


def _plain(value: Any) -> Any:
    import torch
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


@METRICS.register_module()
class DumpPredictions(BaseMetric):
    """Writes every sample's outputs (rows of the output tensors) to ``out_file`` as JSON lines,
    once, in the data's order, with the dataset ``index`` when known; reports no metric.
    ``keys`` limits the output keys written."""

    def __init__(self, out_file: str, keys: Sequence[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.out_file = Path(out_file)
        self.keys = None if keys is None else list(keys)

    def process(self, data_batch, data_samples) -> None:
        import torch
        outputs = data_samples if hasattr(data_samples, 'keys') else {'pred': data_samples}
        cols = {k: v for k, v in outputs.items() if self.keys is None or k in self.keys}
        n = _batch_len(data_batch) or next((len(v) for v in cols.values()
                                            if isinstance(v, (torch.Tensor, list, tuple))), 0)
        rows = [dict() for _ in range(n)]
        for key, value in cols.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                value = value.detach().float().cpu().tolist() if value.is_floating_point() \
                    else value.detach().cpu().tolist()
            if isinstance(value, (list, tuple)) and len(value) == n:
                for row, v in zip(rows, value):
                    row[key] = v
        self.results.extend(rows)

    def compute_metrics(self, results: list) -> dict:
        acc = self.accelerator
        if acc is None or acc.is_main_process:
            self.out_file.parent.mkdir(parents=True, exist_ok=True)
            indices = self.result_indices or [None] * len(results)
            with open(self.out_file, 'w') as f:
                for idx, row in zip(indices, results):
                    f.write(json.dumps({'index': idx, **row} if idx is not None else row) + '\n')
        return {}

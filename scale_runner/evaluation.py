"""``Evaluator`` and ``BaseMetric`` with MMEngine's API; results are gathered across ranks."""
from __future__ import annotations

from typing import Any, Sequence

from .errors import ConfigError
from .registry import EVALUATORS, METRICS


class BaseMetric:
    """Accumulates per-batch results in ``self.results`` and reduces them in ``compute_metrics``.

    ``process(data_batch, data_samples)`` appends plain Python / CPU values to
    ``self.results``; ``compute_metrics(results)`` returns ``{name: value}``. ``evaluate(size)``
    gathers the results of every rank, keeps the first ``size`` (dropping the duplicates that
    even batching pads in), computes on every rank and prefixes the names.
    """

    default_prefix: str | None = None

    def __init__(self, collect_device: str = 'cpu', prefix: str | None = None):
        self.collect_device = collect_device
        self.prefix = prefix or self.default_prefix
        self.results: list = []
        self.accelerator = None  # set by the Evaluator when the runner has one

    def process(self, data_batch: Any, data_samples: Sequence) -> None:
        raise NotImplementedError

    def compute_metrics(self, results: list) -> dict:
        raise NotImplementedError

    def evaluate(self, size: int | None = None) -> dict:
        results = self.results
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            from accelerate.utils import gather_object
            results = gather_object(results)
        if size is not None:
            results = results[:size]
        metrics = self.compute_metrics(results)
        self.results.clear()
        if self.prefix:
            metrics = {f'{self.prefix}/{k}': v for k, v in metrics.items()}
        return metrics


@EVALUATORS.register_module()
class Evaluator:
    """Runs every metric on each batch's outputs and merges their results."""

    def __init__(self, metrics: Any):
        metrics = metrics if isinstance(metrics, (list, tuple)) else [metrics]
        self.metrics = [METRICS.build(m, _cfg_path=f'evaluator.metrics[{i}]')
                        for i, m in enumerate(metrics)]
        self.accelerator = None

    def bind(self, accelerator) -> None:
        self.accelerator = accelerator
        for m in self.metrics:
            m.accelerator = accelerator

    def process(self, data_samples: Any, data_batch: Any = None) -> None:
        for m in self.metrics:
            m.process(data_batch, data_samples)

    def evaluate(self, size: int | None = None) -> dict:
        out: dict = {}
        for m in self.metrics:
            res = m.evaluate(size)
            dup = set(res) & set(out)
            if dup:
                raise ConfigError(f'metric names {sorted(dup)} are produced by more than one metric '
                                  f'({type(m).__name__} among them): give one a prefix=')
            out.update(res)
        return out


def build_evaluator(cfg: Any, where: str = 'val_evaluator') -> Evaluator:
    """An ``Evaluator`` from a metric dict, a list of them, or ``dict(type='Evaluator', metrics=...)``."""
    if isinstance(cfg, Evaluator):
        return cfg
    if isinstance(cfg, BaseMetric):
        return Evaluator([cfg])
    if isinstance(cfg, dict) and 'metrics' in cfg:
        cfg = dict(cfg)
        cfg.setdefault('type', 'Evaluator')
        return EVALUATORS.build(cfg, _cfg_path=where)
    if isinstance(cfg, (dict, list, tuple)):
        try:
            return Evaluator(cfg)
        except ConfigError as e:
            raise ConfigError(str(e).replace('evaluator.', f'{where}.')) from None
    raise ConfigError(f'{where} must be a metric config, a list of them or an Evaluator, '
                      f'got {type(cfg).__name__}')


@METRICS.register_module()
class Accuracy(BaseMetric):
    """Top-k accuracy. Scores come from the outputs (a tensor, or ``outputs[pred_key]``); labels
    from ``outputs[label_key]`` if present, else ``data_batch[label_key]``."""

    default_prefix = None

    def __init__(self, topk: int | Sequence[int] = 1, pred_key: str = 'logits',
                 label_key: str = 'labels', **kwargs):
        super().__init__(**kwargs)
        self.topk = (topk,) if isinstance(topk, int) else tuple(topk)
        self.pred_key, self.label_key = pred_key, label_key

    def process(self, data_batch, data_samples) -> None:
        scores = data_samples[self.pred_key] if isinstance(data_samples, dict) else data_samples
        if isinstance(data_samples, dict) and self.label_key in data_samples:
            labels = data_samples[self.label_key]
        else:
            labels = data_batch[self.label_key]
        top = scores.topk(max(self.topk), dim=-1).indices.cpu()
        hit = top == labels.cpu().view(-1, 1)
        for row in hit:
            self.results.append([bool(row[:k].any()) for k in self.topk])

    def compute_metrics(self, results: list) -> dict:
        n = max(len(results), 1)
        return {('accuracy' if len(self.topk) == 1 else f'accuracy_top{k}'):
                sum(r[i] for r in results) / n for i, k in enumerate(self.topk)}

"""The tests' one regression metric, registered as ``MSE``.

Importing this module registers it. ``tiny_parts`` (conftest.py) imports it; the parts modules
that configs list in ``custom_imports`` (sr_resume_parts, sr_safety_plugin, hl_parts) import and
re-export it, so ``type='MSE'`` resolves in forked runs and subprocesses too (their PYTHONPATH
holds this directory).
"""
from __future__ import annotations

from scale_runner.evaluation import BaseMetric
from scale_runner.registry import METRICS


@METRICS.register_module(force=True)
class MSE(BaseMetric):
    """Mean squared error of ``data_samples['pred']`` against ``data_batch['y']``, one result
    per sample; reported as ``mse``."""

    def process(self, data_batch, data_samples):
        for p, y in zip(data_samples['pred'], data_batch['y']):
            self.results.append(float((p - y).pow(2).mean()))

    def compute_metrics(self, results):
        return {'mse': sum(results) / len(results)}

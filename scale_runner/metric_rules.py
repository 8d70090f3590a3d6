"""Which way a metric improves: ``'greater'`` or ``'less'``, from its name (as in MMEngine)."""
from __future__ import annotations

import re

from .errors import ConfigError

# ``rule`` inferred from the metric name (as in MMEngine); anything else needs an explicit rule.
GREATER_KEYS = ('acc', 'accuracy', 'top', 'f1', 'precision', 'recall', 'map', 'ap', 'auc', 'iou',
                'miou', 'psnr', 'ssim', 'bleu', 'rouge', 'r2')
LESS_KEYS = ('loss', 'error', 'err', 'perplexity', 'ppl', 'mse', 'mae', 'rmse', 'wer', 'cer')
RULES = {'greater': lambda a, b: a > b, 'less': lambda a, b: a < b}


def infer_rule(key: str) -> str:
    """``'greater'`` or ``'less'`` from a metric name such as ``val/accuracy`` or ``top1_acc``."""
    tokens = [t for t in re.split(r'[^a-z0-9]+', key.lower()) if t]
    found = set()
    for rule, names in (('greater', GREATER_KEYS), ('less', LESS_KEYS)):
        if any(t in names or t.rstrip('0123456789') in names for t in tokens):
            found.add(rule)
    if not found:  # substrings: 'mAP50', 'bbox_mAP', 'val_loss_total'
        for rule, names in (('greater', GREATER_KEYS), ('less', LESS_KEYS)):
            if any(len(n) > 2 and n in key.lower() for n in names):
                found.add(rule)
    if len(found) != 1:
        raise ConfigError(
            f'default_hooks.checkpoint: cannot tell whether a greater or a smaller {key!r} is '
            f"better; set rule='greater' or rule='less' (or a list of rules, one per save_best key)")
    return found.pop()

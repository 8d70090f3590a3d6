"""Error types and the 'closest valid name' helper used by every error message."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path, the value and what to do."""


class ModelOutputError(ConfigError, TypeError):
    """The model's output holds no loss the runner can train on (a dict without a ``loss`` key,
    an object without ``.loss``). A :class:`ConfigError`, so the CLI reports it without a
    traceback (exit code 2); also a ``TypeError``, what it was before it had a class of its own."""


class UnsafeTypeError(ConfigError, KeyError):
    """A data config (.yaml/.json) names a ``type`` that it may not import or call (``os.system``).
    A :class:`ConfigError` (the CLI reports it, exit code 2); also a ``KeyError``, what an
    unresolvable registry name raises, so every builder that turns a failed lookup into an error
    naming the config key path (``train_dataloader.dataset.type: ...``) does so for this one too."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's quoted repr


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (small strings only)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def closest(key: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The registered/valid names closest to ``key`` (case-insensitive)."""
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    hits = difflib.get_close_matches(key.lower(), list(lower), n=n, cutoff=cutoff)
    return [lower[h] for h in hits]


def did_you_mean(key: str, candidates: Iterable[str]) -> str | None:
    """The one candidate closest to ``key``, or None if none is close."""
    near = closest(key, candidates, n=1)
    return near[0] if near else None


def check_keys(cfg: Any, valid: Iterable[str], where: str, kind: str) -> None:
    """Refuse the first key of ``cfg`` not in ``valid``: its path, the closest valid one and
    all of them (``kind``: what the keys are, e.g. ``'an env_cfg'``)."""
    valid = list(valid)
    for key in cfg:
        if key not in valid:
            near = did_you_mean(str(key), valid)
            did = f' (did you mean {where}.{near}?)' if near else ''
            raise ConfigError(f'{where}.{key} is not {kind} key{did}: the keys are '
                              f'{", ".join(valid)}')

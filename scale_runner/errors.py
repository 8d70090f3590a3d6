"""Error types and the 'closest valid name' helper used by every error message."""
from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path, the value and what to do."""


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

"""The ``resume`` argument: ``True``, ``False``, ``'auto'`` or a checkpoint path, checked early."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RESUME_USAGE = ("resume takes True (the latest checkpoint of the work dir), False, 'auto' (the "
                "latest, or a fresh start if there was none) or a checkpoint path")
# Words a user may write for a boolean: never read as a checkpoint path (even if one exists).
_RESUME_WORDS = {'yes': True, 'no': False, 'true': True, 'false': False, 'on': True, 'off': False,
                 'y': True, 'n': False, '1': True, '0': False, 'none': False, 'null': False,
                 'latest': True, 'last': True, '': None}


def resolve_resume(resume: Any) -> bool | str | Path:
    """``True``: the latest valid checkpoint, required; ``'auto'``: the same, but a work dir
    that never had a checkpoint starts fresh (a first submission of a requeued job); a path.

    A string is a path if it exists or looks like one (it has a directory part, or names a
    checkpoint: ``epoch_3``, ``iter_1000``, ``best_*``, ``*.safetensors``). A boolean word
    (``'yes'``, ``'false'``, ...) or any other string is a :class:`ConfigError`.
    """
    if resume in (None, False):
        return False
    if resume is True:
        return True
    if isinstance(resume, str) and resume.strip().lower() == 'auto':
        return 'auto'
    if isinstance(resume, str):
        word = resume.strip().lower()
        if word in _RESUME_WORDS:
            meant = _RESUME_WORDS[word]
            hint = '' if meant is None else (
                f' Did you mean resume={meant}? (A checkpoint directory with that name is '
                f'written ./{resume.strip()}.)')
            raise ConfigError(f'resume = {resume!r} is not valid: {RESUME_USAGE}; the string '
                              f'{resume!r} is not read as a path.{hint}')
    if isinstance(resume, (str, os.PathLike)):
        path = Path(resume).expanduser()
        if path.exists() or _looks_like_checkpoint(str(resume)):
            return path
        raise ConfigError(f'resume = {str(resume)!r} is not valid: {RESUME_USAGE}; there is no '
                          f'file or directory {str(resume)!r} (from {os.getcwd()}), and it does '
                          f'not look like a checkpoint path (e.g. work_dirs/x/checkpoints/epoch_3)')
    raise ConfigError(f'resume = {resume!r} is not valid: {RESUME_USAGE}')


def _looks_like_checkpoint(text: str) -> bool:
    seps = {'/', os.sep, os.altsep} - {None}
    if any(sep in text for sep in seps) or text.startswith(('~', '.')):
        return True
    name = text.strip()
    for prefix in ('iter_', 'epoch_'):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return True
    return name.startswith('best_') or name.endswith('.safetensors')

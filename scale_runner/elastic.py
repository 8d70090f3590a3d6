"""Restarts by torchelastic (``torchrun --max-restarts N``, ``accelerate launch --max_restarts N``).

When a worker dies, the launcher stops every worker of the job and starts them all again,
with ``TORCHELASTIC_RESTART_COUNT`` one higher. The runner then resumes by itself from the
latest valid checkpoint (``resume='auto'``, see :func:`restart_count`'s use in the runner).

One trap of torch 2.13 is handled here: the launcher shares its rendezvous TCP store with
the workers and keeps it across restarts (unless ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``),
but the workers' ``env://`` rendezvous adds no per-attempt prefix to their keys (its comment
assumes a new store per attempt). A restarted worker then reads the previous attempt's gloo
addresses and dies in ``connectFullMesh ... Connection refused``, or hangs. A restarted run's
process group is therefore initialized through :data:`SCHEME`: the same store and
environment, with keys under ``scale_runner/attempt_<N>/``.
"""
from __future__ import annotations

import os

SCHEME = 'scale-runner-attempt'


def restart_count() -> int:
    """How many times the launcher has restarted this job's workers (0: the first attempt,
    or no torchelastic launcher)."""
    try:
        return max(0, int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')))
    except ValueError:
        return 0


def restart_init_method() -> str | None:
    """The process group's ``init_method`` for a restarted worker that shares the launcher's
    store (``None`` otherwise: the default ``env://`` is right)."""
    if restart_count() == 0 or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return None
    from torch.distributed.rendezvous import register_rendezvous_handler
    try:
        register_rendezvous_handler(SCHEME, _attempt_rendezvous)
    except RuntimeError:  # registered already (by an earlier runner of this process)
        pass
    return f'{SCHEME}://'


def _attempt_rendezvous(url: str, timeout=None, **kwargs):
    """``env://`` with the launcher's store seen through a per-attempt key prefix."""
    from datetime import timedelta
    from torch.distributed import PrefixStore, TCPStore
    timeout = timeout or timedelta(minutes=30)
    env = os.environ
    rank, world = int(env['RANK']), int(env['WORLD_SIZE'])
    store = TCPStore(env['MASTER_ADDR'], int(env['MASTER_PORT']), world, is_master=False,
                     timeout=timeout)
    yield PrefixStore(f'scale_runner/attempt_{restart_count()}', store), rank, world
    raise RuntimeError(f'{SCHEME}:// cannot rendezvous again: the launcher restarts the workers')


def resume_on_restart(resume, checkpoint_dir):
    """What a run resumes from (``Runner(resume=...)``, resolved), now that the launcher may
    have restarted it: after a restart the job continues from its own latest checkpoint
    (``'auto'``), also when the first attempt was started from a given checkpoint path (which
    is still used if the job wrote none yet)."""
    if restart_count() == 0 or resume in (True, 'auto'):
        return resume
    if resume is False:
        return 'auto'
    from .checkpoint import candidates
    return 'auto' if candidates(checkpoint_dir) else resume

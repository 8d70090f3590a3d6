"""No silent hangs: every rank of a stalled multi-process run exits within ``accelerator.timeout``.

A rank that stops making progress (stuck in user code, waiting for a peer that died without
the backend noticing, or in a collective that only some ranks entered) would otherwise hold
the whole job until the backend's collective timeout (30 minutes for gloo, 10 for NCCL) or
forever. Each rank runs a :class:`Watchdog` thread during training. The training thread does
nothing for it: every ``poll`` seconds the thread samples the training thread's iteration
counter and innermost frame, and publishes them, with what the runner is doing there, to the
launcher's key-value store (``MASTER_ADDR:MASTER_PORT``). When neither has changed for
``timeout`` seconds on some rank, the main process reads every rank's record and logs which
rank(s) did not arrive, after which iteration, and where each rank is; then every rank ends its
process with :data:`EXIT_CODE` (a rank that hears nothing from the main process ends a few
polls later). For example::

    rank 1 did not reach the preemption check after iteration 56 within 60 s. Every rank stops now
    (exit code 124; the bound is accelerator.timeout=60 s).
      rank 0: after iteration 56, in the preemption check
      rank 1: after iteration 56, in the train loop (data loading or a hook), in
        MyHook.after_train_iter (my_hooks.py:12)

The bound holds from the first completed iteration on (a first step that compiles may take
long) and is not applied while a rank saves or loads a checkpoint or computes metrics
(:data:`LONG_PHASES`: long, legitimate single calls); there the backend's timeout remains.
Under ``torchrun --max-restarts N`` the exit restarts the job, which resumes by itself.
"""
from __future__ import annotations

import json
import os
import sys
import sysconfig
import threading
import time
from pathlib import Path

DEFAULT_TIMEOUT = 300.0  # seconds without progress before every rank stops (torchtitan's figure)
EXIT_CODE = 124          # as `timeout(1)`: the run was stopped for taking too long
_PACKAGE = str(Path(__file__).resolve().parent)
_LIBRARIES = tuple({sysconfig.get_paths()[k] for k in ('stdlib', 'platstdlib', 'purelib', 'platlib')})

# What the runner does in a frame of one of its functions (the innermost named one wins): the
# waits for other ranks, and the other phases.
COLLECTIVES = {
    'PreemptionHook.agree': 'the preemption check',
    'OptimWrapper.backward': 'the backward pass (its gradient all-reduce)',
    'OptimWrapper.step': 'the optimizer step',
    'IterTimerHook.rank_spread': "the log line's gather of per-rank times",
    'NanGuardHook.check': "the NaN guard's loss check",
    'NanGuardHook.flag': "the NaN guard's flag all-reduce",
    'from_main': 'a broadcast from the main process',
    'gather': 'a gather of every rank',
    'agree_max': 'an agreement of the ranks',
}
# torch's own functions that wait for other ranks (a collective called from user code, or
# autograd's backward pass, in which DDP all-reduces the gradients)
TORCH_COLLECTIVES = {
    '_engine_run_backward': 'the backward pass (its gradient all-reduce)',
    **{name: f'a torch.distributed {name}' for name in (
        'all_reduce', 'all_gather', 'all_gather_object', 'all_gather_into_tensor', 'broadcast',
        'broadcast_object_list', 'barrier', 'monitored_barrier', 'reduce_scatter_tensor',
        'all_to_all_single', 'send', 'recv', 'gather', 'scatter', 'reduce')},
}
PHASES = {
    **COLLECTIVES,
    'OptimWrapper.update_params': 'the parameter update',
    'LoggerHook._train_line': 'the log line',
    'BaseLoop.run_iter': 'an evaluation step',
    '_TrainLoop.run_iter': 'the train step (forward)',
    'EpochBasedTrainLoop.run': 'the train loop (data loading or a hook)',
    'IterBasedTrainLoop.run': 'the train loop (data loading or a hook)',
}
# Long single calls that are not hangs: the bound is not applied while one runs.
LONG_PHASES = frozenset({'Runner.save_checkpoint', 'Runner.wait_checkpoint', 'Runner.load_checkpoint',
                         'Evaluator.evaluate', 'BaseMetric.evaluate'})


class Watchdog:
    """The hang detector of one rank (see the module docstring); :func:`watch` runs one."""

    def __init__(self, runner, timeout: float, poll: float | None = None):
        self.runner = runner
        self.timeout = float(timeout)
        self.poll = poll if poll is not None else min(max(self.timeout / 10, 0.2), 10.0)
        acc = runner.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self._target = threading.get_ident()  # the training thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name='scale_runner-watchdog', daemon=True)
        self._store = None  # connected by the thread: a slow connection never delays training
        from .elastic import restart_count
        self._prefix = (f'scale_runner/watchdog/{os.environ.get("TORCHELASTIC_RUN_ID", "")}/'
                        f'{restart_count()}/')
        self._seq = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll + 5)

    # ---- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        self._store = _store()
        state = self.runner.state
        first_iter = state.iter
        last, changed = None, time.monotonic()
        fired = None  # when this rank found itself stalled
        main = self.runner.accelerator.is_main_process
        while not self._stop.wait(self.poll):
            frame = sys._current_frames().get(self._target)
            if frame is None:
                return
            sample = (state.iter, id(frame.f_code), frame.f_lineno)
            now = time.monotonic()
            where = describe(frame)
            if sample != last or where['long']:
                last, changed = sample, now
            stalled = now - changed
            self._publish(dict(iter=state.iter, stalled=round(stalled, 1), **where))
            if fired is None and stalled >= self.timeout and state.iter > first_iter:
                fired = now
                self.runner.logger.error(f'rank {self.rank}: no progress for {stalled:.0f} s after '
                                         f'iteration {state.iter}, {_at(where)}')
                self._set('stop', str(self.rank))
            if main and (fired is not None or self._has('stop')):
                self._verdict()
            # Every rank waits for the main process's diagnosis (it names every rank), then
            # stops; without one (the main process is gone) it stops a few polls later.
            if self._has('verdict') or (fired is not None and now - fired > 4 * self.poll + 5):
                _end(self.runner.logger, EXIT_CODE)

    def _verdict(self) -> None:
        """On the main process: read every rank's record twice, one poll apart (a rank whose
        record did not change is not alive), log the diagnosis, tell every rank to stop."""
        first = self._records()
        time.sleep(self.poll * 1.5)
        self.runner.logger.error(diagnose(self._records(), first, self.world, self.timeout, self.rank))
        self._set('verdict', '1')
        time.sleep(self.poll * 1.5)  # the others read it before this process (maybe the store's host) ends
        _end(self.runner.logger, EXIT_CODE)

    def _set(self, key: str, value: str) -> None:
        if self._store is not None:
            try:
                self._store.set(self._prefix + key, value)
            except Exception:  # the store's host is gone: records are a diagnosis aid only
                self._store = None

    def _has(self, key: str) -> bool:
        try:
            return self._store is not None and self._store.check([self._prefix + key])
        except Exception:
            self._store = None
            return False

    def _publish(self, record: dict) -> None:
        self._seq += 1
        self._set(str(self.rank), json.dumps({**record, 'seq': self._seq}))

    def _records(self) -> dict[int, dict]:
        out = {}
        for r in range(self.world):
            key = f'{self._prefix}{r}'
            try:
                if self._store is not None and self._store.check([key]):
                    out[r] = json.loads(self._store.get(key))
            except Exception:
                pass
        return out


def watch(runner, timeout: float | None):
    """A context manager running a :class:`Watchdog` for ``runner`` when it has several
    processes and ``timeout`` is not 0 (``None``: :data:`DEFAULT_TIMEOUT`)."""
    import contextlib
    timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if runner.accelerator.num_processes < 2 or timeout <= 0:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def running():
        dog = Watchdog(runner, timeout)
        dog.start()
        try:
            yield dog
        finally:
            dog.stop()
    return running()


def describe(frame) -> dict:
    """Where a thread is: ``phase``, what the runner does there (the innermost function of this
    package named by :data:`PHASES`, or of torch's in :data:`TORCH_COLLECTIVES`); ``wait``,
    whether that is a wait for the other ranks; ``user``, the innermost user-code frame; and
    ``long``, whether a long phase (:data:`LONG_PHASES`) is running."""
    ours = wait = torch = user = None
    long = False
    while frame is not None:
        code = frame.f_code
        name = getattr(code, 'co_qualname', code.co_name)
        path = code.co_filename
        if path.startswith(_PACKAGE):
            long = long or name in LONG_PHASES
            ours = ours or (name if name in PHASES else None)
            wait = name if name in COLLECTIVES else wait  # the outermost: the runner's own name
        elif path.startswith(_LIBRARIES):
            if torch is None and name in TORCH_COLLECTIVES and f'{os.sep}torch{os.sep}' in path:
                torch = name
        elif user is None and not path.startswith('<'):
            user = f'{name} ({Path(path).name}:{frame.f_lineno})'
        frame = frame.f_back
    if wait is not None:
        phase, wait = COLLECTIVES[wait], True
    elif ours is not None and torch is None:
        phase, wait = PHASES[ours], False
    elif torch is not None:  # a collective of torch's inside a runner phase or user code
        phase, wait = TORCH_COLLECTIVES[torch] + (f' in {PHASES[ours]}' if ours else ''), True
    else:
        phase, wait = 'the train loop', False
    return dict(phase=phase, wait=wait, user=user, long=long)


def _at(where: dict) -> str:
    user = f', in {where["user"]}' if where.get('user') else ''
    return f'in {where.get("phase")}{user}'


def diagnose(records: dict, earlier: dict, world: int, timeout: float, me: int = 0) -> str:
    """The main process's error: which rank(s) did not arrive, and where every rank is."""
    silent = [r for r in range(world) if r != me and (
        r not in records or records[r].get('seq') == earlier.get(r, {}).get('seq'))]
    alive = {r: rec for r, rec in records.items() if r not in silent}
    behind = []
    if alive:
        low = min(rec['iter'] for rec in alive.values())
        if low < max(rec['iter'] for rec in alive.values()):
            behind = [r for r, rec in alive.items() if rec['iter'] == low]
        else:  # the same iteration: the ones that are not waiting for the others
            behind = [r for r, rec in alive.items() if not rec.get('wait')]
    late = sorted(set(behind) | set(silent))
    waiting = [r for r in sorted(alive) if r not in late]
    if late and waiting:
        rec = alive[waiting[0]]
        head = (f'rank{"s" if len(late) > 1 else ""} {", ".join(map(str, late))} did not reach '
                f'{rec["phase"]} after iteration {rec["iter"]} within {timeout:g} s')
    elif len({rec['phase'] for rec in alive.values()}) > 1:
        low = min(alive.values(), key=_iter)['iter']
        head = (f'the ranks wait in different collectives after iteration {low} for {timeout:g} s '
                f'(a collective that only some ranks entered?)')
    elif alive:
        rec = alive[min(alive)]
        head = f'no rank made progress for {timeout:g} s after iteration {rec["iter"]}, in {rec["phase"]}'
    else:
        head = f'no rank made progress for {timeout:g} s'
    lines = []
    for r in range(world):
        if r in silent:
            lines.append(f'rank {r}: not reporting (its process died, or is frozen)'
                         + (f'; last seen after iteration {records[r]["iter"]}, {_at(records[r])}'
                            if r in records else ''))
        else:
            lines.append(f'rank {r}: after iteration {alive[r]["iter"]}, {_at(alive[r])}')
    return (f'{head}. Every rank stops now (exit code {EXIT_CODE}; the bound is '
            f'accelerator.timeout={timeout:g} s).\n  ' + '\n  '.join(lines))


def _iter(record: dict) -> int:
    return record['iter']


def _store():
    """A client of the launcher's store (``None`` without one): it outlives a stuck rank."""
    addr, port = os.environ.get('MASTER_ADDR'), os.environ.get('MASTER_PORT')
    if not addr or not port:
        return None
    try:
        from datetime import timedelta
        from torch.distributed import TCPStore
        return TCPStore(addr, int(port), is_master=False, timeout=timedelta(seconds=30),
                        wait_for_workers=False)
    except Exception:
        return None


def _end(logger, code: int) -> None:
    """End this process from the watchdog thread: the training thread is stuck and cannot be
    interrupted (a collective waits in C++), so flush the logs and leave with ``os._exit``."""
    for handler in logger.handlers:
        try:
            handler.flush()
        except Exception:
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)

"""Ending a process that used torch.distributed without an abort at interpreter exit.

The cause (torch 2.13, gloo; seen in a core dump of an aborted, finished run): a gloo worker
thread drops its reference to a finished collective *after* the caller has moved on. When that
reference is the last one to an output tensor with a Python object, the C++ thread must take
the GIL to free it. If the main thread has meanwhile started interpreter finalization, CPython
ends the worker with ``pthread_exit`` inside a ``noexcept`` frame of ``ProcessGroupGloo::runLoop``
and the C++ runtime calls ``std::terminate`` ("terminate called without an active exception",
SIGABRT, exit -6) — in a run whose files were all written. ``destroy_process_group()`` does not
help while anything (a DDP model's reducer, a hook) still holds the group, because only the
group's destructor joins its worker threads.

So:

* the CLI ends with :func:`exit_process`: every ``atexit`` function runs (logging, wandb,
  TensorBoard, our trackers) while the interpreter is whole, garbage is collected (dataloader
  workers shut down, an unreferenced group joins its threads), stdout/stderr are flushed, and
  the process leaves with ``os._exit(code)``, skipping only the teardown that can abort;
* a Python script that calls ``runner.train()`` under ``torchrun`` keeps its own exit code:
  the runner registers :func:`drain_at_exit` with ``atexit``, which runs before finalization
  and gives the worker threads the GIL until none of them is runnable, so their last
  references are gone before CPython refuses them the GIL.
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import time


def exit_process(code: int) -> None:
    """Flush and close everything, then end the process with ``code`` (never returns)."""
    try:
        atexit._run_exitfuncs()  # what a normal exit runs first, while nothing is torn down
        gc.collect()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):  # closed, or a broken pipe
                pass
        os._exit(code)


def exit_code(exc: BaseException) -> int:
    """The code the interpreter would have exited with for an uncaught ``exc``."""
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)  # sys.exit('message') prints the message, exits 1
        return 1
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def register_drain() -> None:
    """Register :func:`drain_at_exit` once per process (the runner calls it when it sets up a
    multi-process run)."""
    if not getattr(drain_at_exit, 'registered', False):
        drain_at_exit.registered = True
        atexit.register(drain_at_exit)


def drain_at_exit(timeout: float = 2.0) -> None:
    """Release the GIL until no other thread of this process is runnable (at most ``timeout``
    seconds), so a gloo worker that still holds a finished collective frees it now."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        time.sleep(0.002)  # releases the GIL: a worker waiting for it takes it now
        quiet = quiet + 1 if not _other_threads_running() else 0


def _other_threads_running() -> bool:
    """Whether a thread of this process other than the caller is running or runnable (Linux:
    ``/proc``; elsewhere assume one is, so the drain waits its short timeout)."""
    me = str(threading.get_native_id())
    try:
        tids = os.listdir('/proc/self/task')
    except OSError:
        return True
    for tid in tids:
        if tid == me:
            continue
        try:
            with open(f'/proc/self/task/{tid}/stat', 'rb') as f:
                state = f.read().rsplit(b')', 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # the thread ended
        if state == b'R':
            return True
    return False


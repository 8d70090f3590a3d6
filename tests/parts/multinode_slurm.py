"""Stub SLURM commands for the tests of launch/slurm/train.sbatch (tests/test_launch.py,
tests/test_multinode.py). SLURM is not installed here; the stubs record what the script asks.

``srun``: starts its command once per node (``SLURM_NNODES``), in the background, with that
node's ``SLURM_NODEID``/``SLURM_PROCID``/``SLURM_LOCALID``; each task runs under a small
monitor (the part of slurmstepd the test never signals) that writes the task's exit code to
``$STUB_DIR/task<N>.exit``, followed by ``saved`` if ``$STUB_DIR/node<N>/saved`` existed when
the task ended; the tasks' pids go to ``$STUB_DIR/task.pids``, their output to
``task<N>.log``, srun's arguments to ``srun.args``; srun exits with the last failing task's code.
``scontrol``: ``show hostnames $SLURM_JOB_NODELIST`` prints ``$STUB_HOSTS`` (space-separated);
``requeue`` appends its arguments and the caller's ``SLURM_PROCID``/``RANK`` to ``$STUB_DIR/requeue``.
``python`` (for ``PYTHON``, without real training): writes its arguments, environment and
SIGUSR1 disposition under ``$STUB_DIR/node<N>/``, touches ``ready``, then either exits with
``$STUB_EXIT`` at once or (``STUB_WAIT=1``) waits up to 30 s; on SIGTERM it records it, takes
1 s ("saving"), writes ``saved`` and exits 143.
"""
from __future__ import annotations

from pathlib import Path

SRUN = r'''#!/bin/bash
printf '%s\n' "$@" > "$STUB_DIR/srun.args"
while [ "$1" != bash ]; do shift; done  # drop srun's own options
monitors=()
for node in $(seq 0 $((SLURM_NNODES - 1))); do
    (
        SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURMD_NODENAME=node$node \
            "$@" > "$STUB_DIR/task$node.log" 2>&1 &
        task=$!
        echo "$task" >> "$STUB_DIR/task.pids"
        wait "$task"; rc=$?
        if [ -e "$STUB_DIR/node$node/saved" ]; then echo "$rc saved"; else echo "$rc"; fi \
            > "$STUB_DIR/task$node.exit"
        exit "$rc"
    ) &
    monitors+=($!)
done
status=0
for pid in "${monitors[@]}"; do wait "$pid" || status=$?; done
exit "$status"
'''
SCONTROL = r'''#!/bin/bash
case "$1 $2" in
    "show hostnames") [ "$3" = "$SLURM_JOB_NODELIST" ] && printf '%s\n' $STUB_HOSTS ;;
    requeue*) echo "$* procid=${SLURM_PROCID:-} rank=${RANK:-}" >> "$STUB_DIR/requeue" ;;
    *) exit 1 ;;
esac
'''
PYTHON = r'''#!/bin/bash
d="$STUB_DIR/node$SLURM_NODEID"
mkdir -p "$d"
printf '%s\n' "$@" > "$d/args"
env > "$d/env"
pwd > "$d/cwd"
trap -p USR1 > "$d/usr1"
trap 'echo TERM >> "$d/signals"; sleep 1; touch "$d/saved"; exit 143' TERM
touch "$d/ready"
[ "${STUB_WAIT:-0}" = 1 ] || exit "${STUB_EXIT:-0}"
for _ in $(seq 300); do sleep 0.1; done
exit 0
'''


def write_stubs(bindir: Path, python: bool = False) -> Path:
    """Write ``srun``, ``scontrol`` (and ``python``) into ``bindir``; return it."""
    bindir.mkdir(parents=True, exist_ok=True)
    for name, text in (('srun', SRUN), ('scontrol', SCONTROL), *((('python', PYTHON),) if python else ())):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return bindir


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc), parents first: every process of a task,
    as SLURM's process tracking signals them (torch's agent starts each worker in a session
    of its own, so a process group is not enough)."""
    children: dict[int, list[int]] = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            pid, rest = stat.read_text().split(' (', 1)
        except OSError:
            continue
        children.setdefault(int(rest.rsplit(') ', 1)[1].split()[1]), []).append(int(pid))
    tree, i = [root], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    return tree


def task_pids(stub_dir: Path) -> list[int]:
    """The pids of the stub srun's tasks (the script's ``node_main`` shells)."""
    path = Path(stub_dir) / 'task.pids'
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []

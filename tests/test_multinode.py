"""Multi-node, really run (issue 19): two "nodes" on this machine, each an ``accelerate launch``
with ``--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1 --rdzv_backend static
--same_network`` (as launch/slurm/train.sbatch launches) and one process, sharing one work dir
(as a cluster's shared file system), over gloo.

* the final weights equal, bit for bit, those of one node running 2 processes (ranks forked
  from the test process; slow: ``accelerate launch --num_processes 2``, the same weights);
* (slow) a SIGTERM to one node's launcher (node 1, and node 0, which hosts the rendezvous
  store) makes every rank write ``preempt_iter_3`` and exit 143, and a resume on two nodes ends
  bit-identical to the uninterrupted run;
* (slow) ``launch/slurm/train.sbatch`` end to end with stub ``srun``/``scontrol``
  (tests/parts/multinode_slurm.py: two tasks with SLURM_NODEID 0 and 1, each running the real
  ``accelerate launch``): SIGUSR1 to every process of the job step, as SLURM sends it, saves,
  runs ``scontrol requeue`` once (on rank 0), and the requeued job (``--resume auto``) ends
  bit-identical too.

The config is tests/parts/multinode_cfg.py (parts: multinode_parts.py). "Mid-training" is
deterministic: ``MN_GATE`` holds one rank after iteration 3 until its process has the signal.
The script's arguments, and its node shells' handling of signals, are tested without training
in tests/test_launch.py.
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import PARTS_DIR, pythonpath
from multinode_slurm import process_tree, task_pids, write_stubs

ROOT = Path(__file__).resolve().parents[1]
CFG = PARTS_DIR / 'multinode_cfg.py'
SBATCH = ROOT / 'launch' / 'slurm' / 'train.sbatch'
FINAL = 6            # multinode_cfg's max_iters (checkpoints at 4 and 6)
GATE_ITER = 3        # the iteration a signal is agreed at (between two checkpoints)
TIMEOUT = 180
# what a launcher or an outer job may have left in this process's environment
LEFTOVER = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'GROUP_RANK', 'ROLE_RANK',
            'MASTER_ADDR', 'MASTER_PORT', 'NODE_RANK', 'MN_GATE')
LEFTOVER_PREFIXES = ('SLURM_', 'TORCHELASTIC_', 'PET_', 'ACCELERATE_')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LEFTOVER and not k.startswith(LEFTOVER_PREFIXES)}
    env.update(OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath(), **extra)
    return env


def launch_cmd(work: Path, port: int, machine_rank: int | None, resume: bool = False) -> list[str]:
    """``accelerate launch`` of one node of two (``machine_rank``), or of one node with 2
    processes (``None``)."""
    nodes = (['--num_machines', '1'] if machine_rank is None else
             ['--num_machines', '2', '--machine_rank', str(machine_rank), '--main_process_ip',
              '127.0.0.1', '--rdzv_backend', 'static', '--same_network'])
    return [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
            *nodes, '--main_process_port', str(port), '--mixed_precision', 'no',
            '--dynamo_backend', 'no', '-m', 'scale_runner', 'train', str(CFG), '--work-dir', str(work),
            *(['--resume'] if resume else [])]


class Job:
    """Processes started concurrently (each in a session of its own), output to log files."""

    def __init__(self, cmds: list[list[str]], logs: list[Path], env: dict, cwd: Path):
        self.logs, self.procs = logs, []
        for cmd, log in zip(cmds, logs):
            with open(log, 'w') as f:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                                   cwd=cwd, start_new_session=True))

    def output(self, i: int) -> str:
        return self.logs[i].read_text(errors='replace')

    def wait(self) -> list[int]:
        deadline = time.monotonic() + TIMEOUT
        try:
            return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail('a launcher did not finish in time:\n' + '\n'.join(
                f'--- node {i}\n{self.output(i)[-3000:]}' for i in range(len(self.procs))))
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL every process of the job still running (torch's agent starts each worker in
        a session of its own, so a process group is not enough)."""
        for p in self.procs:
            if p.poll() is None:
                for pid in process_tree(p.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait()


def two_nodes(tmp: Path, name: str, work: Path, resume: bool = False, **env: str) -> Job:
    port = free_port()
    return Job([launch_cmd(work, port, r, resume) for r in (0, 1)],
               [tmp / f'{name}.node{r}.log' for r in (0, 1)], clean_env(**env), tmp)


def ok(job: Job) -> None:
    codes = job.wait()
    assert codes == [0] * len(codes), '\n'.join(
        f'--- node {i}: exit {c}\n{job.output(i)[-4000:]}' for i, c in enumerate(codes))


def weights(work: Path, name: str = f'iter_{FINAL}') -> dict:
    from safetensors.torch import load_file
    ckpt = work / 'checkpoints' / name
    assert (ckpt / 'manifest.json').is_file(), f'{ckpt} was not completely written'
    return load_file(ckpt / 'model.safetensors')


def assert_identical(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f'not bit-identical: {differ}'


def run_logs(work: Path) -> dict[str, str]:
    """Per-rank logs of the newest run in ``work``: ``{'0': ..., '1': ...}``."""
    run = max((p for p in work.iterdir() if p.is_dir() and p.name != 'checkpoints'), key=lambda p: p.name)
    return {('0' if '.rank' not in p.name else p.name.split('.rank')[1].split('.')[0]): p.read_text()
            for p in run.glob('*.log')}


def forked_ranks(work: Path, processes: int = 2) -> list[int]:
    """The reference without a launcher's start-up cost: ``processes`` ranks forked from this
    process (torch, Accelerate and the runner already imported), joined over gloo by
    torch.distributed's env:// rendezvous, as torchrun would set it up on one node; each
    trains ``multinode_cfg`` through the CLI's code. Returns the exit codes."""
    port, pids = free_port(), []
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            code = 1
            try:
                fd = os.open(work.parent / f'forked_rank{rank}.log', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.environ.clear()
                os.environ.update(clean_env(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK='0',
                                            WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                                            MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)))
                from accelerate.state import AcceleratorState, GradientState

                from scale_runner.cli import main
                AcceleratorState._reset_state(True)
                GradientState._reset_state()
                code = main(['train', str(CFG), '--work-dir', str(work)]) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    deadline, codes = time.monotonic() + TIMEOUT, {}
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [codes[pid] for pid in pids]


@pytest.fixture(scope='module')
def one_node(tmp_path_factory) -> dict:
    """The reference: one node, 2 processes, never interrupted; its final weights. The ranks
    are forked from this process (see ``forked_ranks``; the slow
    ``test_one_node_accelerate_launch_matches_the_reference`` checks that ``accelerate
    launch --num_processes 2`` on one node gives the same weights)."""
    for module in ('accelerate', 'scale_runner.cli', 'multinode_parts'):  # before forking, so
        importlib.import_module(module)                                      # the children start at once
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # the first optimizer imports torch._dynamo
    work = tmp_path_factory.mktemp('one_node') / 'work'
    codes = forked_ranks(work)
    assert codes == [0, 0], '\n'.join(p.read_text() for p in sorted(work.parent.glob('forked_rank*.log')))
    return weights(work)


@pytest.mark.slow
def test_one_node_accelerate_launch_matches_the_reference(tmp_path, one_node):
    work = tmp_path / 'work'
    ok(Job([launch_cmd(work, free_port(), None)], [tmp_path / 'one.log'], clean_env(), tmp_path))
    assert sorted(run_logs(work)) == ['0', '1']
    assert_identical(weights(work), one_node)


def test_two_nodes_train_bit_identical_to_one_node_with_two_processes(tmp_path, one_node):
    work = tmp_path / 'work'
    job = two_nodes(tmp_path, 'two', work)
    ok(job)
    # one job of 2 processes, not two jobs of one each: rank 1's log is there, and both say 2
    logs = run_logs(work)
    assert sorted(logs) == ['0', '1'], sorted(logs)
    assert all('processes: 2' in text for text in logs.values()), logs
    ckpt = work / 'checkpoints' / f'iter_{FINAL}'
    assert {'rng_0.safetensors', 'rng_1.safetensors'} <= {p.name for p in ckpt.iterdir()}
    final = weights(work)
    assert_identical(final, one_node)
    # the comparison can fail: the weights moved since the previous checkpoint
    assert not all(torch.equal(final[k], v) for k, v in weights(work, 'iter_4').items())


def signal_when_gated(job: Job, gate: Path, rank: int, send) -> None:
    """Wait until ``rank`` is held after GATE_ITER (its marker file), then call ``send``."""
    marker = gate / f'at_{GATE_ITER}_rank{rank}'
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if any(p.poll() is not None for p in job.procs) or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f'never reached iteration {GATE_ITER}:\n' + '\n'.join(
                f'--- node {i}\n{job.output(i)[-3000:]}' for i in range(len(job.procs))))
        time.sleep(0.05)
    send()


def assert_preempted_at_gate(work: Path, signame: str, code: int) -> None:
    root = work / 'checkpoints'
    assert (root / 'latest').read_text().strip() == f'preempt_iter_{GATE_ITER}'
    assert {p.name for p in root.iterdir() if p.is_dir()} == {f'preempt_iter_{GATE_ITER}'}
    from scale_runner.checkpoint import find_resumable
    found = find_resumable(root)
    assert found['state']['train_state']['iter'] == GATE_ITER  # verified: every rank's part
    names = {p.name for p in (root / f'preempt_iter_{GATE_ITER}').iterdir()}
    assert {'model.safetensors', 'rng_0.safetensors', 'rng_1.safetensors'} <= names, names
    logs = run_logs(work)
    for rank in ('0', '1'):  # each node's process saved and stopped with 128 + signal
        assert f'{signame} received: saving a checkpoint at iteration {GATE_ITER}' in logs[rank], logs[rank]
        assert f'preempted by {signame}: exiting with code {code}' in logs[rank], logs[rank]


@pytest.mark.slow
@pytest.mark.parametrize('signalled', [1, 0], ids=['node1', 'node0'])
def test_sigterm_to_one_nodes_launcher_saves_on_both_and_resumes_exactly(tmp_path, one_node, signalled):
    """The elastic agent of the signalled node forwards SIGTERM to its worker (and waits up to
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s, before SIGKILL); the ranks agree on it after the
    iteration, both write ``preempt_iter_3`` and exit 143. That launcher exits 143; the other
    node's launcher sees its worker exit 143 and reports a failure (exit 1)."""
    work, gate = tmp_path / 'work', tmp_path / 'gate'
    gate.mkdir()
    job = two_nodes(tmp_path, 'pre', work, MN_GATE=f'{GATE_ITER}:{signalled}:{gate}')
    signal_when_gated(job, gate, signalled, lambda: os.kill(job.procs[signalled].pid, signal.SIGTERM))
    codes = job.wait()
    out = '\n'.join(f'--- node {i}: exit {c}\n{job.output(i)[-3000:]}' for i, c in enumerate(codes))
    assert codes[signalled] == 143, out
    assert codes[1 - signalled] == 1 and 'exitcode  : 143' in job.output(1 - signalled), out
    assert 'Received 15 death signal, shutting down workers' in job.output(signalled), out
    assert_preempted_at_gate(work, 'SIGTERM', 143)
    ok(two_nodes(tmp_path, 'resumed', work, resume=True))
    assert f'preempt_iter_{GATE_ITER} at epoch 0, iter {GATE_ITER}' in run_logs(work)['0']
    assert_identical(weights(work), one_node)


# ---- launch/slurm/train.sbatch, end to end ----------------------------------------------------
def sbatch_job(tmp: Path, work: Path, name: str, gate: Path | None = None) -> tuple[Job, Path]:
    """``train.sbatch`` as sbatch runs it on the first node of a 2-node allocation, with the
    stubs' records in ``tmp/name``; the real ``accelerate launch`` on every node."""
    stubs = write_stubs(tmp / 'bin')
    record = tmp / name
    record.mkdir()
    env = clean_env(PATH=f'{stubs}{os.pathsep}{os.environ["PATH"]}', STUB_DIR=str(record),
                    STUB_HOSTS='127.0.0.1 node1', SLURM_JOB_ID='4242', SLURM_NNODES='2',
                    SLURM_JOB_NODELIST='node[0-1]', SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE='1',
                    MAIN_PORT=str(free_port()), ACCELERATE_CONFIG=str(ROOT / 'launch' / 'cpu_ddp.yaml'),
                    PYTHON=sys.executable, **({'MN_GATE': f'{GATE_ITER}:0:{gate}'} if gate else {}))
    job = Job([['bash', str(SBATCH), str(CFG), '--work-dir', str(work)]], [record / 'sbatch.log'], env, tmp)
    return job, record


def records(record: Path) -> str:
    return '\n'.join(f'--- {p.name}\n{p.read_text(errors="replace")[-3000:]}'
                     for p in sorted(record.iterdir()) if p.is_file())


@pytest.mark.slow
def test_sbatch_script_preempted_by_sigusr1_requeues_once_and_resumes_exactly(tmp_path, one_node):
    work, gate = tmp_path / 'work', tmp_path / 'gate'
    gate.mkdir()
    job, record = sbatch_job(tmp_path, work, 'first', gate)

    def usr1_to_every_process_of_the_step():  # what SLURM's --signal=USR1@120 does
        for pid in [p for task in task_pids(record) for p in process_tree(task)]:
            os.kill(pid, signal.SIGUSR1)  # the task's shell, its launcher, the launcher's worker
    signal_when_gated(job, gate, 0, usr1_to_every_process_of_the_step)
    codes = job.wait()
    out = records(record)
    assert codes == [1], out  # each launcher reports its worker's exit 138 as a failure
    assert (record / 'requeue').read_text().splitlines() == ['requeue 4242 procid=0 rank=0'], out
    for node in (0, 1):
        task = (record / f'task{node}.log').read_text()
        assert 'exitcode  : 138' in task, out  # the launcher: its worker exited 128 + SIGUSR1
        assert f'node {node}: SIGUSR1 received; the launcher exited with 1 after the runner ' \
               'saved (and, for SIGUSR1, requeued job 4242)' in task, out
        assert (record / f'task{node}.exit').read_text().split() == ['1'], out
    assert_preempted_at_gate(work, 'SIGUSR1', 138)
    # the requeued job: the same script; `--resume auto` finds preempt_iter_3
    job, record = sbatch_job(tmp_path, work, 'requeued')
    assert job.wait() == [0], records(record)
    assert not (record / 'requeue').exists()
    assert f'preempt_iter_{GATE_ITER} at epoch 0, iter {GATE_ITER}' in run_logs(work)['0']
    assert_identical(weights(work), one_node)

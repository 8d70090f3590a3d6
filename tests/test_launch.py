"""launch/: Accelerate config files load with Accelerate's own loader; the SLURM script derives
its launch arguments from SLURM's environment."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'launch'
SBATCH = LAUNCH / 'slurm' / 'train.sbatch'
EXPECTED = {'cpu_ddp.yaml': 'MULTI_GPU', 'single_gpu.yaml': 'NO', 'multi_gpu.yaml': 'MULTI_GPU',
            'fsdp.yaml': 'FSDP', 'deepspeed_zero2.yaml': 'DEEPSPEED', 'deepspeed_zero3.yaml': 'DEEPSPEED'}


def test_every_config_file_is_tested():
    assert sorted(p.name for p in LAUNCH.glob('*.yaml')) == sorted(EXPECTED)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_accelerate_loads_config(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    cfg = load_config_from_file(str(LAUNCH / name))  # unknown keys raise here
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == EXPECTED[name]
    assert cfg.num_machines == 1 and cfg.compute_environment.value == 'LOCAL_MACHINE'
    if name == 'fsdp.yaml':
        assert cfg.fsdp_config['fsdp_version'] == 2
    if name.startswith('deepspeed'):
        assert cfg.deepspeed_config['zero_stage'] == int(name[-6])
        # accumulation and clipping come from optim_wrapper, never from the launcher
        assert 'gradient_accumulation_steps' not in cfg.deepspeed_config
        assert 'gradient_clipping' not in cfg.deepspeed_config
    if name == 'cpu_ddp.yaml':  # MULTI_CPU / use_cpu would make accelerate launch start ONE process
        assert cfg.num_processes == 2 and not cfg.use_cpu


def test_sbatch_is_valid_bash_with_slurm_directives():
    subprocess.run(['bash', '-n', str(SBATCH)], check=True)
    text = SBATCH.read_text()
    for directive in ('#SBATCH --ntasks-per-node=1', '#SBATCH --signal=USR1@120', '#SBATCH --requeue'):
        assert directive in text
    assert 'srun ' in text and 'accelerate.commands.launch' in text


def _launch_args(tmp_path, **env):
    """Source the script (functions only) with SLURM's variables set, print launch_args."""
    stub = tmp_path / 'bin'
    stub.mkdir(exist_ok=True)
    scontrol = stub / 'scontrol'  # SLURM is not installed here: expand a fixed node list
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-09]" ] && '
                        'printf "gpu07\\ngpu08\\ngpu09\\n" || exit 1\n')
    scontrol.chmod(0o755)
    full = {'PATH': f'{stub}{os.pathsep}{os.environ["PATH"]}', 'SCALE_RUNNER_SOURCE_ONLY': '1',
            'SLURM_JOB_NODELIST': 'gpu[07-09]', 'SLURM_NNODES': '3', 'SLURM_JOB_ID': '123456',
            **env}
    out = subprocess.run(['bash', '-c', f'source {shlex.quote(str(SBATCH))} && launch_args'],
                         env=full, capture_output=True, text=True, check=True).stdout
    return shlex.split(out)


def test_sbatch_derives_rank_address_and_port(tmp_path):
    from accelerate.commands.launch import launch_command_parser
    for node in range(3):
        args = _launch_args(tmp_path, SLURM_NODEID=str(node), SLURM_GPUS_ON_NODE='4')
        # Accelerate's own parser accepts them, and they say what SLURM said
        ns = launch_command_parser().parse_args([*args, '-m', 'scale_runner', 'train', 'cfg.py'])
        assert ns.num_machines == 3 and ns.machine_rank == node
        assert ns.num_processes == 12  # 3 nodes x 4 GPUs
        assert ns.main_process_ip == 'gpu07'  # first host of the allocation
        assert ns.main_process_port == 20000 + 123456 % 20000
        assert ns.config_file == 'launch/multi_gpu.yaml'
    args = _launch_args(tmp_path, SLURM_NODEID='1', GPUS_PER_NODE='8', MAIN_PORT='29400',
                        ACCELERATE_CONFIG='launch/fsdp.yaml')
    ns = launch_command_parser().parse_args([*args, 'train.py'])
    assert (ns.num_processes, ns.main_process_port, ns.config_file) == (24, 29400, 'launch/fsdp.yaml')


# ---- the whole script against stub srun / scontrol / python (tests/parts/multinode_slurm.py) ---
def _sbatch_job(tmp_path, *args, **env):
    """Run train.sbatch as sbatch would on a 2-node allocation of 4 GPUs each; the stub python
    stands for `accelerate launch` (no training). Returns (Popen, the stubs' record dir)."""
    from multinode_slurm import write_stubs
    stubs = write_stubs(tmp_path / 'bin', python=True)
    record, submit = tmp_path / 'record', tmp_path / 'submit'
    record.mkdir()
    submit.mkdir()
    full = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'STUB_'))}
    full.pop('OMP_NUM_THREADS', None)
    full.update(PATH=f'{stubs}{os.pathsep}{os.environ["PATH"]}', STUB_DIR=str(record),
                STUB_HOSTS='gpu07 gpu08', SLURM_JOB_ID='123456', SLURM_NNODES='2',
                SLURM_JOB_NODELIST='gpu[07-08]', SLURM_GPUS_ON_NODE='4', SLURM_SUBMIT_DIR=str(submit),
                PYTHON=str(stubs / 'python'), **env)
    proc = subprocess.Popen(['bash', str(SBATCH), 'configs/x.py', *args], env=full, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return proc, record


def _finish(proc, record, timeout=30):
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        from multinode_slurm import process_tree
        for pid in reversed(process_tree(proc.pid)):
            os.kill(pid, 9)
        out = proc.communicate()[0]
        pytest.fail(f'train.sbatch did not finish:\n{out}')
    logs = ''.join(f'--- {p.name}\n{p.read_text()}' for p in sorted(record.glob('task*.log')))
    return proc.returncode, out + logs


def test_sbatch_runs_one_accelerate_launch_per_node_with_its_rank(tmp_path):
    from accelerate.commands.launch import launch_command_parser
    proc, record = _sbatch_job(tmp_path, '--cfg-options', 'a=1')
    code, out = _finish(proc, record)
    assert code == 0, out
    srun = (record / 'srun.args').read_text().splitlines()
    assert srun[:4] == ['--ntasks=2', '--ntasks-per-node=1', '--kill-on-bad-exit=1', 'bash'], srun
    assert sorted(p.name for p in record.glob('node*')) == ['node0', 'node1']  # one launch per node
    for node in (0, 1):
        d = record / f'node{node}'
        args = (d / 'args').read_text().splitlines()
        assert args[:2] == ['-m', 'accelerate.commands.launch'], args
        ns = launch_command_parser().parse_args(args[2:])  # Accelerate's own parser accepts them
        assert (ns.num_machines, ns.machine_rank, ns.num_processes) == (2, node, 8)
        assert ns.main_process_ip == 'gpu07'  # the first host of `scontrol show hostnames`
        assert ns.main_process_port == 20000 + 123456 % 20000
        assert (ns.rdzv_backend, ns.same_network) == ('static', True)
        assert ns.config_file == 'launch/multi_gpu.yaml'
        assert ns.module and ns.training_script == 'scale_runner'
        assert ns.training_script_args == ['train', 'configs/x.py', '--cfg-options', 'a=1',
                                           '--resume', 'auto']
        env = dict(line.split('=', 1) for line in (d / 'env').read_text().splitlines() if '=' in line)
        assert (env['SLURM_NODEID'], env['SLURM_PROCID']) == (str(node), str(node))
        assert env['OMP_NUM_THREADS'] == '1'
        # the preemption save's grace under the launcher, and NCCL's flight recorder
        assert env['TORCH_ELASTIC_SHUTDOWN_TIMEOUT'] == '110'
        assert (env['TORCH_NCCL_TRACE_BUFFER_SIZE'], env['TORCH_NCCL_DUMP_ON_TIMEOUT']) == ('2000', '1')
        assert (d / 'cwd').read_text().strip() == str(tmp_path / 'submit')
        assert (d / 'usr1').read_text().strip() == "trap -- '' SIGUSR1"  # the launcher ignores it
        assert (record / f'task{node}.exit').read_text().split() == ['0']
    assert not (record / 'requeue').exists()  # the script never requeues: the runner does


def test_sbatch_exits_with_a_failing_nodes_code_and_needs_a_config(tmp_path):
    proc, record = _sbatch_job(tmp_path, STUB_EXIT='3')
    code, out = _finish(proc, record)
    assert code == 3, out
    usage = subprocess.run(['bash', str(SBATCH)], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith('SLURM_')})
    assert usage.returncode == 2 and 'usage: sbatch launch/slurm/train.sbatch CONFIG' in usage.stderr


def test_sbatch_node_shells_outlive_their_launchers_on_sigusr1_and_sigterm(tmp_path):
    """SLURM signals every process of the step: SIGUSR1 first (--signal=USR1@120; the launcher
    ignores it), then SIGTERM (the time limit, scancel). Each node's task shell must wait for
    its launcher, which takes 1 s to save: if the shell died first, SLURM would end the step
    and SIGKILL the training processes in the middle of their save."""
    import signal
    import time

    from multinode_slurm import process_tree, task_pids
    proc, record = _sbatch_job(tmp_path, STUB_WAIT='1')
    deadline = time.monotonic() + 30
    while not all((record / f'node{n}' / 'ready').exists() for n in (0, 1)) or len(task_pids(record)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, _finish(proc, record)[1]
        time.sleep(0.05)

    def signal_step(sig):
        for pid in [p for task in task_pids(record) for p in process_tree(task)]:
            os.kill(pid, sig)
    signal_step(signal.SIGUSR1)
    time.sleep(0.5)
    assert proc.poll() is None and not list(record.glob('task*.exit')), _finish(proc, record)[1]
    signal_step(signal.SIGTERM)
    code, out = _finish(proc, record)
    assert code == 143, out
    for node in (0, 1):
        # the task ended after its launcher had saved, with the launcher's exit code
        assert (record / f'task{node}.exit').read_text().split() == ['143', 'saved'], out
        assert (record / f'node{node}' / 'signals').read_text().split() == ['TERM'], out
        assert f'node {node}: SIGUSR1 received; the launcher exited with 143 after the runner ' \
               'saved (and, for SIGUSR1, requeued job 123456)' in out, out

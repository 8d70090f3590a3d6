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

"""Rank/world resolution from torchrun, SLURM or nothing, and a 1-rank process group."""

from __future__ import annotations

import os
import subprocess
import sys

from amorlip.distributed import expand_nodelist, read_launch_env


def test_torchrun_variables():
    info = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                "MASTER_ADDR": "node7", "MASTER_PORT": "29511",
                                "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 8)
    assert (info.master_addr, info.master_port, info.source) == ("node7", 29511, "torchrun")


def test_slurm_variables_map_to_ranks():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[08-10,12],login", "SLURM_JOB_ID": "123456"}
    info = read_launch_env(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "slurm")
    assert info.master_addr == "gpu08"  # same answer from scontrol and from our expansion
    assert 20000 <= info.master_port < 32768  # below Linux's ephemeral range
    # the port is a function of the job id: every rank of one job agrees on it
    assert read_launch_env(dict(env, SLURM_PROCID="0")).master_port == info.master_port
    assert read_launch_env(dict(env, MASTER_PORT="2222")).master_port == 2222


def test_a_batch_script_of_a_multi_task_allocation_is_one_process_not_rank_0():
    # `sbatch -n 8 script`: the script sees SLURM_PROCID=0 and SLURM_NTASKS=8 but is no srun task
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}
    assert read_launch_env(env).source == "single"
    assert read_launch_env(dict(env, SLURM_STEP_ID="batch")).source == "single"
    assert read_launch_env(dict(env, SLURM_STEP_ID="3")).source == "slurm"


def test_single_task_slurm_and_plain_process_are_single():
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"
    info = read_launch_env({})
    assert (info.rank, info.local_rank, info.world_size, info.source) == (0, 0, 1, "single")


def test_nodelist_expansion():
    assert expand_nodelist("gpu[08-10,12],login") == ["gpu08", "gpu09", "gpu10", "gpu12", "login"]
    assert expand_nodelist("n1,n2") == ["n1", "n2"]
    assert expand_nodelist("r[1-2]c[3-4]") == ["r1c3", "r1c4", "r2c3", "r2c4"]
    assert expand_nodelist("single") == ["single"]


def test_single_process_gets_a_process_group(tmp_path):
    # a fresh interpreter: the process group and DeepSpeed's env are global state
    code = (
        "import os, torch.distributed as dist\n"
        "from amorlip.distributed import init_distributed, is_master, broadcast_object, barrier\n"
        "info = init_distributed()\n"
        "assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == 'gloo'\n"
        "assert os.environ['RANK'] == '0' and os.environ['WORLD_SIZE'] == '1' and int(os.environ['MASTER_PORT']) > 0\n"
        "assert os.environ['DS_ACCELERATOR'] == 'cpu'\n"
        "assert is_master() and broadcast_object({'a': 1}) == {'a': 1}\n"
        "barrier(); print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS")}
    env["OMP_NUM_THREADS"] = "1"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")

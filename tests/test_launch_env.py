"""How `amorlip launch` reads SLURM's environment (amorlip/slurm.py) and picks devices (amorlip/devices.py).

The environments below are the variables Slurm 22.05 sets in the batch script of `sbatch -n 2`
and in the tasks of `srun -n 2` (tests/slurm/test_slurm_launch.py checks the same decisions on
environments captured from the local cluster). The decisions are pure functions, so they are
tested here on any machine.
"""

from __future__ import annotations

import pytest
import torch

from amorlip import devices, slurm

BATCH_2 = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "3"}
STEP_2 = {**BATCH_2, "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_LOCALID": "1", "SLURM_PROCID": "1"}


@pytest.mark.parametrize("step, expected", [
    ("0", 0), ("12", 12), ("batch", None), ("extern", None), ("interactive", None),
    # the reserved ids (slurm.h) of the batch, extern and interactive steps, as numbers
    ("4294967291", None), ("4294967292", None), ("4294967290", None), ("", None), ("junk", None),
])
def test_job_step_id_counts_only_numbered_steps(step, expected):
    assert slurm.job_step_id({"SLURM_STEP_ID": step}) == expected


def test_launch_plan():
    # the bug: SLURM_NTASKS=2 in a batch script is not "already under srun"
    assert slurm.launch_plan(2, BATCH_2) == "srun"
    assert slurm.launch_plan(2, STEP_2) == "inline"
    assert slurm.launch_plan(1, BATCH_2) == "inline"
    assert slurm.launch_plan(2, {**BATCH_2, "SLURM_STEP_ID": "batch"}) == "srun"
    assert slurm.launch_plan(2, {**BATCH_2, "SLURM_STEP_ID": "extern"}) == "srun"
    # an allocation of one task (sbatch -c 8 --gres=gpu:2): torchrun on its node
    assert slurm.launch_plan(2, {**BATCH_2, "SLURM_NTASKS": "1"}) == "torchrun"
    # one task of a one-task step asked for several ranks: torchrun inside the step
    assert slurm.launch_plan(2, {**STEP_2, "SLURM_NTASKS": "1"}) == "torchrun"
    assert slurm.launch_plan(4, {}) == "torchrun"
    assert slurm.launch_plan(1, {}) == "inline"


def test_srun_command_flags():
    cmd = slurm.srun_command(4, 8, 8)
    assert cmd[:3] == ["env", "OMP_NUM_THREADS=1", "srun"]
    assert set(cmd[3:]) == {"--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--cpus-per-task=8",
                            "--gpu-bind=none", "--kill-on-bad-exit=1"}
    assert "--cpus-per-task" not in " ".join(slurm.srun_command(1, 2, None))


def test_allocation_srun_command_follows_the_allocation():
    cmd = slurm.allocation_srun_command(2, env={**BATCH_2, "SLURM_JOB_NUM_NODES": "3", "OMP_NUM_THREADS": "4"})
    assert "--nodes=3" in cmd and "--ntasks=6" in cmd and "--ntasks-per-node=2" in cmd
    assert "--cpus-per-task=3" in cmd and "OMP_NUM_THREADS=4" in cmd
    cmd = slurm.allocation_srun_command(2, nodes=1, env={k: v for k, v in BATCH_2.items() if k != "SLURM_CPUS_PER_TASK"})
    assert "--nodes=1" in cmd and "--ntasks=2" in cmd and "OMP_NUM_THREADS=1" in cmd
    assert not any(a.startswith("--cpus-per-task") for a in cmd)


@pytest.mark.parametrize("local_rank, count, expected", [
    (0, 8, 0), (5, 8, 5), (7, 8, 7),   # every rank sees all GPUs of its node
    (1, 1, 0), (7, 1, 0),              # one GPU bound per task: each rank's device is 0
    (3, 2, 1),                         # two GPUs per task
])
def test_cuda_device_index(local_rank, count, expected):
    assert devices.cuda_device_index(local_rank, count) == expected


def test_cuda_device_index_refuses_no_device_and_negative_ranks():
    with pytest.raises(ValueError, match="no CUDA device"):
        devices.cuda_device_index(0, 0)
    with pytest.raises(ValueError, match="local rank"):
        devices.cuda_device_index(-1, 8)


def test_eval_device_follows_the_allocation_not_the_node():
    gpu_job = {"SLURM_JOB_ID": "9", "SLURM_JOB_GPUS": "0", "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
    cpu_job = {"SLURM_JOB_ID": "9"}
    assert devices.eval_device(gpu_job, cuda_device_count=1) == "cuda:0"
    # a CPU job on a GPU node without device confinement sees all 8 GPUs: none of them is its own
    assert devices.eval_device(cpu_job, cuda_device_count=8) == "cpu"
    assert devices.eval_device({"SLURM_JOB_ID": "9", "SLURM_GPUS_PER_NODE": "a100:1"}, 8) == "cuda:0"
    assert devices.eval_device({"SLURM_JOB_ID": "9", "SLURM_TRES_PER_TASK": "cpu=2,gres/gpu=1"}, 8) == "cuda:0"
    assert devices.eval_device({"SLURM_JOB_ID": "9", "SLURM_TRES_PER_TASK": "cpu=2"}, 8) == "cpu"
    assert devices.eval_device({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, 8) == "cpu"
    assert devices.eval_device({"CUDA_VISIBLE_DEVICES": ""}, 8) == "cpu"
    assert devices.eval_device({}, 1) == "cuda:0"   # a workstation
    assert devices.eval_device(gpu_job, 0) == "cpu"  # allocated but no driver: CPU


def test_enable_tf32_sets_the_matmul_and_cudnn_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        devices.enable_tf32()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before

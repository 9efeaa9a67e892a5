"""Where this process sits in the job, and the one object that owns it: :class:`WorldInfo`.

:func:`read_launch_env` reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or, under ``srun``, SLURM's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host
of SLURM_JOB_NODELIST), else describes a single process. :func:`init_distributed` then writes the
torchrun-style variables DeepSpeed insists on and creates the process group: gloo on CPU, NCCL on
GPU. DeepSpeed needs a process group even for one rank, so a lone process gets a 1-rank group.

:func:`init_world` is what the trainer calls: it creates the group and returns a frozen
:class:`WorldInfo` (rank, world size, the process group of the global batch, the device, the local
and the global batch size). The engine, the loader, the trainer and the objectives read their
geometry from it and from nothing else, so a rank can never train on per-rank negatives while the
others assume global ones (docs/architecture.md, "The world").
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import subprocess
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from amorlip import collectives
from amorlip.slurm import in_job_step

log = logging.getLogger(__name__)

# A rendezvous port derived from SLURM_JOB_ID lands in [_PORT_BASE, _PORT_BASE + _PORT_SPAN), so two
# jobs sharing a node rarely collide (open_clip and PyTorch Lightning use the same trick). The range
# ends below 32768, where Linux's ephemeral ports begin (net.ipv4.ip_local_port_range), so an
# outgoing connection of another program cannot already hold the port.
_PORT_BASE = 20000
_PORT_SPAN = 12000


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """What the launcher (torchrun, srun, or nothing) says about this process."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


class WorldSizeMismatch(RuntimeError):
    """The launched world differs from the configured one (the global batch would be split wrongly)."""


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> hosts: ``"gpu[01-03,7],login"`` -> gpu01, gpu02, gpu03, gpu7, login.

    Zero padding is kept (``[08-10]`` -> 08, 09, 10). Used when ``scontrol`` is not on the PATH.
    """
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            if "-" in rng:
                lo, hi = rng.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{rng}{suffix}")
    # nested brackets after the first (e.g. "a[1-2]b[3-4]") are expanded recursively
    out: list[str] = []
    for host in hosts:
        out.extend(expand_nodelist(host) if "[" in host else [host])
    return out


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` when available)."""
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=10, check=True)
            hosts = res.stdout.split()
            if hosts:
                return hosts[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_nodelist(nodelist)[0]


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Rank and rendezvous from torchrun, else SLURM (one task per rank), else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun",
        )
    # a task of an srun step only: a batch script (`sbatch -n 8`) also carries SLURM_PROCID=0 and
    # SLURM_NTASKS=8, but it is one process, not rank 0 of 8 (its peers would never come)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and in_job_step(env):
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:
            port = _PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % _PORT_SPAN
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port, source="slurm",
        )
    return LaunchEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                     master_port=int(env.get("MASTER_PORT", 0)) or 0, source="single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed_cpu() -> None:
    """Avoid DeepSpeed's two 2-minute CPU JIT builds of its C++ ops (on machines without CUDA)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    # The shm allreduce only speeds up CPU collectives and its bf16 path needs AVX-512.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str | None = None, timeout_s: int = 1800) -> LaunchEnv:
    """Export the variables DeepSpeed expects, then create the default process group.

    Returns the resolved :class:`LaunchEnv`. Idempotent: an existing group is reused. ``timeout_s``
    bounds the rendezvous and the checkpoint collectives (a save on a slow shared file system can
    take minutes); per-step collectives use :func:`step_group`'s shorter timeout.
    """
    info = read_launch_env()
    if info.source == "single" and not info.master_port:
        info = dataclasses.replace(info, master_port=free_port())
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                      LOCAL_RANK=str(info.local_rank), MASTER_ADDR=info.master_addr,
                      MASTER_PORT=str(info.master_port))
    prepare_deepspeed_cpu()
    if dist.is_initialized():
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(cuda_device_for(info.local_rank))
    import deepspeed

    if info.source == "single":
        # One process needs no rendezvous. torch's TCPStore would listen on every interface whatever
        # MASTER_ADDR says (an unauthenticated port open to the network); an in-memory store opens
        # none, and DeepSpeed adopts a group that already exists.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s))
    log.info("process group: rank %d/%d (local %d) via %s, %s at %s:%d", info.rank, info.world_size,
             info.local_rank, info.source, backend, info.master_addr, info.master_port)
    return info


def cuda_device_for(local_rank: int) -> int:
    """This rank's CUDA ordinal, ``local_rank % device_count`` (``amorlip.devices.cuda_device_index``)."""
    from amorlip.devices import cuda_device_index

    return cuda_device_index(local_rank, torch.cuda.device_count())


def device_for(local_rank: int) -> torch.device:
    return torch.device(f"cuda:{cuda_device_for(local_rank)}") if torch.cuda.is_available() else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    """The one owner of a training job's geometry; every consumer reads it from here.

    ``group`` is the process group of the global batch: the objectives gather over it (global
    negatives, global partition targets) and the lambda nets all-reduce their gradients over it.
    It is ``None`` only for one rank. ``global_batch = local_batch x world_size`` always.
    """

    rank: int
    local_rank: int
    world_size: int
    group: Any
    device: torch.device
    global_batch: int
    local_batch: int
    source: str = "single"
    step_group: Any = None

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Per-step collectives (the stop/NaN flags, the metric means) run in a group of their own with this
# timeout: when one rank dies uncaught (CUDA OOM on one GPU, a segfault), the others fail at the next
# step after this long instead of waiting the 30 minutes a checkpoint barrier may legitimately need.
STEP_TIMEOUT_S_ENV = "AMORLIP_STEP_TIMEOUT_S"
DEFAULT_STEP_TIMEOUT_S = 600


def make_world(global_batch: int, configured_world_size: int | None = None, what: str = "this run",
               backend: str | None = None) -> WorldInfo:
    """Create the process group and the :class:`WorldInfo` for a job of ``global_batch`` samples a step.

    ``configured_world_size`` (``nproc x nodes`` of the run) must equal the launched world size: a
    mismatch raises :class:`WorldSizeMismatch` naming both, before any model is built (the batch split,
    the DeepSpeed batch and the data position all depend on it).
    """
    launch = init_distributed(backend)
    if configured_world_size is not None and configured_world_size != launch.world_size:
        raise WorldSizeMismatch(
            f"{what} is configured for nproc x nodes = {configured_world_size} rank(s) but was launched "
            f"with {launch.world_size} ({launch.source}); launch it with `amorlip launch --nproc "
            f"{configured_world_size} -- train ...` (or srun with {configured_world_size} tasks), or set the "
            f"run's nproc/nodes to match {launch.world_size}")
    if global_batch % launch.world_size:
        raise WorldSizeMismatch(f"{what}: batch_size {global_batch} is not divisible by the "
                                f"{launch.world_size} ranks")
    group = dist.group.WORLD if launch.world_size > 1 else None
    step_group = None
    if launch.world_size > 1:
        timeout = int(os.environ.get(STEP_TIMEOUT_S_ENV) or DEFAULT_STEP_TIMEOUT_S)
        step_group = dist.new_group(backend=dist.get_backend(), timeout=timedelta(seconds=timeout))
    return WorldInfo(rank=launch.rank, local_rank=launch.local_rank, world_size=launch.world_size,
                     group=group, device=device_for(launch.local_rank), global_batch=global_batch,
                     local_batch=global_batch // launch.world_size, source=launch.source,
                     step_group=step_group)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_master() -> bool:
    """Rank 0 logs, tracks and writes the shared files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (the trainer's step flags and metric means), counted
    by ``amorlip.collectives`` as an all-reduce of its bytes; identity on one rank."""
    if not is_initialized() or world_size() == 1:
        return tensor
    dist.all_reduce(tensor, op=op, group=group)
    collectives.record("all_reduce", collectives.tensor_bytes(tensor))
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity on one rank)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Destroy the process group (in a ``finally``): NCCL warns about, and may hang on, a group that
    is still alive at interpreter exit, and a clean teardown frees the rendezvous port at once."""
    if is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError) as exc:  # a peer already gone: nothing left to tear down
            log.debug("destroy_process_group: %s", exc)

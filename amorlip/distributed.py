"""Where this process sits in the job: rank, local rank, world size, rendezvous address.

One function (:func:`world_info_from_env`) reads torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) or, under ``srun``, SLURM's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
the first host of SLURM_JOB_NODELIST), else describes a single process. :func:`init_distributed`
then writes the torchrun-style variables DeepSpeed insists on and creates the process group:
gloo on CPU, NCCL on GPU. DeepSpeed needs a process group even for one rank, so a lone process
gets a 1-rank gloo/NCCL group on a free loopback port.
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

log = logging.getLogger(__name__)

# A rendezvous port derived from SLURM_JOB_ID lands in [_PORT_BASE, _PORT_BASE + _PORT_SPAN), so two
# jobs sharing a node rarely collide (open_clip and PyTorch Lightning use the same trick).
_PORT_BASE = 15000
_PORT_SPAN = 20000


@dataclasses.dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


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


def world_info_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    """Rank and rendezvous from torchrun, else SLURM (one task per rank), else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(
            rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), source="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:
            port = _PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % _PORT_SPAN
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or first_host(nodelist)
        return WorldInfo(
            rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port, source="slurm",
        )
    return WorldInfo(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                     master_port=int(env.get("MASTER_PORT", 0)) or 0, source="single")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_deepspeed_cpu() -> None:
    """Avoid DeepSpeed's two 2-minute CPU JIT builds (env-python.md section 2)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    # The shm allreduce only speeds up CPU collectives and its bf16 path needs AVX-512.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(backend: str | None = None, timeout_s: int = 1800) -> WorldInfo:
    """Export the variables DeepSpeed expects, then create the default process group.

    Returns the resolved :class:`WorldInfo`. Idempotent: an existing group is reused.
    """
    info = world_info_from_env()
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
        torch.cuda.set_device(info.local_rank)
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


def device_for(info: WorldInfo) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (identity on one rank)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (e.g. any rank saw a stop signal)."""
    if not is_initialized() or world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()

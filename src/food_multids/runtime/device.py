"""Where a process computes: the device it was given and its place in the process group."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from food_multids.config import ProjectConfig
from food_multids.runtime.cluster import exit_with_supervisor


@dataclass(frozen=True)
class Placement:
    """Where this process computes: its device and its rank among `world` processes."""

    device: torch.device
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(cfg: ProjectConfig) -> Placement:
    """training.device for this process, and its place in the process group it joins (or starts, alone):
    called by the entry points (training/run.py in process, training/worker.py under a launcher)."""
    device = resolve_device(cfg)
    rank, world = init_distributed(device, cfg.training.master_port)
    return Placement(device, rank, world)


def resolve_device(cfg: ProjectConfig) -> torch.device:
    return resolve_device_name(cfg.training.device, "training.device")


def resolve_device_name(wanted: str, setting: str = "predict.device") -> torch.device:
    """auto | cpu | cuda -> this process's device (its LOCAL_RANK's GPU under a launcher)."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"params:{setting} is cuda but no CUDA GPU is visible; use auto or cpu")
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def skip_deepspeed_shm_op() -> None:
    """Stop DeepSpeed's CPU backend from JIT-building its shared-memory all-reduce (`deepspeed_shm_comm`).

    Built on the first `init_distributed` of every CPU run, it costs 50-100 s of silent C++ compile into
    ~/.cache/torch_extensions, a folder every checkout and venv on the machine shares; a build killed
    midway leaves a `lock` file there that every later DeepSpeed process waits on forever. The op only
    serves DeepSpeed's tensor-parallel inference all-reduce (`inference_all_reduce`), which nothing here
    calls: training and evaluation reduce through torch.distributed (gloo on CPU). DeepSpeed keeps one
    dict of compatible ops per process, so marking the op incompatible makes it skip the build."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(device: torch.device, master_port: int | None = None) -> tuple[int, int]:
    """Join (or start, for a single in-process run) the process group; return (rank, world_size)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(master_port or _free_port())}
        added = [k for k in defaults if k not in os.environ]
        os.environ.update({k: defaults[k] for k in added})
        exit_with_supervisor()  # a torchrun rank does not outlive kedro / the node worker that started it
        if device.type == "cpu":
            skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        # A single in-process run made these up; child processes (a launcher, tests'
        # subprocesses) must not inherit a port that this process is now listening on.
        for key in added:
            if key != "LOCAL_RANK":
                os.environ.pop(key, None)
    return dist.get_rank(), dist.get_world_size()


def finish_distributed() -> None:
    """Every rank waits for the others, then the process group is torn down before the interpreter exits:
    a rank that exits with gloo's threads still running dies with SIGABRT ("terminate called without an
    active exception"), which the launcher reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

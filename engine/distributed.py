"""Data-parallel training under ``torchrun`` (DistributedDataParallel): one process per GPU (NCCL) or
per CPU worker (gloo).

``torchrun --nproc_per_node N train.py ...`` starts ``N`` processes; :func:`from_environment` reads
the ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun sets and joins the process group.
Conventions (``docs/distributed.md``):

* ``--batch`` is the **global** batch: every process replays the same seeded pair sequence and takes
  its own contiguous share of each batch (:class:`ShardBatches`), so the pairs, their order and the
  resume point do not depend on the number of processes, and each pair is seen once per pass.
* Gradients are averaged over processes (DDP), so one step on ``N`` processes at ``B/N`` pairs each
  equals one single-process step at ``B`` pairs (to float rounding).
* Rank 0 owns the run folder: the lock, checkpoints, TensorBoard, progress and validation.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from network.errors import RunError
from network.training import ShardBatches  # noqa: F401  (re-exported: the sampler of a distributed run)


@dataclass
class Distributed:
    """This process's place in the run (``world_size`` 1: a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        return torch.tensor(values, dtype=torch.float64, device=device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: list) -> list:
        """Element-wise mean of a list of numbers over all processes."""
        if not self.enabled:
            return [float(v) for v in values]
        t = self._tensor([float(v) for v in values])
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def any(self, *flags: bool) -> list:
        """Per flag: whether any process raised it (e.g. a stop request, a non-finite loss)."""
        if not self.enabled:
            return [bool(f) for f in flags]
        t = self._tensor([1.0 if f else 0.0 for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v > 0) for v in t.tolist()]

    def gather(self, obj) -> list:
        """``obj`` of every process, in rank order (on every process)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Average ``module``'s parameter gradients over processes (for modules outside DDP, e.g. the critic)."""
        if not self.enabled:
            return
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every process."""
        if self.enabled:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)

    def close(self) -> None:
        """Leave the process group together (a process that tears its connections down while another
        still talks to it can abort the other). Call on success only: after a fault, just exit and
        torchrun stops the other processes."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def from_environment(gpu: str, argv: list | None = None, script: str = "train.py",
                     timeout_minutes: float = 30.0) -> tuple:
    """``(Distributed, device)`` for this process. Outside torchrun (or with one process): a
    single-process run on the device ``-g`` names; several ids (the seed repos' ``-g 0,1``) stop with
    the torchrun command to use. Under torchrun: ``-g -1`` runs on the CPU with gloo; ``-g 0,1,...``
    lists one GPU per local process (NCCL)."""
    from network.cli import resolve_device

    ids = [g.strip() for g in str(gpu).split(",") if g.strip()]
    world = int(os.environ.get("WORLD_SIZE", "1")) if launched_by_torchrun() else 1
    if world <= 1 and len(ids) > 1 and not launched_by_torchrun():
        raise RunError(f"-g {gpu}: several GPUs run as one process each under torchrun; use: "
                       f"{launch_command(argv if argv is not None else [], script, len(ids))}")
    if world <= 1:
        return Distributed(), resolve_device(ids[0] if len(ids) == 1 else gpu)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not ids or ids == ["-1"]:
        device, backend = torch.device("cpu"), "gloo"
    else:
        if len(ids) != local_world:
            raise RunError(f"-g {gpu}: torchrun started {local_world} processes on this node; list one GPU id per "
                           f"process (e.g. -g {','.join(str(i) for i in range(local_world))}) or -g -1 for the CPU")
        device = resolve_device(ids[local_rank])
        torch.cuda.set_device(device)
        backend = "nccl"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return Distributed(rank, world, local_rank, backend), device


def launch_command(argv: list, script: str, n_processes: int) -> str:
    """The torchrun command line that runs ``script argv`` on ``n_processes`` processes."""
    import shlex

    return shlex.join(["torchrun", "--standalone", f"--nproc_per_node={n_processes}", script] + list(argv))


__all__ = ["Distributed", "from_environment", "launched_by_torchrun", "ShardBatches", "launch_command"]

"""Several processes training one model, as torchrun starts them: who this process is, and the few
collectives hpclora adds to the Trainer's own (DDP through accelerate, on NCCL for GPUs and gloo for CPUs).

One voice: rank 0 alone decides about the run directory (lock, resume point, damaged checkpoints), writes
it, and prints; the other ranks learn its decisions through `share`. With one process every helper here
does nothing and no process group exists.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

# Collectives wait this long before a rank gives up: loading a large model or tokenizing on rank 0
# while the others wait at a barrier takes longer than torch's default of 10 minutes.
COLLECTIVE_TIMEOUT_S = 3 * 3600


@dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    local_rank: int = 0  # this process on its node: the GPU it uses
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the variables torchrun sets (one process when they are absent)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def start(w: World, cuda: bool) -> None:
    """Join the process group (NCCL on GPUs, each rank on its node's GPU LOCAL_RANK; gloo on CPUs), before
    the Trainer would: it then uses this group."""
    import torch
    import torch.distributed as dist

    if w.size == 1 or dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(w.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def finish() -> None:
    """Leave the process group: a process that exits with the group alive can abort in its C++ destructors
    ("terminate called without an active exception"), which torchrun reports as a failed rank. The finished
    Trainer's DDP wrapper, kept alive by reference cycles, holds the group and the last collectives' work too:
    collected now, while the interpreter is whole, not during its shutdown, where freeing their tensors aborts."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def share(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first():
    """Rank 0 runs the block first (filling a cache, say), then the others, which find it filled."""
    if not world().main:
        barrier()
    yield
    if world().main:
        barrier()


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (one small collective)."""
    if not active():
        return values
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gathered_trainable_state(model) -> dict:
    """The trainable parameters (for a PEFT model: its adapter) of a model FSDP shards, whole, on the host of every
    rank; every rank must call it. The frozen base weights stay sharded: gathering them too, as a full state dict
    would, puts the whole base model into one host's memory at every checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))

"""torch.distributed set-up for torchrun jobs (DDP), and the few collectives the trainers use."""
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

# CLIP-ReID's stage 1 runs on rank 0 while the other ranks wait in a collective; torch's default of
# 10 (nccl) / 30 (gloo) minutes would end a long stage 1, so the process group waits up to 12 hours.
PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    group: bool = False  # a process group runs (torchrun), even one of a single process

    @property
    def distributed(self):
        return self.world_size > 1 or self.group

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device):
    """Under torchrun start the process group: nccl on CUDA (one GPU per local rank), gloo on CPU; with
    one process too (`--nproc_per_node 1`: DDP as asked, e.g. to check the NCCL path on one GPU).
    Returns a DistInfo; a plain run gets rank 0 of 1 on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun sets it, even for one process
        return DistInfo(device=str(device))
    import torch.distributed as dist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=str(device), group=True)


def cleanup_distributed(dist_info):
    if dist_info.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(dist_info):
    if dist_info.distributed:
        torch.distributed.barrier()


@contextmanager
def rank0_first(dist_info):
    """Run the block on rank 0 first and on the other ranks after it: rank 0 downloads a file or
    builds a cache, the others then read it."""
    if not dist_info.is_main:
        barrier(dist_info)
    yield
    if dist_info.is_main:
        barrier(dist_info)


def ranks_agree(model, dist_info):
    """True when every rank holds the same parameters (checksums compared). BatchNorm running
    statistics are not compared: DDP syncs them from rank 0 at each forward, then each rank updates
    them with its own batch; checkpoints hold rank 0's."""
    if not dist_info.distributed:
        return True
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(dist_info.device)
    low, high = checksum.clone(), checksum.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(low, high))


def broadcast_object(obj, dist_info):
    """Rank 0's `obj` on every rank."""
    if not dist_info.distributed:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def wrap_ddp(module, dist_info):
    """DistributedDataParallel around `module` in a torchrun job, the module itself otherwise."""
    if not dist_info.distributed:
        return module
    device_ids = [dist_info.local_rank] if dist_info.device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

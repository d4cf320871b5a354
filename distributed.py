"""Processes and devices: torchrun DDP in a dozen lines (NCCL on GPUs, gloo on CPU; plain `python script.py` runs as
a world of one), rank-0 printing, gathering rows across ranks, peak memory.

Shared by training (training_loop.py, benchmark.py) and evaluation (evaluate.py).
"""

import gc
import os
import resource
import socket

import torch
import torch.distributed as dist

#----------------------------------------------------------------------------
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a world of one.

def init_distributed():
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), device

def barrier():
    if dist.is_initialized():
        dist.barrier()

# A 2-process gloo run can abort at exit unless DDP modules go first (training_loop drops its own
# when it returns), then a barrier, then the group.
def close_distributed():
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

# fn() on rank 0 only; the user error it raises is raised on every rank, so all stop together.
def on_rank0(fn):
    error = None
    if get_rank() == 0:
        try:
            fn()
        except (ValueError, OSError) as err:
            error = err
    error = broadcast(error)
    if error is not None:
        raise error

# A picklable value of rank 0 on every rank.
def broadcast(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

# A free local TCP port for a process group's rendezvous (MASTER_PORT).
def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0

def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

# Rows of x from every rank, concatenated in rank order (ranks may hold different numbers of rows).
def gather_rows(x):
    if not dist.is_initialized():
        return x
    sizes = [torch.zeros([], dtype=torch.int64, device=x.device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
    padded = x.new_zeros([max(int(s) for s in sizes), *x.shape[1:]])
    padded[:len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])

# Peak memory of this process: the device's allocator on CUDA, the resident set on the CPU.
def memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

#----------------------------------------------------------------------------

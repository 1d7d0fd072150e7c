"""Data-parallel helpers on PyTorch's own stack (torchrun / accelerate launch): who am I, and sharing
SVD initializations, so that each rank decomposes only its share of the layers."""

from __future__ import annotations

import os

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return torch.distributed.is_available() and torch.distributed.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    return True


def broadcast_init(init, src: int, device: torch.device):
    """Send rank ``src``'s :class:`~svdkit.layers.Init` to every rank (None on the others)."""
    from .layers import Init

    dist = torch.distributed
    header = [None if init is None else (tuple(init.A.shape), tuple(init.B.shape), init.A.dtype,
                                         sorted(init.trainable), init.subtract)]  # fmt: skip
    dist.broadcast_object_list(header, src=src)
    a_shape, b_shape, dtype, trainable, subtract = header[0]
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    A = init.A.to(comm).contiguous() if init is not None else torch.empty(a_shape, dtype=dtype, device=comm)
    B = init.B.to(comm).contiguous() if init is not None else torch.empty(b_shape, dtype=dtype, device=comm)
    dist.broadcast(A, src=src)
    dist.broadcast(B, src=src)
    return Init(A=A.to(device), B=B.to(device), trainable=frozenset(trainable), subtract=subtract)

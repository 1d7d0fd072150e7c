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
    """Send rank ``src``'s :class:`~svdkit.adapters.layers.Init` to every rank (None on the others)."""
    from svdkit.adapters.layers import Init

    dist = torch.distributed
    fields = ("A", "B", "A0", "B0")
    header = [None]
    if init is not None:
        tensors = {k: getattr(init, k) for k in fields if getattr(init, k) is not None}
        tensors.update({f"core.{k}": v for k, v in init.core.items()})
        header = [({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                   sorted(init.trainable), init.subtract, init.bias, init.weightless)]  # fmt: skip
    dist.broadcast_object_list(header, src=src)
    specs, trainable, subtract, bias, weightless = header[0]
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    got = {}
    for key, (shape, dtype) in specs.items():
        if init is not None:
            value = tensors[key].to(comm).contiguous()
        else:
            value = torch.empty(shape, dtype=dtype, device=comm)
        dist.broadcast(value, src=src)
        got[key] = value.to(device)
    core = {k.split(".", 1)[1]: v for k, v in got.items() if k.startswith("core.")}
    return Init(A=got.get("A"), B=got.get("B"), A0=got.get("A0"), B0=got.get("B0"), core=core,
                trainable=frozenset(trainable), subtract=subtract, bias=bias, weightless=weightless)  # fmt: skip

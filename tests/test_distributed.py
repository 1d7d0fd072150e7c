"""Split SVD initialization across ranks (gloo, 2 CPU processes) equals the single-process init."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

import svdkit
from svdkit.api import adapted_layers

from conftest import tiny_model

CFG = dict(rank=3, svd="randomized", niter=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(**CFG), progress=False)
        torch.save({n: (l.lora_A.detach(), l.lora_B.detach()) for n, l in adapted_layers(model)}, f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_split_init_equals_single_process_init(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    single = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(**CFG), progress=False)
    expected = {n: (l.lora_A.detach(), l.lora_B.detach()) for n, l in adapted_layers(single)}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == expected.keys()
        for name, (A, B) in expected.items():
            assert torch.equal(got[name][0], A) and torch.equal(got[name][1], B), (rank, name)

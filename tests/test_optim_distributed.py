"""GaLore under DDP (gloo, 2 CPU processes): the projector comes from the all-reduced gradient, so it is
identical on every rank and equal to the single-process one on the whole batch."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

import svdkit
import svdkit.optim as O

from conftest import free_port
from test_distributed import _leave
from test_optim import _tiny_lm

CFG = dict(rank=4, update_gap=2)
STEPS = 5


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (4, 6), generator=g) for _ in range(STEPS)]


def _loss(model, ids):
    logits = model(ids)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    projs = {n: opt.state[p]["proj"].clone() for n, p in model.named_parameters() if "proj" in opt.state[p]}
    return {"params": params, "projs": projs}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = _tiny_lm()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = O.build(model, svdkit.config("galore", **CFG), lr=1e-2)
    for ids in _batches():
        _loss(ddp, ids[rank * 2 : rank * 2 + 2]).backward()  # each rank: its half; DDP averages the gradients
        opt.step()
        opt.zero_grad()
    torch.save(_snapshot(model, opt), f"{out}/rank{rank}.pt")
    _leave()


def test_ddp_projectors_are_identical_on_every_rank_and_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["projs"].keys() == r1["projs"].keys() and len(r0["projs"]) == 3
    for name in r0["projs"]:
        assert torch.equal(r0["projs"][name], r1["projs"][name]), name
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    model = _tiny_lm()
    opt = O.build(model, svdkit.config("galore", **CFG), lr=1e-2)
    for ids in _batches():
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    single = _snapshot(model, opt)
    for name in r0["projs"]:
        torch.testing.assert_close(r0["projs"][name], single["projs"][name], rtol=1e-3, atol=1e-4)
    for name in r0["params"]:
        torch.testing.assert_close(r0["params"][name], single["params"][name], rtol=1e-4, atol=1e-5)

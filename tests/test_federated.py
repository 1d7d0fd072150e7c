"""FedSVD and FedAvg of LoRA factors: the SVD re-factorization against the direct formula, the one-step
FedAvg = union identity, DP-SGD clipping, the RDP accountant against numerical integration, and two
gloo processes (one client each) equal to the one-process simulation."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.core.linalg import fix_signs
from svdkit.core.linalg_lowrank import refactorize
from svdkit.training.batches import collate, token_loss_sum
from svdkit.training.federated import FederatedConfig, client_update, federated, global_state, load_state, server_update
from svdkit.training.privacy import clipped_noisy_gradient, epsilon, rdp_sampled_gaussian

from conftest import VOCAB, free_port, tiny_model

TINY = dict(rank=2, targets="q_proj|v_proj")


def _items(seed: int, n: int, answer: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (5,), generator=g).tolist() + answer,
             "labels": [-100] * 5 + answer} for _ in range(n)]  # fmt: skip


def test_refactorize_equals_the_direct_svd():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    Bn, An = refactorize(B, A)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    U, Vh = fix_signs(U, Vh)
    assert torch.allclose(An, Vh[:3], atol=1e-10) and torch.allclose(Bn, U[:, :3] * S[:3], atol=1e-10)
    assert torch.allclose(Bn @ An, B @ A, atol=1e-10) and torch.allclose(An @ An.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    Bz, Az = refactorize(torch.zeros(9, 3, dtype=torch.float64), A)  # round 0: B = 0
    assert torch.allclose(Az @ Az.T, torch.eye(3, dtype=torch.float64), atol=1e-10) and Bz.abs().max() < 1e-12


def test_fedavg_of_b_with_fixed_a_equals_one_step_on_the_union():
    """With SGD, one local step on each client's whole data (equal labelled tokens per example) and weights
    n_k/N: Σ_k n_k/N (B − η∇L_k) = B − η∇L_union, the server's B̄ is the union's step; FedSVD's product B'A' = B̄A."""
    clients = [_items(1, 3, [4, 5, 6, 7]), _items(2, 5, [9, 9, 8, 8])]
    cfg = FederatedConfig(**TINY, local_steps=1, batch_size=8, lr=20.0, optimizer="sgd", max_grad_norm=1e9)
    model = svdkit.adapt(tiny_model("llama"), svdkit.LoRA(**TINY), progress=False)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.normal_(0, 0.1)  # B ≠ 0, so A's gradient and B's both matter
    start = global_state(model)
    states = []
    for k, items in enumerate(clients):
        load_state(model, start)
        client_update(model, items, cfg, 0, k, pad_id=0)
        states.append(global_state(model))
    load_state(model, start)
    client_update(model, clients[0] + clients[1], cfg, 0, 0, pad_id=0)
    union = global_state(model)
    new = server_update(states, [3.0, 5.0], "fedsvd", start)
    for name, cur in start.items():
        Bbar = (3 * states[0][name]["B"] + 5 * states[1][name]["B"]) / 8
        moved = float((Bbar - cur["B"]).norm())
        assert moved > 1e-3  # it moved
        assert float((Bbar - union[name]["B"]).norm()) < 1e-4 * moved
        assert torch.equal(states[0][name]["A"], cur["A"])  # clients never train A
        assert torch.allclose(new[name]["B"] @ new[name]["A"], Bbar @ cur["A"], atol=1e-5)


def test_dp_clipping_bounds_each_examples_gradient():
    model = svdkit.adapt(tiny_model("llama"), svdkit.LoRA(**TINY), progress=False)
    params = [l.lora_B for _, l in adapted_layers(model)]  # B = 0 at init: A has no gradient yet
    items = _items(3, 4, [1, 2, 3])

    def loss(i):
        total, n = token_loss_sum(model, collate([items[i]], 0))
        return total / n

    per = [torch.autograd.grad(loss(i), params) for i in range(4)]
    norms = [float(torch.sqrt(sum((g**2).sum() for g in gs))) for gs in per]
    clip = 0.5 * min(norms)  # every example is clipped
    got = clipped_noisy_gradient(params, loss, 4, clip, 0.0, 2.0, torch.Generator().manual_seed(0))
    for j, p in enumerate(params):
        expected = sum(gs[j] * min(1.0, clip / nrm) for gs, nrm in zip(per, norms)) / 2.0
        assert torch.allclose(got[j], expected, atol=1e-6)
    clipped_norms = [nrm * min(1.0, clip / nrm) for nrm in norms]
    assert max(clipped_norms) <= clip * (1 + 1e-6)
    noisy = clipped_noisy_gradient(params, loss, 4, clip, 1.0, 2.0, torch.Generator().manual_seed(0))
    again = clipped_noisy_gradient(params, loss, 4, clip, 1.0, 2.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(noisy, again)) and not torch.allclose(noisy[0], got[0])


@pytest.mark.parametrize("order", [2, 3, 5])
def test_rdp_of_the_sampled_gaussian_matches_numerical_integration(order):
    """A_α = E_{x~N(0,z²)}[((1−q) + q·exp((2x−1)/(2z²)))^α], integrated on a fine grid."""
    q, z = 0.1, 1.2
    x = torch.linspace(-30, 30, 400001, dtype=torch.float64)
    density = torch.exp(-(x**2) / (2 * z * z)) / math.sqrt(2 * math.pi * z * z)
    ratio = (1 - q) + q * torch.exp((2 * x - 1) / (2 * z * z))
    A = float(torch.trapezoid(density * ratio**order, x))
    assert rdp_sampled_gaussian(q, z, order) == pytest.approx(math.log(A) / (order - 1), rel=1e-6)
    assert rdp_sampled_gaussian(1.0, z, order) == pytest.approx(order / (2 * z * z))


def test_epsilon_grows_with_steps_and_falls_with_noise():
    e1, _ = epsilon(0.05, 1.0, 100, 1e-5)
    e2, _ = epsilon(0.05, 1.0, 400, 1e-5)
    e3, _ = epsilon(0.05, 2.0, 400, 1e-5)
    assert 0 < e1 < e2 and e3 < e2


def test_federated_end_to_end_keeps_a_orthonormal():
    clients = [_items(4, 8, [4, 5, 6]), _items(5, 8, [50, 60, 70]), _items(6, 4, [7, 7, 7])]
    heldout = _items(7, 4, [4, 5, 6]) + _items(8, 4, [50, 60, 70])
    cfg = FederatedConfig(rank=2, rounds=3, local_steps=2, batch_size=4, lr=5e-2)
    model = tiny_model("llama")
    result = federated(model, clients, cfg, pad_id=0, heldout=heldout, progress=False)
    losses = [h["heldout_loss"] for h in result["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    for _, layer in adapted_layers(model):
        A = layer.lora_A.detach()
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0]), atol=1e-5)
    dp = federated(tiny_model("llama"), clients, FederatedConfig(**TINY, rounds=1, local_steps=1, batch_size=4, dp_clip=1.0,
                                                                 dp_noise=1.0), pad_id=0, progress=False)  # fmt: skip
    assert 0 < dp["privacy"]["epsilon"] < math.inf and dp["privacy"]["steps"] == 1


def test_config_errors():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        FederatedConfig(algorithm="fedprox")
    with pytest.raises(ValueError, match="dp_noise must be ≥ 0 and needs dp_clip"):
        FederatedConfig(dp_noise=1.0)
    with pytest.raises(ValueError, match="examples on each"):
        federated(tiny_model("llama"), [[], _items(0, 2, [1])], FederatedConfig(**TINY), pad_id=0)


# -- one client per rank under gloo ---------------------------------------------------------------
CLIENTS = [(10, 6, [4, 5, 6]), (11, 4, [30, 31, 32])]
RUN = dict(TINY, rounds=2, local_steps=2, batch_size=3, lr=1e-2)




def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_model("llama")
    federated(model, [_items(*c) for c in CLIENTS], FederatedConfig(**RUN), pad_id=0, progress=False)
    state = {f"{n}.{k}": v for n, d in global_state(model).items() for k, v in d.items()}
    torch.save(state, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort in interpreter shutdown (see tests/test_distributed.py)


def test_two_processes_one_client_each_equal_the_simulation(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    model = tiny_model("llama")
    federated(model, [_items(*c) for c in CLIENTS], FederatedConfig(**RUN), pad_id=0, progress=False)
    expected = {f"{n}.{k}": v for n, d in global_state(model).items() for k, v in d.items()}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.allclose(got[key], value, atol=1e-5), (rank, key)

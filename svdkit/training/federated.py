"""Federated LoRA: FedSVD (B-only clients, server-side SVD re-factorization) and FedAvg of LoRA factors.

FedSVD (Lee et al. 2025, https://arxiv.org/abs/2505.12805). Every round t each client k starts from the
global (A_t, B_t), trains only B (A frozen) on its own data and sends B_k; the server averages
B̄ = Σ_k w_k B_k (w_k ∝ the client's number of training examples, as FedAvg), forms B̄A_t and re-factorizes
it by SVD:  B̄A_t = UΣVᵀ,  A_{t+1} = V_rᵀ (orthonormal rows),  B_{t+1} = U_rΣ_r  (so B_{t+1}A_{t+1} = B̄A_t).
The baseline ``fedavg`` trains A and B on the clients and averages each factor (Ā, B̄), whose product is
not the average of the clients' products.

    clients = [client_0_items, client_1_items, …]            # examples of svdkit.training.data
    result = svdkit.federated(model, clients, FederatedConfig(rounds=10), pad_id=tok.pad_token_id, heldout=items)

Choices (stated): clients are stateless (a fresh local optimizer every round: AdamW by default, or plain
SGD; lr 5e-4 and rank 8 are our defaults, not the paper's); LoRA's init (kaiming A, B = 0) at round 0,
the same on every client (seeded); s = α/r is kept through the re-factorization; a client's local
batches are ``batch_at`` of its items with a per-client seed. Optional DP-SGD on the clients
(``dp_clip``/``dp_noise``: Poisson sampling at q = batch/n_k, per-example clipping, Gaussian noise;
:mod:`svdkit.training.privacy`), reported as the (ε, δ) of each client's record-level guarantee after
all its local steps (RDP accountant of the subsampled Gaussian).
Under torchrun, rank ρ trains clients ρ, ρ + world, … and the weighted sums are all-reduced, so every
rank holds the same global adapter (the same numbers as one process simulating all clients, up to the
order of the floating-point sums).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from svdkit.adapters import api
from svdkit.core.distributed import rank_and_world
from svdkit.core.linalg_lowrank import refactorize
from svdkit.training.batches import batch_at, collate, eval_loss, token_loss_sum

ALGORITHMS = ("fedsvd", "fedavg")


@dataclass(frozen=True)
class FederatedConfig:
    """One federated run (``dp_clip`` None: no DP)."""

    algorithm: str = "fedsvd"
    rank: int = 8
    alpha: float | None = None
    targets: str = "all-linear"
    rounds: int = 10
    local_steps: int = 5
    batch_size: int = 8
    lr: float = 5e-4
    optimizer: str = "adamw"  # or "sgd"
    max_grad_norm: float = 1.0  # without DP: the usual clipping of the (batch) gradient
    dp_clip: float | None = None  # C: per-example clipping norm (DP-SGD)
    dp_noise: float = 0.0  # z: noise std / C
    dp_delta: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"FederatedConfig: algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}.")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"FederatedConfig: optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}.")
        for name in ("rank", "rounds", "local_steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"FederatedConfig: {name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.dp_clip is not None and self.dp_clip <= 0:
            raise ValueError(f"FederatedConfig: dp_clip must be positive (or None: no DP), got {self.dp_clip!r}.")
        if self.dp_noise < 0 or (self.dp_noise > 0 and self.dp_clip is None):
            raise ValueError("FederatedConfig: dp_noise must be ≥ 0 and needs dp_clip (noise is scaled by the clip norm).")


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def global_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A", "B"}} copies of the model's LoRA factors."""
    return {n: {"A": l.lora_A.detach().clone(), "B": l.lora_B.detach().clone()} for n, l in api.adapted_layers(model)}


def load_state(model, state: dict) -> None:
    with torch.no_grad():
        for name, layer in api.adapted_layers(model):
            layer.lora_A.copy_(state[name]["A"])
            layer.lora_B.copy_(state[name]["B"])


def server_update(states: Sequence[dict], weights: Sequence[float], algorithm: str, current: dict) -> dict:
    """The next global state from the clients' states and weights (normalized here). ``fedsvd``: B̄ = Σ w_k B_k,
    then (B, A) ← refactorize(B̄, A_current); ``fedavg``: Ā = Σ w_k A_k, B̄ = Σ w_k B_k."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("server_update needs positive client weights.")
    out = {}
    for name, cur in current.items():
        B = sum(w / total * s[name]["B"].double() for s, w in zip(states, weights))
        if algorithm == "fedsvd":
            Bn, An = refactorize(B, cur["A"].double())
        else:
            Bn, An = B, sum(w / total * s[name]["A"].double() for s, w in zip(states, weights))
        out[name] = {"A": An.to(cur["A"].dtype), "B": Bn.to(cur["B"].dtype)}
    return out


def _trainable(model, algorithm: str) -> list[torch.nn.Parameter]:
    params = []
    for _, layer in api.adapted_layers(model):
        layer.lora_A.requires_grad_(algorithm == "fedavg")  # FedSVD clients never train A
        layer.lora_B.requires_grad_(True)
        params += [layer.lora_A, layer.lora_B] if algorithm == "fedavg" else [layer.lora_B]
    return params


def client_update(model, items: list, cfg: FederatedConfig, round_: int, client: int, pad_id: int) -> None:
    """Train the model's trainable factors on one client's ``items`` for ``cfg.local_steps`` steps (in place)."""
    params = _trainable(model, cfg.algorithm)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0) if cfg.optimizer == "adamw" else torch.optim.SGD(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(_seed(cfg.seed, "dp", round_, client))
    model.train()
    for s in range(cfg.local_steps):
        opt.zero_grad(set_to_none=True)
        if cfg.dp_clip is None:
            batch = collate(batch_at(items, round_ * cfg.local_steps + s, cfg.batch_size, _seed(cfg.seed, client)), pad_id)
            loss, n = token_loss_sum(model, batch)
            (loss / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            from svdkit.training.privacy import clipped_noisy_gradient, poisson_sample

            q = min(1.0, cfg.batch_size / len(items))
            chosen = [items[i] for i in poisson_sample(len(items), q, gen)]

            def example_loss(i):
                loss, n = token_loss_sum(model, collate([chosen[i]], pad_id))
                return loss / max(n, 1)

            grads = clipped_noisy_gradient(params, example_loss, len(chosen), cfg.dp_clip, cfg.dp_noise, q * len(items), gen)
            for p, g in zip(params, grads):
                p.grad = g
        opt.step()
    model.eval()


def privacy(cfg: FederatedConfig, client_sizes: Sequence[int]) -> dict | None:
    """The worst client's (ε, δ) after all its local steps (None without DP; ε = inf without noise)."""
    if cfg.dp_clip is None:
        return None
    steps = cfg.rounds * cfg.local_steps
    if cfg.dp_noise == 0:
        return {"epsilon": float("inf"), "delta": cfg.dp_delta, "steps": steps}
    from svdkit.training.privacy import epsilon

    q = max(min(1.0, cfg.batch_size / n) for n in client_sizes)
    eps, order = epsilon(q, cfg.dp_noise, steps, cfg.dp_delta)
    return {"epsilon": eps, "delta": cfg.dp_delta, "order": order, "sampling_rate": q, "steps": steps,
            "accountant": "RDP of the Poisson-subsampled Gaussian, integer orders, Mironov 2017 conversion"}  # fmt: skip


def federated(model, clients: Sequence[list], cfg: FederatedConfig, *, pad_id: int, heldout: list | None = None,
              eval_batch_size: int = 8, progress=None) -> dict:  # fmt: skip
    """Adapt ``model`` with LoRA(rank, alpha, targets) and run ``cfg.rounds`` rounds over ``clients`` (lists of
    examples); returns ``{"config", "history": [{"round", "heldout_loss"}], "privacy"}`` (round 0: before) and
    leaves the final global adapter in ``model``. Under torchrun every rank gets the same ``clients`` and
    trains its share of them."""
    from tqdm.auto import tqdm

    from svdkit.adapters.zoo.lora import LoRA

    if not clients or any(not c for c in clients):
        raise ValueError(f"federated needs at least one client and examples on each; got sizes {[len(c) for c in clients]}.")
    rank, world = rank_and_world()
    api.adapt(model, LoRA(rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, seed=cfg.seed), progress=False)
    current = global_state(model)
    history = []

    def record(r):
        if heldout:
            history.append({"round": r, "heldout_loss": eval_loss(model, heldout, eval_batch_size, pad_id)[0]})

    record(0)
    mine = list(range(rank, len(clients), world))
    bar = tqdm(total=cfg.rounds, desc=f"svdkit federated ({cfg.algorithm})", unit="round",
               disable=(rank != 0) if progress is None else not (progress and rank == 0))  # fmt: skip
    for r in range(cfg.rounds):
        states, weights = [], []
        for k in mine:
            load_state(model, current)
            client_update(model, clients[k], cfg, r, k, pad_id)
            states.append(global_state(model))
            weights.append(float(len(clients[k])))
        current = _reduce(states, weights, cfg.algorithm, current, world, sum(len(c) for c in clients))
        load_state(model, current)
        record(r + 1)
        bar.update(1)
    bar.close()
    for _, layer in api.adapted_layers(model):
        layer.lora_A.requires_grad_(True)
    return {"config": asdict(cfg), "clients": [len(c) for c in clients], "history": history,
            "privacy": privacy(cfg, [len(c) for c in clients])}  # fmt: skip


def _reduce(states, weights, algorithm, current, world: int, total: float) -> dict:
    """server_update over every client; across ranks, each rank's weighted partial sums are all-reduced first."""
    if world == 1:
        return server_update(states, weights, algorithm, current)
    partial = {}
    for name, cur in current.items():  # Σ_k n_k/N · X_k over this rank's clients, then summed over ranks
        for key in ("A", "B"):
            x = sum((w / total * s[name][key].double() for s, w in zip(states, weights)), torch.zeros_like(cur[key], dtype=torch.float64))
            torch.distributed.all_reduce(x)
            partial.setdefault(name, {})[key] = x
    return server_update([partial], [1.0], algorithm, current)

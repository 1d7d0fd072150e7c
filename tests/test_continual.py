"""Sculpting Subspaces (OSFT) and continual fine-tuning: the two-sided complement projection against its
direct formula, exact protection under AdamW, and less forgetting than plain sequential fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch

import svdkit
from svdkit.adapters.api import adapted_layers, after_task
from svdkit.adapters.zoo.sculpt import protected, protected_ranks
from svdkit.core.linalg_project import complement_projection, protect, protected_basis, ratio_rank
from svdkit.training.batches import collate
from svdkit.training.continual import ContinualConfig, Task, continual, load_task, table
from svdkit.training.loop import make_optimizer, train_step

from conftest import VOCAB, tiny_model


def _orthonormal(m, k, seed):
    return torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def test_complement_projection_equals_the_direct_formula():
    X = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, V = _orthonormal(7, 2, 1), _orthonormal(5, 2, 2)
    direct = (torch.eye(7, dtype=torch.float64) - U @ U.T) @ X @ (torch.eye(5, dtype=torch.float64) - V @ V.T)
    P = complement_projection(X, U, V)
    assert torch.allclose(P, direct, atol=1e-12)
    assert (U.T @ P).abs().max() < 1e-12 and (P @ V).abs().max() < 1e-12
    assert torch.allclose(complement_projection(P, U, V), P, atol=1e-12)  # idempotent
    assert torch.equal(complement_projection(X, U[:, :0], V[:, :0]), X)  # k = 0: nothing protected


def test_protected_basis_takes_the_energy_rank_and_protect_restores_it():
    W = torch.randn(9, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    share = 0.8
    k = int(torch.nonzero(torch.cumsum(S**2, 0) / (S**2).sum() >= share)[0]) + 1  # smallest k reaching the share
    U, s, V = protected_basis(W, share, dtype=torch.float64)
    assert U.shape == (9, k) and V.shape == (6, k) and torch.allclose(s, S[:k])
    assert torch.allclose(U * s @ V.T, W @ V @ V.T, atol=1e-12)  # top-k triplets of W
    delta = torch.randn(9, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(protect(W + delta, U, s, V), W + complement_projection(delta, U, V), atol=1e-10)
    assert protected_basis(W, 0.0)[0].shape == (9, 0)


def test_ratio_rule_protects_a_fixed_share_and_leaves_one_direction():
    W = torch.randn(9, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert ratio_rank(9, 6, 0.5) == 3 and ratio_rank(9, 6, 0.34) == 2 and ratio_rank(9, 6, 1.0) == 5
    U, s, V = protected_basis(W, 0.99, dtype=torch.float64, ratio=0.5)  # share ignored when ratio is set
    assert U.shape == (9, 3) and torch.allclose(s, torch.linalg.svdvals(W)[:3])
    model = svdkit.adapt(tiny_model("llama"), svdkit.Sculpt(ratio=0.25), progress=False)
    after_task(model)
    for name, layer in adapted_layers(model):
        m, n = layer.core.value.shape
        assert protected_ranks(model)[name] == min(int(0.25 * min(m, n)), min(m, n) - 1)
    with pytest.raises(ValueError, match="ratio must be None"):
        svdkit.Sculpt(ratio=1.5)


def _items(seed: int, n: int, answer: list[int]) -> list[dict]:
    """Random 6-token prompts followed by a fixed answer (the task): two tasks conflict on the same prompts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, VOCAB, (6,), generator=g).tolist()
        out.append({"input_ids": x + answer, "labels": [-100] * 6 + answer})
    return out


def test_update_is_orthogonal_to_the_protected_subspace_under_adamw():
    model = svdkit.adapt(tiny_model("llama"), svdkit.Sculpt(energy=0.7), progress=False)
    before = {n: l.core.value.detach().clone() for n, l in adapted_layers(model)}
    loop = make_optimizer(model, lr=1e-2, weight_decay=0.1, total=2, warmup=1)  # decay moves protected parts too
    batch = collate(_items(0, 4, [5, 6, 7]), pad_id=0)
    for _ in range(2):
        train_step(model, model, [batch], loop, max_grad_norm=1.0, peak_lr=1e-2, total=2)
    ranks = protected_ranks(model)
    for name, layer in adapted_layers(model):
        U, S, V = protected(layer)
        assert 0 < ranks[name] < min(before[name].shape)
        assert torch.allclose(U * S @ V.T, before[name] @ V @ V.T, atol=1e-5)  # the base weight's top triplets
        delta = layer.core.value.detach() - before[name]
        assert delta.norm() > 1e-4, name  # it trained
        assert (U.T @ delta).norm() < 1e-5 * delta.norm() and (delta @ V).norm() < 1e-5 * delta.norm(), name


def test_gradient_projection_matches_the_formula():
    model = svdkit.adapt(tiny_model("llama"), svdkit.Sculpt(energy=0.6, project="gradient"), progress=False)
    batch = collate(_items(1, 4, [9, 8]), pad_id=0)
    svdkit.training.batches.token_loss_sum(model, batch)[0].backward()
    raw = {n: l.core.value.grad.clone() for n, l in adapted_layers(model)}
    svdkit.after_clipping(model, 1e-3)
    for name, layer in adapted_layers(model):
        U, _, V = protected(layer)
        m, n = raw[name].shape
        direct = (torch.eye(m) - U @ U.T) @ raw[name] @ (torch.eye(n) - V @ V.T)
        assert torch.allclose(layer.core.value.grad, direct, atol=1e-6), name


def test_sculpt_forgets_less_than_plain_sequential_fine_tuning():
    A, B = _items(0, 40, [5, 17, 29, 41]), _items(1, 40, [60, 72, 84, 96])
    tasks = [Task("A", A[:32], A[32:]), Task("B", B[:32], B[32:])]
    got = {}
    for method in ("full", "sculpt"):
        cfg = ContinualConfig(method=method, steps=20, batch_size=8, lr=3e-3)
        got[method] = continual(tiny_model("llama"), tasks, cfg, pad_id=0, progress=False)
    full, sculpt = got["full"], got["sculpt"]
    assert len(full["losses"]) == 3 and len(full["losses"][0]) == 2
    assert full["losses"][1][0] < full["losses"][0][0] - 0.3  # task A was learned
    assert sculpt["losses"][1][0] < sculpt["losses"][0][0] - 0.2  # also under protection
    assert full["mean_forgetting"] > 0.08  # plain sequential fine-tuning forgets task A
    assert sculpt["mean_forgetting"] < 0.5 * full["mean_forgetting"]
    text = table([full, sculpt])
    assert "| sculpt | forgetting |" in text and "| full | after A |" not in text and "| full | A |" in text


def test_load_task_selects_a_group(tiny_run_inputs, tmp_path):
    import transformers as tf

    model_dir, _ = tiny_run_inputs
    tok = tf.AutoTokenizer.from_pretrained(str(model_dir))
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}", "group": "even" if i % 2 == 0 else "odd"})
                              for i in range(10)) + "\n")  # fmt: skip
    task = load_task(f"{path}@odd", tok, heldout_fraction=0.2)
    assert len(task.train) + len(task.heldout) == 5 and all(x["group"] == "odd" for x in task.train + task.heldout)
    with pytest.raises(ValueError, match="no examples of group 'blue'.*even, odd"):
        load_task(f"{path}@blue", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a", "group": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: 'group' must be a non-empty string"):
        load_task(str(bad), tok)


def test_finetune_continual_cli(tiny_run_inputs, tmp_path):
    from svdkit.cli import main

    model_dir, _ = tiny_run_inputs
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"What is {i}?", "response": f"{i} is a number.", "group": g})
                              for g in ("x", "y") for i in range(6)) + "\n")  # fmt: skip
    out = tmp_path / "cont"
    rc = main(["finetune", "--model", str(model_dir), "--continual", f"{path}@x,{path}@y", "--method", "sculpt",
               "--continual-baselines", "lora", "--rank", "2", "--steps", "2", "--batch-size", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    saved = json.loads((out / "continual.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["sculpt", "lora"]
    assert all(len(r["losses"]) == 3 for r in saved["results"]) and (out / "continual.md").is_file()


def test_config_errors():
    with pytest.raises(ValueError, match="energy must be a number in \\[0, 1\\)"):
        svdkit.Sculpt(energy=1.0)
    with pytest.raises(ValueError, match="project must be one of"):
        svdkit.Sculpt(project="weights")
    with pytest.raises(ValueError, match="task 'A' has 0 training"):
        continual(tiny_model("llama"), [Task("A", [], [1])], ContinualConfig(), pad_id=0)

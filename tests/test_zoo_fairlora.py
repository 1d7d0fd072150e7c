"""FairLoRA (per-group spectral variant): the per-group weight equation, group switching, the variance
objective, and group training moving each group's singular values on its own data."""

from __future__ import annotations

import pytest
import torch

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.zoo.fairlora import GroupDiagonal, use_group, variance_objective
from svdkit.training.fairness import group_losses, split_groups, train_groups

from conftest import VOCAB, tiny_model


def test_each_group_computes_its_own_weight():
    """y = x W'_gᵀ with W'_g = W − s·U₀ diag(σ₀) V₀ᵀ + s·U diag(σ_g) Vᵀ (U₀ σ₀ V₀ the top-r SVD of W)."""
    base = tiny_model("llama")
    W = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = svdkit.adapt(base, svdkit.FairLoRA(rank=3, n_groups=2, targets="q_proj"), progress=False)
    layer = dict(adapted_layers(model))["model.layers.0.self_attn.q_proj"]
    U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
    assert isinstance(layer.core, GroupDiagonal) and layer.core.value.shape == (2, 3)
    assert torch.allclose(layer.core.value.double(), S0[:3].expand(2, 3), atol=1e-5)
    with torch.no_grad():
        layer.core.value[1].mul_(1.5)  # group 1 differs
        layer.lora_B.add_(0.01)
    x = torch.randn(4, W.shape[1], generator=torch.Generator().manual_seed(0))
    s = layer.scaling
    init = W.double() - s * (U0[:, :3] * S0[:3]) @ Vh0[:3]
    for g in (0, 1):
        sigma = layer.core.value[g].detach().double()
        expected = x.double() @ (init + s * (layer.lora_B.detach().double() * sigma) @ layer.lora_A.detach().double()).T
        with use_group(model, g):
            got = layer(x)
        assert torch.allclose(got.double(), expected, atol=1e-5), g
    assert layer.core.active == 0  # restored after the block


def test_function_preserving_for_every_group(ids):
    base = tiny_model("llama")
    expected = base(input_ids=ids).logits
    model = svdkit.adapt(base, svdkit.FairLoRA(rank=2, n_groups=3), progress=False)
    for g in range(3):
        with use_group(model, g):
            assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def test_variance_objective_and_errors():
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(4.0)]
    mean = 7 / 3
    var = sum((v - mean) ** 2 for v in (1.0, 2.0, 4.0)) / 3
    assert float(variance_objective(losses, 0.5)) == pytest.approx(mean + 0.5 * var)
    model = svdkit.adapt(tiny_model("llama"), svdkit.FairLoRA(rank=2, n_groups=2), progress=False)
    with pytest.raises(ValueError, match="group 2 is out of range: this FairLoRA adapter has 2 groups"):
        with use_group(model, 2):
            pass
    with pytest.raises(ValueError, match="n_groups must be a positive integer"):
        svdkit.FairLoRA(n_groups=0)
    with pytest.raises(ValueError, match="variance_weight must be a finite number"):
        svdkit.FairLoRA(variance_weight=-1.0)


def _group_items(seed: int, n: int, answer: list[int], group: str) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (5,), generator=g).tolist() + answer,
             "labels": [-100] * 5 + answer, "group": group} for _ in range(n)]  # fmt: skip


def test_group_training_learns_each_group_with_its_own_singular_values():
    items = _group_items(0, 12, [3, 4, 5], "a") + _group_items(1, 12, [90, 91, 92], "b") + [{"input_ids": [1, 2], "labels": [1, 2]}]
    groups = split_groups(items)
    assert list(groups) == ["a", "b"] and all(len(v) == 12 for v in groups.values())  # ungrouped example left out
    model = svdkit.adapt(tiny_model("llama"), svdkit.FairLoRA(rank=2, n_groups=2, variance_weight=1.0), progress=False)
    before = group_losses(model, groups, pad_id=0)
    rows = train_groups(model, groups, steps=6, lr=5e-2, pad_id=0, batch_size=4, progress=False)
    after = group_losses(model, groups, pad_id=0)
    assert len(rows) == 6 and set(rows[0]) == {"step", "a", "b"}
    assert all(after["losses"][g] < before["losses"][g] - 0.1 for g in groups)
    for _, layer in adapted_layers(model):
        assert not torch.allclose(layer.core.value[0], layer.core.value[1])  # each group moved its own σ
    assert after["spread"] == pytest.approx(max(after["losses"].values()) - min(after["losses"].values()))


def test_finetune_cli_runs_fairlora_and_sculpt(tiny_run_inputs, tmp_path):
    from svdkit.cli import main

    model_dir, data_file = tiny_run_inputs
    for method in ("fairlora", "sculpt"):
        out = tmp_path / method
        rc = main(["finetune", "--model", str(model_dir), "--data", str(data_file), "--method", method, "--rank", "2",
                   "--steps", "2", "--batch-size", "2", "--max-heldout", "2", "--samples", "1", "--out", str(out)])  # fmt: skip
        assert rc == 0 and (out / "eval.json").is_file() and (out / "adapter").is_dir()

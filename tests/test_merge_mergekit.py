"""Parity with mergekit (the tool people use) for task arithmetic, TIES and DARE, on the same tensors.

mergekit's own merge function (``GeneralizedTaskArithmeticMerge.merge_group``, the code ``mergekit-yaml``
runs per tensor) is called on every tensor of tiny fine-tuned Llamas and compared with ``svdkit.merge_models``.
DARE's masks are random: mergekit draws them from the global generator, so the test seeds it and hands svdkit
the same draws (``torch.bernoulli`` after ``manual_seed(s)`` equals a generator seeded ``s``).
"""

from __future__ import annotations

import pytest
import torch

import svdkit
from svdkit.merging import merge_models
from svdkit.merging.dare import dare_merge

from conftest import tiny_model

gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic",
                          reason="mergekit is not installed (pip install mergekit; it must not change torch)")  # fmt: skip
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.registry import get as mergekit_method  # noqa: E402

WEIGHTS = [1.0, 0.6, 1.4]


def models():
    base = tiny_model("llama", 0)
    fts = []
    for s in (1, 2, 3):
        m = tiny_model("llama", 0)
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        fts.append(m)
    return base, fts


def mergekit_tensor(method: str, base: torch.Tensor, tensors: list[torch.Tensor], **params) -> torch.Tensor:
    group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    ids = range(1, len(tensors) + 1)
    shared = {"int8_mask": False, "normalize": params.pop("normalize"), "rescale": params.pop("rescale", False),
              "lambda": params.pop("lam", 1.0)}  # fmt: skip
    per_model = {"weight": dict(zip(ids, WEIGHTS)), "density": dict(zip(ids, [params.pop("density", 1.0)] * len(tensors)))}
    return mergekit_method(method).merge_group(group, **shared, **per_model)


@pytest.mark.parametrize("method, cfg, params", [
    ("task_arithmetic", svdkit.config("task-arithmetic", alpha=0.7), {"normalize": False, "lam": 0.7}),
    ("ties", svdkit.config("ties", density=0.3, alpha=0.9), {"normalize": True, "density": 0.3, "lam": 0.9}),
])  # fmt: skip
def test_task_arithmetic_and_ties_match_mergekit_on_every_tensor(method, cfg, params):
    base, fts = models()
    merged = merge_models(base, fts, cfg, weights=WEIGHTS, progress=False).state_dict()
    ft_states = [m.state_dict() for m in fts]
    for key, W0 in base.state_dict().items():
        ref = mergekit_tensor(method, W0, [s[key] for s in ft_states], **dict(params))
        assert torch.allclose(merged[key], ref, atol=1e-6), key


@pytest.mark.parametrize("combine, method", [("task-arithmetic", "dare_linear"), ("ties", "dare_ties")])
def test_dare_matches_mergekit_given_the_same_random_draws(combine, method):
    base, fts = models()
    density, seed = 0.4, 123
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        W0, tensors = base.state_dict()[key], [m.state_dict()[key] for m in fts]
        torch.manual_seed(seed)
        ref = mergekit_tensor(method, W0, tensors, normalize=combine == "ties", rescale=True, density=density)
        g = torch.Generator().manual_seed(seed)  # the same stream, drawn in mergekit's order (model by model)
        masks = [torch.bernoulli(torch.full(W0.shape, density), generator=g).bool() for _ in tensors]
        ours = W0 + dare_merge([t - W0 for t in tensors], WEIGHTS, masks, density, "l1", combine)
        assert torch.allclose(ours, ref, atol=1e-6), key

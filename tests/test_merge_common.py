"""The rule every SVD merge shares for non-matrix tensors (merging/common.py: per_tensor) and the svd_dtype check."""

import pytest
import torch

import svdkit
from svdkit.merging.common import per_tensor

TOL = dict(rtol=1e-10, atol=1e-12)
SCALED = ("tsv-m", "iso-c", "iso-cts", "knots", "core-space")  # α scales the whole merged vector, biases included


def _tensors(shape, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(T)]


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("shape", [(7,), (1, 6), (6, 1)])  # vectors and matrices with a side of 1 are not SVD'd
def test_non_matrices_take_alpha_times_the_weighted_mean(name, shape):
    deltas, w = _tensors(shape), [1.0, 0.5, 2.0]
    cfg = svdkit.config(name, alpha=0.7)
    expected = 0.7 * sum(wi * d for wi, d in zip(w, deltas)) / len(deltas)
    assert torch.allclose(cfg.merge(deltas, w, "bias"), expected, **TOL)


def test_cart_non_matrices_take_the_plain_weighted_mean():
    deltas, w = _tensors((5,)), [1.0, 0.5, 2.0]
    expected = sum(wi * d for wi, d in zip(w, deltas)) / len(deltas)  # CART's α scales only the low-rank terms
    assert torch.allclose(svdkit.config("cart", alpha=0.3).merge(deltas, w, "bias"), expected, **TOL)


def test_per_tensor_calls_the_matrix_rule_only_for_matrices():
    calls = []

    def rule():
        calls.append(1)
        return torch.zeros(4, 3)

    assert per_tensor(_tensors((4, 3)), [1.0] * 3, rule, 2.0).abs().sum() == 0 and calls == [1]
    vec = _tensors((4,))
    assert torch.allclose(per_tensor(vec, [1.0] * 3, rule, 2.0), 2 * sum(vec) / 3, **TOL) and calls == [1]


@pytest.mark.parametrize("name", ["tsv-m", "iso-c", "iso-cts", "cart", "lore", "knots", "core-space"])
def test_unknown_svd_dtype_is_refused(name):
    with pytest.raises(ValueError, match="svd_dtype"):
        svdkit.config(name, svd_dtype="float16")


def test_iso_cts_ignores_rounding_noise_left_after_the_common_subspace():
    """LoRA-like tasks (rank 2 each, summed rank 8 < k = 12): the common subspace spans every task, the
    remainders Δ_t − U_c U_cᵀ Δ_t are rounding noise, so Iso-CTS must equal Iso-C (σ̄ over the 8 real
    directions), not take noise directions with σ ≈ 0 into its stack and mean."""
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(20, 2, generator=g) @ torch.randn(2, 16, generator=g) for _ in range(4)]  # fp32, as the engine
    from svdkit.merging.iso_c import iso_merge
    from svdkit.merging.iso_cts import common_size, iso_cts_merge

    assert common_size(16, 4, 0.8) == (12, 1)  # a task-specific share exists (s = 1) but has nothing to add
    merged, iso = iso_cts_merge(deltas, [1.0] * 4), iso_merge(deltas, [1.0] * 4)
    assert torch.linalg.matrix_rank(merged.double(), rtol=1e-4) == 8
    assert torch.allclose(merged, iso, rtol=1e-4, atol=1e-5 * iso.abs().max())

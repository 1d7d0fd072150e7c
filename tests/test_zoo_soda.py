"""SODA (issue 18): W' = (U R_U)(Σ + ΔΣ)(V R_V)ᵀ with R = R₁ ⊗ R₂ on the orthogonal group; its parameter count,
the Stiefel step (tangent projection + Cayley retraction) against direct formulas, the merged-only export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdkit
from svdkit.core.linalg_structured import cayley_retract, kron_right_t, orthogonal_tangent
from svdkit.training import loop as train

from conftest import tiny_model

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def one_linear(m: int = 12, n: int = 9) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n, m).double()).eval()


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=GEN(seed), dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))


def reference_svd(W: torch.Tensor):
    """Thin SVD with the largest-|entry| of each left singular vector made positive (svdkit's sign rule: the
    rotations act on these particular bases)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    flip = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).squeeze(0)
    return U * flip, S, Vh.T * flip


def test_update_is_rotated_bases_around_shifted_singular_values():
    model = one_linear()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    svdkit.adapt(model, svdkit.SODA(compute_dtype="float64"))
    layer, x = model[0], torch.randn(5, 9, generator=GEN(1), dtype=torch.float64)
    core = layer.core
    assert (core.u1.shape, core.u2.shape) == ((3, 3), (3, 3))  # k = 9 = 3·3
    assert torch.equal(layer.core(), torch.zeros(9, 9, dtype=torch.float64))  # C = 0 exactly at init
    torch.testing.assert_close(model(x), x @ W.T + b, rtol=0, atol=1e-12)
    U1, U2, V1, V2 = (random_orthogonal(3, s) for s in range(4))
    shift = torch.randn(9, generator=GEN(5), dtype=torch.float64)
    with torch.no_grad():
        for key, value in zip(("u1", "u2", "v1", "v2", "delta"), (U1, U2, V1, V2, shift)):
            getattr(core, key).copy_(value)
    U, S, V = reference_svd(W)
    expected = (U @ torch.kron(U1, U2)) @ torch.diag(S + shift) @ (V @ torch.kron(V1, V2)).T
    torch.testing.assert_close(layer.merged_weight(), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ expected.T + b)


@pytest.mark.parametrize("shape,factor,k1,k2", [((12, 9), None, 3, 3), ((12, 9), 1, 1, 9), ((6, 20), None, 2, 3)])
def test_parameter_count_is_k_plus_the_kronecker_factors(shape, factor, k1, k2):
    model = one_linear(*shape)
    svdkit.adapt(model, svdkit.SODA(factor=factor))
    k = min(shape)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == k + 2 * (k1 * k1 + k2 * k2)


def test_kron_right_t_is_the_dense_product():
    M = torch.randn(5, 6, generator=GEN(0), dtype=torch.float64)
    A, B = torch.randn(2, 2, generator=GEN(1), dtype=torch.float64), torch.randn(3, 3, generator=GEN(2), dtype=torch.float64)
    torch.testing.assert_close(kron_right_t(M, A, B), M @ torch.kron(A, B).T)


def test_tangent_projection_and_cayley_retraction_against_their_formulas():
    R = random_orthogonal(5, 0)
    G = torch.randn(5, 5, generator=GEN(1), dtype=torch.float64)
    T = orthogonal_tangent(R, G)
    torch.testing.assert_close(R.T @ T + (R.T @ T).T, torch.zeros(5, 5, dtype=torch.float64))  # RᵀT skew: a tangent vector
    torch.testing.assert_close(orthogonal_tangent(R, T), T)  # a projection
    step = 1e-2 * torch.randn(5, 5, generator=GEN(2), dtype=torch.float64)
    Omega = 0.5 * (R.T @ step - (R.T @ step).T)
    eye = torch.eye(5, dtype=torch.float64)
    expected = R @ (eye + Omega / 2) @ torch.linalg.inv(eye - Omega / 2)
    got = cayley_retract(R, R + step)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.T @ got, eye)
    assert float((got - (R + R @ Omega)).abs().max()) < 10 * float(Omega.norm()) ** 2  # first order: R + RΩ


def test_training_keeps_the_rotations_orthogonal_and_learns():
    model = svdkit.adapt(tiny_model("llama"), svdkit.SODA(targets=("q_proj", "v_proj")))
    lp = train.make_optimizer(model, lr=2e-2, weight_decay=0.1, total=4, warmup=1)
    ids = torch.randint(0, 128, (4, 10), generator=GEN(0))
    batch = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    losses = [train.train_step(model, model, batch, lp, max_grad_norm=1.0, peak_lr=2e-2, total=4)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]
    core = model.model.layers[0].self_attn.q_proj.core
    for key in ("u1", "u2", "v1", "v2"):
        R = getattr(core, key).detach()
        eye = torch.eye(R.shape[0])
        assert float((R.T @ R - eye).abs().max()) < 1e-5, key  # on the group after AdamW with weight decay
        assert float((R - eye).abs().max()) > 1e-3, key  # and moved
    assert not any(k.startswith("model") for k in svdkit.training_state(model))  # nothing left between steps


def test_after_step_alone_projects_onto_the_group():
    model = svdkit.adapt(one_linear(), svdkit.SODA())
    core = model[0].core
    with torch.no_grad():
        core.u2.add_(0.1 * torch.randn(3, 3, generator=GEN(0), dtype=torch.float64))
    svdkit.after_step(model, 1, 10)
    torch.testing.assert_close(core.u2.T @ core.u2, torch.eye(3, dtype=torch.float64), atol=1e-9, rtol=0)


def test_export_is_merged_or_a_truncated_lora(tmp_path):
    model = svdkit.adapt(tiny_model("llama"), svdkit.SODA(targets="q_proj"))
    with pytest.raises(ValueError, match="merge"):
        svdkit.export_peft(model, tmp_path / "peft")
    svdkit.export_peft(model, tmp_path / "peft4", rank=4)  # the user names a rank: truncated, error reported
    assert (tmp_path / "peft4" / "truncation.json").is_file()


def test_bad_options_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="svd must be 'exact'"):
        svdkit.SODA(svd="randomized")
    with pytest.raises(ValueError, match="factor must be None"):
        svdkit.SODA(factor=0)
    with pytest.raises(ValueError, match=r"factor=4 does not divide k = min\(out, in\) = 9 of 0"):
        svdkit.adapt(one_linear(), svdkit.SODA(factor=4))

"""Task-vector compression (svdkit.compress_delta): Delta-CoMe's mixed-precision singular vectors and ImPart's
importance-aware sparsity, against direct computations on small matrices and on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

import svdkit
from svdkit.core.linalg_merge import quantize_vectors, triplet_errors
from svdkit.merging.delta_come import allocate_bits
from svdkit.merging.impart import keep_ratios

from conftest import calibration_batches, tiny_model


def spiky_delta(m=40, n=30, seed=0):
    """A fine-tune-like delta: a decaying spectrum (σ_i ∝ 1/(i+1)) with random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return (U * (1.0 / torch.arange(1, n + 1, dtype=torch.float64))) @ V.T


def test_vector_quantization_is_symmetric_round_to_nearest_per_column():
    X = torch.randn(50, 3, dtype=torch.float64)
    Q = quantize_vectors(X, torch.tensor([2, 4, 0]))
    for j, b in enumerate((2, 4)):
        qmax = 2 ** (b - 1) - 1
        scale = X[:, j].abs().max() / qmax
        assert torch.allclose(Q[:, j], (X[:, j] / scale).round().clamp(-qmax, qmax) * scale)
        assert len(Q[:, j].unique()) <= 2 * qmax + 1
    assert torch.equal(Q[:, 2], torch.zeros(50, dtype=torch.float64))


def test_triplet_errors_equal_the_dense_frobenius_errors():
    u, v = torch.randn(7, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    qu, qv = quantize_vectors(u, torch.full((4,), 3)), quantize_vectors(v, torch.full((4,), 3))
    dense = torch.stack([(torch.outer(u[:, i], v[:, i]) - torch.outer(qu[:, i], qv[:, i])).pow(2).sum() for i in range(4)])
    assert torch.allclose(triplet_errors(u, qu, v, qv), dense)


def test_delta_come_gives_more_bits_to_larger_singular_values_within_the_budget():
    sigma = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    errors = {b: torch.full((5,), 4.0 ** -b) for b in (2, 4, 8)}  # equal quantization error ratio for every vector
    widths = allocate_bits(sigma, errors, (20, 20), budget=3 * 40 * 4 + 2 * 40 * 2 + 5 * 48)
    assert all(a >= b for a, b in zip(widths.tolist(), widths.tolist()[1:])), widths  # monotone in σ
    spent = sum((40 * b + 48) for b in widths.tolist() if b)
    assert spent <= 3 * 40 * 4 + 2 * 40 * 2 + 5 * 48 and widths[0] > widths[-1]
    delta = spiky_delta()
    errs = []
    for bits in (0.5, 1.0, 2.0, 4.0):
        approx, stats = svdkit.config("delta-come", bits=bits).compress(delta, "w")
        assert stats["bits_per_entry"] <= bits + 1e-9
        errs.append(float((delta - approx).norm() / delta.norm()))
    assert errs == sorted(errs, reverse=True)
    S = torch.linalg.svdvals(delta)  # the same 2 bits/entry spent on an fp16 rank-k truncation: k = 2 triplets
    k = int(2.0 * 40 * 30 // (16 * 70 + 16))
    assert errs[2] < float(S[k:].norm() / S.norm())  # mixed precision beats plain truncation at equal size


def test_impart_keeps_more_of_larger_singular_vectors_and_is_unbiased():
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    p = keep_ratios(sigma, (30, 20), budget=0.3 * 600, power=1.0)
    assert all(a >= b for a, b in zip(p.tolist(), p.tolist()[1:]))
    assert float((p * 50).sum() + (p > 0).sum()) <= 0.3 * 600 + 1e-6
    delta = spiky_delta(12, 8)
    runs = [svdkit.config("impart", density=0.5, seed=s).compress(delta, "w") for s in range(150)]
    kept = [stats["params_per_entry"] for _, stats in runs]  # random masks: the budget holds in expectation
    assert abs(sum(kept) / len(kept) - 0.5) < 0.05
    mean = sum(a for a, _ in runs) / len(runs)
    single = float((runs[0][0] - delta).norm() / delta.norm())
    assert float((mean - delta).norm() / delta.norm()) < 0.35 * single  # E[Δ̂] = Δ: averaging removes the noise
    assert torch.equal(runs[3][0], svdkit.config("impart", density=0.5, seed=3).compress(delta, "w")[0])


@pytest.mark.parametrize("cfg", [svdkit.config("delta-come", bits=2.0), svdkit.config("impart", density=0.3)])
def test_compress_delta_rebuilds_the_finetuned_model_and_reports(cfg):
    base, ft = tiny_model("llama", 0), tiny_model("llama", 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    batch = calibration_batches(1)[0]

    def loss(model):
        with torch.no_grad():
            return model(**batch).loss

    rec, report = svdkit.compress_delta(base, ft, cfg, loss_fn=loss, progress=False)
    assert all(torch.equal(ft.state_dict()[k], v) for k, v in before.items())
    assert "model.embed_tokens.weight" in report["uncompressed"] and "model.norm.weight" in report["uncompressed"]
    assert torch.equal(rec.model.embed_tokens.weight, ft.model.embed_tokens.weight)
    key = "model.layers.0.self_attn.q_proj.weight"
    d = before[key] - base.state_dict()[key]
    err = report["modules"][key]["relative_error"]
    assert 0 < err and abs(float((rec.state_dict()[key] - base.state_dict()[key] - d).norm() / d.norm()) - err) < 1e-4
    assert set(report["loss"]) == {"base", "finetuned", "reconstructed"} and "retained" in report
    with pytest.raises(ValueError, match="compress_delta"):
        svdkit.merge_models(base, [ft, ft], cfg)

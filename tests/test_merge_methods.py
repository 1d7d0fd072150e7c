"""Every merge method against a direct implementation of its paper's equations on small matrices.

The references below are written independently of svdkit (plain torch.linalg.svd, loops, the official
codes' zero padding and index arithmetic), so they check the equations, not the library's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

import svdkit
from svdkit.core.linalg_merge import magnitude_mask, polar_factor, singular_value_threshold, whitened
from svdkit.merging.core_space import core_space
from svdkit.merging.knots import knots_align

TOL = dict(rtol=1e-4, atol=1e-5)
MERGERS = sorted(n for n in svdkit.methods("merge") if not getattr(svdkit.method_class(n), "delta_compression", False))


def deltas(T=3, m=12, n=9, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g, dtype=dtype) for _ in range(T)]


def lora_factors(T=3, m=12, n=10, ranks=(2, 3, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)) for r in ranks[:T]]


def polar_ref(X):
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def test_every_merge_method_is_registered_with_paper_and_summary():
    assert set(MERGERS) == {"task-arithmetic", "ties", "dare", "tsv-m", "iso-c", "iso-cts", "knots", "core-space", "cart", "lore"}
    assert set(svdkit.methods("merge")) - set(MERGERS) == {"delta-come", "impart"}
    for name in MERGERS:
        cfg = svdkit.config(name)
        assert cfg.kind == "merge" and cfg.paper.startswith("https://") and cfg.summary
        assert svdkit.config_from_dict(cfg.to_dict()) == cfg
        with pytest.raises(ValueError, match="alpha must be > 0"):
            svdkit.config(name, alpha=0.0)


def test_polar_factor_is_the_nearest_orthonormal_matrix_and_equals_whitening():
    X = deltas(1, 10, 4)[0]
    Q = polar_factor(X)
    assert torch.allclose(Q.T @ Q, torch.eye(4, dtype=X.dtype), atol=1e-10)
    assert torch.allclose(Q, whitened(X), atol=1e-8)
    for _ in range(5):  # no random orthonormal matrix is closer to X
        R = torch.linalg.qr(torch.randn(10, 4, dtype=X.dtype)).Q
        assert (X - Q).norm() <= (X - R).norm() + 1e-12


def test_singular_value_threshold_shrinks_the_spectrum():
    X = deltas(1)[0]
    S = torch.linalg.svdvals(X)
    got = torch.linalg.svdvals(singular_value_threshold(X, float(S[2])))
    assert torch.allclose(got[:2], S[:2] - S[2], atol=1e-10) and got[2:].abs().max() < 1e-10


def test_task_arithmetic():
    d, w = deltas(), [1.0, 0.5, 2.0]
    got = svdkit.config("task-arithmetic", alpha=0.3).merge(d, w, "x")
    assert torch.allclose(got, 0.3 * (d[0] + 0.5 * d[1] + 2 * d[2]), **TOL)


def test_ties_trim_elect_disjoint_mean_elementwise():
    d, w, density = deltas(T=3, m=6, n=5), [1.0, 1.0, 1.0], 0.4
    got = svdkit.config("ties", alpha=1.0, density=density).merge(d, w, "x")
    k = int(density * 30)
    ref = torch.zeros(6, 5, dtype=d[0].dtype)
    trimmed = []
    for t in d:  # trim: keep the k largest magnitudes
        thr = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    for i in range(6):
        for j in range(5):
            vals = [float(t[i, j]) for t in trimmed]
            sign = 1.0 if sum(vals) >= 0 else -1.0
            agree = [v for v in vals if v != 0 and math.copysign(1, v) == sign]
            ref[i, j] = sum(agree) / len(agree) if agree else 0.0
    assert torch.allclose(got, ref, **TOL)
    assert int(magnitude_mask(d[0], density).sum()) == k


def test_ties_model_scope_uses_one_threshold_per_task_over_all_tensors():
    cfg = svdkit.config("ties", density=0.25, topk_scope="model")
    a, b = deltas(2, 4, 4, seed=1), deltas(2, 3, 2, seed=2)
    b = [x * 10 for x in b]  # the second tensor dominates the whole-model top-k
    state = cfg.prepare(iter([a, b]))
    for t in range(2):
        flat = torch.cat([a[t].abs().flatten(), b[t].abs().flatten()])
        assert state[t] == pytest.approx(float(flat.sort(descending=True).values[int(0.25 * flat.numel()) - 1]))
    assert cfg.merge(a, [1.0, 1.0], "a", state).abs().sum() < cfg.merge(b, [1.0, 1.0], "b", state).abs().sum()


def test_dare_keeps_a_seeded_bernoulli_fraction_rescaled_by_one_over_p():
    d = deltas(T=1, m=200, n=100)
    cfg = svdkit.config("dare", density=0.3, seed=5)
    got = cfg.merge(d, [1.0], "layer.weight")
    kept = got != 0
    assert abs(kept.double().mean() - 0.3) < 0.02
    assert torch.allclose(got[kept], d[0][kept] / 0.3, **TOL)
    assert torch.equal(got, cfg.merge(d, [1.0], "layer.weight"))  # same seed and name: same mask
    assert not torch.equal(kept, svdkit.config("dare", density=0.3, seed=6).merge(d, [1.0], "layer.weight") != 0)


@pytest.mark.parametrize("T", [2, 3])
def test_tsv_m_matches_the_official_construction(T):
    d, w = deltas(T=T, m=12, n=9), [1.0, 0.7, 1.3][:T]
    r = 9
    k = r // T
    U = torch.zeros(12, r, dtype=d[0].dtype)  # the official code: zero-padded blocks of width k
    S = torch.zeros(r, dtype=d[0].dtype)
    V = torch.zeros(9, r, dtype=d[0].dtype)
    for i, (x, wi) in enumerate(zip(d, w)):
        u, s, vh = torch.linalg.svd(wi * x, full_matrices=False)
        U[:, i * k:(i + 1) * k], S[i * k:(i + 1) * k], V[:, i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k].T
    ref = polar_ref(U) @ torch.diag(S) @ polar_ref(V).T
    got = svdkit.config("tsv-m", alpha=0.8).merge(d, w, "x")
    assert torch.allclose(got, 0.8 * ref, **TOL)
    whiten = svdkit.config("tsv-m", alpha=0.8, orthogonalize="whiten").merge(d, w, "x")
    assert torch.allclose(whiten, 0.8 * ref, **TOL)
    bias = [torch.randn(5, dtype=torch.float64) for _ in range(T)]
    assert torch.allclose(svdkit.config("tsv-m").merge(bias, w, "b"), sum(wi * b for wi, b in zip(w, bias)) / T)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    d = deltas()
    u, s, vh = torch.linalg.svd(d[0] + d[1] + d[2], full_matrices=False)
    got = svdkit.config("iso-c", alpha=1.5).merge(d, [1.0] * 3, "x")
    assert torch.allclose(got, 1.5 * s.mean() * u @ vh, **TOL)
    assert torch.allclose(torch.linalg.svdvals(got), torch.full((9,), 1.5 * float(s.mean()), dtype=s.dtype), **TOL)
    geo = svdkit.config("iso-c", mean="geometric").merge(d, [1.0] * 3, "x")
    assert torch.allclose(geo, s.log().mean().exp() * u @ vh, **TOL)


def test_iso_cts_matches_the_official_construction():
    d, T, r = deltas(T=3, m=14, n=11), 3, 11
    k = int(r * 0.8)
    k = r - round((r - k) / T) * T  # the official divisibility adjustment
    s_t = (r - k) // T
    u, s, vh = torch.linalg.svd(sum(d), full_matrices=False)
    Us, Ss, Vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    for x in d:
        resid = x - u[:, :k] @ u[:, :k].T @ x
        ut, st, vht = torch.linalg.svd(resid, full_matrices=False)
        Us.append(ut[:, :s_t]), Ss.append(st[:s_t]), Vs.append(vht[:s_t].T)
    ref = torch.cat(Ss).mean() * polar_ref(torch.cat(Us, 1)) @ polar_ref(torch.cat(Vs, 1)).T
    got = svdkit.config("iso-cts", alpha=1.0, common_fraction=0.8).merge(d, [1.0] * 3, "x")
    assert (k, s_t) == (8, 1)
    assert torch.allclose(got, ref, **TOL)


def test_cart_is_the_average_plus_low_rank_centred_task_vectors():
    d = deltas(T=3, m=12, n=10)
    mean = sum(d) / 3
    k = math.ceil(0.25 * 10)
    ref = mean.clone()
    for x in d:
        u, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        ref += 0.5 * u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    got = svdkit.config("cart", alpha=0.5, rank_fraction=0.25).merge(d, [1.0] * 3, "x")
    assert torch.allclose(got, ref, **TOL)
    full = svdkit.config("cart", alpha=3.0, rank_fraction=1.0).merge(d, [1.0] * 3, "x")
    assert torch.allclose(full, mean, **TOL)  # full rank: the centred vectors sum to 0, weight averaging


def test_lore_reaches_the_coordinate_descent_fixed_point():
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(10, 8, generator=g, dtype=torch.float64)
    thetas = [shared + torch.randn(10, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 8, generator=g, dtype=torch.float64)
              + 0.01 * torch.randn(10, 8, generator=g, dtype=torch.float64) for _ in range(3)]  # fmt: skip
    cfg = svdkit.config("lore", threshold=0.05, iterations=60)
    base = sum(thetas) / 3  # reference: the same alternation written out
    mu = 0.05 * max(float(torch.linalg.svdvals(t - base)[0]) for t in thetas)
    for _ in range(60):
        ds = []
        for t in thetas:
            u, s, vh = torch.linalg.svd(t - base, full_matrices=False)
            ds.append(u @ torch.diag((s - mu).clamp_min(0)) @ vh)
        base = sum(t - x for t, x in zip(thetas, ds)) / 3
    stack = torch.stack(ds)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (stack.sign() == sign).to(stack.dtype)
    ref = base + 0.7 * (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
    got = svdkit.Lore(alpha=0.7, threshold=0.05, iterations=60).merge(thetas, [1.0] * 3, "x")
    assert torch.allclose(got, ref, **TOL)
    assert cfg.base_free and (base - shared).norm() < (thetas[0] - shared).norm()


@pytest.mark.parametrize("inner", ["task-arithmetic", "ties", "tsv-m", "iso-c"])
def test_knots_matches_the_dense_concatenated_svd(inner):
    f = lora_factors()
    dense = [B @ A for B, A in f]
    u, s, vh = torch.linalg.svd(torch.cat(dense, 1), full_matrices=False)
    keep = s > 1e-8 * s[0]
    u, sv = u[:, keep], s[keep, None] * vh[keep]
    R = [sv[:, t * 10:(t + 1) * 10] for t in range(3)]
    from svdkit.merging.inner import inner_merge

    ref = 0.6 * u @ inner_merge(R, inner, 1.0)
    cfg = svdkit.config("knots", alpha=0.6, inner=inner)
    B, A = cfg.merge_factors(f)
    assert B.shape[1] == sum(r for r in (2, 3, 1))  # rank Σr, never m × n
    U, Rk = knots_align(f)
    assert torch.allclose(torch.cat([U @ x for x in Rk], 1), torch.cat(dense, 1), **TOL)
    # every inner rule is equivariant to flipping a basis vector's sign (TIES elects the flipped sign), so the
    # reference's unfixed SVD signs do not matter
    assert torch.allclose(B @ A, ref, **TOL)


def test_core_space_is_lossless_for_mixed_ranks_and_matches_direct_cores():
    f = lora_factors(ranks=(2, 4, 1))
    cfg = svdkit.config("core-space", alpha=1.0)  # inner task arithmetic: exactly the sum of the LoRAs
    B, A = cfg.merge_factors(f)
    assert torch.allclose(B @ A, sum(b @ a for b, a in f), **TOL) and A.shape[0] <= 7
    U_ref, cores, V_ref = core_space(f)
    for (b, a), M in zip(f, cores):
        assert torch.allclose(U_ref @ M @ V_ref, b @ a, **TOL)
    ub = torch.linalg.svd(torch.cat([b for b, _ in f], 1), full_matrices=False)[0]
    va = torch.linalg.svd(torch.cat([a for _, a in f], 0), full_matrices=False)[2]
    ref_cores = [ub.T @ b @ a @ va.T for b, a in f]
    B2, A2 = svdkit.config("core-space", inner="iso-c", alpha=0.5).merge_factors(f)
    u, s, vh = torch.linalg.svd(sum(ref_cores), full_matrices=False)
    assert torch.allclose(B2 @ A2, 0.5 * ub @ (s.mean() * u @ vh) @ va, **TOL)


def test_weights_scale_each_task_before_the_svd():
    d = deltas(T=2)
    a = svdkit.config("tsv-m").merge(d, [2.0, 1.0], "x")
    b = svdkit.config("tsv-m").merge([2 * d[0], d[1]], [1.0, 1.0], "x")
    assert torch.allclose(a, b, **TOL)


@pytest.mark.parametrize("name", MERGERS)
def test_unchanged_tensors_stay_unchanged_and_finite(name):
    cfg = svdkit.config(name)
    zeros = [torch.zeros(6, 4, dtype=torch.float64) for _ in range(3)]
    if cfg.base_free:  # identical models: the merge is that model
        same = [torch.ones(6, 4, dtype=torch.float64)] * 3
        assert torch.allclose(cfg.merge(same, [1.0] * 3, "x"), same[0])
    else:
        assert torch.equal(cfg.merge(zeros, [1.0] * 3, "x"), zeros[0])

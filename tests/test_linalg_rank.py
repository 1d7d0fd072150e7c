"""svdkit.core.linalg_rank against the formulas written out with Python loops: energy and elbow ranks,
effective rank, principal angles, best cosines, Gram deviations."""

from __future__ import annotations

import math

import pytest
import torch

from svdkit.core import linalg_rank as L

SPECTRUM = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def energy_rank_by_loop(values, share, power=2.0, total=None):
    e = [abs(float(v)) ** power for v in values]
    T = sum(e) if total is None else total
    running = 0.0
    for r, x in enumerate(e, start=1):
        running += x
        if running >= share * T:
            return r
    return len(e)


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("share", [0.1, 0.5, 0.77, 0.9, 0.97, 0.999])
def test_energy_rank_is_the_smallest_r_reaching_the_share(share, power):
    assert L.energy_rank(SPECTRUM, share, power) == energy_rank_by_loop(SPECTRUM.tolist(), share, power)


def test_energy_rank_with_a_total_from_a_longer_spectrum_and_caps():
    top = SPECTRUM[:3]  # σ² = 16, 4, 1 of a total 23.25
    total = float((SPECTRUM**2).sum())
    assert L.energy_rank(top, 0.8, total=total) == energy_rank_by_loop(top.tolist(), 0.8, total=total) == 2
    assert L.energy_rank(top, 0.99, total=total) == 3  # not reached within the given values: capped at K
    assert L.energy_rank(SPECTRUM, 1.0) == 8  # share 1 is reached exactly by the whole spectrum
    assert L.energy_rank(torch.zeros(5), 0.9) == 1  # a zero spectrum keeps one direction


def test_energy_rank_counts_a_share_within_rounding_of_the_threshold_as_reached():
    values = torch.tensor([1.0, 1.0, 1.0])  # E = 1/3, 2/3, 1
    assert L.energy_rank(values, 2 / 3, power=1) == 2
    assert L.energy_rank(values, 2 / 3 + 1e-9, power=1) == 3
    with pytest.raises(ValueError, match="non-empty 1-D"):
        L.energy_rank(torch.ones(2, 2), 0.5)


def test_cumulative_energy():
    E = L.cumulative_energy(SPECTRUM)
    e = (SPECTRUM.double() ** 2).tolist()
    expected = [sum(e[: k + 1]) / sum(e) for k in range(len(e))]
    torch.testing.assert_close(E, torch.tensor(expected, dtype=torch.float64))


def test_elbow_rank_maximizes_the_gain_over_the_chord():
    E = L.cumulative_energy(SPECTRUM).tolist()
    K = len(E)
    gains = [E[k] - (k + 1) / K for k in range(K)]
    best = max(gains)
    assert L.elbow_rank(SPECTRUM) == max(k + 1 for k in range(K) if gains[k] >= best - 1e-12)
    assert L.elbow_rank(torch.ones(6)) == 6  # a flat spectrum has no elbow


def test_effective_rank_matches_the_entropy_formula():
    s = [3.0, 1.0, 0.0]
    p = [x / 4 for x in s if x > 0]
    assert L.effective_rank(torch.tensor(s)) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    assert L.effective_rank(torch.ones(5)) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="all zeros"):
        L.effective_rank(torch.zeros(3))


def test_principal_angles_of_two_planes_in_r3():
    theta = 0.3
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    Y = torch.tensor([[1.0, 0.0], [0.0, math.cos(theta)], [0.0, math.sin(theta)]], dtype=torch.float64)
    torch.testing.assert_close(L.principal_cosines(X, Y), torch.tensor([1.0, math.cos(theta)], dtype=torch.float64))
    torch.testing.assert_close(L.principal_angles(X, Y), torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="different spaces"):
        L.principal_cosines(X, torch.eye(4, dtype=torch.float64))


def test_best_cosines_and_gram_deviations():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    expected = [max(abs(float(X[:, i] @ Y[:, j])) for j in range(4)) for i in range(3)]
    torch.testing.assert_close(L.best_cosines(X, Y), torch.tensor(expected, dtype=torch.float64))
    B, A = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    cols = float(((B.T @ B - eye) ** 2).sum().sqrt())
    rows = float(((A @ A.T - eye) ** 2).sum().sqrt())
    assert float(L.gram_deviation(B)) == pytest.approx(cols)
    assert float(L.gram_deviation(A, rows=True)) == pytest.approx(rows)
    assert float(L.orthogonality(B, A)) == pytest.approx(cols + rows)
    Q = torch.linalg.qr(B).Q
    assert float(L.orthogonality(Q, Q.T)) < 1e-12

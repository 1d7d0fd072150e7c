"""svdkit.core.svd_cache: hits return the stored factors, any change of the weight or of the decomposition's
parameters misses, the folder stays within its bound (least recently used first), damaged entries are misses,
and adapter inits reuse it (opt-in: by argument, context manager or the SVDKIT_SVD_CACHE variable)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.core import svd_cache
from svdkit.core.linalg import truncated_svd
from svdkit.core.svd_cache import SvdCache, parse_bytes, use_svd_cache


def weights(b: int = 3, m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, m, n, generator=torch.Generator().manual_seed(seed))


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("method,which", [("exact", "top"), ("exact", "bottom"), ("randomized", "top"),
                                          ("randomized", "bottom")])  # fmt: skip
def test_a_hit_returns_exactly_what_was_computed(tmp_path, method, which):
    W, seeds = weights(), [1, 2, 3]
    cache = SvdCache(tmp_path)
    direct = truncated_svd(W, 4, which, method, seeds, cache=False)
    first = truncated_svd(W, 4, which, method, seeds, cache=cache)
    assert (cache.hits, cache.misses) == (0, 3) and len(cache.entries()) == 3
    second = truncated_svd(W, 4, which, method, seeds, cache=cache)
    assert (cache.hits, cache.misses) == (3, 3)
    assert same(first, direct) and same(second, direct)
    U, S, Vh = second
    torch.testing.assert_close((U * S.unsqueeze(-2)) @ Vh, (direct[0] * direct[1].unsqueeze(-2)) @ direct[2])


def test_a_changed_weight_is_never_served_stale(tmp_path):
    cache = SvdCache(tmp_path)
    W = weights(b=1)[0]
    truncated_svd(W, 3, cache=cache)
    W2 = W.clone()
    W2[7, 5] += 1e-3  # one element, far from any sampled fingerprint position
    got = truncated_svd(W2, 3, cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    assert same(got, truncated_svd(W2, 3, cache=False))
    assert not torch.equal(got[1], truncated_svd(W, 3, cache=False)[1])
    truncated_svd(W.to(torch.float64), 3, cache=cache)  # the same values in another dtype: other bytes, a miss
    assert cache.misses == 3


def test_every_parameter_is_part_of_the_key(tmp_path):
    cache = SvdCache(tmp_path)
    W = weights(b=1)
    calls = [dict(rank=3), dict(rank=4), dict(rank=3, which="bottom"), dict(rank=3, dtype=torch.float64),
             dict(rank=3, method="randomized", seeds=[1]), dict(rank=3, method="randomized", seeds=[2]),
             dict(rank=3, method="randomized", seeds=[1], niter=2), dict(rank=3, method="randomized", seeds=[1], oversample=3)]
    for kwargs in calls:
        truncated_svd(W, cache=cache, **kwargs)
    assert cache.misses == len(calls) and cache.hits == 0
    truncated_svd(W, 3, "top", "exact", seeds=[99], niter=1, cache=cache)  # exact: seeds and niter do not matter
    assert cache.hits == 1


def test_a_batch_with_some_hits_decomposes_only_the_misses(tmp_path):
    cache = SvdCache(tmp_path)
    W = weights(b=4)
    truncated_svd(W[1:3], 3, cache=cache)
    got = truncated_svd(W, 3, cache=cache)
    assert (cache.hits, cache.misses) == (2, 4)
    direct = truncated_svd(W, 3, cache=False)
    for x, y in zip(got, direct):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_the_folder_stays_within_its_bound_least_recently_used_first(tmp_path):
    W = weights(b=3, m=16, n=16)
    cache = SvdCache(tmp_path)
    truncated_svd(W[0], 4, cache=cache)
    entry = cache.size()  # every entry here has the same size: U, S, Vh of rank 4 and the header
    cache.max_bytes = 2 * entry + entry // 2  # room for two
    cache.clear()
    names = {}
    for i in range(2):
        truncated_svd(W[i], 4, cache=cache)
        names[i] = cache.entries()[-1][2].name
        time.sleep(0.02)
    past = time.time() - 100
    os.utime(tmp_path / names[0], (past, past - 10))
    os.utime(tmp_path / names[1], (past, past - 20))  # entry 1 is older ...
    truncated_svd(W[0], 4, cache=cache)  # ... and entry 0 is used again: now the most recent
    assert cache.hits == 1 and cache.misses == 3
    truncated_svd(W[2], 4, cache=cache)  # a third entry: the least recently used (entry 1) goes
    left = {p.name for _, _, p in cache.entries()}
    assert names[0] in left and names[1] not in left and len(left) == 2
    assert cache.size() <= cache.max_bytes


def test_a_damaged_or_foreign_entry_is_a_miss(tmp_path):
    cache = SvdCache(tmp_path)
    W = weights(b=1)
    truncated_svd(W, 3, cache=cache)
    (_, _, path), = cache.entries()
    path.write_bytes(b"not a safetensors file")
    got = truncated_svd(W, 3, cache=cache)
    assert cache.misses == 2 and same(got, truncated_svd(W, 3, cache=False))
    key = SvdCache.key(W[0], {"rank": 3})
    assert cache.get(key, {"rank": 4}) is None  # stored parameters are checked on every hit


def test_opt_in_by_environment_or_context(tmp_path, monkeypatch):
    W = weights(b=1)
    monkeypatch.delenv(svd_cache.ENV, raising=False)
    assert svd_cache.resolve(None) is None  # off by default
    monkeypatch.setenv(svd_cache.ENV, str(tmp_path / "env"))
    monkeypatch.setenv(svd_cache.ENV_MAX, "1M")
    truncated_svd(W, 3)
    store = svd_cache.resolve(None)
    assert store.max_bytes == 2**20 and store.misses == 1 and len(store.entries()) == 1
    with use_svd_cache(tmp_path / "ctx") as ctx:  # the context wins over the variable
        truncated_svd(W, 3)
        assert ctx.misses == 1 and svd_cache.resolve(None) is ctx
    assert svd_cache.resolve(False) is None
    assert [parse_bytes(x) for x in ("4096", "2K", "1.5M", "2GiB")] == [4096, 2048, 1536 * 1024, 2 * 2**30]
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_adapter_inits_reuse_the_cache(tmp_path):
    def pissa_init(method: str) -> list:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12))
        svdkit.adapt(model, svdkit.PiSSA(rank=4, svd=method, niter=2, targets=r"^\d+$"))
        return [(layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for _, layer in adapted_layers(model)]

    for method in ("exact", "randomized"):
        uncached = pissa_init(method)
        with use_svd_cache(tmp_path / method) as cache:
            first = pissa_init(method)
            assert (cache.hits, cache.misses) == (0, 3)
            second = pissa_init(method)
            assert (cache.hits, cache.misses) == (3, 3)
        for a, b, c in zip(uncached, first, second):
            assert same(a, b) and same(a, c)

"""An opt-in on-disk cache of truncated SVDs, so repeated inits (bench sweeps, compress-then-adapt, reruns)
skip the decomposition.

    export SVDKIT_SVD_CACHE=~/.cache/svdkit/svd          # every truncated_svd in this process uses it
    export SVDKIT_SVD_CACHE_MAX_BYTES=4G                 # the bound (default 2G); LRU entries beyond it go

    with use_svd_cache("/tmp/svd", max_bytes=2**30):    # or for one block of code (overrides the env var)
        svdkit.adapt(model, svdkit.PiSSA(rank=16))
    truncated_svd(W, 16, cache="/tmp/svd")               # or for one call (cache=False: never)

One entry per matrix: ``<key>.safetensors`` holding U (m, r), S (r,), Vh (r, n) on the CPU, written
atomically (a temporary file, then one rename). The key is the SHA-256 of the matrix's full content (every
byte of the stored values, with its shape and dtype) and of the decomposition's parameters: exact or
randomized, top or bottom, rank, compute dtype and, for the randomized routines, the matrix's seed, niter,
oversample (and the bottom routine's tolerance), plus :data:`FORMAT` (bumped whenever the engine's results
change). Changing one weight element changes the key, so an entry is never stale; the sampled fingerprint of
:mod:`svdkit.core.fingerprint` is deliberately not used (a change outside its sample would hit). The
parameters are also stored in the entry and checked on every hit.

Bounded size: after each write, the least recently used entries (by modification time, refreshed on every
hit) are deleted until the folder holds at most ``max_bytes`` of entries. Several processes may share a
folder: writes are atomic, and an entry deleted or damaged under a reader counts as a miss.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

FORMAT = 1  # bump when the SVD engine's results change for the same parameters: old entries stop matching
ENV, ENV_MAX = "SVDKIT_SVD_CACHE", "SVDKIT_SVD_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 * 2**30
SUFFIX = ".safetensors"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("svdkit_svd_cache", default=None)


def parse_bytes(text: str | int) -> int:
    """``"500M"``, ``"2G"``, ``"1.5GiB"``, ``"4096"`` → bytes (K/M/G/T are powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
        if not m:
            raise ValueError(f"{ENV_MAX}: {text!r} is not a size; use bytes or a number with K, M, G or T (e.g. 2G).")
        value = int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2).upper() or "_"))
    if value <= 0:
        raise ValueError(f"the SVD cache size must be positive, got {text!r}.")
    return value


def content_hash(matrix: Tensor) -> str:
    """SHA-256 of a matrix's shape, dtype and every byte of its values (any dtype, any device)."""
    flat = matrix.detach().contiguous().cpu().reshape(-1)
    h = hashlib.sha256(f"{tuple(matrix.shape)}|{matrix.dtype}|".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SvdCache:
    """A folder of cached truncated SVDs, at most ``max_bytes`` of entries (least recently used go first)."""

    def __init__(self, path: str | os.PathLike, max_bytes: int | str = DEFAULT_MAX_BYTES):
        self.path = Path(path).expanduser()
        self.max_bytes = parse_bytes(max_bytes)
        self.hits = self.misses = 0
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"SVD cache: {self.path} exists and is not a folder; choose a folder for the cache.")
        self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"SvdCache({str(self.path)!r}, max_bytes={self.max_bytes}, hits={self.hits}, misses={self.misses})"

    @staticmethod
    def key(matrix: Tensor, params: dict) -> str:
        """The entry name of one matrix's decomposition with ``params`` (JSON-serializable values)."""
        text = json.dumps({"format": FORMAT, "content": content_hash(matrix), **params}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str, params: dict) -> tuple[Tensor, Tensor, Tensor] | None:
        """The cached (U, S, Vh) on the CPU, or None (missing, damaged, or made with other parameters)."""
        from safetensors import SafetensorError, safe_open

        file = self.path / f"{key}{SUFFIX}"
        try:
            with safe_open(str(file), framework="pt") as f:
                if json.loads((f.metadata() or {}).get("params", "null")) != params:
                    return None
                U, S, Vh = (f.get_tensor(name) for name in ("U", "S", "Vh"))
            os.utime(file)  # least recently used = oldest modification time
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError):  # missing, evicted, damaged
            return None
        r = S.shape[0]
        if U.ndim != 2 or Vh.ndim != 2 or U.shape[1] != r or Vh.shape[0] != r:
            return None
        return U, S, Vh

    def put(self, key: str, params: dict, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        """Write one entry atomically, then evict down to ``max_bytes``; an entry larger than that is not kept."""
        from safetensors.torch import save_file

        tensors = {"U": U.detach().cpu().contiguous(), "S": S.detach().cpu().contiguous(),
                   "Vh": Vh.detach().cpu().contiguous()}  # fmt: skip
        if sum(t.numel() * t.element_size() for t in tensors.values()) > self.max_bytes:
            return
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-", suffix=SUFFIX)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"params": json.dumps(params, sort_keys=True), "format": str(FORMAT)})
            os.replace(tmp, self.path / f"{key}{SUFFIX}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.evict()

    def entries(self) -> list[tuple[float, int, Path]]:
        """(modification time, size, path) of every entry, oldest first."""
        out = []
        for e in os.scandir(self.path):
            if e.name.endswith(SUFFIX) and not e.name.startswith(".tmp-"):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, Path(e.path)))
        return sorted(out, key=lambda x: (x[0], x[2].name))

    def size(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self) -> None:
        """Delete the least recently used entries until the folder holds at most ``max_bytes``."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size

    def clear(self) -> None:
        for _, _, path in self.entries():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def decompose(self, weight: Tensor, params: Sequence[dict], compute: Callable[[list[int]], tuple[Tensor, Tensor, Tensor]]):
        """(U, S, Vh) of a (b, m, n) batch, entry by entry: ``params[i]`` describes matrix i's decomposition and
        ``compute(indices)`` decomposes the sub-batch ``weight[indices]`` (the misses) in one call."""
        keys = [self.key(weight[i], p) for i, p in enumerate(params)]
        found = [self.get(k, p) for k, p in zip(keys, params)]
        missing = [i for i, f in enumerate(found) if f is None]
        self.hits += len(found) - len(missing)
        self.misses += len(missing)
        if missing:
            U, S, Vh = compute(missing)
            for j, i in enumerate(missing):
                self.put(keys[i], params[i], U[j], S[j], Vh[j])
                found[i] = (U[j], S[j], Vh[j])
        device = weight.device
        return tuple(torch.stack([f[t] for f in found]).to(device) for t in range(3))


def from_env() -> SvdCache | None:
    """The cache named by ``SVDKIT_SVD_CACHE`` (size from ``SVDKIT_SVD_CACHE_MAX_BYTES``), or None."""
    path = os.environ.get(ENV, "").strip()
    if not path:
        return None
    return _from_env_cached(path, os.environ.get(ENV_MAX, "").strip() or DEFAULT_MAX_BYTES)


_ENV_CACHES: dict = {}


def _from_env_cached(path: str, max_bytes) -> SvdCache:
    key = (path, str(max_bytes))
    if key not in _ENV_CACHES:
        _ENV_CACHES[key] = SvdCache(path, max_bytes)
    return _ENV_CACHES[key]


def resolve(cache) -> SvdCache | None:
    """``cache`` argument → a cache or None: an SvdCache or a folder path as given; False: none; None: the
    one enabled by :func:`use_svd_cache`, else the ``SVDKIT_SVD_CACHE`` environment variable, else none."""
    if cache is False:
        return None
    if isinstance(cache, SvdCache):
        return cache
    if cache is not None and cache is not True:
        return SvdCache(cache)
    active = _ACTIVE.get()
    return active if active is not None else from_env()


@contextlib.contextmanager
def use_svd_cache(cache: SvdCache | str | os.PathLike, max_bytes: int | str = DEFAULT_MAX_BYTES):
    """Enable ``cache`` (a folder or an :class:`SvdCache`) for every truncated SVD inside the block."""
    store = cache if isinstance(cache, SvdCache) else SvdCache(cache, max_bytes)
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)

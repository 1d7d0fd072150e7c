"""Low-rank-gradient optimizers and spectral parametrizations for training (DESIGN.md §8, kind="optim").

    opt = svdkit.optim.GaLoreAdamW(model.parameters(), lr=1e-2, rank=128, update_gap=200, scale=0.25)
    opt = svdkit.optim.build(model, svdkit.config("q-galore", rank=64), lr=1e-2)
"""

from svdkit.optim.engine import GaLoreAdamW
from svdkit.optim import baselines, lost, methods, sst  # noqa: F401  (importing them registers the methods)
from svdkit.optim.api import build, memory_report, param_groups, parametrize, state_bytes

__all__ = ["GaLoreAdamW", "build", "memory_report", "param_groups", "parametrize", "state_bytes"]

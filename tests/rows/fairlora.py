"""Conformance row: FairLoRA, per-group spectral variant (shared U, V; one σ vector per group; group 0 active)."""

from rows import Row

ROWS = [
    Row("fairlora", options={"rank": 4, "n_groups": 3}, params=lambda W, cfg, bias: cfg.rank * sum(W.shape) + cfg.n_groups * cfg.rank),
]

"""Conformance row: Sculpting Subspaces / OSFT (full-weight training with projected updates; every entry of W
is a trainable parameter, the projection acts on its gradient and update)."""

from rows import Row

ROWS = [
    Row("sculpt", params=lambda W, cfg, bias: W.shape[0] * W.shape[1]),
]

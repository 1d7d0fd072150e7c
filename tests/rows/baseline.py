"""LoRA, PiSSA, MiLoRA: r(m + n) trainable parameters per matrix, function-preserving."""

from rows import Row

ROWS = [
    Row("lora", dict(rank=4)),
    Row("lora", dict(rank=4, alpha=8, use_rslora=True), id="lora-rslora"),
    Row("pissa", dict(rank=4)),
    Row("pissa", dict(rank=4, svd="randomized", niter=2), id="pissa-randomized"),
    Row("pissa", dict(rank=4, alpha=8, fold=True), id="pissa-fold"),
    Row("milora", dict(rank=4, dropout=0.0)),
    Row("milora", dict(rank=4, dropout=0.0, svd="randomized"), id="milora-randomized"),
]

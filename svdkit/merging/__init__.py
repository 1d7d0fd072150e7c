"""The merge family: task vectors of fine-tuned models (dense, PEFT LoRA or svdkit adapters), streamed.

``svdkit.merge_models(base, models, svdkit.config("tsv-m"))``; ``svdkit.methods("merge")`` lists the methods.
``svdkit.compress_delta(base, finetuned, svdkit.config("delta-come", bits=1.0))`` compresses one task vector.
Importing this package registers them.
"""

from svdkit.merging import (  # noqa: F401  (registers every method)
    cart,
    core_space,
    dare,
    delta_come,
    iso_c,
    iso_cts,
    impart,
    knots,
    lore,
    task_arithmetic,
    ties,
    tsv_m,
)
from svdkit.merging.delta import compress_delta
from svdkit.merging.engine import merge_models

__all__ = ["compress_delta", "merge_models"]

"""Compression: low-rank replacement of target linears (``svdkit.compress``), saved without pickle.

One file per method (svd, fwsvd, asvd, svd-llm, svd-llm-v2, welore, clover-prune); importing this package
registers them.
"""

from svdkit.compression import asvd, clover_prune, fwsvd, svd, svd_llm, svd_llm_v2, welore  # noqa: F401
from svdkit.compression.api import compress, is_compressed, load_compressed, save_compressed, save_dense  # noqa: F401
from svdkit.compression.config import CompressConfig  # noqa: F401
from svdkit.compression.layers import LowRankLinear, PrunedOutput, PrunedValue  # noqa: F401
from svdkit.compression.report import CompressionReport  # noqa: F401

"""svdkit: spectral (SVD-based) adaptation of pretrained PyTorch models.

    model, tok = svdkit.load_model("default")
    svdkit.adapt(model, svdkit.PiSSA(rank=16))
    ...train...
    svdkit.export_peft(model, "out/peft")
"""

__version__ = "0.1.0"

from svdkit.adapters.api import adapt, after_clipping, after_step, merge, regularization, unadapt  # noqa: E402
from svdkit.adapters.api import adapters_disabled, output_regularization  # noqa: E402
from svdkit.adapters.api import load_training_state, training_state  # noqa: E402
from svdkit.adapters.fusion import fuse_shared_inputs  # noqa: E402  (input fusion of q/k/v, gate/up; default on)
from svdkit.adapters import zoo  # noqa: E402,F401  (importing it registers every method)
from svdkit.compression import CompressionReport, compress, load_compressed, save_compressed  # noqa: E402
from svdkit.core.calibration import Calibration, Statistic, calibrate  # noqa: E402
from svdkit.merging import compress_delta, merge_models  # noqa: E402  (importing it registers the merge methods)
from svdkit import optim  # noqa: E402,F401  (svdkit.optim.GaLoreAdamW, build, parametrize; registers the optim methods)
from svdkit.adapters.config import AdapterConfig  # noqa: E402
from svdkit.core.registry import Refused, config, config_from_dict, method_class, methods, register  # noqa: E402
from svdkit.adapters.export import export_peft  # noqa: E402
from svdkit.training.run_export import export_run  # noqa: E402
from svdkit.training.continual import ContinualConfig, Task, continual  # noqa: E402  (sequential tasks, forgetting)
from svdkit.training.federated import FederatedConfig, federated  # noqa: E402  (FedSVD / FedAvg of LoRA, optional DP-SGD)
from svdkit.core.models import load_model  # noqa: E402
from svdkit.core.svd_cache import SvdCache, use_svd_cache  # noqa: E402  (opt-in on-disk SVD cache)
from svdkit.adapters.saving import AdapterFormatError, FingerprintMismatch, load_adapter, save_adapter  # noqa: E402
from svdkit.benchmarking import bench  # noqa: E402  (svdkit.bench(out, ...): the method comparison)
from svdkit.inspection import gradient_spectrum, nuclear_norm_score, spectrum  # noqa: E402

# Every registered method's config class, by its class name: svdkit.PiSSA, svdkit.LoRA, …
globals().update({method_class(name).__name__: method_class(name) for name in methods(None)})

__all__ = [
    "spectrum", "gradient_spectrum", "nuclear_norm_score", "optim",
    "SvdCache", "use_svd_cache", "fuse_shared_inputs",
    "continual", "ContinualConfig", "Task", "federated", "FederatedConfig",
    "AdapterConfig", "AdapterFormatError", "Calibration", "Statistic", "calibrate", "FingerprintMismatch", "adapt", "after_clipping", "after_step",
    "adapters_disabled", "bench", "config", "config_from_dict", "output_regularization", "Refused",
    "export_peft", "export_run", "load_adapter", "load_model", "merge", "methods", "register", "regularization", "training_state", "load_training_state",
    "save_adapter", "unadapt", "compress", "save_compressed", "load_compressed", "CompressionReport", "merge_models", "compress_delta",
    *(method_class(name).__name__ for name in methods(None)),
]

"""svdkit: spectral (SVD-based) adaptation of pretrained PyTorch models.

    model, tok = svdkit.load_model("default")
    svdkit.adapt(model, svdkit.PiSSA(rank=16))
    ...train...
    svdkit.export_peft(model, "out/peft")
"""

__version__ = "0.1.0"

from svdkit.adapters.api import adapt, after_clipping, after_step, merge, regularization, unadapt  # noqa: E402
from svdkit.adapters.api import adapters_disabled, output_regularization  # noqa: E402
from svdkit.adapters import zoo  # noqa: E402,F401  (importing it registers every method)
from svdkit.core.calibration import Calibration, Statistic, calibrate  # noqa: E402
from svdkit.adapters.config import AdapterConfig  # noqa: E402
from svdkit.core.registry import config, config_from_dict, method_class, methods, register  # noqa: E402
from svdkit.adapters.export import export_peft  # noqa: E402
from svdkit.core.models import load_model  # noqa: E402
from svdkit.adapters.saving import AdapterFormatError, FingerprintMismatch, load_adapter, save_adapter  # noqa: E402
from svdkit.benchmarking import bench  # noqa: E402  (svdkit.bench(out, ...): the method comparison)

# Every registered method's config class, by its class name: svdkit.PiSSA, svdkit.LoRA, …
globals().update({method_class(name).__name__: method_class(name) for name in methods(None)})

__all__ = [
    "AdapterConfig", "AdapterFormatError", "Calibration", "Statistic", "calibrate", "FingerprintMismatch", "adapt", "after_clipping", "after_step",
    "adapters_disabled", "bench", "config", "config_from_dict", "output_regularization",
    "export_peft", "load_adapter", "load_model", "merge", "methods", "register", "regularization",
    "save_adapter", "unadapt", *(method_class(name).__name__ for name in methods(None)),
]

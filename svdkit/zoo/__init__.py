"""One file per method family; importing a file registers its methods."""

from .lora import LoRA
from .residual import MiLoRA, PiSSA

__all__ = ["LoRA", "MiLoRA", "PiSSA"]

"""The inspection family (DESIGN.md §8): weight spectra, what fine-tuning changed, data-driven spectral signals."""

from svdkit.inspection.signals import gradient_spectrum, nuclear_norm_score
from svdkit.inspection.spectrum import spectrum

__all__ = ["spectrum", "gradient_spectrum", "nuclear_norm_score"]

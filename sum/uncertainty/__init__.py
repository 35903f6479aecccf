"""Mask-refinement module and uncertainty maps of pseudo labels (spec §4)."""

from sum.uncertainty.maps import UncertaintyConfig, certainty, refine_pseudo_labels, uncertainty_at, uncertainty_map
from sum.uncertainty.refine import RefineConfig, RefinementModule, load_refiner, save_refiner
from sum.uncertainty.report import auroc

__all__ = [
    "RefineConfig",
    "RefinementModule",
    "UncertaintyConfig",
    "auroc",
    "certainty",
    "load_refiner",
    "refine_pseudo_labels",
    "save_refiner",
    "uncertainty_at",
    "uncertainty_map",
]

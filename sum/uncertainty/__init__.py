"""Mask-refinement module and uncertainty maps of pseudo labels (spec §4)."""

from sum.uncertainty.maps import certainty, refine_pseudo_labels, uncertainty_map
from sum.config import RefineConfig, UncertaintyConfig
from sum.uncertainty.refiner import RefinementModule, load_refiner, save_refiner
from sum.uncertainty.scoring import auroc

__all__ = [
    "RefineConfig",
    "RefinementModule",
    "UncertaintyConfig",
    "auroc",
    "certainty",
    "load_refiner",
    "refine_pseudo_labels",
    "save_refiner",
    "uncertainty_map",
]

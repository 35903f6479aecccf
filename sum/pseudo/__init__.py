"""Pseudo-labels: automatic mask generation over the unlabeled pool (spec §3.3-3.5)."""

from sum.pseudo.amg import MaskGenerator
from sum.pseudo.point_decoder import PointBatchDecoder

__all__ = ["MaskGenerator", "PointBatchDecoder"]

"""The refinement module (spec §4.1): a separate copy of SAM's prompt encoder and mask decoder
driven by the mask, box and point prompts of a pseudo label together, and its checkpoint
(`save_refiner`, `load_refiner`). How it is trained is in `sum.uncertainty.refine`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from sum.config import RefineConfig
from sum.io import atomic_torch_save, check_format
from sum.model.build import build_sum_model
from sum.model.checkpoint import CheckpointError, apply_state_dict, check_plain, config_from_dict, config_to_dict
from sum.model.decoder import decode, upscaling_is_sam

REFINER_FORMAT = "sum-refiner"
REFINER_VERSION = 1


class RefinementModule(nn.Module):
    """SAM's prompt encoder + mask decoder, a separate copy, driven by mask + box + point prompts
    together, single output (spec §4.1).

    Arguments:
      prompt_encoder: a ``PromptEncoder`` (or `TaskPromptEncoder`, used with task prompt 0).
      mask_decoder: a ``MaskDecoder``.
      img_size: the padded input side the prompts' coordinates refer to (1024 for SAM).
      folded: compute the decoder folded (`sum.model.decoder.decode`, the same function,
        faster; used when the decoder's upscaling is SAM's), else SAM's ``MaskDecoder``.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, img_size: int, folded: bool = True) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.img_size = int(img_size)
        self.folded = bool(folded) and upscaling_is_sam(mask_decoder)

    @classmethod
    def from_sam(cls, sam: nn.Module) -> "RefinementModule":
        """A copy of ``sam``'s prompt encoder and mask decoder (the foundation weights)."""
        return cls(copy.deepcopy(sam.prompt_encoder), copy.deepcopy(sam.mask_decoder), sam.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def low_res_size(self) -> int:
        return 4 * int(self.prompt_encoder.image_embedding_size[0])

    def forward(
        self,
        features_1chw: torch.Tensor,
        points_bn2: torch.Tensor,
        labels_bn: torch.Tensor,
        boxes_b4: torch.Tensor,
        mask_logits_b1hw: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Refined logits for B pseudo labels of one image.

        Arguments:
          features_1chw: the image embedding, (1, C, He, We).
          points_bn2: (B, N, 2) points (x, y) in the ``ResizeLongestSide`` input frame.
          labels_bn: (B, N) point labels (1 positive).
          boxes_b4: (B, 4) xyxy boxes in the input frame.
          mask_logits_b1hw: (B, 1, 4He, 4We) SAM low-res logits ``s`` (the mask prompt).
        Returns:
          (refined logits r (B, 1, 4He, 4We), predicted IoU (B, 1)).
        """
        pe = self.prompt_encoder
        kwargs = {"task_prompt": 0} if hasattr(pe, "task_prompt_embedding") else {}
        sparse_bnc, dense_bchw = pe(points=(points_bn2, labels_bn), boxes=boxes_b4, masks=mask_logits_b1hw, **kwargs)
        return decode(self.mask_decoder, features_1chw, pe.get_dense_pe(), sparse_bnc, dense_bchw, exact=not self.folded)


def save_refiner(
    refiner: RefinementModule,
    path: str | os.PathLike,
    model_config,
    refine_config: Optional[RefineConfig] = None,
    metrics: Optional[dict] = None,
) -> Path:
    """Write the module (prompt encoder + mask decoder state only), the architecture config, the
    `RefineConfig` and the metrics; atomically.

    Returns:
      ``path``.
    """
    stored = config_to_dict(model_config)
    stored.update(checkpoint=None, checkpoint_sha256=None)
    # wall times are logged, not stored: the checkpoint's bytes (its DVC hash) must not depend on load
    kept = {k: v for k, v in (metrics or {}).items() if not k.startswith("seconds")}
    meta = {"metrics": kept, "refine_config": dataclasses.asdict(refine_config) if refine_config else {}}
    check_plain(meta, "meta")
    check_plain(stored, "model_config")
    obj = {
        "format": REFINER_FORMAT,
        "version": REFINER_VERSION,
        "model_config": stored,
        "state_dict": OrderedDict((k, v.detach().cpu()) for k, v in refiner.state_dict().items()),
        "meta": meta,
    }
    path = Path(path)
    atomic_torch_save(obj, path)
    return path


def build_refinement_module(model_config) -> RefinementModule:
    """An (untrained) module of the architecture of ``model_config``, built by
    `sum.model.build.build_sum_model` so that sizes stay in one place."""
    sam = build_sum_model(model_config)
    return RefinementModule(sam.prompt_encoder, sam.mask_decoder, sam.image_encoder.img_size)


def load_refiner(path: str | os.PathLike, device: torch.device | str = "cpu") -> Tuple[RefinementModule, dict]:
    """The module of a `save_refiner` file, in eval mode, and its meta (metrics, refine config).

    Raises:
      FileNotFoundError, ValueError: one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: refinement-module checkpoint not found (run `sumseg refine`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types on bad bytes)
        raise ValueError(f"{path}: not a readable refinement-module checkpoint ({type(e).__name__})") from None
    check_format(obj, REFINER_FORMAT, path, "a refinement-module checkpoint")
    if obj.get("version") != REFINER_VERSION:
        raise ValueError(f"{path}: refiner version {obj.get('version')!r}, this code reads {REFINER_VERSION}")
    for key in ("model_config", "state_dict"):
        if key not in obj:
            raise ValueError(f"{path}: refinement-module checkpoint without {key!r}")
    try:
        cfg = config_from_dict(obj["model_config"], str(path))
        refiner = build_refinement_module(cfg)
        apply_state_dict(refiner, obj["state_dict"], str(path))
    except (CheckpointError, TypeError) as e:
        raise ValueError(str(e).splitlines()[0]) from None
    return refiner.to(device).eval(), dict(obj.get("meta") or {})

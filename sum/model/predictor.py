"""Prompted mask prediction with the task prompt, B prompts per decoder call (spec §2.1, §2.2).

`SumPredictor` is ``segment_anything.SamPredictor`` with three changes:

- ``predict`` / ``predict_torch`` take ``task_prompt`` and hand it to the `TaskPromptEncoder`
  (spec §2.2, "Plumbing"); with id 0 the outputs equal ``SamPredictor``'s.
- ``predict`` takes a batch of B prompts (points ``(B, N, 2)``, boxes ``(B, 4)``, mask inputs
  ``(B, 1, 256, 256)``) and runs them through the decoder in one call; outputs keep the B axis.
- The image embedding can be read, set, saved and loaded, with the image sizes and a fingerprint of
  the encoder that made it, so that an embedding is never paired with another model.

Preprocessing is SamPredictor's: ``segment_anything``'s ``ResizeLongestSide`` then
``Sam.preprocess`` (normalise, pad bottom/right). The encoder may run on the fast path
(`sum.model.fast`); the embedding, the decoder and every output are fp32.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from sum.io import atomic_torch_save, check_format
from sum.model.decoder import decode

EMBEDDING_FORMAT = "sum-image-embedding/1"


@dataclass
class ImageEmbedding:
    """One image's encoder output and the sizes needed to map masks back onto the image.

    Attributes:
      features (torch.Tensor): (1, C, He, We) fp32, e.g. (1, 256, 64, 64).
      original_size (tuple(int, int)): (H, W) of the image given to ``set_image``.
      input_size (tuple(int, int)): (h, w) after ``ResizeLongestSide``, before padding.
      fingerprint (str or None): `encoder_fingerprint` of the model that made it.
    """

    features: torch.Tensor
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    fingerprint: Optional[str] = None


def encoder_fingerprint(model: Sam) -> str:
    """A sha256 over everything an image embedding depends on: the encoder class, ``img_size``,
    the pixel mean/std and every persistent encoder tensor (name, shape, dtype, bytes).

    The prompt encoder and mask decoder are left out on purpose: embeddings stay valid while only
    the decoder is fine-tuned.
    """
    encoder = model.image_encoder
    base = getattr(type(encoder), "_sum_base_class", type(encoder))  # same with the fast path on
    h = hashlib.sha256()
    h.update(f"{base.__module__}.{base.__qualname__}|{encoder.img_size}|".encode())
    h.update(f"{model.pixel_mean.flatten().tolist()}|{model.pixel_std.flatten().tolist()}|".encode())
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_embedding_record(path: Path) -> dict:
    """The record at ``path`` that `SumPredictor.save_embedding` or the ``embed`` stage wrote,
    checked for its format tag.

    Raises:
      ValueError: naming ``path`` when it is not readable or not an embedding record.
    """
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch.load raises many types on a bad file)
        raise ValueError(f"{path}: not a readable embedding file ({type(e).__name__})") from None
    return check_format(record, EMBEDDING_FORMAT, path, "a SUM image embedding")


class SumPredictor:
    def __init__(self, model: Sam) -> None:
        """
        Arguments:
          model (Sam): a SUM model (`sum.model.build_sum_model`) whose prompt encoder takes a
            ``task_prompt``; load its weights before building the predictor's first embedding.
        """
        self.model = model
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self._fingerprint_key: Optional[tuple] = None
        self._fingerprint: Optional[str] = None
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        self.features: Optional[torch.Tensor] = None
        self.original_size: Optional[Tuple[int, int]] = None
        self.input_size: Optional[Tuple[int, int]] = None

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    # ---- image and embedding ---------------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Encode one image (once); later ``predict`` calls reuse its embedding.

        Arguments:
          image (np.ndarray): (H, W, 3) uint8.
          image_format (str): "RGB" or "BGR".
        """
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            got = type(image).__name__
            if isinstance(image, np.ndarray):
                got = f"{image.dtype} array of shape {image.shape}"
            raise ValueError(f"set_image: image must be an (H, W, 3) uint8 array, got {got}")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"set_image: image_format={image_format!r}, expected 'RGB' or 'BGR'")
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        input_hw3 = self.transform.apply_image(image)
        input_13hw = torch.as_tensor(input_hw3, device=self.device).permute(2, 0, 1).contiguous()[None]
        self.set_torch_image(input_13hw, image.shape[:2])

    def set_torch_image(self, transformed_image: torch.Tensor, original_size: Tuple[int, int]) -> None:
        """Encode an image already resized by ``ResizeLongestSide`` (1, 3, h, w), as
        ``SamPredictor.set_torch_image``."""
        img_size = self.model.image_encoder.img_size
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[:2] != (1, 3) or max(shape[2:]) != img_size:
            raise ValueError(
                f"set_torch_image: expected a (1, 3, h, w) image with long side {img_size}, "
                f"got shape {shape}"
            )
        self.reset_image()
        with torch.inference_mode():
            features = self.model.image_encoder(self.model.preprocess(transformed_image))
        self.features = features.float()
        self.original_size = (int(original_size[0]), int(original_size[1]))
        self.input_size = (int(transformed_image.shape[2]), int(transformed_image.shape[3]))

    def fingerprint(self) -> str:
        """`encoder_fingerprint` of the model, recomputed only when an encoder tensor changed."""
        tensors = self.model.image_encoder.state_dict(keep_vars=True).values()
        key = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        if key != self._fingerprint_key:
            self._fingerprint = encoder_fingerprint(self.model)
            self._fingerprint_key = key
        return self._fingerprint

    def get_embedding(self) -> ImageEmbedding:
        """The current image's embedding (a copy), with its sizes and the model fingerprint."""
        self._require_image("get_embedding")
        return ImageEmbedding(self.features.clone(), self.original_size, self.input_size, self.fingerprint())

    def set_embedding(self, embedding: ImageEmbedding) -> None:
        """Use a stored embedding instead of encoding an image.

        Raises:
          ValueError: if the features do not fit this model, or the fingerprint is another model's.
        """
        self._check_embedding(embedding, "set_embedding")
        self.reset_image()
        self.features = embedding.features.to(self.device, torch.float32)
        self.original_size = tuple(int(s) for s in embedding.original_size)
        self.input_size = tuple(int(s) for s in embedding.input_size)

    def save_embedding(self, path: str | os.PathLike) -> Path:
        """Write the current embedding, sizes and model fingerprint to ``path`` (atomically)."""
        emb = self.get_embedding()
        record = {
            "format": EMBEDDING_FORMAT,
            "features": emb.features.cpu(),
            "original_size": list(emb.original_size),
            "input_size": list(emb.input_size),
            "img_size": self.model.image_encoder.img_size,
            "fingerprint": emb.fingerprint,
        }
        path = Path(path)
        atomic_torch_save(record, path)
        return path

    def load_embedding(self, path: str | os.PathLike) -> ImageEmbedding:
        """Read an embedding written by `save_embedding` and set it.

        Raises:
          FileNotFoundError: naming ``path`` if it does not exist.
          ValueError: naming ``path`` if it is not an embedding file, was made at another
            ``img_size``, or by another encoder (fingerprint mismatch).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: embedding file not found")
        record = read_embedding_record(path)
        img_size = self.model.image_encoder.img_size
        if record["img_size"] != img_size:
            raise ValueError(f"{path}: embedding made at img_size={record['img_size']}, this model uses {img_size}")
        emb = ImageEmbedding(
            features=record["features"],
            original_size=tuple(record["original_size"]),
            input_size=tuple(record["input_size"]),
            fingerprint=record["fingerprint"],
        )
        self._check_embedding(emb, str(path))
        self.set_embedding(emb)
        return emb

    def _check_embedding(self, emb: ImageEmbedding, where: str) -> None:
        pe = self.model.prompt_encoder
        expected = (1, pe.embed_dim, *pe.image_embedding_size)
        if tuple(emb.features.shape) != expected:
            raise ValueError(f"{where}: features have shape {tuple(emb.features.shape)}, this model expects {expected}")
        if emb.fingerprint is not None and emb.fingerprint != self.fingerprint():
            raise ValueError(
                f"{where}: embedding made by another image encoder (fingerprint {emb.fingerprint[:12]}..., "
                f"this model {self.fingerprint()[:12]}...)"
            )

    def _require_image(self, what: str) -> None:
        if not self.is_image_set:
            raise RuntimeError(f"{what}: no image set; call set_image, set_embedding or load_embedding first")

    # ---- prompts -----------------------------------------------------------------------------

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        boxes: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        task_prompt: int = 0,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for B prompts of the current image, in one decoder call.

        Every prompt of a call has the same number of points; pad shorter ones with label -1 (as the
        prompt encoder itself does when no box is given).

        Arguments:
          point_coords (np.ndarray or None): (B, N, 2) or (N, 2) points (x, y) in original pixels.
          point_labels (np.ndarray or None): (B, N) or (N,): 1 positive, 0 negative, -1 padding.
          boxes (np.ndarray or None): (B, 4) or (4,) xyxy in original pixels.
          mask_input (np.ndarray or None): (B, 1, 256, 256) or (1, 256, 256) low-res logits from a
            previous round.
          task_prompt (int): task id for all B prompts (spec §2.2); 0 is plain SAM.
          multimask_output (bool): C = 3 masks per prompt if True, else C = 1.
          return_logits (bool): return logits instead of masks thresholded at 0.

        Returns:
          masks (np.ndarray): (B, C, H, W) bool (float32 logits if ``return_logits``), original size.
          iou_predictions (np.ndarray): (B, C) float32.
          low_res_logits (np.ndarray): (B, C, 256, 256) float32.
        """
        self._require_image("predict")
        coords_bn2 = labels_bn = boxes_b4 = mask_b1hw = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("predict: point_labels must be given with point_coords")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            if coords.ndim != 3 or coords.shape[2] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"predict: point_coords {np.shape(point_coords)} and point_labels {np.shape(point_labels)} "
                    "must be (B, N, 2) and (B, N), or (N, 2) and (N,)"
                )
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_bn2 = torch.as_tensor(coords, dtype=torch.float, device=self.device)
            labels_bn = torch.as_tensor(labels, dtype=torch.int, device=self.device)
        elif point_labels is not None:
            raise ValueError("predict: point_labels given without point_coords")
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float64)
            if b.shape[-1:] != (4,) or b.ndim not in (1, 2):
                raise ValueError(f"predict: boxes must be (B, 4) or (4,) xyxy, got shape {b.shape}")
            b = self.transform.apply_boxes(b.reshape(-1, 4), self.original_size)
            boxes_b4 = torch.as_tensor(b, dtype=torch.float, device=self.device)
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            if m.ndim == 3:
                m = m[None]
            if m.ndim != 4 or m.shape[1] != 1:
                raise ValueError(
                    f"predict: mask_input must be (B, 1, H, W) or (1, H, W), got shape {np.shape(mask_input)}"
                )
            mask_b1hw = torch.as_tensor(m, dtype=torch.float, device=self.device)

        masks, iou_predictions, low_res = self.predict_torch(
            coords_bn2, labels_bn, boxes_b4, mask_b1hw, task_prompt, multimask_output, return_logits
        )
        return masks.cpu().numpy(), iou_predictions.cpu().numpy(), low_res.cpu().numpy()

    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        task_prompt: int = 0,
        multimask_output: bool = True, return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``SamPredictor.predict_torch``, with the task prompt: prompts are tensors already in
        the ``ResizeLongestSide`` input frame.

        Arguments:
          point_coords (torch.Tensor or None): (B, N, 2) float, input frame.
          point_labels (torch.Tensor or None): (B, N) int.
          boxes (torch.Tensor or None): (B, 4) xyxy, input frame.
          mask_input (torch.Tensor or None): (B, 1, 256, 256) low-res logits.
          task_prompt (int): task id (spec §2.2).
          multimask_output, return_logits: as in `predict`.

        Returns:
          masks (B, C, H, W) at the original size, iou_predictions (B, C), low_res_logits
          (B, C, 256, 256), all fp32 (masks bool unless ``return_logits``).
        """
        self._require_image("predict_torch")
        sizes = {
            name: t.shape[0]
            for name, t in (("point_coords", point_coords), ("boxes", boxes), ("mask_input", mask_input))
            if t is not None
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"predict: prompts disagree on the batch size B: {sizes}")
        points = (point_coords, point_labels) if point_coords is not None else None
        # The decoder is fp32 even when called inside someone else's autocast region.
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=False):
            sparse_bnc, dense_bchw = self.model.prompt_encoder(
                points=points, boxes=boxes, masks=mask_input, task_prompt=task_prompt
            )
            pe = self.model.prompt_encoder.get_dense_pe()
            low_res_bchw, iou_bc = decode(
                self.model.mask_decoder, self.features, pe, sparse_bnc, dense_bchw, multimask_output, exact=True
            )
            masks_bchw = self.model.postprocess_masks(low_res_bchw, self.input_size, self.original_size)
            if not return_logits:
                masks_bchw = masks_bchw > self.model.mask_threshold
        return masks_bchw, iou_bc, low_res_bchw

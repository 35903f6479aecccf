"""The SUM model as an MLflow pyfunc: one request row in, masks as COCO RLE out (spec §2).

A request (`SumRequest`) asks for the masks of one image under one set of prompts:

- ``image``: a local path, an ``s3://`` / ``https://`` / ``file://`` URI, or base64-encoded PNG
  or JPEG bytes (a ``data:image/...;base64,`` prefix is accepted);
- ``point_coords`` ``[[x, y], ...]`` and ``point_labels`` ``[1 | 0, ...]`` in image pixels,
  and/or ``box`` ``[x0, y0, x1, y1]``;
- ``mask_input``: the previous round's low-res logits of the chosen mask, as this model returned
  them (`encode_array`: base64 ``.npy``, float32, (256, 256) for SAM's 1024 input);
- ``task``: ``unspecified | salient | entity | part`` (spec §2.2; ``unspecified`` is plain SAM);
- ``multimask``: three masks for an ambiguous prompt, or one.

A response (`SumResponse`) holds the masks as COCO RLE (pycocotools, at the image's size), the
predicted IoU of each and each mask's low-res logits for the next click, plus whether the image's
embedding came from the cache. The model keeps the embeddings of the last ``embedding_cache_size``
images it saw (an LRU keyed by the decoded pixels), so a client clicking again and again on one
image pays the encoder once. Predictions are `SumPredictor.predict`'s, call for call.

Bad input raises one ``MlflowException`` (INVALID_PARAMETER_VALUE, HTTP 400 when served) whose
message names the request row and field; a serving process stays up. Wrong JSON types (a string
where a number belongs) are refused by MLflow's own check of the type hints, which names the field
too.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import io
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pydantic
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from pycocotools import mask as mask_utils

from sum.data.formats import ImageReadError, read_image
from sum.data.image_files import decode_image
from sum.io import FetchError, fetch
from sum.model.checkpoint import load_model
from sum.model.predictor import SumPredictor
from sum.tasks import TASK_IDS

log = logging.getLogger(__name__)

DEFAULT_MODEL_CONFIG = {"device": "auto", "fast_path": "auto", "embedding_cache_size": 4, "allow_paths": True}


class SumRequest(pydantic.BaseModel):
    """One prediction request (module docstring)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    image: str
    point_coords: Optional[List[List[float]]] = None
    point_labels: Optional[List[int]] = None
    box: Optional[List[float]] = None
    mask_input: Optional[str] = None
    task: str = "unspecified"
    multimask: bool = True


class RLE(pydantic.BaseModel):
    """A COCO run-length encoding (pycocotools ``mask.encode`` with ``counts`` as text)."""

    size: List[int]
    counts: str


class SumResponse(pydantic.BaseModel):
    masks: List[RLE]
    iou_predictions: List[float]
    low_res_logits: List[str]  # per mask, `encode_array` of its (256, 256) float32 logits
    embedding_cached: bool


def invalid(field: str, message: str) -> MlflowException:
    return MlflowException(f"{field}: {message}", error_code=INVALID_PARAMETER_VALUE)


def encode_array(arr: np.ndarray) -> str:
    """An array as base64 of its ``.npy`` bytes (dtype and shape kept exactly)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_array(text: str, field: str) -> np.ndarray:
    """The inverse of `encode_array`; an `invalid` error naming ``field`` for anything else."""
    try:
        return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except (ValueError, binascii.Error, OSError, EOFError) as e:
        raise invalid(field, f"not a base64 .npy array ({type(e).__name__})") from None


def mask_to_rle(mask_hw: np.ndarray) -> RLE:
    rle = mask_utils.encode(np.asfortranarray(mask_hw.astype(np.uint8)))
    return RLE(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


def _shown(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


def load_request_image(value: str, field: str, allow_paths: bool = True) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image a request names (module docstring).

    Raises:
      MlflowException: naming ``field`` when the value is no readable image.
    """
    try:
        if value.startswith(("s3://", "https://", "http://", "file://")):
            with tempfile.TemporaryDirectory(prefix="sum-request-") as tmp:
                local = fetch(value, Path(tmp) / Path(value.split("?")[0]).name)
                return decode_image(local.read_bytes(), name=_shown(value))
        if value.startswith("data:image/"):
            head, _, body = value.partition(",")
            if ";base64" not in head:
                raise invalid(field, f"a data URL that is not base64 ({_shown(head)})")
            return decode_image(base64.b64decode(body, validate=True), name="base64 image")
        if len(value) < 4096 and Path(value).is_file():
            if not allow_paths:
                raise invalid(field, "local paths are switched off for this model (allow_paths)")
            return read_image(value)
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(field, f"{_shown(value)!r} is no file, URI or base64 PNG/JPEG") from None
        return decode_image(data, name="base64 image")
    except (ImageReadError, FetchError) as e:
        raise invalid(field, str(e)) from None


def check_prompts(req: SumRequest, hw: tuple, low_res: int, row: str) -> Dict[str, Any]:
    """`SumPredictor.predict`'s arguments for one request, after every check of the contract
    (``hw``: the image's size; ``low_res``: the side of the model's mask input, 256 for SAM).

    Raises:
      MlflowException: naming ``<row>.<field>`` (wrong shape, a point or box outside the image,
        an unknown task, a mask input of the wrong size, no prompt at all).
    """
    h, w = hw
    if req.task not in TASK_IDS:
        raise invalid(f"{row}.task", f"{req.task!r} is not one of {', '.join(TASK_IDS)}")
    args: Dict[str, Any] = {"task_prompt": TASK_IDS[req.task], "multimask_output": bool(req.multimask)}
    if req.point_coords is None and req.box is None:
        raise invalid(f"{row}.point_coords", "no prompt: give point_coords with point_labels, or a box")
    if req.point_coords is not None:
        coords = np.asarray(req.point_coords, dtype=np.float64)
        if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
            raise invalid(f"{row}.point_coords", f"expected [[x, y], ...], got shape {list(coords.shape)}")
        if req.point_labels is None:
            raise invalid(f"{row}.point_labels", "missing: one label (1 positive, 0 negative) per point")
        labels = np.asarray(req.point_labels)
        if labels.shape != (len(coords),):
            raise invalid(f"{row}.point_labels", f"{len(req.point_labels)} labels for {len(coords)} points")
        if not np.isin(labels, (0, 1)).all():
            raise invalid(f"{row}.point_labels", f"{sorted(set(labels.tolist()))}: labels are 1 (positive) or 0 (negative)")
        outside = np.flatnonzero((coords[:, 0] < 0) | (coords[:, 0] >= w) | (coords[:, 1] < 0) | (coords[:, 1] >= h))
        if len(outside):
            i = int(outside[0])
            raise invalid(f"{row}.point_coords[{i}]", f"{coords[i].tolist()} is outside the {w}x{h} image")
        args.update(point_coords=coords[None], point_labels=labels[None])
    elif req.point_labels is not None:
        raise invalid(f"{row}.point_labels", "given without point_coords")
    if req.box is not None:
        box = np.asarray(req.box, dtype=np.float64)
        if box.shape != (4,):
            raise invalid(f"{row}.box", f"expected [x0, y0, x1, y1], got {len(req.box)} numbers")
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise invalid(f"{row}.box", f"{box.tolist()} is not a box x0 <= x1, y0 <= y1 inside the {w}x{h} image")
        args["boxes"] = box[None]
    if req.mask_input is not None:
        m = decode_array(req.mask_input, f"{row}.mask_input")
        if m.shape not in ((low_res, low_res), (1, low_res, low_res)):
            raise invalid(f"{row}.mask_input", f"shape {list(m.shape)}, expected [{low_res}, {low_res}] low-res logits")
        args["mask_input"] = m.astype(np.float32).reshape(1, 1, low_res, low_res)
    return args


class EmbeddingLRU:
    """The image embeddings of the last ``size`` images, keyed by a hash of their pixels."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"embedding_cache_size={size}: keep at least one embedding")
        self.size = size
        self._items: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
        self.encoder_runs = 0  # images encoded since the model was loaded

    @staticmethod
    def key(image: np.ndarray) -> str:
        h = hashlib.sha256(f"{image.shape}|{image.dtype}|".encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()

    def set_image(self, predictor, image: np.ndarray) -> bool:
        """Give ``predictor`` the image's embedding; return whether it came from the cache."""
        key = self.key(image)
        emb = self._items.get(key)
        if emb is not None:
            self._items.move_to_end(key)
            predictor.set_embedding(emb)
            log.info("image %s: embedding from the cache", key[:12])
            return True
        predictor.set_image(image)
        self.encoder_runs += 1
        self._items[key] = predictor.get_embedding()
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        log.info("image %s: encoded (%d encoder runs, %d cached)", key[:12], self.encoder_runs, len(self._items))
        return False


class SumPyfunc(PythonModel):
    """The pyfunc (module docstring). ``model_config`` keys: ``device`` (auto | cpu | cuda[:N]),
    ``fast_path`` (auto | on | off, `sum.model.fast`), ``embedding_cache_size``, ``allow_paths``
    (whether ``image`` may name a file on the serving machine)."""

    def load_context(self, context) -> None:
        config = {**DEFAULT_MODEL_CONFIG, **(context.model_config or {})}
        unknown = sorted(set(config) - set(DEFAULT_MODEL_CONFIG))
        if unknown:
            raise MlflowException(f"model_config: unknown key(s) {unknown}; known: {sorted(DEFAULT_MODEL_CONFIG)}")
        model = load_model(
            checkpoint=context.artifacts["checkpoint"], device=str(config["device"]), fast_path=str(config["fast_path"])
        )
        self.predictor = SumPredictor(model)
        self.low_res = int(model.prompt_encoder.mask_input_size[0])
        self.cache = EmbeddingLRU(int(config["embedding_cache_size"]))
        self.allow_paths = bool(config["allow_paths"])
        self._lock = threading.Lock()

    def predict(self, context, model_input: List[SumRequest], params: Optional[Dict[str, Any]] = None) -> List[SumResponse]:
        out = []
        with self._lock:  # one predictor, one current image
            for i, req in enumerate(model_input):
                row = f"request[{i}]"
                image = load_request_image(req.image, f"{row}.image", self.allow_paths)
                args = check_prompts(req, image.shape[:2], self.low_res, row)
                cached = self.cache.set_image(self.predictor, image)
                masks_bchw, iou_bc, low_res_bchw = self.predictor.predict(**args)
                out.append(
                    SumResponse(
                        masks=[mask_to_rle(m) for m in masks_bchw[0]],
                        iou_predictions=[float(v) for v in iou_bc[0]],
                        low_res_logits=[encode_array(x.astype(np.float32)) for x in low_res_bchw[0]],
                        embedding_cached=cached,
                    )
                )
        return out

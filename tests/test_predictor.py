"""SumPredictor against the official segment_anything.SamPredictor (spec §2.1, §2.2).

The reference is a stock ``segment_anything.modeling.Sam`` with a stock ``PromptEncoder`` holding
the same weights (minus the task prompt), driven by the official ``SamPredictor``. With task prompt
0 the two must agree to 1e-5 in fp32, prompt by prompt and for batches of prompts.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from conftest import model_config
from segment_anything import SamPredictor
from segment_anything.modeling import PromptEncoder, Sam

from sum.model.build import build_sum_model, task_prompt_keys
from sum.model.checkpoint import load_model
from sum.model.fast import enable_fast_path
from sum.model.predictor import ImageEmbedding, SumPredictor

TOL = 1e-5
# Batched vs one-prompt calls run the decoder's GEMMs at other shapes, so their rounding differs:
# MobileSAM's logits (|x| up to ~60) then differ by ~6e-5, i.e. 1e-6 of their scale.
BATCH_RTOL = 2e-6


# ---- shared helpers (test_model.py imports them) -------------------------------------------------


def tiny_model(seed: int = 0, cfg=None) -> Sam:
    """The tiny config with random weights, relative position tables included (they init to 0)."""
    torch.manual_seed(seed)
    model = build_sum_model(cfg or model_config("tiny"))
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def stock_sam(model: Sam) -> Sam:
    """An official ``Sam`` with a stock ``PromptEncoder``: ``model``'s weights without the task prompt."""
    pe = model.prompt_encoder
    stock_pe = PromptEncoder(
        embed_dim=pe.embed_dim,
        image_embedding_size=pe.image_embedding_size,
        input_image_size=pe.input_image_size,
        mask_in_chans=pe.mask_downscaling[3].out_channels,
    )
    task_keys = {k.removeprefix("prompt_encoder.") for k in task_prompt_keys(model)}
    stock_pe.load_state_dict({k: v for k, v in pe.state_dict().items() if k not in task_keys}, strict=True)
    return Sam(
        image_encoder=copy.deepcopy(model.image_encoder),
        prompt_encoder=stock_pe,
        mask_decoder=copy.deepcopy(model.mask_decoder),
        pixel_mean=model.pixel_mean.flatten().tolist(),
        pixel_std=model.pixel_std.flatten().tolist(),
    ).to(model.device).eval()


def shapes_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8: a noisy gradient with a few flat-coloured rectangles and discs.

    Returns the image; `shape_boxes` gives the objects' boxes (x0, y0, x1, y1).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 120 + 40, yy / h * 120 + 40, (xx + yy) / (h + w) * 80 + 60], axis=-1)
    img += rng.normal(0, 6, img.shape)
    for (x0, y0, x1, y1), colour in zip(shape_boxes(h, w)[:2], [(220, 40, 40), (30, 60, 200)]):
        img[y0:y1, x0:x1] = colour
    for (x0, y0, x1, y1), colour in zip(shape_boxes(h, w)[2:], [(250, 220, 30), (20, 160, 60)]):
        cy, cx, r = (y0 + y1) / 2, (x0 + x1) / 2, (x1 - x0) / 2
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def shape_boxes(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Boxes of the objects `shapes_image` draws: two rectangles, then two discs."""
    s = min(h, w)
    return [
        (w // 10, h // 8, w // 10 + s // 3, h // 8 + s // 4),
        (w // 2, h // 2, w // 2 + s // 4, h // 2 + s // 3),
        (w * 6 // 10, h // 10, w * 6 // 10 + s // 4, h // 10 + s // 4),
        (w // 8, h * 6 // 10, w // 8 + s // 5, h * 6 // 10 + s // 5),
    ]


def centre(box) -> list[float]:
    return [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]


def prompt_cases(h: int, w: int, low_res: np.ndarray) -> dict[str, dict]:
    """The five prompt kinds, each as SamPredictor.predict keyword arguments for one prompt.

    ``low_res`` (1, h', w') is a previous round's logits, the mask input.
    """
    b0, b1 = shape_boxes(h, w)[:2]
    return {
        "one point": dict(point_coords=np.array([centre(b0)]), point_labels=np.array([1])),
        "points with negatives": dict(
            point_coords=np.array([centre(b0), centre(b1), [w * 0.9, h * 0.9], [b0[0] + 3.0, b0[1] + 3.0]]),
            point_labels=np.array([1, 0, 0, 1]),
        ),
        "box": dict(box=np.array(b1, dtype=float)),
        "box and points": dict(
            point_coords=np.array([centre(b1), centre(b0)]),
            point_labels=np.array([1, 0]),
            box=np.array(b1, dtype=float),
        ),
        "mask input": dict(
            point_coords=np.array([centre(b0), [b0[2] + 5.0, b0[3] + 5.0]]),
            point_labels=np.array([1, 0]),
            mask_input=low_res,
        ),
    }


def as_batch(kwargs: dict) -> dict:
    """SamPredictor.predict arguments for one prompt -> SumPredictor.predict arguments, B = 1."""
    out = {}
    if "point_coords" in kwargs:
        out["point_coords"] = kwargs["point_coords"][None]
        out["point_labels"] = kwargs["point_labels"][None]
    if "box" in kwargs:
        out["boxes"] = kwargs["box"][None]
    if "mask_input" in kwargs:
        out["mask_input"] = kwargs["mask_input"][None]
    return out


def assert_same_outputs(ref, got, rtol: float = 0.0, where: str = "") -> None:
    """``ref`` = SamPredictor outputs (C, ...) with logits; ``got`` = SumPredictor's for B = 1.

    Max abs diff <= TOL + rtol * max |ref| per output."""
    names = ("mask logits", "iou predictions", "low-res logits")
    for name, a, b in zip(names, ref, got):
        assert b.shape == (1, *a.shape), f"{where} {name}: shape {b.shape} vs {a.shape}"
        diff, bound = float(np.abs(a - b[0]).max()), TOL + rtol * float(np.abs(a).max())
        assert diff <= bound, f"{where} {name}: max abs diff {diff:.3g} > {bound:.3g}"


def predictor_pair(model: Sam, image: np.ndarray) -> tuple[SamPredictor, SumPredictor]:
    ref = SamPredictor(stock_sam(model))
    ref.set_image(image)
    ours = SumPredictor(model)
    ours.set_image(image)
    return ref, ours


def check_prompt_kinds(ref: SamPredictor, ours: SumPredictor, image: np.ndarray) -> None:
    """The five prompt kinds, multimask on and off, logits and thresholded masks."""
    h, w = image.shape[:2]
    b0 = shape_boxes(h, w)[0]
    _, iou, low_res = ref.predict(np.array([centre(b0)]), np.array([1]))
    previous = low_res[int(np.argmax(iou))][None]  # (1, h', w'): the best mask of round 1
    for kind, kwargs in prompt_cases(h, w, previous).items():
        for multimask in (True, False):
            want = ref.predict(**kwargs, multimask_output=multimask, return_logits=True)
            got = ours.predict(**as_batch(kwargs), task_prompt=0, multimask_output=multimask, return_logits=True)
            assert_same_outputs(want, got, where=f"{kind}, multimask={multimask}:")
        # SamPredictor's masks are its logits > mask_threshold: compare the thresholded output once.
        got_masks = ours.predict(**as_batch(kwargs), multimask_output=False)[0]
        assert got_masks.dtype == bool
        assert np.array_equal(want[0] > ref.model.mask_threshold, got_masks[0]), f"{kind}: masks differ"


# ---- tiny config, random weights -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair():
    model = tiny_model(seed=0)
    image = shapes_image(96, 120, seed=1)
    ref, ours = predictor_pair(model, image)
    return model, image, ref, ours


def test_tiny_embedding_equals_sam_predictor(tiny_pair):
    _, _, ref, ours = tiny_pair
    assert torch.equal(ref.features, ours.get_embedding().features)
    assert ours.original_size == tuple(ref.original_size)
    assert ours.input_size == tuple(ref.input_size)


def test_tiny_prompt_kinds_equal_sam_predictor(tiny_pair):
    _, image, ref, ours = tiny_pair
    check_prompt_kinds(ref, ours, image)


def test_tiny_predict_torch_equals_sam_predictor(tiny_pair):
    _, image, ref, ours = tiny_pair
    h, w = image.shape[:2]
    coords = torch.as_tensor(ref.transform.apply_coords(np.array([[centre(shape_boxes(h, w)[1])]]), (h, w))).float()
    labels = torch.ones(1, 1, dtype=torch.int)
    want = ref.predict_torch(coords, labels, return_logits=True)
    got = ours.predict_torch(coords, labels, task_prompt=0, return_logits=True)
    for a, b in zip(want, got):
        assert a.shape == b.shape and float((a - b).abs().max()) <= TOL


def check_batch_equals_single(ref: SamPredictor, ours: SumPredictor, image: np.ndarray) -> None:
    """B prompts in one SumPredictor call == B separate SamPredictor calls, for each prompt kind."""
    h, w = image.shape[:2]
    boxes = np.array(shape_boxes(h, w), dtype=float)  # (4, 4)
    centres = np.array([centre(b) for b in boxes])  # (4, 2)
    # two points per prompt: the object's centre (positive), the next object's centre (negative)
    coords = np.stack([centres, np.roll(centres, -1, axis=0)], axis=1)  # (4, 2, 2)
    labels = np.tile(np.array([1, 0]), (4, 1))  # (4, 2)
    _, _, low_res = ours.predict(coords[:, :1], labels[:, :1], multimask_output=False)  # (4, 1, h', w')
    batches = {
        "points": dict(point_coords=coords, point_labels=labels),
        "boxes": dict(boxes=boxes),
        "boxes and points": dict(point_coords=coords, point_labels=labels, boxes=boxes),
        "points and mask input": dict(point_coords=coords, point_labels=labels, mask_input=low_res),
    }
    for kind, batch in batches.items():
        got_masks, got_iou, got_low = ours.predict(**batch, return_logits=True)
        assert got_masks.shape[:2] == got_iou.shape == (4, 3) and got_masks.shape[2:] == (h, w)
        for b in range(4):
            single = {
                "point_coords": batch["point_coords"][b] if "point_coords" in batch else None,
                "point_labels": batch["point_labels"][b] if "point_labels" in batch else None,
                "box": batch["boxes"][b] if "boxes" in batch else None,
                "mask_input": batch["mask_input"][b] if "mask_input" in batch else None,
            }
            want = ref.predict(**single, return_logits=True)
            got = (got_masks[b : b + 1], got_iou[b : b + 1], got_low[b : b + 1])
            assert_same_outputs(want, got, rtol=BATCH_RTOL, where=f"batched {kind}, prompt {b}:")


def test_tiny_batched_prompts_equal_single_calls(tiny_pair):
    _, image, ref, ours = tiny_pair
    check_batch_equals_single(ref, ours, image)


def test_two_dimensional_points_mean_one_prompt(tiny_pair):
    _, image, _, ours = tiny_pair
    pts, lab = np.array([[30.0, 40.0], [60.0, 50.0]]), np.array([1, 0])
    a = ours.predict(pts, lab, return_logits=True)
    b = ours.predict(pts[None], lab[None], return_logits=True)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_bad_prompts_raise_clear_errors(tiny_pair):
    _, _, _, ours = tiny_pair
    with pytest.raises(ValueError, match="point_labels must be given"):
        ours.predict(point_coords=np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"point_coords .* must be \(B, N, 2\)"):
        ours.predict(point_coords=np.zeros((2, 3, 2)), point_labels=np.ones((2, 2)))
    with pytest.raises(ValueError, match="boxes must be"):
        ours.predict(boxes=np.zeros((2, 5)))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        ours.predict(point_coords=np.zeros((2, 1, 2)), point_labels=np.ones((2, 1)), boxes=np.zeros((3, 4)))
    with pytest.raises(ValueError, match="task_prompt=9"):
        ours.predict(point_coords=np.zeros((1, 2)), point_labels=np.ones(1), task_prompt=9)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        ours.set_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(RuntimeError, match="no image set"):
        SumPredictor(ours.model).predict(point_coords=np.zeros((1, 2)), point_labels=np.ones(1))


# ---- embeddings ------------------------------------------------------------------------------------


def test_embedding_round_trip(tiny_pair, tmp_path):
    model, image, _, ours = tiny_pair
    b0 = shape_boxes(*image.shape[:2])[0]
    kwargs = dict(point_coords=np.array([[centre(b0)]]), point_labels=np.array([[1]]), return_logits=True)
    want = ours.predict(**kwargs)
    path = ours.save_embedding(tmp_path / "emb" / "image.pt")
    assert path.is_file() and not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    fresh = SumPredictor(model)
    emb = fresh.load_embedding(path)
    assert emb.original_size == image.shape[:2]
    for a, b in zip(want, fresh.predict(**kwargs)):
        assert np.array_equal(a, b)

    other = SumPredictor(model)
    other.set_embedding(ours.get_embedding())
    for a, b in zip(want, other.predict(**kwargs)):
        assert np.array_equal(a, b)


def test_embedding_of_another_model_raises(tiny_pair, tmp_path):
    _, _, _, ours = tiny_pair
    path = ours.save_embedding(tmp_path / "image.pt")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: embedding made by another image encoder"):
        SumPredictor(tiny_model(seed=1)).load_embedding(path)
    with pytest.raises(ValueError, match="set_embedding: embedding made by another image encoder"):
        SumPredictor(tiny_model(seed=1)).set_embedding(ours.get_embedding())


def test_embedding_of_another_image_size_raises(tiny_pair, tmp_path):
    _, _, _, ours = tiny_pair
    path = ours.save_embedding(tmp_path / "image.pt")
    cfg = model_config("tiny")
    cfg.img_size = 64
    expected = rf"{re.escape(str(path))}: embedding made at img_size=128, this model uses 64"
    with pytest.raises(ValueError, match=expected):
        SumPredictor(tiny_model(cfg=cfg)).load_embedding(path)
    bad = ImageEmbedding(torch.zeros(1, 32, 4, 4), (10, 10), (128, 128))
    with pytest.raises(ValueError, match=r"set_embedding: features have shape \(1, 32, 4, 4\)"):
        SumPredictor(tiny_model()).set_embedding(bad)


def test_embedding_bad_file_raises(tmp_path):
    predictor = SumPredictor(tiny_model())
    with pytest.raises(FileNotFoundError, match="missing.pt: embedding file not found"):
        predictor.load_embedding(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: not a readable embedding file"):
        predictor.load_embedding(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="other.pt: not a SUM image embedding"):
        predictor.load_embedding(other)


def test_fingerprint_follows_weight_changes():
    model = tiny_model()
    predictor = SumPredictor(model)
    before = predictor.fingerprint()
    assert predictor.fingerprint() == before
    with torch.no_grad():
        model.image_encoder.neck[0].weight.add_(1.0)
    assert predictor.fingerprint() != before
    enable_fast_path(model, "on")  # a different forward, the same weights
    after = predictor.fingerprint()
    enable_fast_path(model, "off")
    assert after == predictor.fingerprint()


# ---- MobileSAM, real weights -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def mobile_sam_pair(mobile_sam_checkpoint):
    model = load_model(model_config("mobile_sam"), mobile_sam_checkpoint, device="cpu", fast_path="off")
    enable_fast_path(model, "off")
    image = shapes_image(480, 640, seed=0)
    ref, ours = predictor_pair(model, image)
    return model, image, ref, ours


def test_mobile_sam_prompt_kinds_equal_sam_predictor(mobile_sam_pair):
    _, image, ref, ours = mobile_sam_pair
    assert torch.equal(ref.features, ours.get_embedding().features)
    check_prompt_kinds(ref, ours, image)


def test_mobile_sam_batched_prompts_equal_single_calls(mobile_sam_pair):
    _, image, ref, ours = mobile_sam_pair
    check_batch_equals_single(ref, ours, image)

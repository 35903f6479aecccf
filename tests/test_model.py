"""The task prompt (spec §2.2) and the encoder fast path (`sum.model.fast`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import model_config
from segment_anything import SamPredictor
from segment_anything.modeling import image_encoder as sam_image_encoder
from test_predictor import (
    predictor_pair,
    check_prompt_kinds,
    centre,
    shape_boxes,
    shapes_image,
    stock_sam,
    tiny_model,
)

from sum.model.build import build_sum_model
from sum.model.checkpoint import load_model
from sum.model.fast import (
    OFF,
    FastPath,
    FlexAttention,
    SdpaAttention,
    apply_fast_path,
    decomposed_rel_pos_bias,
    enable_fast_path,
    fast_path_of,
    rel_pos_tables,
    resolve_fast_path,
)
from sum.model.predictor import SumPredictor


def decode(model, task_prompt, points, embedding):
    """Prompt encoder + mask decoder for B prompts (spec §14.2: not ``Sam.forward``)."""
    sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None, task_prompt=task_prompt)
    return model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )


@pytest.fixture()
def prompts():
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(3, 2, 2, generator=g) * 128  # (B, N, 2) in the 128 px input frame
    labels = torch.tensor([[1, 0], [1, 1], [1, -1]], dtype=torch.int)
    embedding = torch.randn(1, 32, 8, 8, generator=g)
    return (coords, labels), embedding


# ---- task prompt -----------------------------------------------------------------------------------


def test_task_prompt_zero_is_stock_sam(prompts):
    model = tiny_model()
    reference = stock_sam(model)
    points, embedding = prompts
    sparse, dense = model.prompt_encoder(points, None, None, task_prompt=0)
    stock_sparse, stock_dense = reference.prompt_encoder(points, None, None)
    assert torch.equal(sparse, stock_sparse) and torch.equal(dense, stock_dense)
    with torch.no_grad():
        ours = decode(model, 0, points, embedding)
        stock_pe = reference.prompt_encoder.get_dense_pe()
        stock = reference.mask_decoder(embedding, stock_pe, stock_sparse, stock_dense, True)
    for a, b in zip(ours, stock):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_point_embedding_equals_the_official_bit_for_bit(pad, autocast):
    """The sync-free `_embed_points` gives the official in-place result for labels -1, 0, 1 and
    others, in fp32 and under bf16 autocast (where pe is bf16)."""
    model = tiny_model()
    reference = stock_sam(model)
    g = torch.Generator().manual_seed(3)
    coords = torch.rand(5, 4, 2, generator=g) * 64
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 0, 0], [-1, -1, 1, 0], [1, 1, 1, 1], [2, -1, 0, 3]]).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = model.prompt_encoder._embed_points(coords, labels, pad)
        official = reference.prompt_encoder._embed_points(coords, labels, pad)
    assert ours.dtype == official.dtype and torch.equal(ours, official)


def test_non_zero_task_embedding_changes_output(prompts):
    model = tiny_model()
    points, embedding = prompts
    with torch.no_grad():
        task0 = decode(model, 0, points, embedding)
        assert all(torch.equal(a, b) for a, b in zip(task0, decode(model, 1, points, embedding)))
        model.prompt_encoder.task_prompt_embedding[1].weight.normal_()
        task1 = decode(model, 1, points, embedding)
        assert not torch.allclose(task0[0], task1[0])
        assert all(torch.equal(a, b) for a, b in zip(task0, decode(model, 0, points, embedding)))


def test_task_prompt_reaches_predictor():
    model = tiny_model()
    predictor = SumPredictor(model)
    predictor.set_image(shapes_image(96, 120))
    kwargs = dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1]), return_logits=True)
    task0 = predictor.predict(**kwargs, task_prompt=0)[0]
    with torch.no_grad():
        model.prompt_encoder.task_prompt_embedding[2].weight.normal_()
    assert np.array_equal(task0, predictor.predict(**kwargs, task_prompt=0)[0])
    assert not np.allclose(task0, predictor.predict(**kwargs, task_prompt=2)[0])


def test_gradients_reach_ids_1_to_3_never_0(prompts):
    model = tiny_model().train()
    points, embedding = prompts
    loss = sum(decode(model, t, points, embedding)[0].square().mean() for t in range(4))
    loss.backward()
    tp = model.prompt_encoder.task_prompt_embedding
    assert tp[0].weight.requires_grad is False and tp[0].weight.grad is None
    for t in (1, 2, 3):
        assert tp[t].weight.requires_grad and tp[t].weight.grad is not None
        assert tp[t].weight.grad.abs().sum() > 0, f"task prompt {t} got a zero gradient"


def test_use_task_prompt_false_freezes_every_id(prompts):
    cfg = model_config("tiny")
    cfg.use_task_prompt = False
    torch.manual_seed(0)
    model = build_sum_model(cfg).train()
    points, embedding = prompts
    loss = sum(decode(model, t, points, embedding)[0].square().mean() for t in range(4))
    loss.backward()
    for t, emb in enumerate(model.prompt_encoder.task_prompt_embedding):
        assert emb.weight.requires_grad is False and emb.weight.grad is None, f"task prompt {t} is trainable"
        assert not emb.weight.any()


@pytest.mark.parametrize("bad", [4, -1, 99])
def test_bad_task_prompt_raises(bad, prompts):
    model = tiny_model()
    points, _ = prompts
    with pytest.raises(ValueError, match=rf"task_prompt={bad}: expected an id in 0\.\.3"):
        model.prompt_encoder(points, None, None, task_prompt=bad)


# ---- fast path: fused attention ----------------------------------------------------------------------


def _attention_reference(model):
    """SAM's own attention on the tiny encoder, the reference for the fused kernels: random rel-pos
    tables in every block, a batch of 2 images, and per block (0: windowed 4x4, 1: global) the
    block's input tokens and SAM's output, plus the whole encoder's output."""
    encoder = model.image_encoder
    assert [blk.window_size for blk in encoder.blocks] == [4, 0]
    with torch.no_grad():
        for blk in encoder.blocks:
            blk.attn.rel_pos_h.normal_(0.0, 0.5)
            blk.attn.rel_pos_w.normal_(0.0, 0.5)
        x = model.preprocess(torch.rand(2, 3, 128, 128) * 255)
        tokens = encoder.patch_embed(x) + encoder.pos_embed  # (B, 8, 8, C)
        windows, _ = sam_image_encoder.window_partition(tokens, 4)  # (B * 4, 4, 4, C)
        inputs = {0: windows, 1: tokens}
        want = {i: encoder.blocks[i].attn(inputs[i]) for i in (0, 1)}
        return x, inputs, want, encoder(x)


def test_sdpa_attention_matches_sam_attention_fp32():
    """Windowed (block 0, 4x4 windows) and global (block 1) attention with random rel-pos tables."""
    model = tiny_model()
    encoder = model.image_encoder
    x, inputs, want, want_out = _attention_reference(model)
    with torch.no_grad():
        apply_fast_path(model, FastPath(fused_attention=True))
        assert all(type(blk.attn) is SdpaAttention for blk in encoder.blocks)
        for i in (0, 1):
            got = encoder.blocks[i].attn(inputs[i])
            assert float((got - want[i]).abs().max()) <= 1e-5, f"block {i}"
        assert float((encoder(x) - want_out).abs().max()) <= 1e-5

        apply_fast_path(model, OFF)
        assert all(type(blk.attn) is sam_image_encoder.Attention for blk in encoder.blocks)
        assert torch.equal(encoder(x), want_out)


def test_flex_attention_matches_sam_attention_fp32():
    """FlexAttention (eager on CPU) with the rel-pos term as a score_mod, against SAM's attention:
    windowed (block 0) and global (block 1) blocks, random rel-pos tables, and the whole encoder."""
    model = tiny_model()
    encoder = model.image_encoder
    x, inputs, want, want_out = _attention_reference(model)
    with torch.no_grad():
        plan = apply_fast_path(model, FastPath(fused_attention=True, flex_attention=True))
        assert all(type(blk.attn) is FlexAttention for blk in encoder.blocks) and fast_path_of(model) == plan
        for i in (0, 1):
            assert float((encoder.blocks[i].attn(inputs[i]) - want[i]).abs().max()) <= 1e-5, f"block {i}"
        assert float((encoder(x) - want_out).abs().max()) <= 1e-5
        apply_fast_path(model, OFF)
        assert all(type(blk.attn) is sam_image_encoder.Attention for blk in encoder.blocks)
    with pytest.raises(ValueError, match="flex_attention"):
        apply_fast_path(model, FastPath(flex_attention=True))


def test_rel_pos_tables_broadcast_to_the_dense_bias():
    """`rel_pos_tables` are the factors of `decomposed_rel_pos_bias`: query i, key (kh, kw) gets
    rel_h[i, kh] + rel_w[i, kw], checked against SAM's add_decomposed_rel_pos on a zero map."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4 * 5, 8, generator=g)
    rel_h, rel_w = torch.randn(7, 8, generator=g), torch.randn(9, 8, generator=g)
    want = sam_image_encoder.add_decomposed_rel_pos(torch.zeros(3, 20, 20), q, rel_h, rel_w, (4, 5), (4, 5))
    th, tw = rel_pos_tables(q, rel_h, rel_w, (4, 5), (4, 5))
    assert th.shape == (3, 20, 4) and tw.shape == (3, 20, 5)
    torch.testing.assert_close(decomposed_rel_pos_bias(q, rel_h, rel_w, (4, 5), (4, 5)), want)
    torch.testing.assert_close(th[:, 7, 2] + tw[:, 7, 3], want[:, 7, 2 * 5 + 3])


def test_compile_option_runs_the_encoder_through_torch_compile(monkeypatch):
    """``compile`` wraps the encoder's own forward in torch.compile (recorded here, not compiled:
    inductor on CPU is slow and unmeasured) and switching off removes it; load_model reads
    ``ModelConfig.compile_encoder``."""
    compiled = []

    def fake_compile(fn):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = tiny_model()
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        want = model.image_encoder(x)
        assert enable_fast_path(model, "off", compile=True) == FastPath(compile=True)
        assert fast_path_of(model) == FastPath(compile=True)
        assert torch.equal(model.image_encoder(x), want)
        assert compiled == [sam_image_encoder.ImageEncoderViT.forward]
        enable_fast_path(model, "off")
        assert type(model.image_encoder) is sam_image_encoder.ImageEncoderViT
    cfg = model_config("tiny")
    cfg.compile_encoder = True
    assert fast_path_of(load_model(cfg, device="cpu", fast_path="off")).compile


def test_fast_path_switches_on_and_off_keeping_state_dict():
    model = tiny_model()
    keys = list(model.state_dict())
    plan = enable_fast_path(model, "on")
    assert plan == FastPath(fused_attention=True, bf16_autocast=True, channels_last=True)
    assert fast_path_of(model) == plan and list(model.state_dict()) == keys
    assert model.image_encoder.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    out = model.image_encoder(torch.rand(1, 3, 128, 128))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert enable_fast_path(model, "off") == OFF
    assert fast_path_of(model) == OFF and type(model.image_encoder) is sam_image_encoder.ImageEncoderViT
    assert model.image_encoder.patch_embed.proj.weight.is_contiguous()


def test_resolve_fast_path(monkeypatch):
    import sum.model.fast as fast

    vit = tiny_model()
    tiny_vit = build_sum_model(model_config("mobile_sam"))
    full_vit = FastPath(fused_attention=True, bf16_autocast=True, channels_last=True)
    assert resolve_fast_path(vit, "auto", "cuda") == FastPath(fused_attention=True, flex_attention=True, bf16_autocast=True, channels_last=True)
    assert resolve_fast_path(vit, "auto", "cpu") == OFF
    assert resolve_fast_path(vit, "on", "cpu") == full_vit  # SDPA: eager FlexAttention is slow
    assert resolve_fast_path(vit, "off", "cpu", compile=True) == FastPath(compile=True)
    assert resolve_fast_path(tiny_vit, "auto", "cuda") == FastPath(bf16_autocast=True, channels_last=True)
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: True)
    assert resolve_fast_path(tiny_vit, "auto", "cpu") == FastPath(bf16_autocast=True, channels_last=True)
    monkeypatch.setattr(fast, "cpu_has_native_bf16", lambda: False)
    assert resolve_fast_path(tiny_vit, "auto", "cpu") == OFF
    with pytest.raises(ValueError, match="fast_path='fast': expected one of 'auto', 'on', 'off'"):
        resolve_fast_path(vit, "fast")
    with pytest.raises(ValueError, match="fused_attention: only for segment_anything's ImageEncoderViT"):
        apply_fast_path(tiny_vit, FastPath(fused_attention=True))


# ---- fast path: bf16 masks against fp32 -----------------------------------------------------------------


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boolean masks over the last two axes; two empty masks agree (IoU 1)."""
    inter = (a & b).sum((-1, -2))
    union = (a | b).sum((-1, -2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def random_prompts(h: int, w: int, rng: np.random.Generator, n: int = 6) -> list[dict]:
    """Random single clicks, clicks on the objects' centres (multimask output), and the objects'
    boxes (single-mask output); B prompts each."""
    boxes = np.array(shape_boxes(h, w), dtype=float)
    clicks = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], axis=-1)[:, None]  # (n, 1, 2)
    return [
        dict(point_coords=clicks, point_labels=np.ones((n, 1))),
        dict(point_coords=np.array([[centre(b)] for b in boxes]), point_labels=np.ones((len(boxes), 1))),
        dict(boxes=boxes),
    ]


def fast_vs_fp32_iou(model, images: list[np.ndarray], mode: str = "on") -> float:
    """Mean IoU, fast path against plain fp32, of the masks the predictor hands out: for clicks the
    one of the three with the highest fp32 predicted IoU, for boxes the single-mask output.

    The two lower-scored alternatives of a click are left out: they are often unstable under any
    perturbation (MobileSAM, all three masks: mean IoU 0.93-0.99; the chosen ones: >= 0.99).
    """
    predictor = SumPredictor(model)
    ious = []
    for seed, image in enumerate(images):
        outs = {}
        for path in ("off", mode):
            enable_fast_path(model, path)
            predictor.set_image(image)
            prompts = random_prompts(*image.shape[:2], np.random.default_rng(seed))
            outs[path] = [predictor.predict(**p, multimask_output="boxes" not in p)[:2] for p in prompts]
        for (masks32, iou32), (masks16, _) in zip(outs["off"], outs[mode]):
            rows, best = np.arange(len(iou32)), iou32.argmax(axis=1)
            ious += list(mask_ious(masks32[rows, best], masks16[rows, best]))
    enable_fast_path(model, "off")
    return float(np.mean(ious))


def test_fast_tiny_vit_masks_agree_with_fp32():
    model = tiny_model()
    rng = np.random.default_rng(0)
    images = [shapes_image(96, 120, seed=1), rng.integers(0, 256, (100, 80, 3), dtype=np.uint8)]
    assert fast_vs_fp32_iou(model, images) >= 0.99


def test_fast_mobile_sam_masks_agree_with_fp32(mobile_sam_checkpoint):
    model = load_model(model_config("mobile_sam"), mobile_sam_checkpoint, device="cpu", fast_path="off")
    rng = np.random.default_rng(0)
    images = [shapes_image(480, 640, seed=0), rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)]
    assert fast_vs_fp32_iou(model, images) >= 0.99


# ---- GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestVitBOnGpu:
    """vit_b with random weights on CUDA: fp32 equals SamPredictor; the fast path agrees in masks."""

    @pytest.fixture(scope="class")
    def model(self):
        torch.manual_seed(0)
        model = build_sum_model(model_config("vit_b"))
        with torch.no_grad():
            for name, p in model.image_encoder.named_parameters():
                if "rel_pos" in name:
                    p.normal_(0.0, 0.05)
        return model.cuda().eval()

    def test_fp32_equals_sam_predictor(self, model):
        enable_fast_path(model, "off")
        image = shapes_image(480, 640, seed=0)
        ref, ours = predictor_pair(model, image)
        assert isinstance(ref, SamPredictor)
        assert float((ref.features - ours.get_embedding().features.cuda()).abs().max()) <= 1e-5
        check_prompt_kinds(ref, ours, image)

    def test_fast_path_masks_agree_with_fp32(self, model):
        assert enable_fast_path(model, "auto") == FastPath(fused_attention=True, flex_attention=True, bf16_autocast=True, channels_last=True)
        images = [shapes_image(480, 640, seed=0), shapes_image(600, 400, seed=2)]
        assert fast_vs_fp32_iou(model, images, mode="auto") >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_attention_matches_sam_attention_on_cuda():
    """Compiled FlexAttention on CUDA (vit_b's global-block shape, 64x64 tokens, random rel-pos
    tables) against SAM's attention, fp32."""
    torch.manual_seed(0)
    attn = sam_image_encoder.Attention(768, num_heads=12, use_rel_pos=True, input_size=(64, 64)).cuda().eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(0.0, 0.5)
        attn.rel_pos_w.normal_(0.0, 0.5)
        x = torch.randn(1, 64, 64, 768, device="cuda")
        want = attn(x)
        attn.__class__ = FlexAttention
        got = attn(x)
    assert float((got - want).abs().max()) <= 1e-3

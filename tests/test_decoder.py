"""`sum.model.decoder.decode` is SAM's ``MaskDecoder``: outputs and gradients, for
the single output and the three multimask outputs, on the real MobileSAM decoder layout (tiny
config) with one shared or one per-prompt image embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sum.model.build import build_sum_model
from sum.model.decoder import decode, take_tokens, upscaling_is_sam


def _model_and_prompts(tiny_cfg, b=5, seed=0):
    torch.manual_seed(seed)
    sam = build_sum_model(tiny_cfg)
    with torch.no_grad():  # away from any symmetric initialisation
        sam.mask_decoder.mask_tokens.weight.normal_()
        sam.mask_decoder.iou_token.weight.normal_()
    rng = np.random.default_rng(seed)
    size = sam.image_encoder.img_size
    he, we = sam.prompt_encoder.image_embedding_size
    pts = torch.as_tensor(rng.uniform(0, size, (b, 2, 2)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 2, (b, 2)), dtype=torch.int)
    masks = torch.as_tensor(rng.normal(0, 4, (b, 1, 4 * he, 4 * we)), dtype=torch.float32)
    feats = torch.as_tensor(rng.normal(0, 1, (1, sam.prompt_encoder.embed_dim, he, we)), dtype=torch.float32)
    sparse, dense = sam.prompt_encoder(points=(pts, labels), boxes=None, masks=masks, task_prompt=0)
    return sam, feats, sparse, dense


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("multimask", [False, True])
def test_decode_equals_sams_decoder_forward_and_backward(tiny_cfg, multimask):
    sam, feats, sparse, dense = _model_and_prompts(tiny_cfg)
    dec = sam.mask_decoder
    assert upscaling_is_sam(dec)
    pe = sam.prompt_encoder.get_dense_pe()
    outs = []
    for fn in (
        lambda: decode(dec, feats, pe, sparse, dense, multimask),
        lambda: dec(image_embeddings=feats, image_pe=pe, sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense, multimask_output=multimask),
    ):
        sam.zero_grad()
        logits, iou = fn()
        (torch.sigmoid(logits).square().mean() + iou.square().mean()).backward(retain_graph=True)
        outs.append((logits.detach(), iou.detach(), _grads(sam)))
    (l_f, i_f, g_f), (l_s, i_s, g_s) = outs
    m = 3 if multimask else 1
    assert l_f.shape == l_s.shape == (5, m, *l_s.shape[-2:]) and i_f.shape == i_s.shape == (5, m)
    torch.testing.assert_close(l_f, l_s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(i_f, i_s, atol=1e-5, rtol=1e-4)
    assert g_s, "SAM's decoder got no gradient"
    for k, g in g_s.items():
        if k.endswith("k_proj.bias"):
            continue  # mathematically zero (a key bias cancels in the softmax): rounding noise only
        got = g_f.get(k, torch.zeros_like(g))  # parts of unread tokens get no gradient at all
        torch.testing.assert_close(got, g, atol=1e-5 + 1e-3 * float(g.abs().max()), rtol=1e-3, msg=k)


def test_decode_takes_one_embedding_per_prompt(tiny_cfg):
    sam, feats, sparse, dense = _model_and_prompts(tiny_cfg, b=3, seed=1)
    pe = sam.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        feats_b = torch.cat([feats, feats + 1.0, feats * 0.5])
        together = decode(sam.mask_decoder, feats_b, pe, sparse, dense, True)
        for i in range(3):
            alone = decode(sam.mask_decoder, feats_b[i : i + 1], pe, sparse[i : i + 1], dense[i : i + 1], True)
            torch.testing.assert_close(together[0][i : i + 1], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(together[1][i : i + 1], alone[1], atol=1e-6, rtol=1e-5)


def test_the_library_decodes_masks_in_one_place():
    """Issue 18: one decoder. SAM's ``MaskDecoder`` is called, and a `TwoWayTransformer`'s layers
    looped over, only in `sum.model.decoder`; every stage reaches it through `decode` or `two_way`."""
    import ast
    from pathlib import Path

    def decoding(node):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            return node.func.attr == "mask_decoder"  # ``x.mask_decoder(...)``
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Attribute) and node.iter.attr == "layers":
            return isinstance(node.iter.value, ast.Name) and node.iter.value.id in ("tr", "transformer")
        return False

    root = Path(__file__).resolve().parents[1] / "sum"
    found = {
        f"{path.relative_to(root.parent)}:{node.lineno}"
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if decoding(node)
    }
    assert found and all(f.startswith("sum/model/decoder.py:") for f in found), sorted(found)


@pytest.mark.parametrize("read", [[0, 2, 3, 4], [1], [0, 1, 2, 3], [3, 0, 1], [2, 2]])
def test_take_tokens_equals_list_indexing(read):
    """The decoder's sync-free token read equals ``x[:, read]`` (consecutive runs as slices)."""
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(take_tokens(x, read), x[:, read])

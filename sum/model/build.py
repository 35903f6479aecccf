"""Build the SUM model from a `ModelConfig` (spec §2, §14.1).

This is the only place that knows the sizes: modules take every dimension as a constructor argument.
The model is `segment_anything.modeling.Sam` with `TaskPromptEncoder` as its prompt encoder and
either SAM's `ImageEncoderViT` (vit_b/l/h, tiny test configs) or MobileSAM's TinyViT (imported from
the ``mobile_sam`` package, never copied).
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, Sam, TwoWayTransformer
from torch import nn

from sum.model.prompt_encoder import TaskPromptEncoder

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def _tiny_vit_class():
    with warnings.catch_warnings():
        # mobile_sam re-registers TinyViT names that timm already has and imports timm's deprecated
        # module paths; both harmless.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        from mobile_sam.modeling.tiny_vit_sam import TinyViT  # optional: only MobileSAM models need it
    return TinyViT


def build_tiny_vit(
    img_size: int,
    embed_dims: list[int],
    depths: list[int],
    num_heads: list[int],
    window_sizes: list[int],
) -> nn.Module:
    """MobileSAM's TinyViT encoder, with the output grid derived from the input size.

    The upstream ``forward_features`` hard-codes a 64x64 grid (1024 input); the subclass reads the
    grid from the token count so other input sizes (tests) work too.
    """
    TinyViT = _tiny_vit_class()

    class TinyViTEncoder(TinyViT):
        def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 256, S/16, S/16)
            x = self.patch_embed(x)
            for layer in self.layers:
                x = layer(x)
            b, n, c = x.shape
            side = math.isqrt(n)
            x = x.view(b, side, side, c).permute(0, 3, 1, 2)
            return self.neck(x)

    return TinyViTEncoder(
        img_size=img_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=list(embed_dims),
        depths=list(depths),
        num_heads=list(num_heads),
        window_sizes=list(window_sizes),
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def build_image_encoder(cfg) -> nn.Module:
    """The image encoder named by ``cfg.encoder`` (``vit`` or ``tiny_vit``)."""
    if cfg.encoder == "vit":
        return ImageEncoderViT(
            depth=cfg.encoder_depth,
            embed_dim=cfg.encoder_embed_dim,
            img_size=cfg.img_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.encoder_num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(cfg.encoder_global_attn_indexes),
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        )
    if cfg.encoder == "tiny_vit":
        if cfg.prompt_embed_dim != 256:
            raise ValueError(f"model.prompt_embed_dim={cfg.prompt_embed_dim}: TinyViT's neck outputs 256")
        return build_tiny_vit(
            cfg.img_size,
            cfg.tiny_vit_embed_dims,
            cfg.tiny_vit_depths,
            cfg.tiny_vit_num_heads,
            cfg.tiny_vit_window_sizes,
        )
    raise ValueError(f"model.encoder={cfg.encoder!r}: expected 'vit' or 'tiny_vit'")


def build_sum_model(cfg) -> Sam:
    """Build an (untrained, randomly initialised) SUM model from a `ModelConfig`.

    The model with its weights is `sum.model.checkpoint.load_model`'s. The model is returned in
    eval mode; TinyViT caches its attention biases on ``.eval()``, so load weights before calling
    it again (`load_model` does).

    Returns:
        ``Sam`` whose ``prompt_encoder`` is a `TaskPromptEncoder`.
    """
    emb = cfg.img_size // cfg.patch_size
    sam = Sam(
        image_encoder=build_image_encoder(cfg),
        prompt_encoder=TaskPromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(cfg.img_size, cfg.img_size),
            mask_in_chans=cfg.mask_in_chans,
            use_task_prompt=cfg.use_task_prompt,
            num_task_prompts=cfg.num_task_prompts,
            zero_token_no_grad=cfg.zero_token_no_grad,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=cfg.decoder_depth,
                embedding_dim=cfg.prompt_embed_dim,
                mlp_dim=cfg.decoder_mlp_dim,
                num_heads=cfg.decoder_num_heads,
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        ),
        pixel_mean=PIXEL_MEAN,
        pixel_std=PIXEL_STD,
    )
    return sam.eval()


def task_prompt_keys(model: nn.Module) -> list[str]:
    """State-dict keys that SAM checkpoints do not have (the task prompt)."""
    return [k for k in model.state_dict() if "task_prompt_embedding" in k]

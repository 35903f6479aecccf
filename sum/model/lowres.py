"""Low-resolution maps of the model's padded frame brought to the image: SAM's low-res logits,
and the maps that live beside them (uncertainty u, refined logits r), upsampled the way
``Sam.postprocess_masks`` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample_low_res(maps_mhw: np.ndarray, img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """Low-res maps in the padded model frame -> original resolution, as ``Sam.postprocess_masks``
    does with logits: bilinear to (img_size, img_size), crop to the input size (the resized image
    before padding), bilinear to the original size (align_corners=False throughout).

    The released loader upsamples refined maps to 1024x1024 without the crop (spec §3.4 (b)) and
    so reads them in the padded frame; here they are put on the image, like the masks.

    Returns:
      (M, H, W) float32.
    """
    x = torch.as_tensor(np.asarray(maps_mhw, dtype=np.float32))[:, None]
    if x.shape[0] == 0:
        return np.zeros((0, *original_size), np.float32)
    x = F.interpolate(x, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return x[:, 0].numpy()

"""Hidden ground truth of the embedded world: COCO files, one per granularity (salient, entity,
part), that no stage trains on; the uncertainty report scores against them and the oracle pools
are built from them.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sum.data import formats


def hidden_gt_paths(images_dir: str | os.PathLike, pattern: str) -> List[str]:
    """The hidden-GT files of a dataset: ``pattern`` relative to the parent of its image folder."""
    return sorted(glob.glob(str(Path(images_dir).parent / pattern)))


def granularity_of(path: str | os.PathLike) -> str:
    """The granularity a hidden-GT file annotates: its stem without ``annotations_``."""
    stem, prefix = Path(path).stem, "annotations_"
    return stem[len(prefix):] if stem.startswith(prefix) and len(stem) > len(prefix) else stem


def load_hidden_gt(paths: Sequence[str | os.PathLike]) -> Dict[str, Tuple[Tuple[int, int], List[dict]]]:
    """file_name -> ((H, W), annotations) over every hidden-GT COCO file (all granularities); each
    annotation carries its file's granularity (`granularity_of`) under ``_granularity``."""
    out: Dict[str, Tuple[Tuple[int, int], List[dict]]] = {}
    for path in paths:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable COCO file ({type(e).__name__})") from None
        by_id = {img["id"]: img for img in doc.get("images", [])}
        for img in by_id.values():
            out.setdefault(img["file_name"], ((int(img["height"]), int(img["width"])), []))
        for ann in doc.get("annotations", []):
            img = by_id.get(ann["image_id"])
            if img is None:
                raise ValueError(f"{path}: annotation {ann.get('id')} refers to unknown image id {ann['image_id']}")
            out[img["file_name"]][1].append({**ann, "_granularity": granularity_of(path)})
    return out


def hidden_gt_masks(entry, where: str) -> Tuple[np.ndarray, List[str]]:
    """The non-empty GT masks of one hidden-GT entry, (N, H, W) bool, and their granularities."""
    (h, w), anns = entry
    masks = [
        (formats.segmentation_to_mask(a["segmentation"], h, w, where=f"{where}: annotation {a['id']}"), a.get("_granularity", ""))
        for a in anns
    ]
    masks = [(m, g) for m, g in masks if m.any()]
    if not masks:
        return np.zeros((0, h, w), bool), []
    return np.stack([m for m, _ in masks]).astype(bool), [g for _, g in masks]

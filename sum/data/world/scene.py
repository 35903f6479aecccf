"""One image of the procedural world and its exact ground truth at every granularity (spec §3, §10.1).

A scene is a label map of *leaves* (one piece of one part of one object, or one stuff region),
drawn back to front: stuff (sky, wall, ground, ...), then distractors, then the salient foreground
objects, each occluding what lies behind. From the final label map:

- entities: every object and every stuff region; they partition the image (every pixel in exactly
  one entity);
- salient objects: the foreground objects' visible masks (the same masks as their entities);
- parts: the parts of every composite object; the parts of an object partition its visible mask.
  Stuff regions and simple distractors (rock, ball, box, bush) have no parts.

An object left with fewer than ``MIN_OBJECT_AREA`` visible pixels is removed (its pixels return to
the stuff behind it); a part with fewer than ``MIN_PART_AREA`` visible pixels is merged into its
object's largest part. The image is rendered from the final label map, so masks are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from sum.data.world.canvas import Kit, ObjectCanvas
from sum.data.world.materials import Fields, Material, Style, get_style, hsv, luminance, make_fields, shade
from sum.data.world.objects import ASPECT, BUILDERS, PARTS, SIMPLE_KINDS, has_parts

MIN_OBJECT_AREA = 64
MIN_PART_AREA = 16
PORTRAIT_PROB = 0.25
ASPECT_SHORT = 0.75  # short side / long side

FOREGROUND_KINDS = ["figure", "insect", "lamp", "chair", "bicycle", "cart", "scissors", "plant", "kite"]
STUFF_KINDS = ["sky", "hill", "grass", "ground", "sand", "road", "water", "wall", "window", "floor", "rug"]


@dataclass
class Entity:
    kind: str  # object kind or stuff kind
    isthing: bool
    salient: bool = False
    parts: List[str] = field(default_factory=list)  # part names by part index (things with parts)


@dataclass
class Scene:
    """An image with its label map and the tables to read every granularity from it.

    Arguments:
      image: (H, W, 3) uint8 RGB.
      leaf_hw: (H, W) int32 leaf index per pixel.
      leaf_entity: (L,) entity index per leaf.
      leaf_part: (L,) part number within its entity per leaf, -1 for stuff and simple objects.
    """

    image: np.ndarray
    leaf_hw: np.ndarray
    leaf_entity: np.ndarray
    leaf_part: np.ndarray
    entities: List[Entity]
    style: str

    @property
    def entity_hw(self) -> np.ndarray:
        """(H, W) entity index of every pixel."""
        return self.leaf_entity[self.leaf_hw]

    def entity_masks(self) -> List[Tuple[int, np.ndarray]]:
        """(entity index, (H, W) bool mask) for every visible entity, back to front."""
        ent = self.entity_hw
        present = np.unique(ent)
        return [(int(e), ent == e) for e in present]

    def salient_masks(self) -> List[Tuple[int, np.ndarray]]:
        return [(e, m) for e, m in self.entity_masks() if self.entities[e].salient]

    def part_masks(self) -> List[Tuple[int, int, np.ndarray]]:
        """(entity index, part number, (H, W) bool mask) for every visible part."""
        key = self.leaf_entity.astype(np.int64) * 1024 + self.leaf_part
        key[self.leaf_part < 0] = -1
        key_hw = key[self.leaf_hw]
        out = []
        for k in np.unique(key_hw):
            if k >= 0:
                out.append((int(k // 1024), int(k % 1024), key_hw == k))
        return out


def image_shape(rng: np.random.Generator, image_size: int) -> Tuple[int, int]:
    """(H, W): longest side ``image_size``, 4:3, landscape or (with PORTRAIT_PROB) portrait."""
    short = int(round(image_size * ASPECT_SHORT))
    return (image_size, short) if rng.uniform() < PORTRAIT_PROB else (short, image_size)


def _wavy(rng: np.random.Generator, w: int, y: float, amp: float, n: int = 12) -> np.ndarray:
    xs = np.linspace(-2, w + 2, n)
    ys = y + np.cumsum(rng.normal(0, amp, n)) * 0.6
    return np.stack([xs, ys], 1)


class _Builder:
    """Accumulates leaves into a label map, back to front."""

    def __init__(self, h: int, w: int):
        self.h, self.w = h, w
        self.label = np.zeros((h, w), np.int32)
        self.leaf_entity: List[int] = []
        self.leaf_part: List[int] = []
        self.leaf_mat: List[Material] = []
        self.entities: List[Entity] = []
        self.stuff_mat: Dict[int, Material] = {}

    def add_stuff(self, kind: str, mat: Material, pts: Optional[np.ndarray] = None, mask: Optional[np.ndarray] = None) -> None:
        e = len(self.entities)
        self.entities.append(Entity(kind=kind, isthing=False))
        leaf = len(self.leaf_mat)
        self.leaf_entity.append(e)
        self.leaf_part.append(-1)
        self.leaf_mat.append(mat)
        if pts is not None:
            cv2.fillPoly(self.label, [np.round(np.asarray(pts) * 16).astype(np.int32)], leaf, cv2.LINE_8, 4)
        if mask is not None:
            self.label[mask] = leaf
        self.stuff_mat[leaf] = mat

    def add_object(self, kind: str, canvas: ObjectCanvas, salient: bool) -> None:
        if not canvas.pieces:
            return
        e = len(self.entities)
        self.entities.append(Entity(kind=kind, isthing=True, salient=salient, parts=list(canvas.parts) if has_parts(kind) else []))
        first = len(self.leaf_mat)
        for part, mat in canvas.pieces:
            self.leaf_entity.append(e)
            self.leaf_part.append(part if has_parts(kind) else -1)
            self.leaf_mat.append(mat)
        on = canvas.m > 0
        self.label[on] = first + canvas.m[on].astype(np.int32) - 1


def _stuff(b: _Builder, rng: np.random.Generator, style: Style, indoor: bool) -> float:
    """Draw the background stuff; return the horizon/floor line y."""
    h, w = b.h, b.w
    full = np.array([(-2, -2), (w + 2, -2), (w + 2, h + 2), (-2, h + 2)], np.float64)
    if indoor:
        fy = h * rng.uniform(0.45, 0.7)
        wall_kind = str(rng.choice(["wallpaper", "bricks", "plain", "noise"]))
        hue = rng.uniform()
        b.add_stuff("wall", Material(rgb=hsv(hue, rng.uniform(0.05, 0.5), rng.uniform(0.45, 0.9)), texture=wall_kind, amp=0.12 * style.texture_amp, period=rng.uniform(8, 30), angle=np.pi / 2 * rng.integers(0, 2), rgb2=hsv(hue + 0.1, rng.uniform(0.1, 0.5), rng.uniform(0.3, 0.8))), pts=full)
        if rng.uniform() < 0.5:
            x0, y0 = rng.uniform(0.05, 0.6) * w, rng.uniform(0.05, 0.2) * h
            ww, wh = rng.uniform(0.15, 0.35) * w, rng.uniform(0.2, 0.5) * (fy - y0)
            b.add_stuff("window", Material(rgb=hsv(rng.uniform(0.5, 0.65), 0.4, 0.95), texture="sky", amp=0.15, origin=(0, y0), extent=wh), pts=[(x0, y0), (x0 + ww, y0), (x0 + ww, y0 + wh), (x0, y0 + wh)])
        floor_pts = np.concatenate([[(-2, fy), (w + 2, fy)], [(w + 2, h + 2), (-2, h + 2)]])
        floor_kind = str(rng.choice(["wood", "tiles", "noise"]))
        b.add_stuff("floor", Material(rgb=hsv(rng.uniform(0.03, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.75)), texture=floor_kind, amp=0.2 * style.texture_amp, period=rng.uniform(10, 40), rgb2=hsv(rng.uniform(), 0.2, 0.5), origin=(rng.uniform(0, 40), fy)), pts=floor_pts)
        if rng.uniform() < 0.5:
            cx, cy = rng.uniform(0.2, 0.8) * w, fy + rng.uniform(0.3, 0.7) * (h - fy)
            rug = np.zeros((h, w), np.uint8)
            cv2.ellipse(rug, (int(cx), int(cy)), (int(rng.uniform(0.15, 0.35) * w), int(rng.uniform(0.1, 0.3) * (h - fy))), 0, 0, 360, 1, -1)
            b.add_stuff("rug", Material(rgb=hsv(rng.uniform(), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.7)), texture="stripes", amp=0.2, period=rng.uniform(6, 16), angle=rng.uniform(0, np.pi), rgb2=hsv(rng.uniform(), 0.5, 0.6)), mask=rug > 0)
        return fy
    hy = h * rng.uniform(0.3, 0.55)
    b.add_stuff("sky", Material(rgb=hsv(rng.uniform(0.53, 0.66), rng.uniform(0.3, 0.8), rng.uniform(0.6, 0.95)), texture="sky", amp=0.2 * style.texture_amp, origin=(0, 0), extent=hy), pts=full)
    if rng.uniform() < 0.6:
        ridge = _wavy(rng, w, hy - h * rng.uniform(0.05, 0.15), h * 0.03, n=int(rng.integers(6, 16)))
        b.add_stuff("hill", Material(rgb=hsv(rng.uniform(0.2, 0.7), rng.uniform(0.1, 0.5), rng.uniform(0.25, 0.6)), texture="noise", amp=0.2 * style.texture_amp), pts=np.concatenate([ridge, [(w + 2, hy + 5), (-2, hy + 5)]]))
    line = _wavy(rng, w, hy, h * 0.01)
    ground_kind = str(rng.choice(["grass", "ground", "sand"]))
    mats = {
        "grass": Material(rgb=hsv(rng.uniform(0.2, 0.36), rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.65)), texture="grass", amp=0.25 * style.texture_amp),
        "ground": Material(rgb=hsv(rng.uniform(0.05, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)), texture="ground", amp=0.2 * style.texture_amp, rgb2=hsv(0.08, 0.2, 0.75)),
        "sand": Material(rgb=hsv(rng.uniform(0.1, 0.14), rng.uniform(0.25, 0.5), rng.uniform(0.65, 0.9)), texture="ground", amp=0.12 * style.texture_amp, rgb2=hsv(0.1, 0.3, 0.5)),
    }
    b.add_stuff(ground_kind, mats[ground_kind], pts=np.concatenate([line, [(w + 2, h + 2), (-2, h + 2)]]))
    extra = rng.uniform()
    if extra < 0.35:
        top_x, bot_x = rng.uniform(0.3, 0.7) * w, rng.uniform(0.1, 0.9) * w
        tw, bw = w * rng.uniform(0.02, 0.06), w * rng.uniform(0.3, 0.6)
        b.add_stuff("road", Material(rgb=hsv(0.6, 0.05, rng.uniform(0.25, 0.5)), texture="noise", amp=0.15), pts=[(top_x - tw, hy + 2), (top_x + tw, hy + 2), (bot_x + bw, h + 2), (bot_x - bw, h + 2)])
    elif extra < 0.6:
        wy = hy + (h - hy) * rng.uniform(0.05, 0.3)
        shore = _wavy(rng, w, wy + (h - hy) * rng.uniform(0.1, 0.3), h * 0.02)
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * w)
        shore = shore[(shore[:, 0] >= x0) & (shore[:, 0] <= x1)]
        if len(shore) >= 2:
            pts = np.concatenate([[(shore[0, 0], wy), (shore[-1, 0], wy)], shore[::-1]])
            b.add_stuff("water", Material(rgb=hsv(rng.uniform(0.5, 0.6), rng.uniform(0.4, 0.8), rng.uniform(0.35, 0.7)), texture="water", amp=0.2), pts=pts)
    return hy


def _bg_lum(b: _Builder, x: float, y: float) -> float:
    yy = int(np.clip(y, 0, b.h - 1))
    xx = int(np.clip(x, 0, b.w - 1))
    return luminance(b.leaf_mat[b.label[yy, xx]].rgb)


def _place(b: _Builder, rng: np.random.Generator, style: Style, kind: str, x: float, y: float, s: float, salient: bool) -> None:
    c = ObjectCanvas(b.h, b.w)
    kit = Kit(rng=rng, style=style, bg_lum=_bg_lum(b, x, y - s * 0.4))
    BUILDERS[kind](c, kit, x, y, s)
    b.add_object(kind, c, salient)


def _cleanup(b: _Builder, stuff_label: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Remove nearly invisible objects and merge tiny parts (module docstring)."""
    leaf_entity = np.array(b.leaf_entity, np.int64)
    leaf_part = np.array(b.leaf_part, np.int64)
    ent_area = np.bincount(leaf_entity[b.label].ravel(), minlength=len(b.entities))
    for e, ent in enumerate(b.entities):
        if ent.isthing and 0 < ent_area[e] < MIN_OBJECT_AREA:
            gone = leaf_entity[b.label] == e
            b.label[gone] = stuff_label[gone]
    leaf_area = np.bincount(b.label.ravel(), minlength=len(leaf_entity))
    for e, ent in enumerate(b.entities):
        if not ent.parts:
            continue
        leaves = np.nonzero(leaf_entity == e)[0]
        part_area = np.zeros(len(ent.parts), np.int64)
        np.add.at(part_area, leaf_part[leaves], leaf_area[leaves])
        if part_area.sum() == 0:
            continue
        big = int(np.argmax(part_area))
        small = [p for p in range(len(ent.parts)) if 0 < part_area[p] < MIN_PART_AREA]
        for leaf in leaves:
            if leaf_part[leaf] in small:
                leaf_part[leaf] = big
    return leaf_entity, leaf_part


def _render(b: _Builder, rng: np.random.Generator, style: Style, leaf_entity: np.ndarray, fields: Fields, shadows: List[int]) -> np.ndarray:
    h, w = b.h, b.w
    flat = b.label.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=len(b.leaf_mat))
    starts = np.concatenate([[0], np.cumsum(counts)])
    img = np.zeros((h * w, 3), np.float32)
    for leaf, mat in enumerate(b.leaf_mat):
        if counts[leaf] == 0:
            continue
        idx = order[starts[leaf] : starts[leaf + 1]]
        ys, xs = np.divmod(idx, w)
        img[idx] = shade(mat, ys, xs, fields)
    img = img.reshape(h, w, 3)
    ent_hw = leaf_entity[b.label]
    light = rng.uniform(0, 2 * np.pi)
    lx, ly = np.cos(light), np.sin(light)
    for e, ent in enumerate(b.entities):
        if not ent.isthing:
            continue
        m = ent_hw == e
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        sub = m[y0:y1, x0:x1]
        d = cv2.distanceTransform(np.pad(sub.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
        size = max(y1 - y0, x1 - x0)
        rim = 0.78 + 0.22 * np.clip(d / max(2.0, size * 0.05), 0, 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        grad = 1 + 0.18 * ((xx - (x0 + x1) / 2) * lx + (yy - (y0 + y1) / 2) * ly) / size
        img[y0:y1, x0:x1][sub] *= (rim * grad)[sub][:, None]
    for e in shadows:  # soft cast shadows on whatever lies behind, never on the object itself
        m = (ent_hw == e).astype(np.float32)
        if m.sum() == 0:
            continue
        ys = np.nonzero(m)[0]
        foot = float(ys.max())
        shear = np.float32([[1, rng.uniform(-0.8, 0.8), 0], [0, 0.3, 0]])
        shear[0, 2] = -shear[0, 1] * foot
        shear[1, 2] = foot * 0.7
        sh = cv2.warpAffine(m, shear, (w, h))
        sh = cv2.GaussianBlur(sh, (0, 0), 4)
        img *= (1 - 0.4 * sh * (1 - m))[..., None]
    if style.blur_sigma > 0:
        img = cv2.GaussianBlur(img, (0, 0), style.blur_sigma)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    img *= (1 - style.vignette * 0.5 * r2)[..., None]
    img = np.clip(img * style.brightness * np.asarray(style.tint, np.float32), 0, 1)
    if style.hue_shift or style.saturation != 1.0:
        hsv_img = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
        hsv_img[..., 0] = np.mod(hsv_img[..., 0] + 360 * style.hue_shift, 360)
        hsv_img[..., 1] = np.clip(hsv_img[..., 1] * style.saturation, 0, 1)
        img = cv2.cvtColor(hsv_img, cv2.COLOR_HSV2RGB)
    img = img * 255 + rng.normal(0, style.noise_sigma, img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_scene(seed: int, index: int, image_size: int = 512, style: str = "default") -> Scene:
    """Image ``index`` of the world with ``seed``: deterministic, independent of the others.

    Arguments:
      seed: the set's seed; index: the image's position in the set (0-based).
      image_size: length of the longest side (spec §3.7 resizes it to 1024 anyway).
      style: a name in `STYLES`.
    Returns:
      a `Scene` of size (H, W) = (0.75 s, s) or (s, 0.75 s).
    """
    st = get_style(style)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    h, w = image_shape(rng, image_size)
    b = _Builder(h, w)
    indoor = bool(rng.uniform() < st.indoor_prob)
    horizon = _stuff(b, rng, st, indoor)
    stuff_label = b.label.copy()
    shadows: List[int] = []

    n_dis = int(rng.integers(st.n_distractors[0], st.n_distractors[1] + 1))
    for _ in range(n_dis):
        kind = str(rng.choice(SIMPLE_KINDS + FOREGROUND_KINDS)) if rng.uniform() < 0.9 else "kite"
        s = min(h, w) * rng.uniform(0.1, 0.28)
        x = rng.uniform(0.0, 1.0) * w
        y = rng.uniform(horizon * 0.2, horizon * 0.8) if kind == "kite" else rng.uniform(horizon + s * 0.2, h + s * 0.1)
        _place(b, rng, st, kind, x, y, s, salient=False)

    n_fg = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    fg = [str(k) for k in rng.choice(FOREGROUND_KINDS, size=n_fg)]
    slot = w / n_fg
    order = sorted(range(n_fg), key=lambda i: rng.uniform())  # random depth order
    for i in order:
        kind = fg[i]
        s = min(h * rng.uniform(0.5, 0.8) / n_fg**0.3, 0.9 * slot / ASPECT[kind])
        x = slot * (i + 0.5) + rng.uniform(-0.15, 0.15) * slot
        y = h * rng.uniform(0.88, 0.98) if kind != "kite" else h * rng.uniform(0.55, 0.8)
        _place(b, rng, st, kind, x, y, s, salient=True)
        shadows.append(len(b.entities) - 1)
    leaf_entity, leaf_part = _cleanup(b, stuff_label)
    fields = make_fields(rng, h, w)
    image = _render(b, rng, st, leaf_entity, fields, shadows=[e for e in shadows if b.entities[e].kind != "kite"])
    return Scene(image=image, leaf_hw=b.label, leaf_entity=leaf_entity, leaf_part=leaf_part, entities=b.entities, style=style)


def categories() -> List[dict]:
    """Every category of the world, with stable ids: things, then stuff, then ``<kind>:<part>``."""
    cats = []
    for kind in FOREGROUND_KINDS + SIMPLE_KINDS:
        cats.append({"id": len(cats) + 1, "name": kind, "supercategory": "thing", "isthing": 1})
    for kind in STUFF_KINDS:
        cats.append({"id": len(cats) + 1, "name": kind, "supercategory": "stuff", "isthing": 0})
    for kind, parts in PARTS.items():
        for p in parts:
            cats.append({"id": len(cats) + 1, "name": f"{kind}:{p}", "supercategory": kind, "isthing": 1})
    return cats

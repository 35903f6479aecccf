"""Where the procedural world's objects are drawn: `ObjectCanvas` (one value per piece, every piece
in one part, drawn with cv2 at 1/16 px precision), the `Kit` of materials and stroke widths a
builder draws with, the `Builder` signature, geometry helpers and the `wheel` several kinds share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import cv2
import numpy as np

from sum.data.world.materials import Material, Style, hsv

SHIFT = 4
ONE = 1 << SHIFT


class ObjectCanvas:
    """An (H, W) uint8 map of piece values (0 = not this object) plus the piece and part tables."""

    def __init__(self, h: int, w: int):
        self.m = np.zeros((h, w), np.uint8)
        self.parts: List[str] = []  # part name per part index
        self.pieces: List[Tuple[int, Material]] = []  # (part index, material) per value - 1

    def part(self, name: str) -> int:
        self.parts.append(name)
        return len(self.parts) - 1

    def piece(self, part: int, mat: Material) -> int:
        if len(self.pieces) >= 254:
            raise ValueError("object has more than 254 pieces")
        self.pieces.append((part, mat))
        return len(self.pieces)

    @staticmethod
    def _p(pts) -> np.ndarray:
        return np.round(np.asarray(pts, np.float64) * ONE).astype(np.int32).reshape(-1, 2)

    def poly(self, v: int, pts) -> None:
        cv2.fillPoly(self.m, [self._p(pts)], int(v), cv2.LINE_8, SHIFT)

    def polyline(self, v: int, pts, t: int, closed: bool = False) -> None:
        cv2.polylines(self.m, [self._p(pts)], closed, int(v), max(1, int(t)), cv2.LINE_8, SHIFT)

    def line(self, v: int, p0, p1, t: int) -> None:
        self.polyline(v, [p0, p1], t)

    def ellipse(self, v: int, c, axes, angle: float = 0.0, t: int = -1) -> None:
        cc = tuple(int(round(z * ONE)) for z in c)
        ax = tuple(max(1, int(round(z * ONE))) for z in axes)
        cv2.ellipse(self.m, cc, ax, float(angle), 0, 360, int(v), int(t), cv2.LINE_8, SHIFT)

    def circle(self, v: int, c, r: float, t: int = -1) -> None:
        self.ellipse(v, c, (r, r), 0.0, t)


def bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def rot(pts, c, ang: float) -> np.ndarray:
    pts = np.asarray(pts, np.float64) - c
    ca, sa = np.cos(ang), np.sin(ang)
    return pts @ np.array([[ca, sa], [-sa, ca]]) + c


@dataclass
class Kit:
    """Random materials for one object, kept in contrast with the background behind it."""

    rng: np.random.Generator
    style: Style
    bg_lum: float  # luminance of the background around the anchor

    def body(self) -> Material:
        r = self.rng
        h = r.uniform()
        rgb = hsv(h, r.uniform(0.35, 0.9), r.uniform(0.35, 0.95))
        tex = str(r.choice(self.style.object_textures))
        return Material(
            rgb=rgb,
            texture=tex,
            amp=r.uniform(0.08, 0.25) * self.style.texture_amp,
            period=r.uniform(4, 14),
            angle=r.uniform(0, np.pi),
            rgb2=hsv(h + r.uniform(0.3, 0.7), r.uniform(0.3, 0.9), r.uniform(0.2, 0.9)),
            origin=(r.uniform(0, 100), r.uniform(0, 100)),
            extent=r.uniform(20, 80),
        )

    def thin(self) -> Material:
        """Wires, spokes, legs: dark on bright backgrounds and bright on dark ones."""
        r = self.rng
        v = r.uniform(0.05, 0.3) if self.bg_lum > 0.45 else r.uniform(0.75, 0.97)
        return Material(rgb=hsv(r.uniform(), r.uniform(0.0, 0.6), v), texture="plain", amp=0.1)

    def dark(self) -> Material:
        r = self.rng
        return Material(rgb=hsv(r.uniform(), r.uniform(0, 0.3), r.uniform(0.04, 0.18)), texture="plain", amp=0.2)

    def metal(self) -> Material:
        r = self.rng
        return Material(
            rgb=hsv(r.uniform(), r.uniform(0, 0.25), r.uniform(0.45, 0.8)),
            texture="metal",
            amp=0.3,
            angle=r.uniform(0, np.pi),
            origin=(r.uniform(0, 50), r.uniform(0, 50)),
            extent=r.uniform(15, 60),
        )

    def thin_t(self) -> int:
        lo, hi = self.style.thin_px
        return int(self.rng.integers(lo, hi + 1))


Builder = Callable[[ObjectCanvas, Kit, float, float, float], None]


def wheel(c: ObjectCanvas, k: Kit, part: int, ctr, r: float, n_spokes: int) -> None:
    """Tyre, rim, spokes and hub of one wheel: a ring with thin spokes and holes between them."""
    tyre, spoke, hub = c.piece(part, k.dark()), c.piece(part, k.thin()), c.piece(part, k.metal())
    c.circle(tyre, ctr, r, t=max(2, int(round(r * 0.12))))
    c.circle(spoke, ctr, r * 0.86, t=1)
    t = k.thin_t()
    for a in np.linspace(0, 2 * np.pi, n_spokes, endpoint=False) + k.rng.uniform(0, np.pi):
        c.line(spoke, ctr, (ctr[0] + 0.86 * r * np.cos(a), ctr[1] + 0.86 * r * np.sin(a)), t)
    c.circle(hub, ctr, max(1.5, r * 0.12))

"""Appearance of the procedural world: styles, materials and the texture fields they sample.

Colours are derived from the label map after every mask is final, so appearance never changes a
mask. A `Material` turns pixel coordinates into RGB in [0, 1]; a `Style` holds everything that a
benchmark style shift may change (palette, textures, scene mix, noise, blur, line widths).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import cv2
import numpy as np


@dataclass(frozen=True)
class Style:
    """A named appearance. ``default`` is daylight and mostly outdoor; ``shift`` is a dim,
    desaturated, mostly indoor world with bold object textures, heavier sensor noise, more clutter
    and thinner wires: the same objects and ground truth under a shifted image distribution."""

    name: str
    hue_shift: float = 0.0  # applied to the whole image, in [0, 1) of the hue circle
    saturation: float = 1.0  # multiplier on HSV saturation of the final image
    brightness: float = 1.0
    tint: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise_sigma: float = 3.0  # sensor noise, 0-255 scale
    blur_sigma: float = 0.55  # softens edges like a lens; masks stay exact
    indoor_prob: float = 0.3
    texture_amp: float = 1.0
    object_textures: Tuple[str, ...] = ("noise", "noise", "plain", "stripes", "spots", "metal")
    n_distractors: Tuple[int, int] = (2, 5)
    thin_px: Tuple[int, int] = (1, 2)  # cv2 thickness range of wires, spokes, legs
    vignette: float = 0.15


STYLES: Dict[str, Style] = {
    "default": Style(name="default"),
    "shift": Style(
        name="shift",
        hue_shift=0.08,
        saturation=0.55,
        brightness=0.78,
        tint=(1.08, 0.95, 0.82),
        noise_sigma=7.0,
        blur_sigma=0.7,
        indoor_prob=0.8,
        texture_amp=1.6,
        object_textures=("stripes", "checker", "spots", "noise", "metal"),
        n_distractors=(4, 7),
        thin_px=(1, 1),
        vignette=0.35,
    ),
}


def get_style(name: str) -> Style:
    if name not in STYLES:
        raise ValueError(f"style {name!r}: expected one of {sorted(STYLES)}")
    return STYLES[name]


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), np.float32)


def luminance(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


@dataclass
class Material:
    """How one leaf region (a piece of a part, or a stuff region) looks.

    texture: plain | noise | stripes | checker | spots | metal | sky | grass | ground | bricks |
      tiles | wood | water | wallpaper.
    """

    rgb: np.ndarray
    texture: str = "noise"
    amp: float = 0.15
    period: float = 12.0
    angle: float = 0.0
    rgb2: Optional[np.ndarray] = None
    origin: Tuple[float, float] = (0.0, 0.0)  # (x, y) where stripes/gradients are anchored
    extent: float = 100.0  # length scale of gradients (sky height, metal sheen)


@dataclass
class Fields:
    """Smooth noise fields over the whole image, made once per scene, sampled by materials."""

    fine: np.ndarray
    mid: np.ndarray
    coarse: np.ndarray
    streak_v: np.ndarray  # stretched vertically: grass blades
    streak_h: np.ndarray  # stretched horizontally: wood grain, water ripples
    extra: Dict[str, np.ndarray] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sy: float, sx: float) -> np.ndarray:
    gh, gw = int(np.ceil(h / sy)) + 3, int(np.ceil(w / sx)) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * sx), int(gh * sy)), interpolation=cv2.INTER_CUBIC)
    out = big[int(sy) : int(sy) + h, int(sx) : int(sx) + w]
    return ((out - out.mean()) / (out.std() + 1e-6)).astype(np.float32)


def make_fields(rng: np.random.Generator, h: int, w: int) -> Fields:
    return Fields(
        fine=rng.standard_normal((h, w)).astype(np.float32),
        mid=_smooth_noise(rng, h, w, 6, 6),
        coarse=_smooth_noise(rng, h, w, 40, 40),
        streak_v=_smooth_noise(rng, h, w, 9, 1.5),
        streak_h=_smooth_noise(rng, h, w, 2, 30),
    )


def shade(m: Material, ys: np.ndarray, xs: np.ndarray, f: Fields, amp_scale: float = 1.0) -> np.ndarray:
    """RGB (N, 3) in [0, 1] of material ``m`` at pixels (ys, xs)."""
    base = m.rgb[None, :]
    a = m.amp * amp_scale
    t = m.texture
    yf, xf = ys.astype(np.float32), xs.astype(np.float32)
    fine, mid, coarse = f.fine[ys, xs][:, None], f.mid[ys, xs][:, None], f.coarse[ys, xs][:, None]
    rgb2 = m.rgb2[None, :] if m.rgb2 is not None else base * 0.55
    if t == "plain":
        out = base * (1 + 0.25 * a * fine + 0.3 * a * mid)
    elif t == "noise":
        out = base * (1 + a * (0.7 * mid + 0.35 * fine + 0.4 * coarse))
    elif t in ("stripes", "wallpaper"):
        u = xf * np.cos(m.angle) + yf * np.sin(m.angle)
        s = np.sin(2 * np.pi * u / m.period)[:, None]
        w = np.clip(0.5 + 1.5 * s, 0, 1)
        out = (base * (1 - w) + rgb2 * w) * (1 + 0.3 * a * mid + 0.15 * a * fine)
    elif t in ("checker", "tiles"):
        p = max(m.period, 3.0)
        c = ((np.floor((xf - m.origin[0]) / p) + np.floor((yf - m.origin[1]) / p)) % 2)[:, None]
        out = base * (1 - c) + rgb2 * c
        if t == "tiles":
            grout = ((np.mod(xf - m.origin[0], p) < 1.5) | (np.mod(yf - m.origin[1], p) < 1.5))[:, None]
            out = np.where(grout, base * 0.45, out)
        out = out * (1 + 0.3 * a * mid + 0.2 * a * fine)
    elif t == "spots":
        s = f.mid[ys, xs] * 0.8 + f.fine[ys, xs] * 0.05
        w = (s > 0.9).astype(np.float32)[:, None]
        out = (base * (1 - w) + rgb2 * w) * (1 + 0.2 * a * fine)
    elif t == "metal":
        u = ((xf - m.origin[0]) * np.cos(m.angle) + (yf - m.origin[1]) * np.sin(m.angle)) / max(m.extent, 1.0)
        sheen = np.exp(-((np.mod(u, 1.0) - 0.35) ** 2) / 0.02)[:, None]
        out = base * (0.85 + 0.1 * a * fine) + 0.35 * sheen
    elif t == "sky":
        g = np.clip((yf - m.origin[1]) / max(m.extent, 1.0), 0, 1)[:, None]
        top, horizon = base, np.clip(base * 0.6 + 0.45, 0, 1)
        out = top * (1 - g) + horizon * g
        cloud = np.clip(coarse * 0.9 + 0.25 * mid - 0.5, 0, 1) * a * 3
        out = out * (1 - cloud) + cloud * 0.97
    elif t == "grass":
        sv = f.streak_v[ys, xs][:, None]
        out = base * (1 + a * (0.9 * sv + 0.5 * coarse + 0.25 * fine))
    elif t == "ground":
        out = base * (1 + a * (0.5 * coarse + 0.6 * mid + 0.6 * fine))
        pebble = (f.mid[ys, xs] > 1.6)[:, None]
        out = np.where(pebble, rgb2 * (1 + 0.2 * fine), out)
    elif t == "bricks":
        p = max(m.period, 6.0)
        row = np.floor(yf / (p * 0.5))
        xo = xf + (row % 2) * p * 0.5
        mortar = ((np.mod(yf, p * 0.5) < 1.5) | (np.mod(xo, p) < 1.5))[:, None]
        jitter = np.sin(row * 12.9898 + np.floor(xo / p) * 78.233)[:, None] * 0.08
        out = np.where(mortar, rgb2, base * (1 + jitter + 0.35 * a * mid + 0.2 * a * fine))
    elif t == "wood":
        sh = f.streak_h[ys, xs][:, None]
        plank = (np.mod(yf - m.origin[1], max(m.period, 4.0)) < 1.2)[:, None]
        out = np.where(plank, base * 0.5, base * (1 + a * (0.6 * np.sin(4 * sh) + 0.2 * fine)))
    elif t == "water":
        sh = f.streak_h[ys, xs][:, None]
        ripple = np.sin(yf / 2.5 + 3 * f.mid[ys, xs])[:, None]
        out = base * (1 + a * (0.5 * sh + 0.25 * ripple)) + 0.15 * np.clip(ripple - 0.8, 0, 1)
    else:
        raise ValueError(f"material texture {t!r} unknown")
    return np.clip(out, 0, 1).astype(np.float32)

"""Composite objects of the procedural world, each drawn part by part onto an `ObjectCanvas`.

A builder draws one object standing on its anchor ``(x, y)`` (bottom centre), ``s`` pixels tall,
with cv2 (8-connected lines, filled polygons and ellipses at 1/16 px precision): the canvas holds
one value per *piece* and every piece belongs to one *part* of the object, so the part masks are
exact and partition the object. Holes are erased, so what lies behind shows through them.

``PARTS`` lists each kind's part names; they become the part categories ``"<kind>:<part>"``.
The canvas, the kit and shared helpers are in `sum.data.world.canvas`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from sum.data.world.canvas import Builder, Kit, ObjectCanvas, bezier, rot, wheel
from sum.data.world.materials import Material, hsv

PARTS: Dict[str, List[str]] = {
    "figure": ["head", "torso", "arm", "leg", "antenna", "tail"],
    "insect": ["head", "thorax", "abdomen", "leg", "antenna"],
    "lamp": ["base", "pole", "arm", "shade", "bulb", "cord"],
    "chair": ["seat", "backrest", "leg", "stretcher"],
    "bicycle": ["wheel", "frame", "handlebar", "saddle", "pedal", "chain"],
    "cart": ["basket", "chassis", "handle", "wheel"],
    "scissors": ["blade", "handle", "pivot"],
    "plant": ["pot", "stem", "leaf"],
    "kite": ["sail", "spar", "tail", "string"],
}
SIMPLE_KINDS = ["rock", "ball", "box", "bush"]  # distractors without parts
THING_KINDS = list(PARTS) + SIMPLE_KINDS


def build_figure(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    skin, cloth, legm = k.body(), k.body(), k.body()
    head_r = s * r.uniform(0.09, 0.13)
    hip = (x, y - s * 0.45)
    neck = (x, y - s * 0.78)
    torso, arm, leg = c.part("torso"), None, None
    legw = max(2, int(s * r.uniform(0.035, 0.06)))
    for side in (-1, 1):
        leg = c.part("leg")
        v = c.piece(leg, legm)
        knee = (hip[0] + side * s * r.uniform(0.03, 0.12), y - s * 0.22)
        foot = (hip[0] + side * s * r.uniform(0.05, 0.18), y - 1)
        c.polyline(v, [(hip[0] + side * s * 0.04, hip[1]), knee, foot], legw)
        c.ellipse(v, (foot[0] + side * legw, foot[1] - legw * 0.5), (legw * 1.3, legw * 0.7))
    v = c.piece(torso, cloth)
    c.ellipse(v, (x, (hip[1] + neck[1]) / 2), (s * r.uniform(0.1, 0.16), (hip[1] - neck[1]) / 2 + s * 0.03))
    armw = max(2, int(s * r.uniform(0.025, 0.045)))
    for side in (-1, 1):
        arm = c.part("arm")
        v = c.piece(arm, skin)
        sh = (x + side * s * 0.12, neck[1] + s * 0.05)
        el = (sh[0] + side * s * r.uniform(0.05, 0.15), sh[1] + s * r.uniform(0.05, 0.17))
        hand = (el[0] + side * s * r.uniform(-0.02, 0.12), el[1] + s * r.uniform(-0.2, 0.12))
        c.polyline(v, [sh, el, hand], armw)
        c.circle(v, hand, armw * 0.9)
    head = c.part("head")
    hc = (x + s * r.uniform(-0.02, 0.02), neck[1] - head_r * 0.85)
    c.ellipse(c.piece(head, skin), hc, (head_r, head_r * r.uniform(1.0, 1.2)))
    eye = c.piece(head, k.dark())
    for side in (-1, 1):
        c.circle(eye, (hc[0] + side * head_r * 0.4, hc[1] - head_r * 0.1), max(1.0, head_r * 0.13))
    if r.uniform() < 0.7:
        ant = c.part("antenna")
        v = c.piece(ant, k.thin())
        for side in (-1, 1):
            base = (hc[0] + side * head_r * 0.5, hc[1] - head_r * 0.8)
            tip = (base[0] + side * s * r.uniform(0.03, 0.12), base[1] - s * r.uniform(0.1, 0.2))
            c.polyline(v, bezier(base, (base[0], tip[1]), tip, 12), k.thin_t())
            c.circle(v, tip, max(1.5, s * 0.015))
    if r.uniform() < 0.5:
        tail = c.part("tail")
        side = r.choice([-1, 1])
        p0 = (x + side * s * 0.08, hip[1])
        p2 = (x + side * s * r.uniform(0.25, 0.4), hip[1] - s * r.uniform(0.0, 0.3))
        c.polyline(c.piece(tail, k.thin()), bezier(p0, (p2[0], y - s * 0.1), p2), k.thin_t() + 1)


def build_insect(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    ang = r.uniform(-0.5, 0.5)
    ctr = np.array([x, y - s * 0.5])
    ax = np.array([np.cos(ang), np.sin(ang)])
    nrm = np.array([-ax[1], ax[0]])
    L = s * r.uniform(0.6, 0.9)
    shell, thorax_m = k.body(), k.body()
    legm = k.thin()
    t = k.thin_t()
    n_legs = int(r.choice([6, 8]))
    for i in range(n_legs):
        side = 1 if i % 2 else -1
        j = i // 2
        leg = c.part("leg")
        root = ctr + ax * L * (0.12 - 0.08 * j)
        knee = root + nrm * side * s * r.uniform(0.2, 0.32) + ax * s * (0.12 - 0.1 * j)
        foot = knee + nrm * side * s * r.uniform(0.05, 0.15) + np.array([0, s * r.uniform(0.15, 0.3)])
        c.polyline(c.piece(leg, legm), [root, knee, foot], t)
    abd = c.part("abdomen")
    v = c.piece(abd, shell)
    ac = ctr - ax * L * 0.25
    c.ellipse(v, ac, (L * 0.3, s * r.uniform(0.14, 0.22)), np.degrees(ang))
    if r.uniform() < 0.6:
        spot = c.piece(abd, k.dark())
        for _ in range(int(r.integers(2, 5))):
            c.circle(spot, ac + ax * L * r.uniform(-0.2, 0.15) + nrm * s * r.uniform(-0.08, 0.08), s * 0.03)
    th = c.part("thorax")
    c.ellipse(c.piece(th, thorax_m), ctr + ax * L * 0.12, (L * 0.13, s * 0.11), np.degrees(ang))
    head = c.part("head")
    hc = ctr + ax * L * 0.32
    c.circle(c.piece(head, thorax_m if r.uniform() < 0.5 else k.dark()), hc, s * r.uniform(0.07, 0.1))
    ant = c.part("antenna")
    v = c.piece(ant, legm)
    for side in (-1, 1):
        tip = hc + ax * s * r.uniform(0.2, 0.35) + nrm * side * s * r.uniform(0.1, 0.2) - np.array([0, s * 0.1])
        c.polyline(v, bezier(hc, hc + ax * s * 0.2, tip, 12), 1)


def build_lamp(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    metal, thin = k.metal(), k.thin()
    base = c.part("base")
    bw = s * r.uniform(0.12, 0.2)
    c.ellipse(c.piece(base, metal), (x, y - s * 0.03), (bw, s * 0.03))
    cord = c.part("cord")
    side = r.choice([-1, 1])
    p0 = (x + side * bw * 0.8, y - s * 0.03)
    p2 = (x + side * s * r.uniform(0.35, 0.55), y - s * r.uniform(0.0, 0.02))
    c.polyline(c.piece(cord, k.thin()), bezier(p0, (p0[0] + side * s * 0.05, y + s * 0.04), p2, 20), 1)
    pole = c.part("pole")
    top = (x + s * r.uniform(-0.05, 0.05), y - s * r.uniform(0.55, 0.7))
    c.line(c.piece(pole, thin), (x, y - s * 0.05), top, k.thin_t() + 1)
    arm = c.part("arm")
    elbow = (top[0] + side * -1 * s * r.uniform(0.1, 0.2), top[1] - s * r.uniform(0.12, 0.22))
    head = (elbow[0] + side * s * r.uniform(0.1, 0.3), elbow[1] + s * r.uniform(-0.05, 0.1))
    va = c.piece(arm, thin)
    c.polyline(va, [top, elbow, head], k.thin_t())
    c.circle(c.piece(arm, metal), elbow, max(1.5, s * 0.015))
    shade_p = c.part("shade")
    sw, sh = s * r.uniform(0.12, 0.2), s * r.uniform(0.12, 0.18)
    tilt = r.uniform(-0.6, 0.6)
    hc = np.array(head)
    pts = rot([(hc[0] - sw * 0.35, hc[1]), (hc[0] + sw * 0.35, hc[1]), (hc[0] + sw, hc[1] + sh), (hc[0] - sw, hc[1] + sh)], hc, tilt)
    bulb = c.part("bulb")
    bc = rot([(hc[0], hc[1] + sh * 1.05)], hc, tilt)[0]
    c.circle(c.piece(bulb, Material(rgb=hsv(0.14, 0.3, 1.0), texture="plain", amp=0.02)), bc, sw * 0.3)
    c.poly(c.piece(shade_p, k.body()), pts)


def build_chair(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    wood, seat_m = k.body(), k.body()
    w = s * r.uniform(0.4, 0.55)
    d = s * r.uniform(0.08, 0.15)  # perspective depth of the seat
    sy = y - s * r.uniform(0.4, 0.5)
    lt = max(2, int(s * r.uniform(0.015, 0.03)))
    back_l, back_r = (x - w / 2 + d, sy - d), (x + w / 2 + d, sy - d)
    legs = []
    for (fx, fy), length in [(back_l, 0.92), (back_r, 0.92), ((x - w / 2, sy), 1.0), ((x + w / 2, sy), 1.0)]:
        leg = c.part("leg")
        foot = (fx + r.uniform(-0.02, 0.02) * s, fy + (y - sy) * length)
        c.line(c.piece(leg, wood), (fx, fy), foot, lt)
        legs.append(((fx, fy), foot))
    st = c.part("stretcher")
    vs = c.piece(st, wood)
    for a, b in [(0, 2), (1, 3), (2, 3)]:
        fa, fb = legs[a], legs[b]
        pa = np.add(fa[0], np.subtract(fa[1], fa[0]) * 0.7)
        pb = np.add(fb[0], np.subtract(fb[1], fb[0]) * 0.7)
        c.line(vs, pa, pb, k.thin_t())
    back = c.part("backrest")
    bh = s * r.uniform(0.4, 0.55)
    vb = c.piece(back, wood)
    for px, py in (back_l, back_r):
        c.line(vb, (px, py), (px, py - bh), lt + 1)
    c.poly(vb, [(back_l[0], back_l[1] - bh - lt), (back_r[0], back_r[1] - bh - lt), (back_r[0], back_r[1] - bh + s * 0.06), (back_l[0], back_l[1] - bh + s * 0.06)])
    n_slats = int(r.integers(2, 6))
    for xi in np.linspace(back_l[0], back_r[0], n_slats + 2)[1:-1]:
        c.line(vb, (xi, back_l[1] - bh + s * 0.05), (xi, back_l[1]), k.thin_t())
    seat = c.part("seat")
    c.poly(c.piece(seat, seat_m), [(x - w / 2, sy), (x + w / 2, sy), (x + w / 2 + d, sy - d), (x - w / 2 + d, sy - d)])
    c.poly(c.piece(seat, wood), [(x - w / 2, sy), (x + w / 2, sy), (x + w / 2, sy + s * 0.03), (x - w / 2, sy + s * 0.03)])


def build_bicycle(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    wr = s * r.uniform(0.26, 0.32)
    span = s * r.uniform(1.0, 1.25)
    f = r.choice([-1, 1])
    rear = np.array([x - f * span / 2, y - wr - 1])
    front = np.array([x + f * span / 2, y - wr - 1])
    for ctr in (rear, front):
        wheel(c, k, c.part("wheel"), ctr, wr, int(r.integers(10, 20)))
    frame_p = c.part("frame")
    fm = k.body()
    ft = max(2, int(s * r.uniform(0.02, 0.035)))
    bb = np.array([x - f * span * 0.05, y - wr * 0.8])
    seat = np.array([x - f * span * 0.17, y - wr - s * 0.45])
    head = np.array([x + f * span * 0.32, y - wr - s * 0.42])
    vf = c.piece(frame_p, fm)
    for a, b in [(rear, bb), (rear, seat), (bb, seat), (seat + (head - seat) * 0.05, head), (bb, head), (head, front)]:
        c.line(vf, a, b, ft)
    ch = c.part("chain")
    vc = c.piece(ch, k.thin())
    c.line(vc, rear + (0, -wr * 0.1), bb + (0, -wr * 0.12), 1)
    c.line(vc, rear + (0, wr * 0.1), bb + (0, wr * 0.12), 1)
    pd = c.part("pedal")
    vp = c.piece(pd, k.metal())
    a = r.uniform(0, 2 * np.pi)
    crank = bb + wr * 0.4 * np.array([np.cos(a), np.sin(a)])
    c.line(vp, bb, crank, max(2, ft - 1))
    c.poly(vp, [crank + (-wr * 0.15, -wr * 0.05), crank + (wr * 0.15, -wr * 0.05), crank + (wr * 0.15, wr * 0.05), crank + (-wr * 0.15, wr * 0.05)])
    sd = c.part("saddle")
    sp = seat + (0, -s * 0.05)
    c.line(c.piece(sd, k.metal()), seat, sp, ft)
    c.poly(c.piece(sd, k.dark()), [sp + (-f * s * 0.1, -s * 0.02), sp + (f * s * 0.08, -s * 0.03), sp + (f * s * 0.08, s * 0.01), sp + (-f * s * 0.08, s * 0.015)])
    hb = c.part("handlebar")
    stem = head + (f * s * 0.02, -s * 0.1)
    vh = c.piece(hb, k.metal())
    c.line(vh, head, stem, ft)
    grip = stem + (-f * s * 0.12, s * r.uniform(-0.02, 0.06))
    c.polyline(vh, [stem, stem + (f * s * 0.03, 0), grip], max(2, ft - 1))
    c.circle(c.piece(hb, k.dark()), grip, ft * 1.2)


def build_cart(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    wr = s * r.uniform(0.12, 0.18)
    w = s * r.uniform(0.7, 0.95)
    f = r.choice([-1, 1])
    ch = c.part("chassis")
    frame = k.metal()
    by = y - 2 * wr
    c.line(c.piece(ch, frame), (x - w / 2, by), (x + w / 2, by), max(2, int(s * 0.025)))
    for cx in (x - w * 0.35, x + w * 0.35):
        wheel(c, k, c.part("wheel"), (cx, y - wr - 1), wr, int(r.integers(6, 12)))
    bk = c.part("basket")
    top = by - s * r.uniform(0.4, 0.55)
    flare = s * r.uniform(0.0, 0.12)
    quad = np.array([(x - w / 2 - flare, top), (x + w / 2 + flare, top), (x + w / 2, by), (x - w / 2, by)])
    vb = c.piece(bk, k.thin())
    if r.uniform() < 0.55:  # wire mesh: a hole-rich basket
        c.polyline(vb, quad, 2, closed=True)
        n = int(r.integers(5, 12))
        for t in np.linspace(0, 1, n + 2)[1:-1]:
            c.line(vb, quad[0] + (quad[1] - quad[0]) * t, quad[3] + (quad[2] - quad[3]) * t, 1)
        for t in np.linspace(0, 1, int(r.integers(3, 6)) + 2)[1:-1]:
            c.line(vb, quad[0] + (quad[3] - quad[0]) * t, quad[1] + (quad[2] - quad[1]) * t, 1)
    else:
        c.poly(c.piece(bk, k.body()), quad)
        c.polyline(vb, quad, 2, closed=True)
    hd = c.part("handle")
    p0 = quad[1] if f > 0 else quad[0]
    p1 = p0 + (f * s * r.uniform(0.12, 0.25), -s * r.uniform(0.15, 0.3))
    c.line(c.piece(hd, frame), p0, p1, k.thin_t() + 1)
    c.ellipse(c.piece(hd, k.dark()), p1, (s * 0.06, max(2, s * 0.02)), r.uniform(-20, 20))


def build_scissors(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    ctr = np.array([x, y - s * 0.5])
    base_ang = r.uniform(-np.pi, np.pi)
    opening = r.uniform(0.15, 0.5)
    blade_m, handle_m = k.metal(), k.body()
    L = s * 0.48
    for sign in (-1, 1):
        a = base_ang + sign * opening / 2
        d = np.array([np.cos(a), np.sin(a)])
        n = np.array([-d[1], d[0]])
        hp = c.part("handle")
        hc = ctr - d * L * 0.6 + n * sign * s * 0.04
        ring = c.piece(hp, handle_m)
        ra, rb = s * r.uniform(0.12, 0.16), s * r.uniform(0.08, 0.11)
        c.ellipse(ring, hc, (ra, rb), np.degrees(a))
        c.ellipse(0, hc, (ra * 0.7, rb * 0.55), np.degrees(a))  # the finger hole
        c.line(ring, hc + d * ra * 0.9, ctr, max(2, int(s * 0.03)))
    for sign in (-1, 1):
        a = base_ang + sign * opening / 2
        d = np.array([np.cos(a), np.sin(a)])
        n = np.array([-d[1], d[0]])
        bp = c.part("blade")
        c.poly(c.piece(bp, blade_m), [ctr - n * s * 0.04, ctr + d * L + n * s * 0.005, ctr + d * L * 0.9 + n * s * 0.04, ctr + n * s * 0.04])
    pv = c.part("pivot")
    c.circle(c.piece(pv, k.dark()), ctr, max(2.0, s * 0.025))


def build_plant(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    pot = c.part("pot")
    pw, ph = s * r.uniform(0.15, 0.25), s * r.uniform(0.18, 0.28)
    pm = k.body()
    c.poly(c.piece(pot, pm), [(x - pw, y - ph), (x + pw, y - ph), (x + pw * 0.7, y), (x - pw * 0.7, y)])
    c.poly(c.piece(pot, k.body()), [(x - pw * 1.1, y - ph - s * 0.05), (x + pw * 1.1, y - ph - s * 0.05), (x + pw * 1.1, y - ph), (x - pw * 1.1, y - ph)])
    stem = c.part("stem")
    vs = c.piece(stem, Material(rgb=hsv(r.uniform(0.2, 0.4), 0.6, r.uniform(0.2, 0.5)), texture="plain", amp=0.1))
    leaf_m = Material(rgb=hsv(r.uniform(0.2, 0.42), r.uniform(0.5, 0.9), r.uniform(0.3, 0.7)), texture="noise", amp=0.12)
    root = np.array([x, y - ph - s * 0.05])
    n = int(r.integers(4, 9))
    for i in range(n):
        a = -np.pi / 2 + r.uniform(-0.9, 0.9)
        length = s * r.uniform(0.35, 0.7)
        tip = root + length * np.array([np.cos(a), np.sin(a)])
        mid = (root + tip) / 2 + r.uniform(-0.15, 0.15, 2) * s
        c.polyline(vs, bezier(root, mid, tip, 16), k.thin_t())
        leaf = c.part("leaf")
        la = np.degrees(a) + r.uniform(-30, 30)
        c.ellipse(c.piece(leaf, leaf_m), tip, (s * r.uniform(0.06, 0.11), s * r.uniform(0.025, 0.045)), la)


def build_kite(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
    r = k.rng
    ctr = np.array([x, y - s * 0.7])
    w, h = s * r.uniform(0.18, 0.28), s * r.uniform(0.25, 0.35)
    tilt = r.uniform(-0.5, 0.5)
    top, right, bottom, left = rot([ctr + (0, -h * 0.6), ctr + (w, 0), ctr + (0, h), ctr + (-w, 0)], ctr, tilt)
    stp = c.part("string")
    end = (x + r.uniform(-0.5, 0.5) * s, y + s * 0.5)
    c.polyline(c.piece(stp, k.thin()), bezier(ctr, ((ctr[0] + end[0]) / 2 + s * 0.2, end[1] - s * 0.1), end, 24), 1)
    tl = c.part("tail")
    vt = c.piece(tl, k.thin())
    bow = c.piece(tl, k.body())
    pts = bezier(bottom, bottom + (s * r.uniform(-0.3, 0.3), s * 0.2), bottom + (s * r.uniform(-0.3, 0.3), s * 0.45), 20)
    c.polyline(vt, pts, 1)
    for p in pts[4::5]:
        c.poly(bow, [p + (-s * 0.03, -s * 0.015), p + (s * 0.03, s * 0.015), p + (s * 0.03, -s * 0.015), p + (-s * 0.03, s * 0.015)])
    sail = c.part("sail")
    m1, m2 = k.body(), k.body()
    c.poly(c.piece(sail, m1), [top, right, ctr, left])
    c.poly(c.piece(sail, m2), [left, ctr, right, bottom])
    sp = c.part("spar")
    vsp = c.piece(sp, k.thin())
    c.line(vsp, top, bottom, k.thin_t())
    c.line(vsp, left, right, k.thin_t())


def build_simple(kind: str) -> Builder:
    """A one-piece distractor: rock, ball, box or bush (no parts)."""

    def build(c: ObjectCanvas, k: Kit, x: float, y: float, s: float) -> None:
        r = k.rng
        p = c.part(kind)
        if kind == "rock":
            n = int(r.integers(7, 12))
            a = np.sort(r.uniform(0, 2 * np.pi, n))
            rad = s * r.uniform(0.35, 0.55, n)
            m = Material(rgb=hsv(r.uniform(0.05, 0.15), r.uniform(0, 0.25), r.uniform(0.3, 0.7)), texture="noise", amp=0.25)
            c.poly(c.piece(p, m), np.stack([x + rad * np.cos(a) * 1.3, y - s * 0.45 + rad * np.sin(a) * 0.8], 1))
        elif kind == "ball":
            m = k.body()
            m.texture = "stripes"
            c.circle(c.piece(p, m), (x, y - s * 0.3), s * 0.3)
        elif kind == "box":
            m = k.body()
            bw, bh, d = s * r.uniform(0.4, 0.7), s * r.uniform(0.4, 0.7), s * r.uniform(0.1, 0.25)
            c.poly(c.piece(p, m), [(x - bw / 2, y), (x + bw / 2, y), (x + bw / 2, y - bh), (x - bw / 2, y - bh)])
            lid = Material(rgb=np.clip(m.rgb * 1.25, 0, 1), texture="plain", amp=0.1)
            c.poly(c.piece(p, lid), [(x - bw / 2, y - bh), (x + bw / 2, y - bh), (x + bw / 2 + d, y - bh - d), (x - bw / 2 + d, y - bh - d)])
            c.poly(c.piece(p, Material(rgb=m.rgb * 0.6, texture="plain", amp=0.1)), [(x + bw / 2, y), (x + bw / 2 + d, y - d), (x + bw / 2 + d, y - bh - d), (x + bw / 2, y - bh)])
        else:
            m = Material(rgb=hsv(r.uniform(0.2, 0.4), r.uniform(0.4, 0.8), r.uniform(0.2, 0.5)), texture="noise", amp=0.3)
            v = c.piece(p, m)
            for _ in range(int(r.integers(4, 8))):
                c.ellipse(v, (x + r.uniform(-0.4, 0.4) * s, y - s * r.uniform(0.2, 0.5)), (s * r.uniform(0.15, 0.3), s * r.uniform(0.12, 0.25)), r.uniform(0, 180))

    return build


BUILDERS: Dict[str, Builder] = {
    "figure": build_figure,
    "insect": build_insect,
    "lamp": build_lamp,
    "chair": build_chair,
    "bicycle": build_bicycle,
    "cart": build_cart,
    "scissors": build_scissors,
    "plant": build_plant,
    "kite": build_kite,
    **{kind: build_simple(kind) for kind in SIMPLE_KINDS},
}

# width of each kind relative to its height s, used to place objects side by side
ASPECT: Dict[str, float] = {
    "figure": 0.8, "insect": 1.2, "lamp": 1.0, "chair": 0.7, "bicycle": 1.7, "cart": 1.3,
    "scissors": 1.0, "plant": 1.2, "kite": 0.8, "rock": 1.2, "ball": 0.6, "box": 0.9, "bush": 1.2,
}  # fmt: skip


def has_parts(kind: str) -> bool:
    return kind in PARTS


def kinds(names: Sequence[str]) -> List[str]:
    return [n for n in names if n in BUILDERS]

"""The embedded procedural world written as COCO sets (spec §3 data, §10.1 benchmarks).

Every image is drawn by `sum.data.world.render_scene` from (set seed, image index), so a set is
byte-identical whatever the number of worker processes. One set is one folder::

    <out_dir>/<name>/images/000001.png        image id 1 (RGB, 4:3, longest side image_size)
    <out_dir>/<name>/annotations.json         COCO, RLE masks of the set's task (or none)
    <out_dir>/<name>/hidden_gt/annotations_{salient,entity,part}.json   role "unlabeled" only

What ``annotations.json`` holds, by role and task:

- ``labeled``: the ground truth of the set's task only (salient: precise salient-object masks, as
  in HQSeg-44K);
- ``unlabeled``: no annotations; the ground truth of every granularity is kept apart under
  ``hidden_gt/``, only to score pseudo labels;
- ``benchmark``: the ground truth of the set's task;
- ``validation``: the ground truth of the set's task, held out: only ``sumseg recipe`` reads it.

Annotation ids are shared by the granularity files of one set: a salient object has the id of its
entity annotation, and a part's ``parent_id`` is that id. Annotations carry ``granularity``
(salient | entity | part), entities ``isthing``, parts ``parent_id``. Categories (the same ids in
every set) are object kinds (``bicycle``), stuff (``sky``) and parts (``bicycle:wheel``).
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import cv2
import numpy as np

from sum.config import ROLES, WorldConfig, WorldSetConfig
from sum.data.coco import decode_rle, mask_to_annotation, write_coco
from sum.data.world import STYLES, categories, render_scene
from sum.io import atomic_write_bytes, remove_stale_dirs, remove_temporaries
from sum.tracking import stage_run

log = logging.getLogger(__name__)

GENERATOR = "sum.data.synthetic"
LICENCE = "CC0 (generated)"
GRANULARITIES = ("salient", "entity", "part")
DEFAULT_SHEET = Path("outputs/world_contact_sheet.png")
LICENSES = [{"id": 1, "name": "CC0 1.0 (generated)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}]


@dataclass(frozen=True)
class _Job:
    images_dir: str
    seed: int
    index: int
    image_size: int
    style: str


def _image_job(job: _Job) -> dict:
    """Render one image, write its PNG atomically, return its COCO records (ids still local)."""
    sc = render_scene(job.seed, job.index, job.image_size, job.style)
    image_id = job.index + 1
    file_name = f"{image_id:06d}.png"
    ok, png = cv2.imencode(".png", sc.image[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"{file_name}: PNG encoding failed")
    atomic_write_bytes(Path(job.images_dir) / file_name, png.tobytes())
    cats = {c["name"]: c["id"] for c in categories()}
    h, w = sc.image.shape[:2]
    entities = []
    for e, m in sc.entity_masks():
        ent = sc.entities[e]
        ann = mask_to_annotation(m, 0, image_id, cats[ent.kind], granularity="entity", isthing=int(ent.isthing))
        entities.append((e, ent.salient, ann))
    parts = []
    for e, p, m in sc.part_masks():
        name = f"{sc.entities[e].kind}:{sc.entities[e].parts[p]}"
        parts.append((e, mask_to_annotation(m, 0, image_id, cats[name], granularity="part")))
    image = {"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 1}
    return {"image": image, "entities": entities, "parts": parts}


def _map(jobs: Sequence[_Job], workers: int) -> List[dict]:
    # Forking a process that runs other threads (a server, a Dask client, a test harness) can copy
    # a lock one of them holds and deadlock the children, and spawn would need an
    # `if __name__ == "__main__"` guard in every caller's script: so fork only a single-threaded
    # process, else render here (about 0.1 s an image). Workers keep cv2 single-threaded.
    forkable = threading.active_count() == 1 and "fork" in mp.get_all_start_methods()
    if workers <= 1 or len(jobs) < 8 or not forkable:
        return [_image_job(j) for j in jobs]
    ctx = mp.get_context("fork")
    # cv2's own thread pool is not a Python thread: once this process has run cv2 (rendered a
    # scene), a forked child inherits the pool's state without its threads and hangs on its first
    # parallel call. Stop the pool for the fork, and restore it after.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
            return list(pool.map(_image_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    finally:
        cv2.setNumThreads(threads)


def _check(name: str, cfg: WorldSetConfig) -> None:
    if cfg.role not in ROLES:
        raise ValueError(f"world set {name!r}: role {cfg.role!r}, expected one of {list(ROLES)}")
    if cfg.style not in STYLES:
        raise ValueError(f"world set {name!r}: style {cfg.style!r}, expected one of {sorted(STYLES)}")
    if cfg.role != "unlabeled" and cfg.task not in GRANULARITIES:
        raise ValueError(f"world set {name!r}: role {cfg.role!r} needs a task in {list(GRANULARITIES)}, got {cfg.task!r}")
    if cfg.role == "unlabeled" and cfg.task not in GRANULARITIES + ("unspecified",):
        raise ValueError(f"world set {name!r}: task {cfg.task!r} unknown")
    if cfg.n_images < 1:
        raise ValueError(f"world set {name!r}: n_images is {cfg.n_images}, expected >= 1")


def generate_set(
    out_dir: Union[str, os.PathLike],
    name: str,
    set_cfg: WorldSetConfig,
    image_size: int,
    workers: int = 2,
) -> Path:
    """Write one set of the world (module docstring) and return its folder ``<out_dir>/<name>``.

    The set is built in ``<out_dir>/<name>.tmp-XXXX`` and renamed into place when complete, so a
    folder under the final name is always whole; an older set of that name is replaced, and what
    a killed run left half-built is removed first.
    """
    _check(name, set_cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / name
    for pattern in (f"{glob.escape(name)}.tmp-*", f".{glob.escape(name)}.old-*"):
        remove_stale_dirs(out, pattern)  # half-built or half-replaced by a killed run
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=out))
    tmp.chmod(0o755)  # mkdtemp makes it private; the set is meant to be shared
    t0 = time.perf_counter()
    try:
        (tmp / "images").mkdir()
        jobs = [_Job(str(tmp / "images"), int(set_cfg.seed), i, int(image_size), set_cfg.style) for i in range(set_cfg.n_images)]
        records = _map(jobs, workers)
        images, by_gran = [], {g: [] for g in GRANULARITIES}
        next_id = 1
        for rec in records:
            images.append(rec["image"])
            ent_id = {}
            for e, salient, ann in rec["entities"]:
                ann["id"] = ent_id[e] = next_id
                next_id += 1
                by_gran["entity"].append(ann)
                if salient:
                    by_gran["salient"].append({**ann, "granularity": "salient"})
            for e, ann in rec["parts"]:
                ann["id"] = next_id
                ann["parent_id"] = ent_id[e]
                next_id += 1
                by_gran["part"].append(ann)
        info = {"task": set_cfg.task, "role": set_cfg.role, "seed": int(set_cfg.seed), "style": set_cfg.style, "generator": GENERATOR, "licence": LICENCE, "image_size": int(image_size)}
        cats = categories()
        if set_cfg.role == "unlabeled":
            write_coco(tmp / "annotations.json", images, [], cats, info, LICENSES)
            for g in GRANULARITIES:
                write_coco(tmp / "hidden_gt" / f"annotations_{g}.json", images, by_gran[g], cats, {**info, "task": g, "hidden": True}, LICENSES)
        else:
            write_coco(tmp / "annotations.json", images, by_gran[set_cfg.task], cats, info, LICENSES)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("world set %s: %d images in %.1f s -> %s", name, len(images), time.perf_counter() - t0, final)
    return final


def _replace_dir(src: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(src, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sheet_path_for(out_dir: Union[str, os.PathLike]) -> Path:
    """Where the contact sheet of a world at ``out_dir`` goes: the pipeline's ``DEFAULT_SHEET`` for
    the default ``data/world``, else ``<out_dir>/contact_sheet.png``, so that a world written
    elsewhere (an experiment) never replaces the pipeline's sheet."""
    if Path(out_dir).resolve() == Path(WorldConfig().out_dir).resolve():
        return DEFAULT_SHEET
    return Path(out_dir) / "contact_sheet.png"


def generate_world(cfg: WorldConfig, workers: int = 2, sheet_path: Optional[Union[str, os.PathLike]] = "auto") -> Dict[str, Path]:
    """Write every set of ``cfg`` under ``cfg.out_dir``; then the contact sheet at ``sheet_path``
    (``"auto"``: `sheet_path_for`; skipped when None). Returns {set name: set folder}."""
    if sheet_path == "auto":
        sheet_path = sheet_path_for(cfg.out_dir)
    paths = {name: generate_set(cfg.out_dir, name, s, cfg.image_size, workers=workers) for name, s in cfg.sets.items()}
    if sheet_path is not None and paths:
        remove_temporaries(sheet_path)  # of a killed run
        contact_sheet(cfg.out_dir, list(paths), sheet_path)
    return paths


def run_world(cfg) -> Dict[str, Path]:
    """The ``world`` stage: `generate_world` of ``cfg.data.world``, logged as an MLflow child run
    (the world's config as params, the contact sheet as an artifact)."""
    # no system-metrics thread: the render workers are forked
    with stage_run(cfg.tracking, "world", params={"data.world": cfg.data.world}, system_metrics=False) as tracker:
        paths = generate_world(cfg.data.world)
        sheet = sheet_path_for(cfg.data.world.out_dir)
        if paths and Path(sheet).is_file():
            tracker.log_artifact(sheet, artifact_path="world")
    return paths


# ---------------------------------------------------------------------------------------------
# contact sheet


def _palette(n: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hues = (np.arange(n) * 0.61803398875 + rng.uniform()) % 1.0
    hsv = np.stack([hues * 180, np.full(n, 200), np.full(n, 255)], 1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def _overlay(image: np.ndarray, masks: List[np.ndarray], dim_rest: bool) -> np.ndarray:
    """Image with each mask tinted in its own colour and outlined; uncovered pixels greyed if asked."""
    out = image.astype(np.float32)
    covered = np.zeros(image.shape[:2], bool)
    cols = _palette(max(1, len(masks)))
    edges = np.zeros(image.shape[:2], bool)
    k = np.ones((3, 3), np.uint8)
    for m, col in zip(masks, cols):
        out[m] = 0.45 * out[m] + 0.55 * col
        covered |= m
        mu = m.astype(np.uint8)
        edges |= (mu - cv2.erode(mu, k)) > 0
    if dim_rest:
        grey = out[~covered].mean(axis=1, keepdims=True)
        out[~covered] = 0.35 * grey
    out[edges] = 255
    return np.clip(out, 0, 255).astype(np.uint8)


def _read_coco(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _masks_by_image(doc: dict) -> Dict[int, List[np.ndarray]]:
    out: Dict[int, List[np.ndarray]] = {}
    for a in doc["annotations"]:
        out.setdefault(a["image_id"], []).append(decode_rle(a["segmentation"]))
    return out


def contact_sheet(
    out_dir: Union[str, os.PathLike],
    sets: Union[Iterable[str], Mapping[str, object]],
    path: Union[str, os.PathLike],
    n_per_set: int = 4,
    cell: int = 256,
) -> Path:
    """A PNG grid to look at the world: per set, ``n_per_set`` rows of image | salient | entity | part.

    A set's own ground truth (``annotations.json``, or ``hidden_gt/`` for unlabeled sets) is read
    from disk; the other granularities are re-rendered from the set's seed and style (the world is
    deterministic), and their column titles say so with ``(re-rendered)``.
    """
    out_dir = Path(out_dir)
    names = list(sets.keys()) if isinstance(sets, Mapping) else list(sets)
    rows = []
    font = cv2.FONT_HERSHEY_SIMPLEX
    for name in names:
        root = out_dir / name
        doc = _read_coco(root / "annotations.json")
        if doc is None:
            raise FileNotFoundError(f"{root / 'annotations.json'}: set {name!r} not generated")
        info = doc["info"]
        on_disk: Dict[str, Dict[int, List[np.ndarray]]] = {}
        for g in GRANULARITIES:
            hidden = _read_coco(root / "hidden_gt" / f"annotations_{g}.json")
            if hidden is not None:
                on_disk[g] = _masks_by_image(hidden)
            elif info.get("task") == g:
                on_disk[g] = _masks_by_image(doc)
        for img in doc["images"][:n_per_set]:
            image = cv2.imread(str(root / "images" / img["file_name"]), cv2.IMREAD_COLOR)[..., ::-1]
            sc = None
            cells = [image]
            titles = [f"{name} #{img['id']} {info['role']}/{info['task']}/{info['style']}"]
            for g in GRANULARITIES:
                if g in on_disk:
                    masks, tag = on_disk[g].get(img["id"], []), "gt"
                else:
                    if sc is None:
                        sc = render_scene(info["seed"], img["id"] - 1, max(image.shape[:2]), info["style"])
                    masks = [m for *_, m in {"salient": sc.salient_masks, "entity": sc.entity_masks, "part": sc.part_masks}[g]()]
                    tag = "re-rendered"
                cells.append(_overlay(image, masks, dim_rest=g != "entity"))
                titles.append(f"{g}: {len(masks)} ({tag})")
            tiles = []
            for c, t in zip(cells, titles):
                h, w = c.shape[:2]
                s = cell / max(h, w)
                small = cv2.resize(c, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
                tile = np.full((small.shape[0] + 18, cell, 3), 30, np.uint8)
                tile[18 : 18 + small.shape[0], : small.shape[1]] = small
                cv2.putText(tile, t[:44], (3, 13), font, 0.36, (255, 255, 255), 1, cv2.LINE_AA)
                tiles.append(tile)
            rows.append(np.concatenate(tiles, 1))
    sheet = np.concatenate(rows, 0) if rows else np.zeros((cell, cell, 3), np.uint8)
    ok, png = cv2.imencode(".png", sheet[..., ::-1])
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, png.tobytes())
    return Path(path)

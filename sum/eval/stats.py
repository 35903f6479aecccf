"""How sure a model's gain or loss against the foundation model is: paired differences with an
image-level bootstrap confidence interval.

The embedded benchmarks are small (the pipeline scores a few images per benchmark), so a table
of means alone cannot say whether "0.4 points below the foundation model" is forgetting or noise.
For each model, protocol, round and scope (task or overall) this module gives:

- ``delta``: the model's mean minus the reference model's, aggregated the paper's way (spec
  §10.2): per benchmark the mean over its masks, per task the mean of its benchmarks' means,
  overall the mean of all benchmark means. Because the means are linear, ``delta`` equals the
  difference of the two columns of ``table.md``.
- ``lo``, ``hi``: a percentile bootstrap interval of ``delta`` at ``level``. Each replicate
  redraws, within every benchmark independently, as many images as it has, with replacement;
  the masks of an image move together, since they share the image and its embedding and are
  not independent. Both models are scored on the same redrawn masks (a paired bootstrap).

  The bootstrap spread of a mean over n images is (n - 1)/n of its variance, too narrow for the
  few images per benchmark of the embedded run; each benchmark's replicates are therefore widened
  about its estimate by sqrt(n / (n - 1)) before the benchmarks are averaged (the small-sample
  correction of Hesterberg's expanded percentile interval, without its t factor).
  A scope holding a benchmark of one image has no interval (``lo``, ``hi`` NaN): redrawing one
  image says nothing about another.

An interval wholly below 0 means the model is below the reference beyond what the choice of
images explains; one that straddles 0 means the benchmarks cannot tell. With a handful of images
per benchmark (the pipeline evaluates 4) the intervals are rough; the larger evaluation in the
README is the one to read them on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np

METRICS = ("iou", "biou")


@dataclass(frozen=True)
class Delta:
    """A paired difference (model minus reference) and its bootstrap interval, as fractions."""

    delta: float
    lo: float
    hi: float
    n_images: int
    n_masks: int

    @property
    def verdict(self) -> str:
        """``below`` / ``above`` when the interval excludes 0 on that side, ``unknown`` without
        an interval, else ``tie``."""
        if np.isnan(self.lo) or np.isnan(self.hi):
            return "unknown"
        if self.hi < 0:
            return "below"
        if self.lo > 0:
            return "above"
        return "tie"


def image_bootstrap(sums_ir: np.ndarray, counts_i: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of a benchmark's mean over masks, resampling whole images.

    Arguments:
      sums_ir: (I, R) per image, the sum over its masks of the per-mask value at each round.
      counts_i: (I,) masks per image (each >= 1).
      samples: replicates B.
      rng: the generator the draws come from.

    Returns:
      (B, R): per replicate, the mean over the masks of I images drawn with replacement.
    """
    n = len(counts_i)
    pick = rng.integers(0, n, size=(samples, n))
    return sums_ir[pick].sum(axis=1) / counts_i[pick].sum(axis=1)[:, None]


def _per_image(records, metric: str) -> Dict[str, Dict[Tuple[str, str], np.ndarray]]:
    """dataset -> (image_id, ann_id) -> per-round values."""
    out: Dict[str, Dict[Tuple[str, str], np.ndarray]] = {}
    for r in records:
        out.setdefault(r.dataset, {})[(str(r.image_id), str(r.ann_id))] = np.asarray(getattr(r, metric), dtype=np.float64)
    return out


def paired_deltas(
    records: Sequence,
    dataset_task: Mapping[str, str],
    reference: str,
    protocol: str,
    metric: str = "iou",
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Dict[str, Dict[str, List[Delta]]]:
    """Every other model's paired difference to ``reference`` on ``protocol`` (module docstring).

    Arguments:
      records: `sum.eval.scoring.MaskRecord`-like objects (``model, protocol, dataset, image_id,
        ann_id`` and a per-round list under ``metric``).
      dataset_task: benchmark name -> task; its order is the order of the task keys.
      reference: the model the others are compared with (normally the foundation model).
      metric: ``iou`` or ``biou``.
      samples: bootstrap replicates; 0 gives intervals of no width (the point estimate only).
      level: the interval's coverage, in (0, 1).
      seed: the generator's seed. Every model starts from it, so all models are scored on the
        same redraws, and a model's interval does not change when others are added or dropped.

    Returns:
      ``{model: {scope: [Delta per round]}}``, scopes the tasks (in ``dataset_task`` order) and
      ``"overall"``; models in the order first seen, without the reference.

    Raises:
      ValueError: an unknown metric, a level outside (0, 1), no records of the reference on the
        protocol, or a model that was not scored on exactly the reference's masks (naming both).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {list(METRICS)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: expected a fraction in (0, 1)")
    recs = [r for r in records if r.protocol == protocol]
    by_model: Dict[str, list] = {}
    for r in recs:
        by_model.setdefault(r.model, []).append(r)
    if reference not in by_model:
        raise ValueError(f"reference model {reference!r}: no {protocol} records (models: {sorted(by_model)})")
    ref = _per_image(by_model.pop(reference), metric)
    datasets = [d for d in dataset_task if d in ref]
    tasks = list(dict.fromkeys(dataset_task[d] for d in datasets))
    alpha = (1.0 - level) / 2.0
    out: Dict[str, Dict[str, List[Delta]]] = {}
    for model, model_recs in by_model.items():
        # every model redraws the same images: its interval does not depend on the other models
        rng = np.random.default_rng(seed)
        mine = _per_image(model_recs, metric)
        point: Dict[str, np.ndarray] = {}
        reps: Dict[str, np.ndarray] = {}
        images: Dict[str, int] = {}
        masks: Dict[str, int] = {}
        for d in datasets:
            if set(mine.get(d, {})) != set(ref[d]):
                missing = sorted(set(ref[d]) ^ set(mine.get(d, {})))[:3]
                raise ValueError(
                    f"{protocol}: model {model!r} and reference {reference!r} were scored on different "
                    f"masks of {d!r} (e.g. image/mask {missing}); a paired comparison needs the same targets"
                )
            point[d], reps[d], images[d], masks[d] = _dataset_deltas(ref[d], mine[d], samples, rng)
        scopes = {t: [d for d in datasets if dataset_task[d] == t] for t in tasks}
        scopes["overall"] = datasets
        out[model] = {}
        for scope, names in scopes.items():
            est = np.mean([point[d] for d in names], axis=0)
            dist = np.mean([reps[d] for d in names], axis=0)
            lo = np.quantile(dist, alpha, axis=0)
            hi = np.quantile(dist, 1.0 - alpha, axis=0)
            n_img, n_mask = sum(images[d] for d in names), sum(masks[d] for d in names)
            out[model][scope] = [
                Delta(float(e), float(a), float(b), n_img, n_mask) for e, a, b in zip(est, lo, hi)
            ]
    return out


def _dataset_deltas(
    ref_d: Mapping[tuple, np.ndarray], mine_d: Mapping[tuple, np.ndarray], samples: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One benchmark of `paired_deltas`: the mean per-round difference over its masks, its
    ``samples`` image-bootstrap replicates (module docstring), and its numbers of images and masks."""
    diffs: Dict[str, List[np.ndarray]] = {}
    for (image_id, ann_id), values in ref_d.items():
        diffs.setdefault(image_id, []).append(mine_d[(image_id, ann_id)] - values)
    sums = np.stack([np.sum(v, axis=0) for v in diffs.values()])
    counts = np.array([len(v) for v in diffs.values()], dtype=np.float64)
    point = sums.sum(axis=0) / counts.sum()
    if samples == 0:
        reps = point[None, :]
    elif len(counts) == 1:
        reps = np.full((samples, sums.shape[1]), np.nan)
    else:
        widen = np.sqrt(len(counts) / (len(counts) - 1))
        reps = point + widen * (image_bootstrap(sums, counts, samples, rng) - point)
    return point, reps, len(counts), int(counts.sum())

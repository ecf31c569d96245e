"""Evaluation measures of paper A ("Quantitative evaluation criteria", eqs. 5-8, Tables 2-5).

Segmentation (per sub-case or per nodule): voxel Dice (eq. 5), precision
(eq. 6), recall (eq. 7), and tables of them by size category (Table 2's
categories, :data:`lungseg.cache.SIZE_CATEGORIES`: micro <= 5 mm, small 5-10,
nodule 10-30, mass > 30). Classification (benign 0 / malignant 1 = positive):
accuracy, recall (sensitivity) and specificity (eq. 8), the confusion matrix
(Fig. 9), the ROC curve and its exact AUC. Beyond the paper: percentile
bootstrap confidence intervals and nodule-level detection counts.

Conventions
-----------
- Arguments go truth first, as in scikit-learn: ``dice(truth, pred)``,
  ``confusion_matrix(y_true, y_pred)``, ``roc_auc(y_true, scores)``.
- Masks are any arrays of equal shape; non-zero means inside.
- Voxel measures are always defined: when a denominator is 0 the value is 1
  if both masks are empty (nothing to find, nothing found) and 0 otherwise (a
  missed nodule scores 0 on all three, as does a prediction where the truth
  is empty).
- Classification ratios whose denominator is 0 (no positives for the recall,
  no negatives for the specificity, one class only for the AUC) are NaN: they
  are undefined, and a NaN shows it rather than a made-up number.

NumPy only; :func:`detection_counts` uses ``scipy.ndimage.label`` (scipy is a
lungseg dependency) for connected components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .cache import SIZE_CATEGORIES, size_category

CATEGORY_NAMES: tuple[str, ...] = tuple(name for _, name in SIZE_CATEGORIES)


# --------------------------------------------------------------------------
# Voxel measures (eqs. 5-7)
# --------------------------------------------------------------------------

def _masks(truth, pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(truth) != 0
    p = np.asarray(pred) != 0
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} differs from prediction shape {p.shape}")
    return t, p


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def overlap_counts(truth, pred) -> tuple[int, int, int]:
    """(|T and P|, |T|, |P|) in voxels."""
    t, p = _masks(truth, pred)
    return int(np.count_nonzero(t & p)), int(np.count_nonzero(t)), int(np.count_nonzero(p))


def dice(truth, pred) -> float:
    """Eq. 5: ``2 |T and P| / (|T| + |P|)``; 1 when both are empty."""
    i, nt, np_ = overlap_counts(truth, pred)
    return _ratio(2 * i, nt + np_, nt == 0 and np_ == 0)


def precision(truth, pred) -> float:
    """Eq. 6: ``|T and P| / |P|``; 1 when both are empty, 0 when only P is."""
    i, nt, np_ = overlap_counts(truth, pred)
    return _ratio(i, np_, nt == 0 and np_ == 0)


def recall(truth, pred) -> float:
    """Eq. 7: ``|T and P| / |T|``; 1 when both are empty, 0 when only T is."""
    i, nt, np_ = overlap_counts(truth, pred)
    return _ratio(i, nt, nt == 0 and np_ == 0)


def segmentation_scores(truth, pred) -> dict[str, float]:
    """Dice, precision and recall of one pair of masks (eqs. 5-7)."""
    i, nt, np_ = overlap_counts(truth, pred)
    both = nt == 0 and np_ == 0
    return {"dice": _ratio(2 * i, nt + np_, both), "precision": _ratio(i, np_, both),
            "recall": _ratio(i, nt, both)}


# --------------------------------------------------------------------------
# Size categories (Table 2) and per-category tables (Tables 3, 4)
# --------------------------------------------------------------------------

def per_category_table(diameters_mm, scores: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Mean of each score per size category, plus ``n``, and an ``"all"`` row.

    ``scores`` maps a name ("dice", ...) to one value per nodule, aligned with
    ``diameters_mm``. Categories without nodules have ``n = 0`` and NaN means.
    Row order: micro, small, nodule, mass, all.
    """
    cat = np.atleast_1d(size_category(diameters_mm))
    cols = {k: np.asarray(v, dtype=float) for k, v in scores.items()}
    for k, v in cols.items():
        if v.shape != cat.shape:
            raise ValueError(f"scores[{k!r}] has {v.shape} values for {cat.shape} diameters")
    table: dict[str, dict[str, float]] = {}
    rows = [(name, cat == i) for i, name in enumerate(CATEGORY_NAMES)]
    rows.append(("all", np.ones(cat.shape, bool)))
    for name, sel in rows:
        n = int(sel.sum())
        table[name] = {"n": n, **{k: float(v[sel].mean()) if n else float("nan") for k, v in cols.items()}}
    return table


def format_table(table: Mapping[str, Mapping[str, float]], *, digits: int = 3) -> str:
    """A per-category table as aligned plain text (one row per category)."""
    keys = [k for k in next(iter(table.values())) if k != "n"]
    lines = [f"{'category':<10}{'n':>6}" + "".join(f"{k:>12}" for k in keys)]
    for name, row in table.items():
        lines.append(f"{name:<10}{int(row['n']):>6}" + "".join(f"{row[k]:>12.{digits}f}" for k in keys))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Classification (eq. 8, Fig. 9, ROC)
# --------------------------------------------------------------------------

def _labels(y_true, y_pred=None) -> tuple[np.ndarray, np.ndarray | None]:
    t = np.asarray(y_true)
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {t.shape}")
    if y_pred is None:
        return t, None
    p = np.asarray(y_pred)
    if p.shape != t.shape:
        raise ValueError(f"y_true has shape {t.shape}, y_pred {p.shape}")
    return t, p


def _binary(y: np.ndarray, name: str) -> np.ndarray:
    if y.dtype == bool:
        return y
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} must hold 0 (benign) / 1 (malignant) labels")
    return y.astype(bool)


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class.

    ``num_classes`` defaults to ``1 + max`` of both label arrays (at least 2).
    """
    t, p = _labels(y_true, y_pred)
    t, p = t.astype(np.int64), p.astype(np.int64)
    if t.size and (t.min() < 0 or p.min() < 0):
        raise ValueError("class labels must be >= 0")
    k = num_classes if num_classes is not None else max(2, int(max(t.max(initial=0), p.max(initial=0))) + 1)
    if t.size and max(t.max(), p.max()) >= k:
        raise ValueError(f"labels must be below num_classes={k}")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def binary_counts(y_true, y_pred) -> dict[str, int]:
    """TP, FP, TN, FN with 1 (malignant) as the positive class."""
    t, p = _labels(y_true, y_pred)
    t, p = _binary(t, "y_true"), _binary(p, "y_pred")
    return {"tp": int(np.sum(t & p)), "fp": int(np.sum(~t & p)),
            "tn": int(np.sum(~t & ~p)), "fn": int(np.sum(t & ~p))}


def _div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def accuracy(y_true, y_pred) -> float:
    """Eq. 8: (TP + TN) / all; for any number of classes: share of correct labels."""
    t, p = _labels(y_true, y_pred)
    return _div(float(np.sum(t == p)), t.size)


def sensitivity(y_true, y_pred) -> float:
    """Eq. 8's recall: TP / (TP + FN); NaN without positives."""
    c = binary_counts(y_true, y_pred)
    return _div(c["tp"], c["tp"] + c["fn"])


def specificity(y_true, y_pred) -> float:
    """Eq. 8: TN / (FP + TN); NaN without negatives."""
    c = binary_counts(y_true, y_pred)
    return _div(c["tn"], c["fp"] + c["tn"])


def classification_scores(y_true, y_pred) -> dict[str, float]:
    """Table 5's columns (accuracy, recall, specificity) and the four counts."""
    c = binary_counts(y_true, y_pred)
    n = sum(c.values())
    return {"accuracy": _div(c["tp"] + c["tn"], n), "recall": _div(c["tp"], c["tp"] + c["fn"]),
            "specificity": _div(c["tn"], c["fp"] + c["tn"]), **c}


def _scores(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    t, s = _labels(y_true, scores)
    t = _binary(t, "y_true")
    s = s.astype(float)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return t, s


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: (false-positive rate, true-positive rate, thresholds).

    A case is called positive when its score is >= the threshold. Thresholds
    are the distinct scores in decreasing order, preceded by +inf (the point
    (0, 0)); tied scores move the curve diagonally, so the trapezoid area under
    it equals :func:`roc_auc`. Rates are NaN when a class is absent.
    """
    t, s = _scores(y_true, scores)
    order = np.argsort(-s, kind="stable")
    s_sorted, t_sorted = s[order], t[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1] if s.size else np.array([], int)
    tp = np.cumsum(t_sorted)[last_of_value]
    fp = np.cumsum(~t_sorted)[last_of_value]
    npos, nneg = int(t.sum()), int((~t).sum())
    tpr = np.r_[0.0, tp] / npos if npos else np.full(tp.size + 1, np.nan)
    fpr = np.r_[0.0, fp] / nneg if nneg else np.full(fp.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, s_sorted[last_of_value]]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]


def roc_auc(y_true, scores) -> float:
    """Exact area under the ROC curve (Mann-Whitney U / (n_pos n_neg)).

    The probability that a random malignant case scores higher than a random
    benign one, ties counted 1/2. NaN when either class is absent.
    """
    t, s = _scores(y_true, scores)
    npos, nneg = int(t.sum()), int((~t).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[t].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


# --------------------------------------------------------------------------
# Bootstrap confidence intervals
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class BootstrapCI:
    """A point estimate with a percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    n_valid: int        # resamples whose statistic was finite (others, e.g. one-class AUCs, dropped)

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(statistic: Callable[..., float], *arrays, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, groups=None) -> BootstrapCI:
    """Percentile bootstrap interval of ``statistic(*arrays)``.

    Each resample draws units with replacement: single rows of the (equally
    long) ``arrays``, or, with ``groups`` (one id per row, e.g. patient ids),
    whole groups with all their rows, so correlated rows (nodules of one
    patient) move together. Deterministic for a given ``seed``. Resamples
    whose statistic is not finite are dropped and counted in ``n_valid``.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = len(data[0])
    if n == 0 or any(len(a) != n for a in data):
        raise ValueError(f"arrays must be non-empty and equally long, got lengths {[len(a) for a in data]}")
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    if groups is None:
        members = None
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must hold one id per row ({n}), got shape {g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        members = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
    stats = np.empty(n_resamples)
    for r in range(n_resamples):
        if members is None:
            idx = rng.integers(0, n, size=n)
        else:
            picks = rng.integers(0, len(members), size=len(members))
            idx = np.concatenate([members[k] for k in picks])
        stats[r] = statistic(*(a[idx] for a in data))
    valid = stats[np.isfinite(stats)]
    alpha = (1.0 - confidence) / 2.0
    low, high = (np.percentile(valid, [100 * alpha, 100 * (1 - alpha)]) if valid.size
                 else (float("nan"), float("nan")))
    return BootstrapCI(float(statistic(*data)), float(low), float(high), confidence, n_resamples,
                       int(valid.size))


# --------------------------------------------------------------------------
# Nodule-level detection
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectionCounts:
    """Nodule-level result of one scan (or sub-case)."""

    n_truth: int                 # ground-truth nodules
    n_hit: int                   # of them overlapped by some predicted component
    n_pred: int                  # predicted connected components
    n_false_positive: int        # predicted components that overlap no nodule
    truth_ids: np.ndarray = field(repr=False)   # label value of each nodule
    hit: np.ndarray = field(repr=False)         # bool per nodule, aligned with truth_ids

    @property
    def sensitivity(self) -> float:
        return _div(self.n_hit, self.n_truth)


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    from scipy import ndimage
    if not 1 <= connectivity <= ndim:
        raise ValueError(f"connectivity must be 1..{ndim} (1: faces, {ndim}: faces, edges and corners)")
    return ndimage.generate_binary_structure(ndim, connectivity)


def detection_counts(truth, pred, *, connectivity: int = 3) -> DetectionCounts:
    """Which nodules a predicted mask finds, and how many components it adds.

    ``truth`` is a label array (each nodule its own positive integer, 0
    background) or a boolean mask (its connected components are the nodules).
    ``pred`` is a binary mask; its connected components (``connectivity`` 3 =
    26-neighbourhood in 3D, 1 = 6-neighbourhood) are the detections. A nodule
    is hit when any predicted voxel overlaps it; a component that overlaps no
    nodule is a false positive.
    """
    from scipy import ndimage

    t = np.asarray(truth)
    p = np.asarray(pred) != 0
    if t.shape != p.shape:
        raise ValueError(f"truth shape {t.shape} differs from prediction shape {p.shape}")
    structure = _structure(t.ndim, connectivity)
    if t.dtype == bool:
        t, _ = ndimage.label(t, structure=structure)
    elif not np.issubdtype(t.dtype, np.integer) or (t.size and t.min() < 0):
        raise ValueError("truth must be a boolean mask or a label array of integers >= 0")
    truth_ids = np.unique(t[t > 0])
    hit_ids = np.unique(t[(t > 0) & p])
    hit = np.isin(truth_ids, hit_ids)
    comps, n_pred = ndimage.label(p, structure=structure)
    touching = np.unique(comps[(t > 0) & p])
    return DetectionCounts(n_truth=int(truth_ids.size), n_hit=int(hit.sum()), n_pred=int(n_pred),
                           n_false_positive=int(n_pred - touching.size), truth_ids=truth_ids, hit=hit)


def detection_summary(counts: Sequence[DetectionCounts]) -> dict[str, Any]:
    """Pooled over scans: nodules, hits, sensitivity, false positives and FP per scan."""
    n_scans = len(counts)
    n_truth = sum(c.n_truth for c in counts)
    n_hit = sum(c.n_hit for c in counts)
    n_fp = sum(c.n_false_positive for c in counts)
    return {"n_scans": n_scans, "n_truth": n_truth, "n_hit": n_hit,
            "sensitivity": _div(n_hit, n_truth), "n_false_positive": n_fp,
            "fp_per_scan": _div(n_fp, n_scans)}

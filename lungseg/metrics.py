"""Evaluation measures of paper A ("Quantitative evaluation criteria", eqs. 5-8, Tables 2-5).

Segmentation (per sub-case or per nodule): voxel Dice (eq. 5), precision
(eq. 6), recall (eq. 7), and tables of them by size category (Table 2's
categories, :data:`lungseg.cache.SIZE_CATEGORIES`: micro <= 5 mm, small 5-10,
nodule 10-30, mass > 30). Classification (benign 0 / malignant 1 = positive):
accuracy, recall (sensitivity) and specificity (eq. 8), the confusion matrix
(Fig. 9), the ROC curve and its exact AUC. Beyond the paper: percentile
bootstrap confidence intervals, nodule-level detection counts, and detection
measured the LUNA16 way (FROC curve and CPM, Setio et al., Medical Image
Analysis 42:1-13, 2017): :func:`froc`, :func:`cpm_bootstrap_ci`.

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

NumPy only (the FROC functions too); :func:`detection_counts` uses ``scipy.ndimage.label`` (scipy is a
lungseg dependency) for connected components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .cache import SIZE_CATEGORIES, size_category
from .configs import FROC_MAX_FINDINGS

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


# --------------------------------------------------------------------------
# Calibration of probabilities
# --------------------------------------------------------------------------

#: Equal-width probability bins of the reliability diagram and the ECE.
CALIBRATION_BINS = 10


def brier_score(y_true, probs) -> float:
    """Mean squared difference between the predicted probability and the 0/1 outcome (lower is better)."""
    y, p = _scores(y_true, probs)
    return float(np.mean((p - y) ** 2)) if len(y) else math.nan


def reliability(y_true, probs, n_bins: int = CALIBRATION_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin of predicted probability: mean prediction, observed positive fraction, count.

    Bins without items have NaN means and count 0; a probability of exactly
    1 falls in the last bin.
    """
    y, p = _scores(y_true, probs)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=p, minlength=n_bins) / count
        observed = np.bincount(index, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "mean_predicted": mean_p, "observed": observed, "count": count}


def expected_calibration_error(y_true, probs, n_bins: int = CALIBRATION_BINS) -> float:
    """ECE: the count-weighted mean |observed fraction - mean prediction| over equal-width bins."""
    r = reliability(y_true, probs, n_bins)
    n = r["count"].sum()
    if n == 0:
        return math.nan
    used = r["count"] > 0
    return float(np.sum(r["count"][used] * np.abs(r["observed"][used] - r["mean_predicted"][used])) / n)


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


# --------------------------------------------------------------------------
# FROC and CPM, the LUNA16 protocol
# --------------------------------------------------------------------------
#
# Setio A.A.A. et al., "Validation, comparison, and combination of algorithms
# for automatic detection of pulmonary nodules in computed tomography images:
# the LUNA16 challenge", Medical Image Analysis 42:1-13, 2017.

#: False-positive rates per scan whose mean sensitivity is the CPM (LUNA16's
#: Competition Performance Metric).
CPM_FP_RATES: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0)

#: What :func:`froc` made of each finding: ``hit`` (the finding that scores a
#: relevant nodule: a true positive), ``duplicate`` (hits a relevant nodule that
#: a higher- or equal-scoring finding already scores: ignored), ``irrelevant``
#: (hits irrelevant nodules only: ignored), ``fp`` (hits no nodule: a false
#: positive), ``dropped`` (beyond the ``max_findings`` best of its scan: ignored).
FINDING_STATUSES: tuple[str, ...] = ("hit", "duplicate", "irrelevant", "fp", "dropped")

_FROC_KEYS = ("finding_centres_mm", "finding_scores", "nodule_centres_mm", "nodule_diameters_mm",
              "nodule_relevant")


def _froc_points(value, name: str, where: str) -> np.ndarray:
    a = np.asarray(value, dtype=float)
    if a.size == 0:
        return a.reshape(0, 3)
    if a.ndim != 2 or a.shape[1] != 3 or not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: {name} must be an (n, 3) array of finite mm, got shape {a.shape}")
    return a


def _froc_vector(value, name: str, where: str, n: int, dtype=float) -> np.ndarray:
    a = np.asarray(value)
    if a.size == 0:
        a = a.reshape(0)
    if a.shape != (n,):
        raise ValueError(f"{where}: {name} must hold {n} values (one per row of the centres), got shape {a.shape}")
    if dtype is bool:
        if a.dtype != bool and not np.all((a == 0) | (a == 1)):
            raise ValueError(f"{where}: {name} must be booleans")
        return a.astype(bool)
    a = a.astype(float)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: {name} must be finite")
    return a


def _froc_match_scan(scan: Mapping[str, Any], where: str, max_findings: int) -> dict[str, np.ndarray]:
    """LUNA16's matching in one scan (see :func:`froc`)."""
    if not isinstance(scan, Mapping):
        raise ValueError(f"{where}: a scan must be a mapping with keys {_FROC_KEYS}, got {type(scan).__name__}")
    unknown = set(scan) - set(_FROC_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {_FROC_KEYS}")
    centres = _froc_points(scan.get("finding_centres_mm", ()), "finding_centres_mm", where)
    scores = _froc_vector(scan.get("finding_scores", ()), "finding_scores", where, len(centres))
    nodules = _froc_points(scan.get("nodule_centres_mm", ()), "nodule_centres_mm", where)
    diameters = _froc_vector(scan.get("nodule_diameters_mm", ()), "nodule_diameters_mm", where, len(nodules))
    if "nodule_relevant" not in scan and len(nodules):
        raise ValueError(f"{where}: nodule_relevant is required when there are nodules")
    relevant = _froc_vector(scan.get("nodule_relevant", ()), "nodule_relevant", where, len(nodules), bool)
    if np.any(diameters < 0):
        raise ValueError(f"{where}: nodule diameters must be >= 0 mm")

    order = np.argsort(-scores, kind="stable")[:max_findings]      # best first; ties keep input order
    keep = np.zeros(len(scores), bool)
    keep[order] = True
    distance = np.linalg.norm(centres[:, None, :] - nodules[None, :, :], axis=2)      # (K, N)
    hits = (distance <= diameters[None, :] / 2.0) & keep[:, None]
    nodule_scores = np.where(hits, scores[:, None], -np.inf).max(axis=0, initial=-np.inf)
    scoring = np.zeros(len(scores), bool)
    for j in np.flatnonzero(relevant & np.isfinite(nodule_scores)):
        scoring[order[hits[order, j]][0]] = True                   # the best finding on nodule j
    on_relevant = hits[:, relevant].any(axis=1)
    on_irrelevant = hits[:, ~relevant].any(axis=1)
    status = np.full(len(scores), "dropped", dtype="<U10")
    status[keep & on_relevant & ~scoring] = "duplicate"
    status[keep & on_relevant & scoring] = "hit"
    status[keep & ~on_relevant & on_irrelevant] = "irrelevant"
    status[keep & ~on_relevant & ~on_irrelevant] = "fp"
    return {"nodule_scores": nodule_scores, "relevant": relevant, "status": status,
            "fp_scores": scores[status == "fp"]}


def _froc_curve(hit_scores: np.ndarray, fp_scores: np.ndarray, n_scans: int):
    """Operating points from the relevant nodules' scores (-inf: missed) and the FPs' scores."""
    found = np.sort(hit_scores[np.isfinite(hit_scores)])
    fps = np.sort(fp_scores)
    thresholds = np.unique(np.concatenate([found, fps]))[::-1]
    n_tp = found.size - np.searchsorted(found, thresholds, side="left")      # scores >= t
    n_fp = fps.size - np.searchsorted(fps, thresholds, side="left")
    sens = n_tp / hit_scores.size if hit_scores.size else np.full(thresholds.shape, np.nan)
    return thresholds, sens, n_fp / n_scans


def froc_sensitivity_at(sensitivity, fp_per_scan, fp_rates) -> np.ndarray:
    """Sensitivity of a FROC curve at each FP rate, read as :func:`froc` reads it.

    The highest sensitivity among operating points with FP/scan <= the rate,
    0 where there is none (the step reading; see :func:`froc`).
    """
    sens = np.asarray(sensitivity, dtype=float)
    fp = np.asarray(fp_per_scan, dtype=float)
    if sens.shape != fp.shape:
        raise ValueError(f"sensitivity {sens.shape} and fp_per_scan {fp.shape} must be aligned")
    return np.array([sens[fp <= r].max(initial=0.0) for r in np.atleast_1d(np.asarray(fp_rates, dtype=float))])


def _sensitivity_at(sens: np.ndarray, fp_per_scan: np.ndarray, rates, n_relevant: int) -> np.ndarray:
    if n_relevant == 0:
        return np.full(len(rates), np.nan)
    return froc_sensitivity_at(sens, fp_per_scan, rates)


def froc(scans: Sequence[Mapping[str, Any]], *, max_findings: int = FROC_MAX_FINDINGS,
         fp_rates: Sequence[float] = CPM_FP_RATES) -> dict[str, Any]:
    """FROC curve and CPM over scans, by the LUNA16 protocol (Setio et al., Medical Image Analysis 42:1-13, 2017).

    ``scans`` holds one mapping per scan (every scan evaluated, with or
    without findings) with keys, each optional when empty:

    - ``finding_centres_mm`` (K, 3) and ``finding_scores`` (K,): the CAD's
      findings, centres in mm in any frame common to findings and nodules;
    - ``nodule_centres_mm`` (N, 3), ``nodule_diameters_mm`` (N,) and
      ``nodule_relevant`` (N,) bool: the reference nodules. The caller marks
      the irrelevant ones (LUNA16: nodules of fewer than 3 of the 4 readers,
      nodules under 3 mm, non-nodules).

    Rules, per scan:

    - only the ``max_findings`` highest-scoring findings count (ties at the
      cut keep input order); the others are ``dropped``;
    - a finding hits a nodule when its centre lies within the nodule's radius
      (distance <= diameter / 2); a finding may hit several nodules;
    - a relevant nodule is hit at most once: its score is the highest score
      of the findings hitting it; the other findings hitting it are ignored
      (neither true nor false positives);
    - a finding that hits irrelevant nodules only is ignored;
    - every other finding is a false positive.

    Operating points: for each threshold ``t``, the distinct scores of the
    counted findings (hits and false positives) in decreasing order,
    sensitivity = relevant nodules scoring >= t / all relevant nodules, and
    FP/scan = false positives scoring >= t / number of scans.

    Sensitivity at an FP rate ``r``: the highest sensitivity among operating
    points with FP/scan <= r, 0 if there is none. This is the operating-point
    (step) reading of the curve; the LUNA16 evaluation script interpolates
    linearly between operating points instead. Both agree at the operating
    points; between them the step reading is never above the interpolated one.
    CPM = mean sensitivity over ``fp_rates`` (:data:`CPM_FP_RATES`). Without
    relevant nodules sensitivities and the CPM are NaN.

    Returns plain data:

    - ``thresholds``, ``sensitivity``, ``fp_per_scan``: the curve (arrays);
    - ``fp_rates``, ``sensitivity_at_fp_rates`` (aligned arrays) and ``cpm``;
    - ``counts``: ``n_scans``, ``n_relevant``, ``n_irrelevant`` (nodules),
      ``n_findings`` (kept), ``n_dropped``, ``n_hit`` (relevant nodules hit),
      ``n_false_positive``, ``n_ignored`` (= ``n_duplicate`` + ``n_on_irrelevant``);
    - ``max_findings``;
    - ``scans``: per scan, ``nodule_scores`` (N,) (the highest score of the kept
      findings hitting each nodule, relevant or not; -inf when none does),
      ``relevant`` (N,), ``status`` (K,) (one of :data:`FINDING_STATUSES` per
      input finding) and ``fp_scores``. A relevant nodule counts as found at
      threshold ``t`` when its score is >= t (see :func:`froc_operating_threshold`).

    Raises ``ValueError`` for no scans or ill-formed arrays.
    """
    if isinstance(scans, Mapping) or not isinstance(scans, Sequence) or len(scans) == 0:
        raise ValueError("froc needs a non-empty sequence of scans (one mapping per scan)")
    if isinstance(max_findings, bool) or not isinstance(max_findings, (int, np.integer)) or max_findings < 1:
        raise ValueError(f"max_findings must be a positive int, got {max_findings!r}")
    rates = np.asarray(fp_rates, dtype=float)
    if rates.ndim != 1 or rates.size == 0 or not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"fp_rates must be positive finite numbers, got {fp_rates!r}")
    matched = [_froc_match_scan(s, f"scan {i}", int(max_findings)) for i, s in enumerate(scans)]
    hit_scores = np.concatenate([m["nodule_scores"][m["relevant"]] for m in matched])
    fp_scores = np.concatenate([m["fp_scores"] for m in matched])
    thresholds, sens, fp = _froc_curve(hit_scores, fp_scores, len(matched))
    at = _sensitivity_at(sens, fp, rates, hit_scores.size)
    status = np.concatenate([m["status"] for m in matched])
    n_dup, n_irr = int(np.sum(status == "duplicate")), int(np.sum(status == "irrelevant"))
    n_relevant = int(hit_scores.size)
    counts = {"n_scans": len(matched), "n_relevant": n_relevant,
              "n_irrelevant": int(sum((~m["relevant"]).sum() for m in matched)),
              "n_findings": int(np.sum(status != "dropped")), "n_dropped": int(np.sum(status == "dropped")),
              "n_hit": int(np.isfinite(hit_scores).sum()), "n_false_positive": int(fp_scores.size),
              "n_ignored": n_dup + n_irr, "n_duplicate": n_dup, "n_on_irrelevant": n_irr}
    return {"thresholds": thresholds, "sensitivity": sens, "fp_per_scan": fp, "fp_rates": rates,
            "sensitivity_at_fp_rates": at, "cpm": float(at.mean()), "counts": counts,
            "max_findings": int(max_findings), "scans": matched}


def froc_operating_threshold(result: Mapping[str, Any], fp_rate: float) -> float:
    """The score threshold of the operating point that :func:`froc` reads at ``fp_rate``.

    The lowest threshold whose FP/scan is <= ``fp_rate`` (+inf when none is):
    the relevant nodules with ``nodule_scores >= threshold`` are those found
    there, so per-group sensitivities (e.g. by size category) add up to the
    overall one.
    """
    ok = np.asarray(result["fp_per_scan"]) <= fp_rate
    return float(np.asarray(result["thresholds"])[ok].min()) if ok.any() else float("inf")


def cpm_bootstrap_ci(result: Mapping[str, Any], *, n_resamples: int = 1000, confidence: float = 0.95,
                     seed: int = 0, fp_rate: float | None = None) -> BootstrapCI:
    """Percentile bootstrap interval of the CPM of a :func:`froc` result, resampling scans.

    With ``fp_rate``: of the sensitivity at that many false positives per
    scan instead (read as :func:`froc` reads it).

    Each resample draws scans with replacement (a scan drawn twice counts
    twice: its nodules and false positives, and in the number of scans), with
    the matching of each scan kept (it does not depend on other scans), via
    :func:`bootstrap_ci`. Resamples without relevant nodules are dropped.
    """
    scans = result["scans"]
    rates = np.asarray(result["fp_rates"] if fp_rate is None else [fp_rate], dtype=float)
    hits = [m["nodule_scores"][m["relevant"]] for m in scans]
    fps = [m["fp_scores"] for m in scans]

    def cpm(idx: np.ndarray) -> float:
        h = np.concatenate([hits[i] for i in idx])
        thresholds, sens, fp = _froc_curve(h, np.concatenate([fps[i] for i in idx]), len(idx))
        return float(_sensitivity_at(sens, fp, rates, h.size).mean())

    return bootstrap_ci(cpm, np.arange(len(scans)), n_resamples=n_resamples, confidence=confidence, seed=seed)

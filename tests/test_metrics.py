"""metrics.py: eqs. 5-8, size categories, ROC and AUC with ties, bootstrap, detection, on hand-worked examples."""

import itertools
import math

import numpy as np
import pytest

from lungseg import metrics as m

# ---- voxel measures -------------------------------------------------------------------------


def test_dice_precision_recall_hand_worked():
    t = np.array([1, 1, 1, 1, 0, 0])
    p = np.array([1, 0, 0, 0, 1, 0])
    # |T and P| = 1, |T| = 4, |P| = 2
    assert m.dice(t, p) == pytest.approx(2 / 6)
    assert m.precision(t, p) == pytest.approx(1 / 2)
    assert m.recall(t, p) == pytest.approx(1 / 4)
    assert m.segmentation_scores(t.reshape(2, 3), p.reshape(2, 3)) == pytest.approx(
        {"dice": 1 / 3, "precision": 0.5, "recall": 0.25})
    assert m.dice(t, t) == m.precision(t, t) == m.recall(t, t) == 1.0


@pytest.mark.parametrize("t,p,expected", [
    ([0, 0, 0], [0, 0, 0], (1.0, 1.0, 1.0)),      # nothing to find, nothing found
    ([0, 0, 0], [0, 1, 0], (0.0, 0.0, 0.0)),      # prediction where the truth is empty
    ([0, 1, 0], [0, 0, 0], (0.0, 0.0, 0.0)),      # missed nodule
])
def test_empty_masks_have_defined_values(t, p, expected):
    assert (m.dice(t, p), m.precision(t, p), m.recall(t, p)) == expected
    assert tuple(m.segmentation_scores(t, p).values()) == expected


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        m.dice(np.zeros((2, 2)), np.zeros(4))


# ---- size categories ------------------------------------------------------------------------

def test_per_category_table_hand_worked():
    table = m.per_category_table([4, 8, 9, 20], {"dice": [0.2, 0.5, 0.7, 0.9], "recall": [0, 1, 1, 1]})
    assert list(table) == ["micro", "small", "nodule", "mass", "all"]
    assert table["micro"] == {"n": 1, "dice": 0.2, "recall": 0.0}
    assert table["small"]["n"] == 2 and table["small"]["dice"] == pytest.approx(0.6)
    assert table["mass"]["n"] == 0 and math.isnan(table["mass"]["dice"])
    assert table["all"] == pytest.approx({"n": 4, "dice": 0.575, "recall": 0.75})
    text = m.format_table(table)
    assert "small" in text and "0.600" in text and "nan" in text
    with pytest.raises(ValueError):
        m.per_category_table([4, 8], {"dice": [0.1]})


# ---- classification -------------------------------------------------------------------------

Y_TRUE = [1, 1, 1, 0, 0, 0, 0]
Y_PRED = [1, 0, 1, 0, 0, 1, 0]          # TP 2, FN 1, FP 1, TN 3


def test_eq_8_and_confusion_matrix_hand_worked():
    assert m.binary_counts(Y_TRUE, Y_PRED) == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    assert m.accuracy(Y_TRUE, Y_PRED) == pytest.approx(5 / 7)
    assert m.sensitivity(Y_TRUE, Y_PRED) == pytest.approx(2 / 3)
    assert m.specificity(Y_TRUE, Y_PRED) == pytest.approx(3 / 4)
    scores = m.classification_scores(Y_TRUE, Y_PRED)
    assert scores["accuracy"] == pytest.approx(5 / 7) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["specificity"] == pytest.approx(0.75)
    assert m.confusion_matrix(Y_TRUE, Y_PRED).tolist() == [[3, 1], [1, 2]]


def test_confusion_matrix_three_classes():
    cm = m.confusion_matrix([0, 1, 2, 2, 1], [0, 2, 2, 1, 1])
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert m.confusion_matrix([0, 0], [0, 0], num_classes=3).shape == (3, 3)
    assert m.accuracy([0, 1, 2, 2, 1], [0, 2, 2, 1, 1]) == pytest.approx(3 / 5)


def test_undefined_ratios_are_nan():
    assert math.isnan(m.sensitivity([0, 0], [1, 0]))
    assert math.isnan(m.specificity([1, 1], [1, 0]))
    assert math.isnan(m.roc_auc([1, 1], [0.2, 0.3]))


@pytest.mark.parametrize("call", [
    lambda: m.binary_counts([0, 2], [0, 1]),
    lambda: m.binary_counts([0, 1], [0, 1, 1]),
    lambda: m.confusion_matrix([[0, 1]], [[0, 1]]),
    lambda: m.confusion_matrix([0, 3], [0, 1], num_classes=2),
    lambda: m.confusion_matrix([0, -1], [0, 1]),
    lambda: m.roc_auc([0, 1], [0.5, float("nan")]),
    lambda: m.roc_curve([0, 1, 1], [0.5, 0.2]),
])
def test_ill_formed_labels_raise(call):
    with pytest.raises(ValueError):
        call()


# ---- ROC and AUC ----------------------------------------------------------------------------

def brute_auc(y, s):
    pos = [a for a, t in zip(s, y) if t]
    neg = [a for a, t in zip(s, y) if not t]
    return sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))


def test_auc_hand_worked_examples():
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert m.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)      # all tied
    # pos 0.5 vs neg 0.2: 1; vs neg 0.5: 1/2; pos 0.9 beats both: 2 -> 3.5 / 4
    assert m.roc_auc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert m.roc_auc([1, 1, 0], [0.0, 0.1, 0.9]) == 0.0


def test_auc_equals_pairwise_count_and_roc_trapezoid_on_tied_data():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 6, 60) / 5.0                      # many ties
    auc = m.roc_auc(y, s)
    assert auc == pytest.approx(brute_auc(y, s))
    fpr, tpr, _ = m.roc_curve(y, s)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(auc)


def test_roc_curve_hand_worked():
    fpr, tpr, thr = m.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert thr.tolist() == [math.inf, 0.8, 0.4, 0.35, 0.1]
    assert tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1]
    fpr, tpr, thr = m.roc_curve([0, 1, 1], [0.3, 0.3, 0.7])        # a tie moves diagonally
    assert thr.tolist() == [math.inf, 0.7, 0.3] and tpr.tolist() == [0, 0.5, 1] and fpr.tolist() == [0, 0, 1]


# ---- bootstrap ------------------------------------------------------------------------------

def test_bootstrap_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = y * 0.8 + rng.normal(0, 0.5, 80)
    ci = m.bootstrap_ci(m.roc_auc, y, s, n_resamples=300, seed=7)
    assert ci.estimate == pytest.approx(m.roc_auc(y, s))
    assert ci.low < ci.estimate < ci.high and 0 <= ci.low and ci.high <= 1
    assert ci == m.bootstrap_ci(m.roc_auc, y, s, n_resamples=300, seed=7)
    assert ci != m.bootstrap_ci(m.roc_auc, y, s, n_resamples=300, seed=8)
    wide = m.bootstrap_ci(m.roc_auc, y, s, n_resamples=300, seed=7, confidence=0.99)
    assert wide.low <= ci.low and wide.high >= ci.high
    assert ci.n_valid == 300 and "[" in str(ci)


def test_bootstrap_by_group_keeps_each_group_together():
    groups = np.repeat(np.arange(10), 3)                 # 10 patients, 3 nodules each
    values = np.arange(30.0)
    seen = []

    def stat(v, g):
        _, counts = np.unique(g, return_counts=True)
        seen.append(np.all(counts % 3 == 0))
        return v.mean()

    ci = m.bootstrap_ci(stat, values, groups, groups=groups, n_resamples=50, seed=1)
    assert all(seen) and ci.estimate == pytest.approx(14.5)
    assert ci.low <= 14.5 <= ci.high


def test_bootstrap_drops_undefined_resamples():
    ci = m.bootstrap_ci(m.roc_auc, np.array([0, 1, 0]), np.array([0.1, 0.9, 0.2]), n_resamples=200)
    assert 0 < ci.n_valid < 200 and ci.estimate == 1.0


@pytest.mark.parametrize("kwargs", [dict(n_resamples=0), dict(confidence=1.0), dict(groups=[0, 1])])
def test_bootstrap_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        m.bootstrap_ci(np.mean, np.arange(3.0), **kwargs)
    with pytest.raises(ValueError):
        m.bootstrap_ci(m.roc_auc, [0, 1], [0.5])


# ---- nodule-level detection -----------------------------------------------------------------

def test_detection_counts_hand_worked():
    truth = np.zeros((6, 10, 10), int)
    truth[1:3, 1:3, 1:3] = 4                       # nodule A (labels need not be 1..n)
    truth[3:5, 6:9, 6:9] = 7                       # nodule B
    pred = np.zeros(truth.shape, bool)
    pred[2:4, 2:4, 2:4] = True                     # overlaps A in one voxel, (2, 2, 2)
    pred[5, 0, 9] = True                           # a false positive
    c = m.detection_counts(truth, pred)
    assert (c.n_truth, c.n_hit, c.n_pred, c.n_false_positive) == (2, 1, 2, 1)
    assert c.truth_ids.tolist() == [4, 7] and c.hit.tolist() == [True, False]
    assert c.sensitivity == 0.5
    # A boolean truth mask: its connected components are the nodules.
    assert m.detection_counts(truth > 0, pred).n_truth == 2
    s = m.detection_summary([c, m.detection_counts(np.zeros_like(truth), np.zeros_like(pred))])
    assert s == {"n_scans": 2, "n_truth": 2, "n_hit": 1, "sensitivity": 0.5,
                 "n_false_positive": 1, "fp_per_scan": 0.5}


def test_detection_connectivity():
    pred = np.zeros((3, 3, 3), bool)
    pred[0, 0, 0] = pred[1, 1, 1] = True             # corner-touching voxels
    truth = np.zeros((3, 3, 3), int)
    truth[0, 0, 0] = 1
    assert m.detection_counts(truth, pred).n_pred == 1                    # 26-neighbourhood
    c6 = m.detection_counts(truth, pred, connectivity=1)
    assert c6.n_pred == 2 and c6.n_false_positive == 1
    with pytest.raises(ValueError):
        m.detection_counts(truth, pred, connectivity=4)
    with pytest.raises(ValueError):
        m.detection_counts(truth.astype(float), pred)
    with pytest.raises(ValueError):
        m.detection_counts(truth, pred[0])


# ---- FROC and CPM (LUNA16) ------------------------------------------------------------------

def _luna_case():
    """Three scans worked by hand (centres in mm).

    Scan A: relevant N1 at (0, 0, 0), diameter 10 (radius 5); relevant N2 at (50, 0, 0), diameter 6
    (radius 3); irrelevant I at (0, 50, 0), diameter 8.
      f1 (1, 0, 0)      0.9  -> hits N1: N1 scores 0.9                      hit
      f2 (0, 2, 0)      0.6  -> hits N1 again: ignored                      duplicate
      f3 (0, 50, 1)     0.8  -> hits only I: ignored                        irrelevant
      f4 (53.01, 0, 0)  0.7  -> 3.01 mm from N2, just outside its radius    fp
      f5 (53, 0, 0)     0.3  -> exactly 3 mm from N2 (distance <= radius)   hit, N2 scores 0.3
      f6 (100, 100, 100) 0.5 -> nothing                                     fp
    Scan B: relevant N3 at (0, 0, 0), diameter 4.
      f7 (0, 0, 1)      0.4  -> hits N3: N3 scores 0.4                      hit
      f8 (30, 30, 30)   0.95 -> nothing                                     fp
    Scan C: no findings, no nodules (it still counts in FP/scan).
    """
    a = {"finding_centres_mm": [[1, 0, 0], [0, 2, 0], [0, 50, 1], [53.01, 0, 0], [53, 0, 0], [100, 100, 100]],
         "finding_scores": [0.9, 0.6, 0.8, 0.7, 0.3, 0.5],
         "nodule_centres_mm": [[0, 0, 0], [50, 0, 0], [0, 50, 0]],
         "nodule_diameters_mm": [10, 6, 8], "nodule_relevant": [True, True, False]}
    b = {"finding_centres_mm": [[0, 0, 1], [30, 30, 30]], "finding_scores": [0.4, 0.95],
         "nodule_centres_mm": [[0, 0, 0]], "nodule_diameters_mm": [4], "nodule_relevant": [True]}
    return [a, b, {}]


def test_froc_hand_worked_curve_rates_and_cpm():
    r = m.froc(_luna_case())
    # Relevant nodule scores 0.9, 0.3, 0.4; FP scores 0.7, 0.5, 0.95; 3 scans.
    #   t      TP  FP   sensitivity  FP/scan
    #   0.95   0   1    0            1/3
    #   0.9    1   1    1/3          1/3
    #   0.7    1   2    1/3          2/3
    #   0.5    1   3    1/3          1
    #   0.4    2   3    2/3          1
    #   0.3    3   3    1            1
    assert r["thresholds"].tolist() == [0.95, 0.9, 0.7, 0.5, 0.4, 0.3]
    assert r["sensitivity"] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1])
    assert r["fp_per_scan"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    # Step reading: 1/8 and 1/4 FP/scan -> no operating point -> 0; 1/2 -> best at FP/scan 1/3 -> 1/3;
    # 1, 2, 4, 8 -> 1. CPM = (0 + 0 + 1/3 + 1 + 1 + 1 + 1) / 7 = 13/21.
    assert r["fp_rates"].tolist() == list(m.CPM_FP_RATES) == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    assert r["sensitivity_at_fp_rates"] == pytest.approx([0, 0, 1 / 3, 1, 1, 1, 1])
    assert r["cpm"] == pytest.approx(13 / 21)
    assert r["counts"] == {"n_scans": 3, "n_relevant": 3, "n_irrelevant": 1, "n_findings": 8, "n_dropped": 0,
                           "n_hit": 3, "n_false_positive": 3, "n_ignored": 2, "n_duplicate": 1,
                           "n_on_irrelevant": 1}
    a, b, c = r["scans"]
    assert a["status"].tolist() == ["hit", "duplicate", "irrelevant", "fp", "hit", "fp"]
    assert a["nodule_scores"].tolist() == [0.9, 0.3, 0.8]          # I's score shown, not counted
    assert a["relevant"].tolist() == [True, True, False] and sorted(a["fp_scores"].tolist()) == [0.5, 0.7]
    assert b["status"].tolist() == ["hit", "fp"] and b["nodule_scores"].tolist() == [0.4]
    assert c["status"].size == c["nodule_scores"].size == 0
    # The operating point read at a rate: its threshold selects the nodules found there.
    assert m.froc_operating_threshold(r, 1.0) == 0.3
    assert m.froc_operating_threshold(r, 0.5) == 0.9
    assert m.froc_operating_threshold(r, 0.125) == math.inf


def test_froc_missed_nodule_and_scans_without_findings_lower_the_curve():
    # One relevant nodule, missed (-inf); one FP of 0.5 over 4 scans: FP/scan 1/4, sensitivity 0 everywhere.
    scans = [{"finding_centres_mm": [[9, 9, 9]], "finding_scores": [0.5], "nodule_centres_mm": [[0, 0, 0]],
              "nodule_diameters_mm": [5], "nodule_relevant": [1]}, {}, {}, {}]
    r = m.froc(scans)
    assert r["thresholds"].tolist() == [0.5] and r["fp_per_scan"].tolist() == [0.25]
    assert r["sensitivity"].tolist() == [0.0] and r["cpm"] == 0.0
    assert r["scans"][0]["nodule_scores"].tolist() == [-math.inf]
    # Found at 0.2 instead: points (t 0.5: sens 0, FP 1/4), (t 0.2: sens 1, FP 1/4).
    scans[0] = {**scans[0], "finding_centres_mm": [[9, 9, 9], [0, 0, 1]], "finding_scores": [0.5, 0.2]}
    r = m.froc(scans)
    # 1/8 -> 0; 1/4 and above -> 1. CPM = 6/7.
    assert r["sensitivity_at_fp_rates"].tolist() == [0, 1, 1, 1, 1, 1, 1] and r["cpm"] == pytest.approx(6 / 7)


def test_froc_one_finding_may_hit_several_nodules_and_relevant_wins():
    scan = {"finding_centres_mm": [[0, 0, 0]], "finding_scores": [0.7],
            "nodule_centres_mm": [[1, 0, 0], [-1, 0, 0], [0, 1, 0]], "nodule_diameters_mm": [4, 4, 4],
            "nodule_relevant": [True, True, False]}
    r = m.froc([scan])
    # Both relevant nodules score 0.7 through the same finding: one point, sensitivity 1 at FP/scan 0.
    assert r["scans"][0]["status"].tolist() == ["hit"] and r["counts"]["n_hit"] == 2
    assert r["sensitivity"].tolist() == [1.0] and r["fp_per_scan"].tolist() == [0.0] and r["cpm"] == 1.0


def test_froc_keeps_the_max_findings_best_per_scan():
    # 100 far-away findings of 0.5 and, last, one of 0.1 on the relevant nodule: it is the 101st -> dropped.
    far = [[100 + k, 100, 100] for k in range(100)]
    scan = {"finding_centres_mm": far + [[0, 0, 0]], "finding_scores": [0.5] * 100 + [0.1],
            "nodule_centres_mm": [[0, 0, 0]], "nodule_diameters_mm": [6], "nodule_relevant": [True]}
    r = m.froc([scan])
    assert r["counts"]["n_dropped"] == 1 and r["counts"]["n_findings"] == 100 and r["counts"]["n_hit"] == 0
    assert r["scans"][0]["status"][-1] == "dropped" and r["cpm"] == 0.0
    # Ties at the cut keep input order: the on-nodule finding scoring 0.5 but listed last is dropped too.
    tied = {**scan, "finding_scores": [0.5] * 101}
    assert m.froc([tied])["counts"]["n_hit"] == 0
    # A smaller cap: the nodule's finding (0.9) and one FP (0.8) kept, 99 dropped.
    best = {**scan, "finding_scores": [0.8] + [0.5] * 99 + [0.9]}
    r = m.froc([best], max_findings=2)
    assert r["counts"]["n_dropped"] == 99 and r["counts"]["n_false_positive"] == 1
    assert r["thresholds"].tolist() == [0.9, 0.8] and r["sensitivity"].tolist() == [1, 1]
    assert r["fp_per_scan"].tolist() == [0, 1]


def test_froc_without_relevant_nodules_is_nan():
    r = m.froc([{"finding_centres_mm": [[0, 0, 0]], "finding_scores": [0.5]}])
    assert math.isnan(r["cpm"]) and r["counts"]["n_false_positive"] == 1
    ci = m.cpm_bootstrap_ci(r, n_resamples=20)
    assert ci.n_valid == 0 and math.isnan(ci.low)


def test_cpm_bootstrap_resamples_scans_and_is_seeded():
    r = m.froc(_luna_case())
    ci = m.cpm_bootstrap_ci(r, n_resamples=200, seed=3)
    assert ci.estimate == pytest.approx(13 / 21)
    assert 0 <= ci.low <= ci.estimate <= ci.high <= 1 and ci.low < ci.high
    assert ci == m.cpm_bootstrap_ci(r, n_resamples=200, seed=3)
    # Resamples drawing scan C only have no relevant nodule: dropped, not counted.
    assert 150 < ci.n_valid <= 200
    one = m.froc(_luna_case()[:1])
    c1 = m.cpm_bootstrap_ci(one, n_resamples=20)
    assert c1.low == c1.high == c1.estimate == one["cpm"]       # one scan: every resample is the same


@pytest.mark.parametrize("scans, kwargs", [
    ([], {}),
    ({}, {}),
    ([{"finding_centres_mm": [[0, 0]], "finding_scores": [0.5]}], {}),                 # centres not (n, 3)
    ([{"finding_centres_mm": [[0, 0, 0]], "finding_scores": [0.5, 0.4]}], {}),        # scores misaligned
    ([{"finding_centres_mm": [[0, 0, 0]], "finding_scores": [math.nan]}], {}),        # non-finite score
    ([{"nodule_centres_mm": [[0, 0, 0]], "nodule_diameters_mm": [5]}], {}),           # relevance missing
    ([{"nodule_centres_mm": [[0, 0, 0]], "nodule_diameters_mm": [-5], "nodule_relevant": [1]}], {}),
    ([{"nodule_centres_mm": [[0, 0, 0]], "nodule_diameters_mm": [5], "nodule_relevant": [2]}], {}),
    ([{"finding_centers_mm": [[0, 0, 0]]}], {}),                                       # unknown key
    (["scan"], {}),
    ([{}], {"max_findings": 0}),
    ([{}], {"fp_rates": (0.0, 1.0)}),
])
def test_froc_ill_formed_input_raises(scans, kwargs):
    with pytest.raises(ValueError):
        m.froc(scans, **kwargs)


def test_the_sensitivity_at_one_rate_has_its_own_interval():
    scans = [{"finding_centres_mm": [[0.0, 0, 0], [50, 50, 50]], "finding_scores": [0.9, 0.8],
              "nodule_centres_mm": [[0.0, 0, 0]], "nodule_diameters_mm": [6.0], "nodule_relevant": [True]},
             {"finding_centres_mm": [[9.0, 9, 9]], "finding_scores": [0.95],
              "nodule_centres_mm": [[30.0, 30, 30]], "nodule_diameters_mm": [6.0], "nodule_relevant": [True]}]
    r = m.froc(scans)
    one = m.cpm_bootstrap_ci(r, n_resamples=200, seed=1, fp_rate=1.0)
    assert one.estimate == pytest.approx(r["sensitivity_at_fp_rates"][list(r["fp_rates"]).index(1.0)])
    assert 0.0 <= one.low <= one.estimate <= one.high <= 1.0 and one.high > one.low
    assert m.cpm_bootstrap_ci(r, n_resamples=200, seed=1) != one       # the CPM's interval is another


def test_calibration_measures():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    assert m.brier_score(y, y.astype(float)) == 0.0
    assert m.brier_score(y, np.full(8, 0.5)) == pytest.approx(0.25)
    assert m.expected_calibration_error(y, np.full(8, 0.5)) == pytest.approx(0.0)      # half are malignant
    over = np.where(y == 1, 0.95, 0.85)            # confident everywhere: bins 8 (all benign) and 9 (all malignant)
    r = m.reliability(y, over)
    assert r["count"].sum() == 8 and r["count"][8] == 4 and r["count"][9] == 4
    assert r["observed"][8] == 0.0 and r["observed"][9] == 1.0 and np.isnan(r["observed"][0])
    assert m.expected_calibration_error(y, over) == pytest.approx((4 * 0.85 + 4 * 0.05) / 8)
    assert m.reliability([1], [1.0])["count"][-1] == 1                                     # p = 1 in the last bin

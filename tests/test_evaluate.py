"""evaluate.py: the paper's tables from a cache and checkpoints, JSON keys, protocols."""

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lungseg import evaluate
from lungseg.cache import Cache
from lungseg.errors import LungsegError


@pytest.fixture
def all_test(tiny_trained, tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("patient_id,split\nLIDC-IDRI-9001,test\nLIDC-IDRI-9002,test\nLIDC-IDRI-9003,test\n")
    return str(split)


def test_report_has_the_paper_tables_with_plain_keys(tiny_trained, all_test, tmp_path):
    report = evaluate.evaluate(tiny_trained["cache"], seg=tiny_trained["seg"], cls=tiny_trained["cls"],
                               out=tmp_path, split="test", split_file=all_test, n_bootstrap=50)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["classification"]["auc"] == pytest.approx(report["classification"]["auc"], nan_ok=True)
    assert saved["data"]["split"] == "test" and saved["protocol"] == "nodule" and saved["data"]["n_scans"] == 3
    table = saved["segmentation"]["per_size_category"]
    assert list(table) == ["micro", "small", "nodule", "mass", "all"]
    assert table["all"]["n"] == 2 and {"dice", "precision", "recall"} <= set(table["all"])
    det = saved["segmentation"]["detection"]
    assert det["n_truth"] == 2 and det["n_scans"] == 3
    cls = saved["classification"]
    for key in ("accuracy", "recall", "specificity", "auc"):
        assert key in cls and len(cls["ci95"][key]) == 2
    assert np.sum(cls["confusion_matrix"]) == cls["n"] == 2
    assert (tmp_path / "roc.png").is_file() and "| accuracy |" in (tmp_path / "evaluation.md").read_text()
    cal = cls["calibration"]
    probs = np.array([item["p_malignant"] for item in cls["items"]])
    labels = np.array([item["label"] for item in cls["items"]])
    assert cal["brier"] == pytest.approx(np.mean((probs - labels) ** 2))
    assert sum(cal["reliability"]["count"]) == cls["n"] and 0 <= cal["ece"] <= 1
    assert (tmp_path / "calibration.png").is_file() and "Calibration of p(malignant)" in (tmp_path / "evaluation.md").read_text()


def test_annotation_protocol_counts_each_readers_rating(tiny_trained, all_test, tmp_path):
    cache = Cache(tiny_trained["cache"])
    items, labels, patients = evaluate.classification_items(cache, cache.series_uids, "annotation")
    # 9001: readers 4, 5, 5 -> malignant x3; 9002: readers 1, 2, 2 -> benign x3.
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    items_n, labels_n, _ = evaluate.classification_items(cache, cache.series_uids, "nodule")
    assert sorted(labels_n.tolist()) == [0, 1]
    with pytest.raises(ValueError):
        evaluate.classification_items(cache, cache.series_uids, "reader")


def test_command_line_and_refusals(tiny_trained, all_test, tmp_path):
    from cli import main

    result = CliRunner().invoke(main, ["evaluate", "--cache", str(tiny_trained["cache"]), "--cls",
                                       str(tiny_trained["cls"]), "--split-file", all_test, "--out",
                                       str(tmp_path), "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "| accuracy | recall | specificity | auc |" in result.output
    with pytest.raises(LungsegError, match="no scans of split 'val'"):
        evaluate.evaluate(tiny_trained["cache"], seg=None, cls=tiny_trained["cls"], out=tmp_path,
                          split="val", split_file=all_test)
    with pytest.raises(LungsegError, match="give a segmentation .*--seg.*checkpoint"):
        evaluate.evaluate(tiny_trained["cache"], seg=None, cls=None, out=tmp_path, split_file=all_test)


class _Spy(torch.nn.Module):
    """A segmenter of overconfident logits that records whether autocast was on."""

    def __init__(self, logit):
        super().__init__()
        self.logit, self.autocast = logit, []

    def forward(self, x):
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        return torch.full_like(x, self.logit)


@pytest.mark.parametrize("precision, autocast", [("bf16", True), ("fp32", False)])
def test_evaluate_honours_precision_and_confident_logits_do_not_overflow(tiny_trained, precision, autocast):
    cache = Cache(tiny_trained["cache"])
    for logit in (1e4, -1e4):
        spy = _Spy(logit)
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # np.exp overflow warned here before
            out = evaluate.evaluate_segmentation(spy, cache, cache.series_uids, device=torch.device("cpu"),
                                                 precision=precision)
        assert spy.autocast and all(a == autocast for a in spy.autocast)
        recall = out["per_size_category"]["all"]["recall"]
        assert recall == (1.0 if logit > 0 else 0.0)


# ---- detection the LUNA16 way (FROC, CPM) ---------------------------------------------------

def test_scan_cache_report_has_a_froc_section_and_plot(tiny_trained, all_test, tmp_path):
    report = evaluate.evaluate(tiny_trained["cache"], seg=tiny_trained["seg"], cls=None, out=tmp_path,
                               split="test", split_file=all_test, n_bootstrap=50)
    froc = json.loads((tmp_path / "evaluation.json").read_text())["segmentation"]["froc"]
    assert froc["cpm"] == pytest.approx(report["segmentation"]["froc"]["cpm"])
    assert 0 <= froc["cpm"] <= 1
    lo, hi = froc["cpm_ci95"]
    assert 0 <= lo <= hi <= 1 and froc["n_bootstrap"] == 50
    assert list(froc["sensitivity_at_fp_rates"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert froc["cpm"] == pytest.approx(np.mean(list(froc["sensitivity_at_fp_rates"].values())))
    curve = froc["curve"]
    assert len(curve["thresholds"]) == len(curve["sensitivity"]) == len(curve["fp_per_scan"])
    assert all(a > b for a, b in zip(curve["thresholds"], curve["thresholds"][1:]))
    c = froc["counts"]
    assert c["n_scans"] == 3 and c["n_relevant"] == 2        # 9001's and 9002's 3-reader nodules
    assert len(froc["findings"]) == c["n_findings"] + c["n_dropped"] and c["n_findings"] <= 3 * 100
    assert sum(r["relevant"] for r in froc["nodules"]) == 2
    assert froc["candidate_threshold"] == 0.1 and froc["max_findings"] == 100
    assert list(froc["per_size_category"]) == ["micro", "small", "nodule", "mass", "all"]
    assert froc["per_size_category"]["all"]["n"] == 2
    assert "detection" in report["segmentation"]                      # the old counts stay
    assert (tmp_path / "froc.png").is_file() and not (tmp_path / "roc.png").exists()
    assert "FROC (LUNA16): CPM" in (tmp_path / "evaluation.md").read_text()


class _Oracle(torch.nn.Module):
    """A segmenter that returns prepared logits, one array per call, in evaluation order."""

    def __init__(self, logits):
        super().__init__()
        self.logits = list(logits)

    def forward(self, x):
        return torch.from_numpy(self.logits.pop(0)[None, None]).to(x.dtype)


def _logit(p):
    return float(np.log(p / (1 - p)))


def _oracle_logits(cache):
    """9001's nodule at probability ~1, 9002's at 0.2, and in 9003 a 2x2x2 blob at 0.3 (a false positive)."""
    out = []
    for uid in cache.series_uids:
        g = cache.scan(uid)
        patient = str(g.attrs["patient_id"])
        for i in range(len(g["subcases/start"])):
            mask = g["subcases/mask"][i] > 0
            value = {"LIDC-IDRI-9001": 10.0, "LIDC-IDRI-9002": _logit(0.2)}.get(patient, -10.0)
            logits = np.where(mask, value, -10.0).astype(np.float32)
            if patient == "LIDC-IDRI-9003" and i == 0:
                logits[8:10, 30:32, 30:32] = _logit(0.3)
            out.append(logits)
    return out


BLOB_VOXEL = (8.5, 44.5, 46.5)      # 9003 sub-case 0 starts at (0, 14, 16): the blob's centre on the scan grid


def test_froc_of_a_stand_in_segmenter_finds_the_nodules(tiny_trained):
    cache = Cache(tiny_trained["cache"])
    out = evaluate.evaluate_segmentation(_Oracle(_oracle_logits(cache)), cache, cache.series_uids,
                                         device=torch.device("cpu"), precision="fp32", n_bootstrap=100)
    froc = out["froc"]
    # Relevant nodules score ~1 (9001) and 0.2 (9002); the blob is one FP of 0.3 over 3 scans:
    #   t ~1: sens 1/2, FP/scan 0;  t 0.3: 1/2, 1/3;  t 0.2: 1, 1/3.
    # 1/8 and 1/4 FP/scan -> 1/2; 1/2 and above -> 1. CPM = (2 * 1/2 + 5) / 7 = 6/7.
    assert froc["curve"]["sensitivity"] == pytest.approx([0.5, 0.5, 1])
    assert froc["curve"]["fp_per_scan"] == pytest.approx([0, 1 / 3, 1 / 3])
    assert froc["curve"]["thresholds"][1:] == pytest.approx([0.3, 0.2])
    assert list(froc["sensitivity_at_fp_rates"].values()) == pytest.approx([0.5, 0.5, 1, 1, 1, 1, 1])
    assert froc["cpm"] == pytest.approx(6 / 7)
    lo, hi = froc["cpm_ci95"]
    assert lo <= froc["cpm"] <= hi
    c = froc["counts"]
    assert (c["n_relevant"], c["n_hit"], c["n_false_positive"], c["n_findings"]) == (2, 2, 1, 3)
    assert sorted(f["status"] for f in froc["findings"]) == ["fp", "hit", "hit"]
    blob = next(f for f in froc["findings"] if f["status"] == "fp")
    assert blob["centre_resampled"] == pytest.approx(BLOB_VOXEL, abs=1e-4)
    assert blob["centre_mm"] == pytest.approx(np.multiply(BLOB_VOXEL, (3.0, 1.5, 1.5)), abs=1e-3)
    assert sorted(r["hit_score"] for r in froc["nodules"] if r["relevant"]) == pytest.approx([0.2, 1.0], abs=1e-4)
    # Per size category at 4 FP/scan (threshold 0.2): 9002's 9.5 mm nodule is small, 9001's 16 mm one a nodule.
    table = froc["per_size_category"]
    assert table["small"]["sensitivity_at_4_fp"] == table["nodule"]["sensitivity_at_4_fp"] == 1.0
    assert table["all"]["sensitivity_any"] == 1.0 and table["micro"]["n"] == 0
    # Table 4 on detected nodules: both; 9002's (probability 0.2 < 0.5) has an empty mask, Dice 0.
    detected = froc["per_size_category_detected"]
    assert detected["all"]["n"] == 2 and detected["all"]["dice"] == pytest.approx(0.5)


def _copy_cache(src, dst):
    import shutil

    from lungseg.cache import scans_dir
    shutil.copy2(src, dst)
    shutil.copytree(scans_dir(src), scans_dir(dst))
    return scans_dir(dst)


def test_froc_reads_the_optional_irrelevant_group(tiny_trained, tmp_path):
    import h5py

    folder = _copy_cache(tiny_trained["cache"], tmp_path / "c.h5")
    cache = Cache(tmp_path / "c.h5")
    by_patient = {str(cache.scan(u).attrs["patient_id"]): u for u in cache.series_uids}
    cache.close()
    for patient in by_patient:               # whatever preprocess wrote: rewrite the group per case
        with h5py.File(folder / f"{by_patient[patient]}.h5", "a") as f:
            if "irrelevant" in f:
                del f["irrelevant"]
            if patient == "LIDC-IDRI-9003":    # a nodule of fewer readers on the blob
                f["irrelevant/centroid_resampled"] = np.array([BLOB_VOXEL], np.float32)
                f["irrelevant/diameter_mm"] = np.array([5.0], np.float32)
            elif patient == "LIDC-IDRI-9001":  # an empty group; 9002: no group at all
                f.create_group("irrelevant")
    cache = Cache(tmp_path / "c.h5")
    ref = evaluate.reference_nodules(cache, by_patient["LIDC-IDRI-9003"])
    assert ref["relevant"].tolist() == [False]
    np.testing.assert_allclose(ref["centres_mm"], [[25.5, 66.75, 69.75]])
    assert evaluate.reference_nodules(cache, by_patient["LIDC-IDRI-9002"])["relevant"].tolist() == [True]
    assert evaluate.reference_nodules(cache, by_patient["LIDC-IDRI-9001"])["relevant"].tolist() == [True]
    out = evaluate.evaluate_segmentation(_Oracle(_oracle_logits(cache)), cache, cache.series_uids,
                                         device=torch.device("cpu"), precision="fp32", n_bootstrap=20)
    froc = out["froc"]
    # The blob now hits an irrelevant nodule: ignored, no FP left, sensitivity 1/2 at FP/scan 0 then 1 -> CPM 1.
    c = froc["counts"]
    assert (c["n_false_positive"], c["n_on_irrelevant"], c["n_irrelevant"]) == (0, 1, 1) and froc["cpm"] == 1.0
    row = next(r for r in froc["nodules"] if not r["relevant"])
    assert row["id"].endswith("/irrelevant/0") and row["hit_score"] == pytest.approx(0.3)


def test_crop_caches_have_no_detection_or_froc(tiny_trained, monkeypatch):
    cache = Cache(tiny_trained["cache"])
    monkeypatch.setattr(evaluate, "is_crop_cache", lambda c: True)
    out = evaluate.evaluate_segmentation(_Spy(1e4), cache, cache.series_uids, device=torch.device("cpu"),
                                         precision="fp32")
    assert "froc" not in out and "detection" not in out and out["per_size_category"]["all"]["n"] == 2


def test_find_findings_components_scores_and_weighted_centres():
    prob = np.zeros((4, 6, 6), np.float32)
    prob[1, 1, 1], prob[2, 2, 2] = 0.9, 0.3        # corner neighbours: one component (26-connectivity)
    prob[0, 5, 5] = 0.05                           # below the candidate threshold
    prob[3, 4, 0] = 0.5
    centres, scores, voxels = evaluate.find_findings(prob, (2.0, 1.0, 0.5))
    assert scores.tolist() == pytest.approx([0.9, 0.5])
    # Weighted centroid of (1,1,1) x 0.9 and (2,2,2) x 0.3: 1 + 0.3 / 1.2 = 1.25 on each axis.
    np.testing.assert_allclose(voxels, [[1.25, 1.25, 1.25], [3, 4, 0]])
    np.testing.assert_allclose(centres, [[2.5, 1.25, 0.625], [6, 4, 0]])
    assert evaluate.find_findings(prob, (1, 1, 1), max_findings=1)[1].tolist() == pytest.approx([0.9])
    assert evaluate.find_findings(prob, (1, 1, 1), candidate_threshold=0.95)[1].size == 0


def test_score_report_counts_hits_misses_and_false_positives(tiny_trained):
    cache = Cache(tiny_trained["cache"])
    uid = next(u for u in cache.series_uids if evaluate.reference_nodules(cache, u)["relevant"].any())
    ref = evaluate.reference_nodules(cache, uid)
    spacing = [float(s) for s in cache.scan(uid).attrs["spacing"]]
    first = int(np.flatnonzero(ref["relevant"])[0])
    found = [{"id": 1, "centroid_voxel_zyx": ref["centroid_resampled"][first].tolist(), "nodule_probability": 0.9},
             {"id": 2, "centroid_voxel_zyx": [0.0, 0.0, 0.0], "nodule_probability": 0.8}]
    score = evaluate.score_report({"nodules": found, "spacing_zyx_mm": spacing}, cache, uid)
    assert score["n_relevant"] == int(ref["relevant"].sum()) and score["n_found"] == 1
    assert score["false_positives"] == [2]
    assert [n["found"] for n in score["nodules"]][first] is True
    empty = evaluate.score_report({"nodules": [], "spacing_zyx_mm": spacing}, cache, uid)
    assert empty["n_found"] == 0 and empty["false_positives"] == []

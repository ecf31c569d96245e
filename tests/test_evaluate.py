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
    with pytest.raises(LungsegError, match="give a segmentation checkpoint"):
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

"""malignancy.py: the two-channel nodule network, its loss, calibration, cross-fitting and the hybrid."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lungseg import malignancy
from lungseg.cache import FEATURES, Cache
from lungseg.checkpoints import load_checkpoint, load_model
from lungseg.configs import make_config
from lungseg.errors import TrainingError
from test_crops import write_crop

HEADER = ["patient_id", "nodule_id", "Malignancy_value", "Calcification_value", "Spiculation_value",
          "Texture_value", "len_mal_details"]


def test_network_returns_ratings_in_training_only_and_checks_channels():
    net = malignancy.NoduleNet(width=4, in_channels=2, n_aux=9)
    x = torch.randn(3, 2, 16, 48, 48)
    assert net.train()(x).shape == (3, 11)
    assert net.eval()(x).shape == (3, 2)
    assert net.centre(x).shape[2:] == (12, 32, 32)
    assert net(torch.randn(1, 2, 8, 16, 16)).shape == (1, 2)         # smaller ROIs are used whole
    with pytest.raises(ValueError, match="2 input channel"):
        net(torch.randn(1, 1, 16, 48, 48))
    ens = malignancy.NoduleEnsemble([net, malignancy.NoduleNet(width=4)]).eval()
    ens.temperature.fill_(2.0)
    with torch.no_grad():
        mean = torch.stack([malignancy.tta_logits(m, x) for m in ens.members]).mean(0)
        assert torch.allclose(ens(x), mean / 2.0, atol=1e-5)


def test_predicted_ratings_are_the_ratings_head_on_the_rating_scale():
    net = malignancy.NoduleNet(width=2, n_aux=9).eval()
    images, masks = np.random.default_rng(0).random((3, 8, 16, 16)), np.ones((3, 8, 16, 16))
    r = malignancy.predicted_ratings(malignancy.NoduleEnsemble([net]), images, masks)
    x = malignancy.model_input(net, images, masks)
    with torch.no_grad():
        expected = torch.stack([net.outputs(x.flip(f) if f else x)[:, 2:] for f in malignancy.TTA_FLIPS]).mean(0)
    assert r.shape == (3, 9) and np.allclose(r, expected.numpy() * malignancy.RATING_SCALE + malignancy.RATING_CENTRE,
                                             atol=1e-5)
    assert malignancy.predicted_ratings(malignancy.NoduleNet(width=2, n_aux=0), images, masks) is None


def test_model_input_stacks_the_mask_for_two_channel_networks():
    images, masks = np.zeros((2, 4, 8, 8), np.float16), np.ones((2, 4, 8, 8), np.uint8)
    two = malignancy.model_input(malignancy.NoduleNet(width=2), images, masks)
    assert two.shape == (2, 2, 4, 8, 8) and two.dtype == torch.float32 and float(two[:, 1].min()) == 1.0
    one = malignancy.model_input(torch.nn.Identity(), images, masks)
    assert one.shape == (2, 1, 4, 8, 8)
    with pytest.raises(ValueError, match="mask"):
        malignancy.model_input(malignancy.NoduleNet(width=2), images, None)


def test_loss_ignores_missing_labels_and_ratings():
    logits = torch.tensor([[0.0, 2.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    # Row 1 has no label (malignancy 3); rating 2 of row 0 is missing.
    target = torch.tensor([[1.0, 4.0, -1.0], [-1.0, 3.0, 5.0]])
    loss = malignancy.cls_loss(logits, target, aux_weight=0.5)
    nll = torch.nn.functional.cross_entropy(logits[:1, :2], torch.tensor([1]))
    aux = ((0.5 - 0.5) ** 2 + (0.0 - 0.0) ** 2 + (0.0 - 1.0) ** 2) / 3
    assert torch.isclose(loss, nll + 0.5 * aux, atol=1e-6)
    loss.backward()
    assert logits.grad[1, :2].abs().sum() == 0          # no label: no gradient on its class logits
    assert torch.isclose(malignancy.cls_loss(logits, target, 0.0), nll)
    assert torch.isclose(malignancy.cls_loss(logits[:, :2], target[:, 0].long().clamp(min=0)),
                         torch.nn.functional.cross_entropy(logits[:, :2], torch.tensor([1, 0])))


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    logits = np.c_[np.zeros(4000), 3.0 * true_logit]           # three times too confident
    assert malignancy.fit_temperature(logits, y) == pytest.approx(3.0, rel=0.1)


def test_majority_ratings_from_votes_or_readers():
    crop = {"ratings_majority": np.array([[2, 1, 6, 3, 4, 2, 1, 5, 4]])}
    assert malignancy.majority_ratings(crop, 0).tolist() == [2, 1, 6, 3, 4, 2, 1, 5, 4]
    readers = np.full((1, 4, 9), -1)
    readers[0, :3, 8] = [2, 3, 5]            # median 3
    readers[0, :2, 0] = [4, 5]               # median 4.5 -> 5 (half up)
    r = malignancy.majority_ratings({"ratings": readers}, 0)
    assert r[8] == 3 and r[0] == 5 and r[1] == -1


def _crop_folder(root, n_patients=12):
    """Crops of n patients: large balls rated malignant (5), small ones benign (1), and unlabelled (3) ones."""
    import csv

    rows = []
    for i in range(n_patients):
        malignant = i % 2 == 0
        write_crop(root, f"P-{i}_R_1", radius_mm=6.0 if malignant else 2.5)
        rows.append([f"P-{i}", 1, 5 if malignant else 1, 6, 4 if malignant else 1, 5, 4])
        if i % 3 == 0:
            write_crop(root, f"P-{i}_R_2", radius_mm=4.0)
            rows.append([f"P-{i}", 2, 3, 6, 2, 5, 4])
    with open(root / "nodules.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def crossfit(tmp_path_factory):
    """A crop cache, its all-train split, and a 2-member cross-fitted model trained through the command line."""
    from cli import main

    tmp = tmp_path_factory.mktemp("crossfit")
    folder = _crop_folder(tmp / "nodules")
    runner = CliRunner()
    cache = tmp / "c.h5"
    assert runner.invoke(main, ["import-crops", str(folder), "--out", str(cache)]).exit_code == 0
    split = tmp / "all.csv"
    split.write_text("patient_id,split\n" + "".join(f"P-{i},train\n" for i in range(12)))
    out = tmp / "run"
    args = ["train-cls", "--cache", str(cache), "--split-file", str(split), "--preset", "nodule", "--members", "2",
            "--epochs", "2", "--width", "4", "--batch-size", "4", "--out", str(out)]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    return {"cache": cache, "split": split, "out": out, "args": args, "output": result.output}


def test_cross_fit_writes_a_calibrated_ensemble_with_a_hybrid(crossfit):
    out = crossfit["out"]
    assert "2 members; out-of-fold AUC" in crossfit["output"] and "hybrid fitted" in crossfit["output"]
    ckpt = load_checkpoint(out / "model.pt", kind="cls")
    model, _ = load_model(out / "model.pt", kind="cls")
    assert isinstance(model, malignancy.NoduleEnsemble) and len(model.members) == 2
    assert float(model.temperature) == pytest.approx(ckpt["val"]["temperature"]) and float(model.temperature) > 0
    assert tuple(ckpt["hybrid"]["features"]) == malignancy.HYBRID_FEATURES
    # Every training nodule has exactly one out-of-fold logit, from the member that did not train on it.
    folds = ckpt["cross_fit"]["folds"]
    assert sorted(folds) == sorted(f"P-{i}" for i in range(12)) and set(folds.values()) == {0, 1}
    ids = [r["id"] for r in ckpt["cross_fit"]["oof"]]
    assert len(ids) == len(set(ids)) == 16
    for j in (0, 1):
        split = dict(line.split(",") for line in (out / f"member{j}" / "split.csv").read_text().split()[1:])
        assert {p for p, s in split.items() if s == "val"} == {p for p, f in folds.items() if f == j}
    # The cache stores the features the hybrid reads.
    with Cache(crossfit["cache"]) as cache:
        f = malignancy.features_of(cache, "P-0_R_1")
        assert f.shape == (1, len(FEATURES)) and f[0, FEATURES.index("diameter_mm")] > 10


def test_cross_fit_refuses_to_overwrite_and_resumes_without_retraining(crossfit):
    from cli import main

    out = crossfit["out"]
    result = CliRunner().invoke(main, crossfit["args"])
    assert result.exit_code != 0 and "already holds a run" in result.output
    before = (out / "member0" / "last.pt").stat().st_mtime_ns
    result = CliRunner().invoke(main, crossfit["args"] + ["--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "member0" / "last.pt").stat().st_mtime_ns == before
    cfg = make_config("cls", "nodule", members=2, epochs=2, width=4, split_file=str(crossfit["split"]))
    with pytest.raises(TrainingError, match="already holds"):
        malignancy.train_cross_fit(cfg, crossfit["cache"], out)


def test_evaluate_reports_the_hybrid_and_the_network_with_calibration(crossfit, tmp_path):
    from cli import main

    result = CliRunner().invoke(main, ["evaluate", "--cache", str(crossfit["cache"]), "--cls",
                                       str(crossfit["out"] / "model.pt"), "--split", "all", "--out", str(tmp_path),
                                       "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    cls = json.loads((tmp_path / "evaluation.json").read_text())["classification"]
    assert cls["p_malignant"] == "hybrid" and cls["n"] == 12
    assert {"auc", "ci95", "calibration"} <= set(cls["network"]) and "brier" in cls["calibration"]
    assert all(0 <= i["p_malignant"] <= 1 and 0 <= i["p_network"] <= 1 for i in cls["items"])
    assert "network alone" in result.output and "Calibration" in result.output


def test_probabilities_fall_back_to_the_network_where_features_are_missing():
    net = malignancy.NoduleNet(width=2, n_aux=0).eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, len(malignancy.HYBRID_FEATURES)))
    from lungseg.logistic import LogisticRegression

    hybrid = LogisticRegression.fit(x, (x[:, 1] > 0).astype(int), features=malignancy.HYBRID_FEATURES)
    images, masks = rng.random((3, 8, 16, 16)), np.ones((3, 8, 16, 16))
    feats = np.abs(rng.normal(size=(3, len(FEATURES)))) + 1
    feats[1, 2] = np.nan
    p, q = malignancy.probabilities(net, images, masks, device=torch.device("cpu"), features=feats, hybrid=hybrid)
    assert p.shape == q.shape == (3,) and q[1] == p[1] and q[0] != p[0]
    p2, none = malignancy.probabilities(net, images, masks, device=torch.device("cpu"))
    assert none is None and np.allclose(p, p2)


def test_predict_feeds_the_findings_mask_to_a_two_channel_classifier(crossfit, tiny_trained, tmp_path):
    from lungseg import infer
    from lungseg.dicomio import find_series, read_series

    models = infer.Models.load(tiny_trained["seg"], crossfit["out"] / "model.pt", device="cpu")
    assert models.hybrid is not None
    series = find_series(tiny_trained["root"])[0]
    pred = infer.predict_volume(read_series(series.folder), models,
                                infer.PredictConfig(threshold=0.01, min_volume_mm3=1.0))
    for row in pred.nodules:
        assert 0 <= row["malignancy_probability"] <= 1 and 0 <= row["malignancy_probability_network"] <= 1

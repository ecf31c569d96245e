"""detect.py: blob candidates, their labels, suppression, finding masks, and the detector end to end on a tiny cache."""

import numpy as np
import pytest
import torch

from lungseg import detect, train
from lungseg.cache import Cache
from lungseg.configs import DetConfig, DetectConfig

SPACING = (3.0, 1.5, 1.5)


def _lung_with_sphere_and_vessel(shape=(30, 80, 80)):
    """Aerated lung (-850 HU) with a 12 mm sphere at (15, 25, 25) and a 4 mm vessel along z at (., 55, 55)."""
    z, y, x = np.indices(shape).astype(float)
    zz, yy, xx = z * SPACING[0], y * SPACING[1], x * SPACING[2]
    hu = np.full(shape, -850.0)
    hu[(zz - 45) ** 2 + (yy - 37.5) ** 2 + (xx - 37.5) ** 2 <= 6.0 ** 2] = 30.0
    hu[(yy - 82.5) ** 2 + (xx - 82.5) ** 2 <= 2.0 ** 2] = 40.0
    hu += np.random.default_rng(0).normal(0, 15, shape)
    return hu.astype(np.float32), np.ones(shape, bool)


def test_candidates_put_the_sphere_first_and_label_it():
    hu, lungs = _lung_with_sphere_and_vessel()
    cands = detect.candidates(hu, lungs, SPACING)
    assert len(cands) >= 2 and len(cands) <= DetectConfig().max_candidates
    first = cands.centres[0] * SPACING
    assert np.linalg.norm(first - [45, 37.5, 37.5]) <= 3.0
    assert 3.0 <= cands.radius_mm[0] <= 10.0
    on_vessel = np.linalg.norm(cands.centres[:, 1:] - [55, 55], axis=1) <= 1.5
    assert on_vessel.sum() >= 2                     # the vessel gives candidates too, ranked below the sphere
    ignored = cands.centres[on_vessel][0]
    label, which = detect.label_candidates(cands, SPACING, [((15, 25, 25), 12.0)], ignore=[(ignored, 2.0)])
    assert label[0] == 1 and which[0] == 0
    near = np.linalg.norm((cands.centres - ignored) * SPACING, axis=1) <= 1.0
    assert (label[near] == -1).all() and (label[~near & (label != 1)] == 0).all()


def test_blobness_tells_a_sphere_from_a_tube():
    hu, _ = _lung_with_sphere_and_vessel()
    smooth = detect._smooth(hu, SPACING, 3.2)
    sphere, tube = detect.blobness(smooth, SPACING, np.array([[15, 25, 25], [15, 55, 55]]))
    assert sphere > 0.6 and tube < 0.3


def test_candidates_outside_the_lungs_are_dropped():
    hu, lungs = _lung_with_sphere_and_vessel()
    lungs[:, :40] = False                           # the sphere's half of the volume
    cands = detect.candidates(hu, lungs, SPACING)
    assert (cands.centres[:, 1] >= 40).all()


def test_suppress_keeps_one_finding_per_structure():
    centres = np.array([[0.0, 0, 0], [0, 0, 4], [0, 0, 30]])
    kept = detect.suppress(centres, np.array([6.0, 2.0, 2.0]), np.array([0.9, 0.95, 0.5]))
    assert kept.tolist() == [1, 2]                  # 0 lies within its own 6 mm radius of the better 1


def test_finding_masks_take_the_component_nearest_the_centre_and_keep_earlier_voxels():
    probs = np.zeros((2, 8, 16, 16), np.float32)
    probs[0, 3:6, 7:10, 7:10] = 0.9                 # at the centre (4, 8, 8)
    probs[0, 0:2, 0:2, 0:2] = 0.9                   # a far component: not this finding's
    probs[1, 3:6, 5:10, 5:10] = 0.9                 # overlaps finding 0's voxels
    starts = np.array([[0, 0, 0], [0, 0, 0]])
    labels, kept = detect.finding_masks(probs, starts, (8, 16, 16), SPACING)
    assert kept == [0, 1]
    assert (labels[3:6, 7:10, 7:10] == 1).all() and not labels[0:2, 0:2, 0:2].any()
    assert (labels == 2).sum() == 3 * 25 - 27


def test_rescorer_learns_which_feature_tells_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(detect.CANDIDATE_FEATURES)))
    y = (x[:, 1] + 0.3 * rng.normal(size=400) < 0).astype(int)      # a low rank (feature 1) means nodule
    cols = detect.feature_columns(detect.RESCORE_FEATURES)
    r = detect.Rescorer.fit(x[:, cols], y)
    rank = detect.RESCORE_FEATURES.index("log_rank")
    assert r.weights[rank] < -1 and np.abs(np.delete(r.weights, rank)).max() < 0.5 * abs(r.weights[rank])
    again = detect.Rescorer.from_dict(r.to_dict())
    assert np.allclose(again(x), r(x)) and ((r(x) > 0.5) == y).mean() > 0.85     # called on all the features
    f = detect.candidate_features(np.array([0.5, 0.9]), np.array([100.0, 50.0]), np.array([3.0, 6.0]))
    assert f.shape == (2, 4) and f[0, 0] == 0 and f[1, 1] == np.log(2)


def test_a_rescorer_fitted_on_other_candidate_features_still_loads_and_reads_its_own():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, len(detect.CANDIDATE_FEATURES)))
    y = (x[:, 3] > 0).astype(int)                                       # the scale alone tells
    r = detect.Rescorer.fit(x[:, [0, 3]], y, features=["cnn_logit", "log_radius_mm"])
    again = detect.Rescorer.from_dict(r.to_dict())
    assert again.features == ("cnn_logit", "log_radius_mm") and np.allclose(again(x), r(x))
    assert ((again(x) > 0.5) == y).mean() > 0.95
    with pytest.raises(ValueError, match="unknown candidate features"):
        detect.Rescorer.from_dict({**r.to_dict(), "features": ["cnn_logit", "colour"]})


def test_candidate_net_gives_two_logits():
    net = detect.candidate_net(width=4)
    assert net(torch.zeros(3, 1, 16, 48, 48)).shape == (3, 2)


def test_the_detector_trains_sets_its_operating_point_and_predicts(tiny_trained, tmp_path):
    from lungseg import checkpoints, dicomio, evaluate, infer

    c = Cache(tiny_trained["cache"])
    g = c.scan(next(u for u in c.series_uids if c.scan(u).attrs["patient_id"] == "LIDC-IDRI-9001"))
    assert (g["candidates/label"][()] == 1).any()   # the phantom's 15 mm nodule is a candidate
    uid = str(g.attrs["series_uid"])
    rois, masks = c.candidate_rois(uid, masks=True)
    assert rois.shape == (len(g["candidates/label"]), *g["rois/image"].shape[1:]) and masks.shape == rois.shape
    hits = np.flatnonzero(g["candidates/label"][()] == 1)
    assert masks[hits].any(axis=(1, 2, 3)).all()       # a candidate on the nodule sees its mask
    one, one_mask = c.candidate_rois(uid, int(hits[0]), masks=True)   # one ROI, read alone, is the same
    np.testing.assert_array_equal(one, rois[hits[0]])
    np.testing.assert_array_equal(one_mask, masks[hits[0]])

    cfg = DetConfig(width=2, epochs=1, batch_size=4, max_batches=3, split_file=str(tiny_trained["split"]),
                    device="cpu", precision="fp32")
    summary = train.fit(cfg, tiny_trained["cache"], tmp_path / "det")
    ckpt_path = tmp_path / "det" / (("best.pt") if summary["best"] else "last.pt")
    op = detect.calibrate(ckpt_path, tiny_trained["cache"])
    assert 0 <= op["threshold"] <= 1 and op["target_fp_per_scan"] == 1.0
    saved = checkpoints.load_checkpoint(ckpt_path)
    assert saved["operating_point"] == op and saved["rescore"]["features"] == list(detect.RESCORE_FEATURES)

    report = evaluate.evaluate(tiny_trained["cache"], seg=tiny_trained["seg"], cls=None, det=ckpt_path,
                               out=tmp_path / "eval", split="all", n_bootstrap=10)
    froc = report["detection"]["froc"]
    assert froc["counts"]["n_relevant"] >= 1 and 0 <= froc["cpm"] <= 1
    assert "in_context" in report["detection"] and (tmp_path / "eval" / "froc.png").exists()

    models = infer.Models.load(tiny_trained["seg"], tiny_trained["cls"], "cpu", det_path=ckpt_path)
    volume = dicomio.read_series(tiny_trained["root"] / "LIDC-IDRI-9001")
    pred = infer.predict_volume(volume, models, infer.PredictConfig(det_threshold=0.0))
    p = [n["nodule_probability"] for n in pred.nodules]
    assert p == sorted(p, reverse=True)
    assert all(n["lung_side"] in ("left", "right") for n in pred.nodules)
    assert {"candidates_s", "fp_reduction_s", "segment_s"} <= set(pred.timings)
    import dataclasses

    solid = np.full(volume.shape, -1000, np.int16)
    solid[:, 20:70, 20:70] = 40                                                     # a body without lungs
    solid = dataclasses.replace(volume, hu=solid)                                   # no lungs, no candidates
    assert infer.predict_volume(solid, models, infer.PredictConfig(det_threshold=0.0)).nodules == []


def test_a_segmenter_trains_on_candidate_rois(tiny_trained, tmp_path):
    from lungseg.configs import make_config
    from lungseg.datasets import CandidateSegDataset

    c = Cache(tiny_trained["cache"])
    train_ds = CandidateSegDataset(c, c.series_uids, augment=True)
    assert len(train_ds) > 0 and set(train_ds.labels.tolist()) == {1}     # nodules only, seen from candidates too
    groups = {item[0] for item in train_ds.items}
    assert groups == {"candidates", "rois"}
    for k in range(len(train_ds)):
        image, mask = train_ds[k]
        assert image.shape == mask.shape and mask.sum() > 0
    cfg = make_config("seg", "context", widths=(2, 4, 8), epochs=1, max_batches=2, batch_size=2,
                      split_file=str(tiny_trained["split"]), device="cpu", precision="fp32")
    assert cfg.patches == "candidate"
    summary = train.fit(cfg, tiny_trained["cache"], tmp_path / "seg")
    assert summary["epochs_run"] == 1


def test_train_det_command_prints_its_operating_point(tiny_trained, tmp_path):
    from click.testing import CliRunner

    from cli import main

    out = tmp_path / "det"
    result = CliRunner().invoke(main, ["train-det", "--cache", str(tiny_trained["cache"]), "--out", str(out),
                                       "--split-file", str(tiny_trained["split"]), "--epochs", "1",
                                       "--max-batches", "2", "--batch-size", "4", "--width", "2",
                                       "--device", "cpu", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert "operating point: p(nodule) >=" in result.output
    result = CliRunner().invoke(main, ["predict", str(tiny_trained["root"] / "LIDC-IDRI-9001"), "--seg",
                                       str(tiny_trained["seg"]), "--cls", str(tiny_trained["cls"]), "--det",
                                       str(out / "last.pt"), "--det-threshold", "2", "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "det-threshold" in result.output


def test_preprocess_can_leave_the_candidates_out(tiny_lidc, tmp_path):
    from lungseg import lidc
    from lungseg.errors import CacheError
    from lungseg.preprocess import PreprocessConfig, preprocess_dataset, select_scans

    root, db_path = tiny_lidc
    cfg = PreprocessConfig(subcase_shape=(16, 64, 64), roi_shape=(8, 16, 16), candidates=False)
    with lidc.LidcDatabase(db_path) as db:
        results = list(preprocess_dataset(select_scans(root, db, ["LIDC-IDRI-9001"]), tmp_path / "c.h5", db, cfg))
    assert [r.status for r in results] == ["done"]
    c = Cache(tmp_path / "c.h5")
    assert "candidates" not in c.scan(c.series_uids[0])
    with pytest.raises(CacheError, match="no detector candidates"):
        c.candidates(c.series_uids[0])

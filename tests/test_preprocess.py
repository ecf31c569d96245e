"""preprocess.py: resampling, windowing, lung mask, cutting, and whole runs on a phantom LIDC."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_CASES, TINY_SHAPE, TINY_SPACING, phantom

from lungseg import cache, lidc
from lungseg.preprocess import (
    Crops,
    PreprocessConfig,
    crop,
    lung_mask,
    preprocess_dataset,
    preprocess_scan,
    resample,
    resampled_shape,
    select_scans,
    subcase_starts,
    window,
)

TINY_CFG = PreprocessConfig(subcase_shape=(16, 64, 64), roi_shape=(8, 16, 16))


def test_defaults_are_paper_a():
    cfg = PreprocessConfig()
    assert cfg.spacing == (3.0, 1.5, 1.5)
    assert cfg.window == (-1000.0, 400.0)
    assert cfg.subcase_shape == (48, 192, 192)
    assert cfg.roi_shape == (16, 48, 48)
    assert cfg.min_readers == 3 and cfg.mask_readers == 3


@pytest.mark.parametrize("bad", [dict(spacing=(0, 1, 1)), dict(window=(400, -1000)),
                                 dict(roi_shape=(0, 48, 48)), dict(mask_readers=5)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError):
        PreprocessConfig(**bad)


def test_resample_keeps_voxel_zero_and_is_exact_on_a_linear_ramp():
    spacing, new = (2.5, 0.7, 0.7), (3.0, 1.5, 1.5)
    z, y, x = np.indices((20, 30, 31), dtype=float)
    ramp = 2.5 * z + 0.7 * y - 0.7 * x            # a linear function of world position
    out = resample(ramp, spacing, new)
    assert out.shape == resampled_shape(ramp.shape, spacing, new) == (16, 14, 15)
    zz, yy, xx = np.indices(out.shape, dtype=float)
    np.testing.assert_allclose(out, 3.0 * zz + 1.5 * yy - 1.5 * xx, atol=1e-4)
    # The last new voxel stays inside the old grid.
    assert (out.shape[0] - 1) * 3.0 <= (20 - 1) * 2.5


@pytest.mark.parametrize("new", [(3.0, 1.5, 1.5), (1.0, 0.4, 0.9), (0.5, 2.0, 0.7)])
def test_resample_equals_scipy_affine_transform(new):
    from scipy import ndimage

    rng = np.random.default_rng(0)
    spacing = (2.5, 0.7, 1.1)
    hu = rng.integers(-1000, 400, (9, 17, 13)).astype(np.int16)
    labels = rng.integers(0, 4, (9, 17, 13)).astype(np.uint8)
    shape = resampled_shape(hu.shape, spacing, new)
    ratio = np.asarray(new) / np.asarray(spacing)
    linear = ndimage.affine_transform(hu.astype(np.float32), ratio, output_shape=shape, order=1, mode="nearest",
                                      prefilter=False)
    nearest = ndimage.affine_transform(labels, ratio, output_shape=shape, order=0, mode="nearest", prefilter=False)
    np.testing.assert_allclose(resample(hu, spacing, new), linear, atol=1e-3)
    out = resample(labels, spacing, new, order=0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, nearest)


def test_window_maps_the_lung_window_to_unit_range():
    hu = np.array([-2000, -1000, -300, 400, 3000])
    np.testing.assert_allclose(window(hu), [0, 0, 0.5, 1, 1])


def test_crop_pads_outside_the_array():
    a = np.arange(27).reshape(3, 3, 3)
    out = crop(a, (-1, 1, 2), (3, 3, 3), fill=-7)
    assert out.shape == (3, 3, 3)
    assert (out[0] == -7).all()
    np.testing.assert_array_equal(out[1:, :2, :1], a[:2, 1:, 2:])
    assert (crop(a, (10, 10, 10), (2, 2, 2)) == 0).all()


def test_lung_mask_keeps_lungs_drops_air_table_and_body():
    nodule = (12, 46, 18, 5, 30)               # touching the outer wall of the left lung
    hu = phantom(0, [nodule])
    mask = lung_mask(hu, TINY_SPACING)
    z, r, c = np.indices(TINY_SHAPE)
    assert not mask[hu < -950].any() or mask[hu < -950].mean() < 0.01     # outside air
    assert not mask[:, 90:93].any()                                        # table
    assert not mask[:, 46, 48].any()                                       # mediastinum
    lungs = (((r - 46) / 22) ** 2 + ((c - 28) / 14) ** 2 <= 0.8) | (((r - 46) / 22) ** 2 + ((c - 68) / 14) ** 2 <= 0.8)
    assert mask[lungs].mean() > 0.99
    assert mask[:, 46, 28].all()                                           # vessel hole filled
    in_nodule = (((z - 12) * 2.5 / 1.5) ** 2 + (r - 46) ** 2 + (c - 18) ** 2 <= 16)
    assert mask[in_nodule].mean() > 0.95                                   # juxta-pleural nodule stays in
    volume_ml = mask.sum() * np.prod(TINY_SPACING) / 1000
    assert 200 < volume_ml < 330


def test_lung_mask_leaves_out_large_tissue_ringed_by_lung():
    hu = phantom(0)
    z, r, c = np.indices(TINY_SHAPE)
    lung = ((r - 46) / 35) ** 2 + ((c - 48) / 35) ** 2 <= 1
    hu[lung] = -850
    dome = ((r - 46) ** 2 + (c - 48) ** 2 <= 22 ** 2)                      # ~3400 mm2 per slice
    hu[dome] = 50
    mask = lung_mask(hu, TINY_SPACING, max_hole_mm2=2500)
    assert mask[lung & ~dome].mean() > 0.99
    assert mask[:, 46, 48].sum() == 0


def test_subcases_cover_the_lungs():
    lung = np.zeros((100, 120, 130), bool)
    lung[7:95, 20:100, 15:118] = True
    starts = subcase_starts(lung, (48, 64, 64))
    assert len(starts) == 2
    covered = np.zeros(100, bool)
    for s in starts:
        covered[max(s[0], 0): s[0] + 48] = True
    assert covered[7:95].all()
    assert all(s[1:] == starts[0][1:] for s in starts)
    assert starts[0][1] == round((20 + 100 - 64) / 2)


@pytest.fixture(scope="module")
def tiny_db(tiny_lidc):
    with lidc.LidcDatabase(tiny_lidc[1]) as db:
        yield db


def test_preprocess_scan_finds_labels_and_masks_the_nodules(tiny_lidc, tiny_db):
    root, _ = tiny_lidc
    scan = tiny_db.scan(patient_id="LIDC-IDRI-9001")
    rec = preprocess_scan(lidc.find_scan_folder(root, scan), scan, tiny_db.annotations(scan.id), TINY_CFG)
    a = rec.arrays
    assert rec.attrs["n_nodules"] == 1
    assert a["nodules/label"].tolist() == [lidc.MALIGNANT]
    assert a["nodules/n_readers"].tolist() == [3]
    assert a["nodules/ratings"][0, 3].tolist() == [-1] * 9 and a["nodules/ratings"][0, :3, 8].tolist() == [4, 5, 5]
    # A 15 mm sphere of 30 HU: the consensus mask measures close to it.
    assert 13 < a["nodules/diameter_mm"][0] < 19
    assert a["nodules/size_category"][0] == cache.size_category(float(a["nodules/diameter_mm"][0]))
    assert a["nodules/mean_hu"][0] > -300
    np.testing.assert_allclose(a["nodules/centroid_voxel"][0], [12, 46, 18], atol=0.6)
    assert a["subcases/image"].shape[1:] == (16, 64, 64) and a["subcases/image"].dtype == np.float16
    assert 0 <= a["subcases/image"].min() and a["subcases/image"].max() <= 1
    # Every nodule voxel of the resampled grid lies in some sub-case, and inside the lung mask there.
    assert a["subcases/mask"].sum() > 0
    assert (a["subcases/lung"][a["subcases/mask"] > 0] == 1).all()
    # The ROI is centred on the nodule.
    roi = a["rois/mask"][0]
    assert roi.shape == (8, 16, 16) and roi.sum() > 0
    centre = np.argwhere(roi).mean(axis=0)
    np.testing.assert_allclose(centre, (np.array(roi.shape) - 1) / 2, atol=1.0)


def test_preprocess_refuses_a_series_that_does_not_match_its_record(tiny_lidc, tiny_db, tmp_path):
    import shutil

    root, _ = tiny_lidc
    scan = tiny_db.scan(patient_id="LIDC-IDRI-9003")
    folder = tmp_path / "copy"
    shutil.copytree(lidc.find_scan_folder(root, scan), folder)
    (folder / "000024.dcm").unlink()                    # the last slice: no gap shows it
    with pytest.raises(lidc.LidcError, match="23 slices but the LIDC record"):
        preprocess_scan(folder, scan, tiny_db.annotations(scan.id), TINY_CFG)


def test_dataset_run_resumes_and_reports_failures(tiny_lidc, tiny_db, tmp_path):
    import shutil

    root, _ = tiny_lidc
    broken_root = tmp_path / "lidc"
    shutil.copytree(root, broken_root)
    scan3 = tiny_db.scan(patient_id="LIDC-IDRI-9003")
    (lidc.find_scan_folder(broken_root, scan3) / "000012.dcm").unlink()     # a missing slice
    out = tmp_path / "c.h5"
    jobs = select_scans(broken_root, tiny_db)
    assert [j.record.patient_id for j in jobs] == list(TINY_CASES)
    results = list(preprocess_dataset(jobs, out, tiny_db, TINY_CFG))
    assert [r.status for r in results] == ["done", "done", "failed"]
    assert "missing slice" in results[2].message
    again = list(preprocess_dataset(jobs, out, tiny_db, TINY_CFG, workers=2))
    assert [r.status for r in again] == ["skipped", "skipped", "failed"]
    with cache.Cache(out) as c:
        summary = c.summary()
    assert summary["n_scans"] == 2 and summary["n_nodules"] == 2
    assert summary["nodules_by_label"] == {"benign": 1, "malignant": 1, "excluded": 0}


def test_workers_give_the_same_cache(tiny_lidc, tiny_db, tmp_path):
    root, _ = tiny_lidc
    jobs = select_scans(root, tiny_db, ["LIDC-IDRI-9001", "LIDC-IDRI-9002"])
    for name, workers in (("one.h5", 1), ("two.h5", 2)):
        assert [r.status for r in preprocess_dataset(jobs, tmp_path / name, tiny_db, TINY_CFG,
                                                     workers=workers)] == ["done", "done"]
    with cache.Cache(tmp_path / "one.h5") as a, cache.Cache(tmp_path / "two.h5") as b:
        assert a.series_uids == b.series_uids
        for uid in a.series_uids:
            np.testing.assert_array_equal(a.scan(uid)["subcases/image"][()], b.scan(uid)["subcases/image"][()])


@pytest.mark.slow
def test_real_lidc_0001_preprocess_and_info(shared_data, tmp_path):
    """The foundation's acceptance check on the real scan, through the command line."""
    from cli import main

    out = tmp_path / "c.h5"
    runner = CliRunner()
    result = runner.invoke(main, ["preprocess", "--lidc-root", str(shared_data / "lidc"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["n_scans"] == 1
    scan = info["scans"][0]
    assert 2500 < scan["lung_volume_ml"] < 8000
    assert len(scan["nodules"]) == 1
    nodule = scan["nodules"][0]
    assert 20 <= nodule["diameter_mm"] <= 35
    assert nodule["n_readers"] == 4
    assert nodule["mean_hu"] > -300
    assert nodule["label"] == "malignant"
    assert scan["n_subcases"] == 2                       # paper A: two sub-cases per scan
    # A rerun skips the finished scan.
    result = runner.invoke(main, ["preprocess", "--lidc-root", str(shared_data / "lidc"), "--out", str(out)])
    assert "0 scans written, 1 already cached" in result.output


def test_candidates_come_from_the_lungs_predict_sees_not_from_the_known_masks():
    """A nodule the lung mask misses (in an island of air in the chest wall) gets no candidate, though the cache's
    lung mask includes the known nodules' masks; a nodule in the lung gets one."""
    from dataclasses import replace

    from conftest import tiny_luna_volume

    from lungseg import lidc
    from lungseg.preprocess import measure_nodule, scan_lungs, scan_record

    volume = tiny_luna_volume(nodules=[(12, 46, 68, 4, 30)])
    hu = volume.hu.copy()
    z, r, c = np.indices(hu.shape)
    ball = lambda rad: ((z - 12) * 2.5 / 1.5) ** 2 + (r - 14) ** 2 + (c - 48) ** 2 <= rad ** 2   # noqa: E731
    hu[ball(6)] = -850                                                          # an island of air ...
    hu[ball(3)] = 30                                                            # ... holding a nodule
    volume = replace(volume, hu=hu)
    masks, rows = [], []
    for i, inside in enumerate([((z - 12) * 2.5 / 1.5) ** 2 + (r - 46) ** 2 + (c - 68) ** 2 <= 16, ball(3)]):
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(inside))
        masks.append((inside[box], box))
        rows.append({"index": i + 1, "n_readers": 4, "ratings": np.full((4, len(lidc.CHARACTERISTICS)), 3, np.int8),
                     "ratings_majority": np.full(len(lidc.CHARACTERISTICS), 3, np.int8),
                     "annotation_ids": np.full(4, -1, np.int32), "malignancy_median": 3.0, "label": -1,
                     "long_axis_mm": float("nan"), **measure_nodule(inside[box], box, volume)})
    record = scan_record(volume, masks, rows, TINY_CFG, {"patient_id": "P", "study_uid": "1", "series_uid": "2",
                                                          "source": "test", "kind": "composite"})
    a = record.arrays
    hit = set(a["candidates/nodule"][a["candidates/label"] == 1].tolist())
    assert hit == {0}                                                           # the lung nodule only
    island = np.round(np.asarray(a["nodules/centroid_resampled"][1])).astype(int)
    hu_r = resample(volume.hu, volume.spacing, TINY_CFG.spacing,
                    shape=resampled_shape(volume.shape, volume.spacing, TINY_CFG.spacing))
    assert not scan_lungs(hu_r, TINY_CFG)[tuple(island)]                        # predict's lungs miss it


def test_crops_cut_the_rois_when_indexed_as_crop_does():
    rng = np.random.default_rng(0)
    array = rng.random((6, 9, 9)).astype(np.float32)
    starts = np.array([[0, 0, 0], [-2, 3, 7], [4, 8, -1]])
    rois = Crops(array, starts, (3, 4, 4))
    expected = np.stack([crop(array, s, (3, 4, 4)) for s in starts])
    assert len(rois) == 3 and rois.shape == (3, 3, 4, 4)
    np.testing.assert_array_equal(rois[:], expected)
    np.testing.assert_array_equal(rois[1], expected[1])
    np.testing.assert_array_equal(rois[np.array([2, 0])], expected[[2, 0]])
    assert rois[np.zeros(0, int)].shape == (0, 3, 4, 4)
    assert Crops(array, np.zeros((0, 3)), (3, 4, 4))[:].shape == (0, 3, 4, 4)


def test_near_zero_is_scipys_distance_transform_thresholded():
    from scipy import ndimage

    from lungseg.preprocess import _near_zero

    rng = np.random.default_rng(1)
    for trial in range(60):
        shape = tuple(int(n) for n in rng.integers(3, 30, 3))
        array = ndimage.gaussian_filter(rng.random(shape), 1.5) > rng.uniform(0.4, 0.6)
        array.flat[rng.integers(array.size)] = False             # a zero somewhere (scipy's is undefined without)
        spacing = [(3.0, 1.5, 1.5), tuple(rng.uniform(0.3, 3.5, 3)), tuple(np.round(rng.uniform(0.3, 3.5, 3), 1))
                   ][trial % 3]
        radius = float(rng.uniform(0.5, 12)) if trial % 4 else 1.5 * int(rng.integers(1, 8))   # ties on the grid
        expected = ndimage.distance_transform_edt(array, sampling=spacing) <= radius
        np.testing.assert_array_equal(_near_zero(array, radius, spacing, slices=4), expected)

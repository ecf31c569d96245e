"""infer.py: whole-scan prediction, the report and its masks, resume over a tree, bad input."""

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from lungseg import checkpoints, dicomio, infer
from lungseg.errors import DicomError, LungsegError

from conftest import requires_bundle, stand_in_models


@pytest.fixture
def models():
    return stand_in_models()


@pytest.fixture
def volume(tiny_lidc):
    root, _ = tiny_lidc
    return dicomio.read_series(root / "LIDC-IDRI-9001")


def test_predict_volume_finds_the_nodule_inside_the_lungs(volume, models):
    pred = infer.predict_volume(volume, models)
    assert pred.labels.shape == volume.shape and pred.lungs.shape == volume.shape
    # The phantom's juxta-pleural 15 mm nodule at voxel (12, 46, 18); the vessel at (., 46, 28) runs
    # through all slices. Body soft tissue outside the lungs is dropped.
    found = [n for n in pred.nodules if np.allclose(n["centroid_voxel_zyx"], [12, 46, 18], atol=1.5)]
    assert len(found) == 1
    n = found[0]
    assert 12 < n["diameter_mm"] < 19 and n["size_category"] == "nodule"
    assert n["mean_hu"] > -100 and 0 < n["segmentation_confidence"] <= 1
    assert n["malignancy_probability"] == pytest.approx(1 / (1 + np.exp(-1)), abs=1e-3)
    assert n["long_axis_mm"] >= n["diameter_mm"] * 0.9
    for other in pred.nodules:
        z, y, x = (int(round(v)) for v in other["centroid_voxel_zyx"])
        assert pred.lungs[z, y, x] or (pred.labels == other["id"]).sum() > 0
    assert not pred.labels[:, 90:93].any()                        # the table is not a nodule


def test_report_fields_and_masks_overlay_the_source(volume, models, tmp_path):
    pred = infer.predict_volume(volume, models)
    done = infer.write_report(tmp_path / "r", volume, pred, checkpoints=models.checkpoints,
                              settings=infer.report_settings(models, infer.PredictConfig()))
    report = json.loads(done.read_text())
    for key in ("lungseg_version", "series_uid", "checkpoints", "timings_s", "disclaimer", "frames", "nodules"):
        assert key in report
    assert report["n_nodules"] == len(pred.nodules) > 0
    fields = {"id", "centroid_voxel_zyx", "centroid_world_lps_mm", "long_axis_mm", "diameter_mm", "volume_mm3",
              "mean_hu", "size_category", "malignancy_probability", "segmentation_confidence"}
    assert all(fields <= set(n) for n in report["nodules"])
    rows = list(csv.DictReader(open(tmp_path / "r" / "nodules.csv")))
    assert len(rows) == report["n_nodules"] and float(rows[0]["diameter_mm"]) == report["nodules"][0]["diameter_mm"]
    assert len(list((tmp_path / "r").glob("nodule_*.png"))) == report["n_nodules"]
    # Round trip: the mask's voxels, through the NIfTI's RAS affine, land where the report says (LPS).
    image = nib.load(tmp_path / "r" / "nodules.nii.gz")
    labels = np.asarray(image.dataobj)                             # (x, y, z)
    for n in report["nodules"]:
        ijk = np.argwhere(labels == n["id"]).mean(axis=0)
        ras = image.affine @ np.r_[ijk, 1.0]
        lps = ras[:3] * [-1, -1, 1]
        np.testing.assert_allclose(lps, n["centroid_world_lps_mm"], atol=0.02)
        np.testing.assert_allclose(ijk[::-1], n["centroid_voxel_zyx"], atol=0.01)
    lungs = nib.load(tmp_path / "r" / "lungs.nii.gz")
    np.testing.assert_allclose(lungs.affine, image.affine)
    assert lungs.header.get_qform(coded=True)[1] == 1 and lungs.header.get_sform(coded=True)[1] == 1


def test_report_has_an_overview_and_html_and_drops_stale_figures(volume, models, tmp_path):
    pred = infer.predict_volume(volume, models)
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "nodule_099.png").write_bytes(b"from an earlier run")
    infer.write_report(folder, volume, pred, checkpoints=models.checkpoints,
                       settings=infer.report_settings(models, infer.PredictConfig()))
    assert not (folder / "nodule_099.png").exists()
    assert (folder / "overview.png").stat().st_size > 1000
    page = (folder / "report.html").read_text()
    assert page.count("<tr><td>") == len(pred.nodules) > 0


@requires_bundle
def test_checkpoint_paths_default_to_the_bundled_models(tmp_path):
    from lungseg import models

    seg, cls, det = infer.checkpoint_paths()
    assert (seg, cls, det) == (models.default("seg"), models.default("cls"), models.default("det"))
    own = tmp_path / "seg.pt"
    assert infer.checkpoint_paths(seg=own) == (own, models.default("cls"), None)      # paper A's path
    assert infer.checkpoint_paths(seg=own, det=tmp_path / "d.pt")[2] == tmp_path / "d.pt"
    assert infer.checkpoint_paths(det=tmp_path / "d.pt")[:2] == (models.default("seg"), models.default("cls"))


def test_nifti_input_gives_the_same_nodules(volume, models, tmp_path):
    path = tmp_path / "scan.nii.gz"
    dicomio.write_nifti(volume.hu, volume, path, dtype=np.int16)
    again = dicomio.read_nifti_volume(path)
    a = infer.predict_volume(volume, models).nodules
    b = infer.predict_volume(again, models).nodules
    assert [n["centroid_world_lps_mm"] for n in a] == [n["centroid_world_lps_mm"] for n in b]


def test_predict_over_a_tree_resumes_and_reports_failures(tiny_trained, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(tiny_trained["root"], root)
    out = tmp_path / "out"
    runs = list(infer.predict(root, tiny_trained["seg"], tiny_trained["cls"], out))
    assert [s for _, s, _ in runs] == ["done"] * 3
    assert all((out / job.name / "nodules.json").is_file() for job, _, _ in runs)
    again = list(infer.predict(root, tiny_trained["seg"], tiny_trained["cls"], out))
    assert [s for _, s, _ in again] == ["skipped"] * 3
    (out / runs[1][0].name / "nodules.json").unlink()              # a report left half done
    broken = runs[2][0].path
    sorted(broken.iterdir())[5].unlink()                            # a missing slice in another series
    third = list(infer.predict(root, tiny_trained["seg"], tiny_trained["cls"], out))
    assert [s for _, s, _ in third] == ["skipped", "done", "failed"]    # its input changed: read again
    assert "missing slice" in third[2][2] and not (out / runs[2][0].name / "nodules.json").exists()
    report = json.loads((out / runs[0][0].name / "nodules.json").read_text())
    assert report["checkpoints"]["seg"]["sha256"] == checkpoints.sha256(tiny_trained["seg"])


def test_bad_input_is_refused_in_one_line(tiny_trained, tmp_path):
    from cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LungsegError, match="no CT series"):
        infer.find_inputs(empty)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(LungsegError, match="expected a DICOM folder or a .nii"):
        infer.find_inputs(tmp_path / "notes.txt")
    mri = tmp_path / "mri.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 300, np.int16), np.eye(4)), mri)
    with pytest.raises(DicomError, match="do not look like Hounsfield"):
        dicomio.read_nifti_volume(mri)
    result = CliRunner().invoke(main, ["predict", str(empty), "--seg", str(tiny_trained["seg"]),
                                       "--cls", str(tiny_trained["cls"]), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "no CT series" in result.output
    swapped = CliRunner().invoke(main, ["predict", str(tiny_trained["root"]), "--seg", str(tiny_trained["cls"]),
                                        "--cls", str(tiny_trained["seg"]), "--out", str(tmp_path / "o")])
    assert swapped.exit_code == 1 and "expected a seg checkpoint" in swapped.output


def test_a_series_without_its_rescale_fails_alone_in_one_line(tiny_trained, tmp_path):
    """Stored values read as HU (no RescaleIntercept) would give a report of nothing: refused, the others go on."""
    import pydicom

    from cli import main

    root = tmp_path / "tree"
    shutil.copytree(tiny_trained["root"], root)
    raw = sorted(p for p in root.iterdir() if p.is_dir())[0]
    for f in (p for p in raw.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f)
        for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(f)
    result = CliRunner().invoke(main, ["predict", str(root), "--seg", str(tiny_trained["seg"]),
                                       "--cls", str(tiny_trained["cls"]), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and str(raw) in failed[0] and "do not look like chest CT Hounsfield units" in failed[0]
    assert result.output.count("done: ") == 2 and "1 series failed" in result.output


def test_two_inputs_never_share_a_report(volume, models, tmp_path):
    """scan.v1.nii.gz beside scan.v2.nii.gz, and an edited copy of a series (same UIDs): each gets its own report."""
    v1, v2 = tmp_path / "in" / "scan.v1.nii.gz", tmp_path / "in" / "scan.v2.nii.gz"
    v1.parent.mkdir()
    dicomio.write_nifti(volume.hu, volume, v1, dtype=np.int16)
    edited = volume.hu.copy()
    edited[volume.hu > -500] = 0                                       # soft tissue flattened
    dicomio.write_nifti(edited, volume, v2, dtype=np.int16)
    jobs = [infer.find_inputs(v)[0] for v in (v1, v2)]
    assert [j.name for j in jobs] == ["scan.v1", "scan.v2"]
    out = tmp_path / "out"
    settings = {"checkpoints": {}, "settings": {}}
    first = list(infer.report_each(jobs, out, lambda v: infer.predict_volume(v, models), **settings))
    assert [s for _, s, _ in first] == ["done", "done"]
    # The same name for another input (scan.v1 overwritten by v2's data): predicted again, not "skipped".
    shutil.copy(v2, v1)
    again = list(infer.report_each(jobs, out, lambda v: infer.predict_volume(v, models), **settings))
    assert [s for _, s, _ in again] == ["done", "skipped"]
    a, b = (json.loads((out / n / "nodules.json").read_text()) for n in ("scan.v1", "scan.v2"))
    assert a["input_sha256"] == b["input_sha256"] and a["n_nodules"] == b["n_nodules"]


def test_an_edited_copy_of_a_series_gets_its_own_report_folder(tiny_trained, tmp_path):
    root = tmp_path / "tree"
    series = sorted(p for p in tiny_trained["root"].iterdir() if p.is_dir())[0]
    shutil.copytree(series, root / "original")
    shutil.copytree(series, root / "edited")
    jobs = infer.find_inputs(root)
    assert len(jobs) == 2 and jobs[0].series_uid == jobs[1].series_uid
    assert sorted(j.name for j in jobs) == sorted([jobs[0].series_uid, jobs[0].series_uid + "-2"])


def test_a_tree_with_an_unreadable_file_and_linked_series(tiny_trained, tmp_path):
    """One broken series fails alone; series behind symbolic links are found, a link loop ends."""
    root = tmp_path / "tree"
    root.mkdir()
    store = tmp_path / "store"
    shutil.copytree(tiny_trained["root"], store)
    series = sorted(p for p in store.iterdir() if p.is_dir())
    (root / "a").symlink_to(series[0], target_is_directory=True)
    (root / "b").symlink_to(series[1], target_is_directory=True)
    (root / "b" / "loop").symlink_to(root, target_is_directory=True)
    broken = root / "broken"
    shutil.copytree(series[2], broken)
    victim = sorted(p for p in broken.rglob("*") if p.is_file())[3]
    victim.rename(victim.with_name("slice.dcm"))
    victim.with_name("slice.dcm").write_bytes(b"not dicom at all")
    jobs = infer.find_inputs(root)
    assert len(jobs) == 3 and sum(j.problem is not None for j in jobs) == 1
    assert "slice.dcm: not a readable DICOM file" in next(j.problem for j in jobs if j.problem)
    runs = list(infer.predict(root, tiny_trained["seg"], tiny_trained["cls"], tmp_path / "out"))
    assert sorted(s for _, s, _ in runs) == ["done", "done", "failed"]


def test_a_coronal_series_gets_the_axial_findings_on_its_own_grid(volume, models, tmp_path):
    from conftest import coronal_of

    coronal = coronal_of(volume)
    axial_pred = infer.predict_volume(volume, models)
    pred = infer.predict_volume(coronal, models)
    assert len(pred.nodules) == len(axial_pred.nodules) >= 1
    _, ro = dicomio.reorient_to_axial(coronal)
    np.testing.assert_array_equal(pred.labels, ro.to_source(axial_pred.labels))
    assert pred.labels.shape == coronal.shape and pred.lungs.shape == coronal.shape
    for a, c in zip(axial_pred.nodules, pred.nodules):
        assert c["centroid_world_lps_mm"] == a["centroid_world_lps_mm"] and c["diameter_mm"] == a["diameter_mm"]
        np.testing.assert_allclose(coronal.voxel_to_world(c["centroid_voxel_zyx"]), c["centroid_world_lps_mm"],
                                   atol=0.02)
    report = infer.write_report(tmp_path / "r", coronal, pred, checkpoints={}, settings={})
    mask, _ = dicomio.read_nifti_mask(report.parent / "nodules.nii.gz")
    np.testing.assert_array_equal(mask, pred.labels)                    # the NIfTI overlays the coronal source
    assert (report.parent / "overview.png").is_file() and (report.parent / "nodule_001.png").is_file()


@pytest.mark.slow
@requires_bundle
def test_a_coronal_reformat_of_lidc_idri_0001_gives_the_same_finding(shared_data):
    from conftest import coronal_of

    patient = shared_data / "lidc" / "LIDC-IDRI-0001"
    if not patient.is_dir():
        pytest.skip(f"{patient} not found")
    volume = dicomio.read_series(patient)
    models = infer.Models.load(*infer.checkpoint_paths()[:2], "cpu", det_path=infer.checkpoint_paths()[2])
    axial, coronal = (infer.predict_volume(v, models).nodules for v in (volume, coronal_of(volume)))
    assert len(coronal) == len(axial) >= 1
    assert [n["centroid_world_lps_mm"] for n in coronal] == [n["centroid_world_lps_mm"] for n in axial]

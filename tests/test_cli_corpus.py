"""cli.py against a corpus of bad and odd inputs made from the tiny LIDC twin (and LIDC-IDRI-0001 when present).

Each case is what a user might hand ``lungseg``; each must give either a correct result or a one-line error
(``Error: ...``, or one ``failed: ...`` line per series that could not be read), never a traceback.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from conftest import coronal_of

from cli import main
from lungseg import cache, dicomio

PREDICT_ERRORS = {
    # name: (how the input is made from the axial volume, what the error says)
    "slices 50 mm apart": (lambda v: replace(v, spacing=(50.0, *v.spacing[1:])), "slices 50 mm apart"),
    "a 1e-9 mm voxel": (lambda v: replace(v, spacing=(v.spacing[0], 1e-9, 1e-9)), "pixels of 1e-09"),
    "two slices": (lambda v: replace(v, hu=v.hu[:2], slice_positions=v.slice_positions[:2]), "2 slices"),
    "stored values without the rescale": (lambda v: replace(v, hu=(v.hu + 1024).astype(np.int16)),
                                          "Hounsfield"),
    "halved HU": (lambda v: replace(v, hu=(v.hu // 2).astype(np.int16)), "Hounsfield"),
    "an oblique grid": (lambda v: replace(v, direction=_tilt(v.direction, 40)), "oblique orientation"),
}


def _tilt(direction: np.ndarray, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return about_z @ direction


@pytest.fixture(scope="module")
def axial(tiny_trained):
    return dicomio.read_series(tiny_trained["root"] / "LIDC-IDRI-9001")


def predict(tiny_trained, source, out) -> "click.testing.Result":   # noqa: F821
    return CliRunner().invoke(main, ["predict", str(source), "--seg", str(tiny_trained["seg"]), "--cls",
                                     str(tiny_trained["cls"]), "--out", str(out)])


def assert_one_line_error(result, says: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output      # not an uncaught error
    errors = [line for line in result.output.splitlines() if line.startswith(("Error:", "failed:"))]
    assert errors and any(says in line for line in errors), result.output


@pytest.mark.parametrize("name", sorted(PREDICT_ERRORS))
def test_unsupported_volumes_are_refused_in_one_line(name, axial, tiny_trained, tmp_path):
    make, says = PREDICT_ERRORS[name]
    volume = make(axial)
    path = tmp_path / "scan.nii.gz"
    dicomio.write_nifti(volume.hu, volume, path, dtype=np.int16)
    assert_one_line_error(predict(tiny_trained, path, tmp_path / "out"), says)


def test_nan_voxels_are_refused_in_one_line(axial, tiny_trained, tmp_path):
    data = axial.hu.astype(np.float32)
    data[5, 40, 40] = np.nan
    path = tmp_path / "scan.nii.gz"
    dicomio.write_nifti(data, axial, path, dtype=np.float32)
    assert_one_line_error(predict(tiny_trained, path, tmp_path / "out"), "not finite")


@pytest.mark.parametrize("form", ["coronal", "axes permuted and flipped"])
def test_reformatted_volumes_give_the_axial_findings(form, axial, tiny_trained, tmp_path):
    other = coronal_of(axial) if form == "coronal" else coronal_of(coronal_of(axial))
    for name, volume in (("axial", axial), ("other", other)):
        dicomio.write_nifti(volume.hu, volume, tmp_path / f"{name}.nii.gz", dtype=np.int16)
        result = predict(tiny_trained, tmp_path / f"{name}.nii.gz", tmp_path / "out")
        assert result.exit_code == 0, result.output
    import json

    a, b = (json.loads((tmp_path / "out" / n / "nodules.json").read_text()) for n in ("axial", "other"))
    assert b["shape_zyx"] == list(other.shape)
    assert [n["centroid_world_lps_mm"] for n in b["nodules"]] == [n["centroid_world_lps_mm"] for n in a["nodules"]]


def _series_tree(tiny_trained, tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "tree"
    shutil.copytree(tiny_trained["root"], root)
    return root, sorted(p for p in root.rglob("*") if p.is_dir() and any(f.is_file() for f in p.iterdir()))


@pytest.mark.parametrize("damage, says", [
    ("truncated slice", "truncated"),
    ("garbled header", "cannot read DICOM header"),
    ("not DICOM but named .dcm", "not a readable DICOM file"),
    ("a missing slice", "missing slice"),
    ("no rescale", "Hounsfield"),
])
def test_one_damaged_series_fails_alone(damage, says, tiny_trained, tmp_path):
    root, series = _series_tree(tiny_trained, tmp_path)
    files = sorted(series[1].iterdir())
    if damage == "truncated slice":
        files[4].write_bytes(files[4].read_bytes()[:600])
    elif damage == "garbled header":
        data = files[4].read_bytes()
        files[4].write_bytes(data.replace(b"\x08\x00\x18\x00UI", b"\x08\x00\x18\x00U~"))
    elif damage == "not DICOM but named .dcm":
        (series[1] / "notes.dcm").write_text("not dicom")
    elif damage == "a missing slice":
        files[5].unlink()
    else:
        for f in files:
            ds = pydicom.dcmread(f)
            del ds.RescaleIntercept, ds.RescaleSlope
            ds.save_as(f)
    result = predict(tiny_trained, root, tmp_path / "out")
    assert_one_line_error(result, says)
    assert result.output.count("done: ") == 2 and result.output.count("failed: ") == 1


@pytest.mark.parametrize("case, says", [
    ("an empty folder", "no CT series found"),
    ("a text file", "expected a DICOM folder or a .nii"),
    ("--out below a file", "a file stands where a folder is needed"),
])
def test_bad_places_are_one_line(case, says, tiny_trained, tmp_path):
    source, out = tiny_trained["root"] / "LIDC-IDRI-9001", tmp_path / "out"
    if case == "an empty folder":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "a text file":
        source = tmp_path / "notes.txt"
        source.write_text("x")
    else:
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "out"
    assert_one_line_error(predict(tiny_trained, source, out), says)


@pytest.mark.parametrize("damage, says", [
    ("copied without its .scans folder", "missing; a cache is"),
    ("a truncated per-scan file", "cannot be read (truncated or corrupt)"),
    ("a per-scan file without rois/", "no rois/ group"),
])
def test_damaged_caches_are_one_line(damage, says, tiny_trained, tmp_path):
    import h5py

    copy = tmp_path / "copy.h5"
    shutil.copy(tiny_trained["cache"], copy)
    if damage != "copied without its .scans folder":
        shutil.copytree(cache.scans_dir(tiny_trained["cache"]), cache.scans_dir(copy))
        parts = sorted(cache.scans_dir(copy).iterdir())
        if damage == "a truncated per-scan file":
            parts[0].write_bytes(parts[0].read_bytes()[:3000])
        else:
            for part in parts:
                with h5py.File(part, "a") as f:
                    del f["rois"]
    for command in (["info", str(copy)],
                    ["train-cls", "--cache", str(copy), "--split-file", str(tiny_trained["split"]), "--out",
                     str(tmp_path / "run"), "--epochs", "1", "--width", "4", "--device", "cpu"]):
        assert_one_line_error(CliRunner().invoke(main, command), says)


def test_the_real_lidc_idri_0001_read_as_a_coronal_nifti(shared_data, tiny_trained, tmp_path):
    """Real data: a coronal NIfTI of LIDC-IDRI-0001 reads into the same axial volume (the grid, not the model)."""
    patient = shared_data / "lidc" / "LIDC-IDRI-0001"
    if not patient.is_dir():
        pytest.skip(f"{patient} not found")
    volume = dicomio.read_series(patient)
    path = tmp_path / "coronal.nii.gz"
    coronal = coronal_of(volume)
    dicomio.write_nifti(coronal.hu, coronal, path, dtype=np.int16)
    axial, _ = dicomio.reorient_to_axial(dicomio.read_nifti_volume(path))
    np.testing.assert_array_equal(axial.hu, volume.hu)
    np.testing.assert_allclose(axial.voxel_to_world([10, 20, 30]), volume.voxel_to_world([10, 20, 30]), atol=1e-3)
    dicomio.check_chest_ct(axial, min_extent_mm=48)

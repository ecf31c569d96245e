"""dicomout.py: predict's DICOM SEG and SR load in pydicom and highdicom, match the NIfTI masks, pass dciodvfy."""

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from conftest import stand_in_models

from lungseg import dicomio, infer


@pytest.fixture(scope="module")
def report(tiny_lidc, tmp_path_factory):
    root, _ = tiny_lidc
    volume = dicomio.read_series(root / "LIDC-IDRI-9001")
    pred = infer.predict_volume(volume, stand_in_models())
    assert pred.nodules
    out = tmp_path_factory.mktemp("report")
    infer.write_report(out, volume, pred, checkpoints={}, settings={})
    return out, volume, pred


def test_seg_masks_equal_the_nifti_masks_voxel_for_voxel_without_overlap(report):
    import highdicom as hd

    out, volume, pred = report
    seg = hd.seg.segread(out / "seg.dcm")
    assert seg.StudyInstanceUID == volume.study_uid and seg.PatientID == volume.patient_id
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lungs"] + [f"nodule {n['id']}" for n in pred.nodules]
    numbers = [1] + [1 + n["id"] for n in pred.nodules]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(volume.sop_uids),
                                               segment_numbers=numbers, ignore_spatial_locations=True)
    labels, _ = dicomio.read_nifti_mask(out / "nodules.nii.gz")
    lungs, _ = dicomio.read_nifti_mask(out / "lungs.nii.gz")
    np.testing.assert_array_equal(pixels[..., 0] > 0, (lungs > 0) & (labels == 0))   # the lungs outside findings
    assert seg.SegmentsOverlap == "NO"
    for k, n in enumerate(pred.nodules, start=1):
        np.testing.assert_array_equal(pixels[..., k] > 0, labels == n["id"])


def test_sr_holds_each_findings_measurements(report):
    import highdicom as hd

    out, volume, pred = report
    sr = hd.sr.srread(out / "sr.dcm")
    assert pydicom.dcmread(out / "sr.dcm").SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(pred.nodules)
    for group, n in zip(groups, pred.nodules):
        values = {m.name.meaning: m.value for m in group.get_measurements()}
        assert values["Diameter"] == pytest.approx(n["diameter_mm"])
        assert values["Volume"] == pytest.approx(n["volume_mm3"])
        assert values["Attenuation Coefficient"] == pytest.approx(n["mean_hu"])
        assert values["Probability of cancer"] == pytest.approx(n["malignancy_probability"])
        assert group.referenced_segment.referenced_segment_numbers == [1 + n["id"]]
        assert group.referenced_segment.source_series_for_segmentation.value == volume.series_uid


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed")
@pytest.mark.parametrize("name", ["seg.dcm", "sr.dcm"])
def test_dciodvfy_finds_no_error(report, name):
    out, _, _ = report
    result = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_a_nifti_input_gets_no_dicom_outputs(report, tmp_path):
    out, volume, pred = report
    path = tmp_path / "scan.nii.gz"
    dicomio.write_nifti(volume.hu, volume, path, dtype=np.int16)
    again = dicomio.read_nifti_volume(path)
    infer.write_report(tmp_path / "r", again, pred, checkpoints={}, settings={})
    assert (tmp_path / "r" / "nodules.json").exists() and not (tmp_path / "r" / "seg.dcm").exists()


def test_a_scan_without_findings_or_lungs_still_gets_a_valid_seg_and_sr(report, tmp_path):
    import highdicom as hd

    from lungseg.dicomout import write_seg_and_sr

    _, volume, pred = report
    for lungs in (pred.lungs, np.zeros_like(pred.lungs)):
        seg_path, sr_path = write_seg_and_sr(tmp_path, volume, np.zeros_like(pred.labels), lungs, [])
        assert hd.seg.segread(seg_path).SegmentSequence[0].SegmentLabel == "lungs"
        assert hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups() == []
        if shutil.which("dciodvfy"):
            for path in (seg_path, sr_path):
                result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
                lines = (result.stdout + result.stderr).splitlines()
                assert not [line for line in lines if line.startswith("Error")]

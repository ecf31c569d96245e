"""pipeline.py: the helper process that reads and writes for predict gives the reports of the single-process loop."""

import json
from pathlib import Path

import numpy as np
from conftest import stand_in_models

from lungseg import dicomio, infer
from lungseg.pipeline import Lane


def _reports(out: Path) -> dict:
    found = {}
    for done in sorted(out.glob("*/nodules.json")):
        report = json.loads(done.read_text())
        labels, _ = dicomio.read_nifti_mask(done.parent / "nodules.nii.gz")
        lungs, _ = dicomio.read_nifti_mask(done.parent / "lungs.nii.gz")
        found[done.parent.name] = (report["nodules"], report["input_sha256"], labels, lungs,
                                   sorted(p.name for p in done.parent.iterdir()))
    return found


def test_the_helper_reads_and_writes_the_reports_of_the_single_process_loop_in_order(tiny_lidc, tmp_path):
    root, _ = tiny_lidc
    broken = dicomio.SeriesJob(tmp_path / "broken", None, "broken", problem="broken: cannot be read")
    jobs = infer.find_inputs(root)
    jobs = [jobs[0], broken, *jobs[1:]]
    models = stand_in_models()

    def predict(volume):
        return infer.predict_volume(volume, models)

    alone = list(infer.report_each(jobs, tmp_path / "alone", predict, checkpoints={}, settings={}))
    with Lane() as lane:
        beside = list(infer.report_each(jobs, tmp_path / "beside", predict, checkpoints={}, settings={}, lane=lane))
        again = list(infer.report_each(jobs, tmp_path / "beside", predict, checkpoints={}, settings={}, lane=lane))
    assert [(j.name, s) for j, s, _ in beside] == [(j.name, s) for j, s, _ in alone]
    assert [s for _, s, _ in alone] == ["done", "failed"] + ["done"] * (len(jobs) - 2)
    assert [s for _, s, _ in again] == ["skipped", "failed"] + ["skipped"] * (len(jobs) - 2)
    a, b = _reports(tmp_path / "alone"), _reports(tmp_path / "beside")
    assert a.keys() == b.keys() and len(a) == len(jobs) - 1
    for name in a:
        nodules_a, sha_a, labels_a, lungs_a, files_a = a[name]
        nodules_b, sha_b, labels_b, lungs_b, files_b = b[name]
        assert nodules_a == nodules_b and sha_a == sha_b and files_a == files_b
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(lungs_a, lungs_b)
    assert not list(Path(lane._exchange).parent.glob(Path(lane._exchange).name))     # its exchange folder is gone


def test_a_prediction_that_fails_fails_its_job_alone(tiny_lidc, tmp_path):
    root, _ = tiny_lidc
    jobs = infer.find_inputs(root)
    models = stand_in_models()
    first = jobs[0].name

    def predict(volume):
        if volume.series_uid == first:
            raise dicomio.DicomError("this one cannot be predicted")
        return infer.predict_volume(volume, models)

    with Lane() as lane:
        got = list(infer.report_each(jobs, tmp_path, predict, checkpoints={}, settings={}, lane=lane))
    assert [s for _, s, _ in got] == ["failed"] + ["done"] * (len(jobs) - 1)
    assert got[0][2] == "this one cannot be predicted"

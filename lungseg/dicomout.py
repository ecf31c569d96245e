"""DICOM outputs of ``predict`` for DICOM inputs: a Segmentation (SEG) and a measurement report (SR).

A hospital system (PACS, viewer, research archive) takes DICOM, not NIfTI.
For a DICOM series, ``predict`` also writes, with highdicom:

- ``seg.dcm``: a binary DICOM Segmentation of the series, segment 1 the
  lungs and segment ``1 + i`` finding ``i``; each frame references the source
  slice it lies on, so the masks are those of ``nodules.nii.gz`` and
  ``lungs.nii.gz`` voxel for voxel. The segments do not overlap: segment 1 is
  the lungs outside the findings (the union of all segments is
  ``lungs.nii.gz`` with the findings), as viewers that draw a SEG as one
  label map expect.
- ``sr.dcm``: a Comprehensive 3D SR holding a TID 1500 Measurement Report:
  per finding, its segment (referenced in ``seg.dcm``), diameter (mm),
  volume (mm3), mean attenuation (HU) and the probability of cancer; with
  no finding, one image-level group saying nodule: absent.

Both name lungseg as the device and its version, and belong to the source's
study (same Study Instance UID and patient), each in a new series.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .dicomio import CTVolume
from .files import replacing

#: Series numbers of the two outputs in the source's study.
SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002


#: Patient and study attributes the outputs copy from the source (DICOM type 2: present, maybe empty).
_COPIED_TYPE2 = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
                 "StudyTime", "ReferringPhysicianName")


def _sources(volume: CTVolume) -> list:
    """The source slices' headers, in the volume's slice order (what the SEG's frames reference): those the
    reader kept, else read again; a type-2 patient or study attribute the source lacks is taken as empty, as
    DICOM allows."""
    import pydicom

    headers = list(volume.headers) if len(volume.headers) == len(volume.files) else \
        [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.files]
    for ds in headers:
        for keyword in _COPIED_TYPE2:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return headers


def segmentation(volume: CTVolume, labels: np.ndarray, lungs: np.ndarray, nodules: Sequence[dict], sources=None):
    """The binary DICOM SEG of the lungs outside the findings (segment 1) and each finding (segment 1 + its id)
    on ``volume``; the segments do not overlap."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = sources if sources is not None else _sources(volume)
    algorithm = hd.AlgorithmIdentificationSequence(name="lungseg", version=__version__,
                                                   family=codes.DCM.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=1, segment_label="lungs", segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.Lung, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)]
    for n in nodules:
        segments.append(hd.seg.SegmentDescription(
            segment_number=1 + int(n["id"]), segment_label=f"nodule {n['id']}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    # One label map (frames, rows, columns): 1 the lungs, 1 + id each finding, which wins over the lungs;
    # 8 bits while the segments fit (a third of the memory of 16 bits and temporaries)
    labels = np.asarray(labels)
    pixel_array = (np.asarray(lungs) > 0).astype(np.uint8 if len(segments) <= 255 else np.uint16)
    np.add(labels, 1, out=pixel_array, where=labels > 0, casting="unsafe")
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="lungseg", manufacturer_model_name="lungseg",
        software_versions=__version__, device_serial_number="none", series_description="lungseg lungs and nodules",
        content_label="LUNGSEG", content_description="lungs and nodule findings (research use)")


def measurement_report(volume: CTVolume, seg, nodules: Sequence[dict], sources=None):
    """The Comprehensive 3D SR (TID 1500) of the findings of ``seg``: diameter, volume, mean HU, p(cancer)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    sources = sources if sources is not None else _sources(volume)
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="lungseg",
                                                       manufacturer_name="lungseg", model_name="lungseg")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    algorithm = hd.sr.AlgorithmIdentification(name="lungseg", version=__version__)
    groups = []
    for n in nodules:
        measurements = [
            hd.sr.Measurement(name=codes.SCT.Diameter, value=float(n["diameter_mm"]), unit=codes.UCUM.Millimeter,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.SCT.Volume, value=float(n["volume_mm3"]), unit=codes.UCUM.CubicMillimeter,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=float(n["mean_hu"]),
                              unit=codes.UCUM.HounsfieldUnit, derivation=codes.SCT.Mean, algorithm_id=algorithm),
        ]
        if "malignancy_probability" in n:
            measurements.append(hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer,
                                                  value=float(n["malignancy_probability"]),
                                                  unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"nodule {n['id']}"),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=1 + int(n["id"]),
                source_series=hd.sr.SourceSeriesForSegmentation(volume.series_uid)),
            finding_type=codes.SCT.Nodule, finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_id=algorithm, measurements=measurements))
    if not groups:                          # nothing found: said as such (TID 1500 needs one measurement group)
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="no findings"),
            algorithm_id=algorithm,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.SCT.Nodule, value=codes.SCT.Absent)]))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg], content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="lungseg",
        series_description="lungseg nodule measurements", is_complete=True, is_final=False, is_verified=False)


def write_seg_and_sr(folder: Path, volume: CTVolume, labels: np.ndarray, lungs: np.ndarray,
                     nodules: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``folder/seg.dcm`` and ``folder/sr.dcm`` of a DICOM volume's prediction (each atomically)."""
    sources = _sources(volume)
    with warnings.catch_warnings():     # the source's own values (e.g. a patient name in the retired form)
        warnings.simplefilter("ignore", UserWarning)
        seg = segmentation(volume, labels, lungs, nodules, sources)
        sr = measurement_report(volume, seg, nodules, sources)
    paths = folder / "seg.dcm", folder / "sr.dcm"
    for dataset, path in zip((seg, sr), paths):
        with replacing(path) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
    return paths


__all__ = ["segmentation", "measurement_report", "write_seg_and_sr", "SEG_SERIES_NUMBER", "SR_SERIES_NUMBER"]

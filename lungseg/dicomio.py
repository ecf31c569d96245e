"""Read one CT series from a DICOM folder; write masks as NIfTI that overlay it.

``read_series(folder)`` turns a folder of single-frame CT slices into a
:class:`CTVolume`: Hounsfield units as int16 in (z, y, x) = (slice, row, column)
order, voxel spacing in mm, and the geometry that maps voxel indices to DICOM
patient coordinates (LPS, mm).  On the way it

- picks one series when the folder holds several (a given ``series_uid``, else
  the CT series with the most slices) and logs which one it chose;
- sorts slices by their position along the slice normal, whatever the file
  names or order;
- refuses, with a one-line :class:`~lungseg.errors.DicomError` naming the folder
  or file, anything it cannot turn into one regular volume: non-CT data,
  inconsistent orientation or matrix size, duplicate or missing slices, uneven
  spacing, sheared (gantry-tilted) stacks, corrupt files, and compressed pixel
  data for which no decoder is installed;
- applies RescaleSlope/RescaleIntercept per slice.

``write_series`` writes a volume as a CT series (for the LIDC twin and tests).
``write_nifti`` writes an array in the volume's (z, y, x) layout as NIfTI
(RAS, indexed (x, y, z)) with an affine that places it exactly on the scan in
any viewer.  Knows nothing of LIDC.

Geometry, in one formula: for a voxel index ``(k, j, i)`` (slice, row, column),

    world_LPS = origin + k*dz*normal + j*dy*col_cosine + i*dx*row_cosine

where ``row_cosine`` = ImageOrientationPatient[0:3] (the direction along a row,
i.e. as the column index grows), ``col_cosine`` = ImageOrientationPatient[3:6]
(as the row index grows), ``normal`` = row_cosine x col_cosine, ``dy, dx`` =
PixelSpacing and ``dz`` the median gap between slices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from lungseg.errors import DicomError, LungsegError

__all__ = [
    "CTVolume",
    "check_chest_ct",
    "reorient_to_axial",
    "Reorientation",
    "SeriesInfo",
    "find_series",
    "list_series",
    "nifti_affine",
    "read_nifti_mask",
    "read_series",
    "write_nifti",
    "write_series",
]

logger = logging.getLogger(__name__)

#: Absolute floor (mm) for the slice-gap tolerance and the duplicate-position test.
MIN_SPACING_TOLERANCE_MM = 0.01
#: Slices may drift in-plane by at most this fraction of a pixel (else "sheared").
MAX_INPLANE_SHIFT_PIXELS = 0.1
#: Tolerance for comparing ImageOrientationPatient between slices (direction cosines).
_ORIENTATION_ATOL = 1e-4
#: Media Storage Directory Storage: the SOP class of a DICOMDIR file.
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_INSTALL_HINT = (
    "install lungseg's decoder, GDCM: `pip install python-gdcm` (JPEG, JPEG Lossless, JPEG-LS, JPEG 2000)"
)
_GROUPING_KEYWORDS = ("SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription")
_INT16_MIN, _INT16_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max


# --------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in one folder (from headers only)."""

    series_uid: str
    modality: str
    n_files: int
    study_uid: str
    description: str
    files: tuple[str, ...]
    folder: str


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series as a regular grid of Hounsfield units, with its LPS geometry.

    Attributes:
        hu: int16 array, shape (z, y, x) = (slice, row, column).  Treat it as
            read-only; copy before modifying.
        spacing: (dz, dy, dx) in mm: median slice gap, PixelSpacing[0] (between
            rows), PixelSpacing[1] (between columns).
        origin: LPS position (mm) of voxel [0, 0, 0], the ImagePositionPatient
            of the first slice in sorted order.
        direction: 3x3 array whose columns are the unit LPS vectors of the array
            axes (z, y, x): slice normal, column cosine, row cosine.
        slice_positions: position of each slice along the normal (mm), ascending.
        patient_id, study_uid, series_uid: from the DICOM headers.
        sop_uids, files: SOPInstanceUID and path of each slice, in sorted order.
        path: the folder the slices were read from.
        headers: each slice's DICOM header (no pixel data) in sorted order, as
            read (empty for NIfTI and derived volumes); the DICOM outputs
            (:mod:`lungseg.dicomout`) reference them without reading them again.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    slice_positions: np.ndarray
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]
    files: tuple[str, ...]
    path: str
    headers: tuple[Dataset, ...] = field(default=(), repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(z, y, x) size of the volume."""
        return tuple(self.hu.shape)

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix mapping a homogeneous index (z, y, x, 1) to LPS mm (x, y, z, 1)."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing)  # scale each column
        affine[:3, 3] = self.origin
        return affine

    def voxel_to_world(self, ijk_zyx: np.ndarray | Sequence) -> np.ndarray:
        """Map (..., 3) voxel indices in (z, y, x) order (fractional allowed) to LPS mm."""
        idx = np.asarray(ijk_zyx, dtype=np.float64)
        affine = self.affine_lps()
        return idx @ affine[:3, :3].T + affine[:3, 3]

    def slice_z_world(self) -> np.ndarray:
        """World z (LPS, mm) of each slice's first voxel, in array order (what LIDC's slice z values are)."""
        n = self.shape[0]
        return self.voxel_to_world(np.c_[np.arange(n), np.zeros((n, 2))])[:, 2]

    def world_to_voxel(self, xyz: np.ndarray | Sequence) -> np.ndarray:
        """Map (..., 3) LPS points (mm) to fractional voxel indices in (z, y, x) order."""
        pts = np.asarray(xyz, dtype=np.float64)
        affine = self.affine_lps()
        return (pts - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


# --------------------------------------------------------------------------- orientation

#: lungseg's internal frame: array axes (z, y, x) along LPS +S (feet to head), +P (front to back), +L (right to left).
AXIAL = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
#: Largest angle (degrees) between an array axis and the LPS axis it is taken for; beyond it, a volume is oblique.
MAX_OBLIQUE_DEGREES = 20.0


@dataclass(frozen=True)
class Reorientation:
    """How a volume's array maps onto lungseg's axial frame: axial axis ``i`` is source axis ``perm[i]``,
    reversed where ``flip[i]``. The identity for an axial series in ascending order."""

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]

    @property
    def identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def axial_shape(self) -> tuple[int, int, int]:
        return tuple(self.source_shape[p] for p in self.perm)

    def to_axial(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x) array on the source grid, on the axial grid (a view)."""
        out = np.transpose(array, self.perm)
        return np.flip(out, [i for i in range(3) if self.flip[i]]) if any(self.flip) else out

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """An array on the axial grid, back on the source grid (a view)."""
        if any(self.flip):
            array = np.flip(array, [i for i in range(3) if self.flip[i]])
        return np.transpose(array, np.argsort(self.perm))

    def index_to_source(self, index: Sequence[float]) -> np.ndarray:
        """An axial voxel index (z, y, x), fractional allowed, as the source's."""
        axial = np.asarray(index, float)
        out = np.empty(3)
        for i, p in enumerate(self.perm):
            out[p] = (self.source_shape[p] - 1 - axial[i]) if self.flip[i] else axial[i]
        return out

    def index_to_axial(self, index: Sequence[float]) -> np.ndarray:
        """A source voxel index (z, y, x) as the axial grid's."""
        source = np.asarray(index, float)
        return np.array([(self.source_shape[p] - 1 - source[p]) if self.flip[i] else source[p]
                         for i, p in enumerate(self.perm)])


def reorient_to_axial(volume: CTVolume) -> tuple[CTVolume, Reorientation]:
    """The volume in lungseg's axial frame (:data:`AXIAL`), and how to map back.

    A coronal or sagittal series, a NIfTI with permuted or flipped axes, an
    axial stack stored head first: any volume whose axes lie within
    :data:`MAX_OBLIQUE_DEGREES` of the patient's axes is transposed and flipped
    (no resampling); an oblique one is refused with a one-line
    :class:`~lungseg.errors.DicomError`.
    """
    cosines = AXIAL.T @ np.asarray(volume.direction, float)      # [i, j]: axial axis i . source axis j
    perm = tuple(int(j) for j in np.argmax(np.abs(cosines), axis=1))
    worst = min(abs(cosines[i, perm[i]]) for i in range(3))
    if sorted(perm) != [0, 1, 2] or worst < np.cos(np.radians(MAX_OBLIQUE_DEGREES)):
        angle = np.degrees(np.arccos(np.clip(worst, 0, 1)))
        raise DicomError(f"{volume.path or volume.series_uid}: oblique orientation (an axis {angle:.0f} degrees from "
                         f"the patient's axes; direction {np.round(volume.direction, 3).tolist()}); resample it to "
                         "an axial, coronal or sagittal grid first")
    flip = tuple(bool(cosines[i, perm[i]] < 0) for i in range(3))
    ro = Reorientation(perm, flip, volume.shape)
    if ro.identity:
        return volume, ro
    direction = np.column_stack([volume.direction[:, p] * (-1 if f else 1) for p, f in zip(perm, flip)])
    origin = volume.voxel_to_world(ro.index_to_source([0, 0, 0]))
    spacing = tuple(float(volume.spacing[p]) for p in perm)
    positions = float(origin @ direction[:, 0]) + spacing[0] * np.arange(ro.axial_shape[0])
    axial = CTVolume(hu=np.ascontiguousarray(ro.to_axial(volume.hu)), spacing=spacing,
                     origin=tuple(float(v) for v in origin), direction=direction, slice_positions=positions,
                     patient_id=volume.patient_id, study_uid=volume.study_uid, series_uid=volume.series_uid,
                     sop_uids=(), files=volume.files, path=volume.path)
    logger.info("%s: axes reordered %s, flipped %s, into the axial frame", volume.path, perm, flip)
    return axial, ro


# --------------------------------------------------------------------------- discovery


def list_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """List the series whose files lie directly in ``folder`` (not in subfolders).

    Reads headers only.  Files may have any name (with or without ``.dcm``);
    hidden files, DICOMDIR and files that are not DICOM are skipped, but a file
    named ``*.dcm`` that cannot be read is an error.  Series come most files first.
    """
    folder = _check_folder(folder)
    return _group_series(folder, _read_headers(folder))


def find_series(root: str | os.PathLike, errors: list[tuple[str, str]] | None = None) -> list[SeriesInfo]:
    """List the series in ``root`` and every folder below it, one entry per (folder, series).

    Symbolic links to folders are followed (each real folder once, so a link
    loop ends). A folder holding a file that cannot be read raises a
    :class:`~lungseg.errors.DicomError`; with an ``errors`` list, it is
    appended there as (folder, message) instead and the walk goes on.
    """
    root = _check_folder(root)
    found: list[SeriesInfo] = []
    for folder, headers in _walk_headers(root, errors):
        found.extend(_group_series(folder, headers))
    return found


def _check_folder(folder: str | os.PathLike) -> str:
    path = os.fspath(folder)
    if not os.path.exists(path):
        raise DicomError(f"{path}: folder does not exist")
    if not os.path.isdir(path):
        raise DicomError(f"{path}: not a folder (pass the folder that holds the DICOM slices)")
    return path


#: The headers of the folder read last, with the (name, size, mtime) of its files: finding a series and then
#: reading it reads its headers once.
_LAST_HEADERS: list = [None, {}]


def _read_headers(folder: str) -> dict[str, Dataset]:
    """Headers (no pixel data) of the DICOM files directly in ``folder``, by path.

    The folder read last is remembered while its files keep their names,
    sizes and modification times.
    """
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    try:
        key = (os.path.realpath(folder), tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries))
    except OSError:
        key = None
    if key is not None and _LAST_HEADERS[0] == key:
        return dict(_LAST_HEADERS[1])
    headers = _read_headers_of(entries)
    _LAST_HEADERS[:] = [key, dict(headers)]
    return headers


def _read_headers_of(entries: list[os.DirEntry]) -> dict[str, Dataset]:
    """:func:`_read_headers` of a folder's entries."""
    headers: dict[str, Dataset] = {}
    for entry in entries:
        if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR" or not entry.is_file():
            continue
        must_be_dicom = entry.name.lower().endswith(".dcm")
        try:
            with open(entry.path, "rb") as fp:
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
                runs_to_end = fp.tell() >= entry.stat().st_size
            for part in (getattr(ds, "file_meta", None), ds):  # decode every element now: garbled values fail here
                if part is not None:
                    part.walk(lambda _ds, _elem: None)
        except InvalidDicomError as exc:
            if must_be_dicom:
                raise DicomError(f"{entry.path}: not a readable DICOM file ({_one_line(exc)})") from exc
            continue  # some other file (notes, XML annotations, ...)
        except Exception as exc:  # garbled header
            raise DicomError(f"{entry.path}: cannot read DICOM header ({_one_line(exc)})") from exc
        if _is_dicomdir(ds):
            continue
        if not ds.get("SeriesInstanceUID") or (runs_to_end and _should_have_pixels(ds)):
            # pydicom stops quietly at the end of a file, so a truncated header looks complete
            raise DicomError(
                f"{entry.path}: DICOM header is incomplete or has no pixel data after it (truncated file?)"
            )
        headers[entry.path] = ds
    return headers


def _should_have_pixels(ds: Dataset) -> bool:
    """True unless the SOP class is a known non-image one (report, presentation state, ...)."""
    syntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    if str(syntax) == DeflatedExplicitVRLittleEndian:
        return False  # the whole dataset is read at once; where it ended tells nothing
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    known_non_image = sop_class.name != str(sop_class) and "Image" not in sop_class.name
    return not known_non_image


def _walk_headers(root: str, errors: list[tuple[str, str]] | None = None
                  ) -> Iterator[tuple[str, dict[str, Dataset]]]:
    """Yield (folder, headers) for ``root`` and each folder below it holding DICOM files (links followed once)."""
    seen: set[str] = set()
    for folder, subdirs, _files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        try:
            headers = _read_headers(folder)
        except DicomError as exc:
            if errors is None:
                raise
            errors.append((folder, str(exc)))
            continue
        if headers:
            yield folder, headers


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop_class = meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""
    return str(sop_class) == _DICOMDIR_SOP_CLASS


def _group_series(folder: str, headers: dict[str, Dataset]) -> list[SeriesInfo]:
    """Group headers by SeriesInstanceUID; most files first, then by UID."""
    groups: dict[str, list[str]] = {}
    for path, ds in headers.items():
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(path)
    series = []
    for uid, files in groups.items():
        first = headers[files[0]]
        series.append(
            SeriesInfo(
                series_uid=uid,
                modality=str(first.get("Modality", "")),
                n_files=len(files),
                study_uid=str(first.get("StudyInstanceUID", "")),
                description=str(first.get("SeriesDescription", "")),
                files=tuple(files),
                folder=folder,
            )
        )
    return sorted(series, key=lambda s: (-s.n_files, s.series_uid))


def _describe(series: Sequence[SeriesInfo]) -> str:
    return ", ".join(f"{s.series_uid} ({s.modality or 'no modality'}, {s.n_files} files)" for s in series)


# --------------------------------------------------------------------------- reading


def read_series(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    *,
    spacing_tolerance: float = 0.01,
) -> CTVolume:
    """Read one CT series from ``folder`` into a :class:`CTVolume`.

    Args:
        folder: the folder that holds the slice files.  If it holds no DICOM
            files itself but exactly one folder below it does (e.g. a patient
            folder with one study and one series), that folder is used.
        series_uid: which series to read when the folder holds several; by
            default the CT series with the most slices.
        spacing_tolerance: allowed relative deviation of each slice gap from the
            median gap (the absolute allowance is never below
            ``MIN_SPACING_TOLERANCE_MM``).

    Raises:
        DicomError: with a one-line message naming the folder or file, for any
            input that is not one regular, decodable CT volume.
    """
    if spacing_tolerance < 0:
        raise ValueError(f"spacing_tolerance must be >= 0, got {spacing_tolerance}")
    folder = _check_folder(folder)
    headers = _read_headers(folder)
    if not headers:
        folder, headers = _find_single_series_folder(folder, series_uid)
    info = _choose_series(folder, _group_series(folder, headers), series_uid)
    return _read_volume(folder, info, headers, spacing_tolerance)


def _find_single_series_folder(root: str, series_uid: str | None) -> tuple[str, dict[str, Dataset]]:
    """For a folder without DICOM files: the one folder below it that holds them."""
    found = [(f, h) for f, h in _walk_headers(root) if f != root]
    if series_uid is not None:
        found = [(f, h) for f, h in found if any(s.series_uid == series_uid for s in _group_series(f, h))]
        if not found:
            raise DicomError(f"{root}: series {series_uid} not found in this folder or below it")
    if not found:
        raise DicomError(f"{root}: no DICOM files in this folder or below it")
    if len(found) > 1:
        listing = "; ".join(f"{f}: {_describe(_group_series(f, h))}" for f, h in found)
        raise DicomError(
            f"{root}: DICOM files in {len(found)} folders below it ({listing}); "
            "pass the series folder or series_uid"
        )
    sub, headers = found[0]
    logger.info("%s holds no DICOM files itself; reading the series folder %s", root, sub)
    return sub, headers


def _choose_series(folder: str, series: list[SeriesInfo], series_uid: str | None) -> SeriesInfo:
    """Pick the requested series, else the CT series with the most files; log the choice."""
    if series_uid is not None:
        matches = [s for s in series if s.series_uid == series_uid]
        if not matches:
            raise DicomError(f"{folder}: series {series_uid} not found; available: {_describe(series)}")
        chosen = matches[0]
    else:
        ct = [s for s in series if s.modality.upper() == "CT"]
        chosen = ct[0] if ct else series[0]  # series are sorted most files first
    if chosen.modality.upper() != "CT":
        raise DicomError(
            f"{folder}: series {chosen.series_uid} has modality {chosen.modality or '(missing)'}, "
            f"not CT (series here: {_describe(series)})"
        )
    skipped = [s for s in series if s is not chosen]
    if skipped:
        log = logger.info if series_uid is not None else logger.warning
        log(
            "%s holds %d series; reading %s (%s, %d files), skipping %s",
            folder, len(series), chosen.series_uid, chosen.modality, chosen.n_files, _describe(skipped),
        )
    return chosen


@dataclass(frozen=True)
class _SliceGeometry:
    """Geometry tags of one slice, parsed and checked."""

    path: str
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    position: np.ndarray  # (3,) ImagePositionPatient
    rows: int
    columns: int
    pixel_spacing: np.ndarray  # (2,) (between rows, between columns)


def _read_volume(
    folder: str, info: SeriesInfo, headers: dict[str, Dataset], spacing_tolerance: float
) -> CTVolume:
    """Check the chosen series' geometry, sort its slices, then decode them into HU."""
    if info.n_files < 2:
        raise DicomError(f"{folder}: series {info.series_uid} has a single slice; a volume needs at least 2")
    geometry = [_slice_geometry(path, headers[path]) for path in info.files]
    _check_consistent(folder, geometry)

    reference = geometry[0]  # orientation, matrix and pixel spacing are shared (checked)
    row_cosine, col_cosine = _orientation_cosines(reference)
    normal = np.cross(row_cosine, col_cosine)

    positions = np.array([g.position @ normal for g in geometry])
    order = np.argsort(positions, kind="stable")
    geometry = [geometry[i] for i in order]
    positions = positions[order]
    _check_duplicates(folder, positions, geometry)
    _check_not_sheared(folder, positions, geometry, normal)
    dz = _check_gaps(folder, positions, spacing_tolerance)

    files = tuple(g.path for g in geometry)
    sorted_headers = [headers[p] for p in files]
    _check_pixel_tags(sorted_headers, files)
    hu = _read_hu(files, reference.rows, reference.columns)
    if not any("RescaleIntercept" in ds for ds in sorted_headers) and hu.min() >= 0:
        logger.warning(
            "%s: no RescaleIntercept and no negative values; pixel values may be raw, not HU", folder
        )

    direction = np.column_stack([normal, col_cosine, row_cosine])
    direction.setflags(write=False)
    positions.setflags(write=False)
    head = sorted_headers[0]
    volume = CTVolume(
        hu=hu,
        spacing=(float(dz), float(reference.pixel_spacing[0]), float(reference.pixel_spacing[1])),
        origin=tuple(float(v) for v in geometry[0].position),  # first slice in sorted order
        direction=direction,
        slice_positions=positions,
        patient_id=str(head.get("PatientID", "")),
        study_uid=str(head.get("StudyInstanceUID", "")),
        series_uid=info.series_uid,
        sop_uids=tuple(str(ds.get("SOPInstanceUID", "")) for ds in sorted_headers),
        files=files,
        path=folder,
        headers=tuple(sorted_headers),
    )
    logger.info(
        "read %s: %d x %d x %d voxels at (%.3f, %.3f, %.3f) mm",
        folder, *volume.shape, *volume.spacing,
    )
    return volume


def _slice_geometry(path: str, ds: Dataset) -> _SliceGeometry:
    """Parse the geometry tags of one slice, refusing missing or malformed ones."""
    def number_list(keyword: str, count: int) -> np.ndarray:
        if keyword not in ds:
            raise DicomError(f"{path}: missing {keyword} (truncated file or not an image slice)")
        try:
            value = ds[keyword].value
        except Exception as exc:  # pydicom decodes raw values on first access
            raise DicomError(f"{path}: malformed {keyword} ({_one_line(exc)})") from exc
        if value is None or value == "":
            raise DicomError(f"{path}: empty {keyword}")
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        try:
            array = np.array([float(v) for v in values])
        except (TypeError, ValueError) as exc:
            raise DicomError(f"{path}: malformed {keyword} {value!r}") from exc
        if array.shape != (count,) or not np.all(np.isfinite(array)):
            raise DicomError(f"{path}: {keyword} must hold {count} finite numbers, got {value!r}")
        return array

    frames = ds.get("NumberOfFrames", 1)
    if frames not in (None, "") and int(frames) > 1:
        raise DicomError(f"{path}: multi-frame image ({frames} frames); only single-frame slices are read")
    return _SliceGeometry(
        path=path,
        orientation=number_list("ImageOrientationPatient", 6),
        position=number_list("ImagePositionPatient", 3),
        rows=int(number_list("Rows", 1)[0]),
        columns=int(number_list("Columns", 1)[0]),
        pixel_spacing=number_list("PixelSpacing", 2),
    )


def _check_consistent(folder: str, geometry: list[_SliceGeometry]) -> None:
    """All slices must share orientation, matrix size and pixel spacing."""
    ref = geometry[0]
    name = os.path.basename
    for g in geometry[1:]:
        if not np.allclose(g.orientation, ref.orientation, atol=_ORIENTATION_ATOL):
            raise DicomError(
                f"{folder}: inconsistent ImageOrientationPatient: {name(ref.path)} has "
                f"{ref.orientation.tolist()}, {name(g.path)} has {g.orientation.tolist()}"
            )
        if (g.rows, g.columns) != (ref.rows, ref.columns):
            raise DicomError(
                f"{folder}: inconsistent Rows/Columns: {name(ref.path)} is {ref.rows}x{ref.columns}, "
                f"{name(g.path)} is {g.rows}x{g.columns}"
            )
        if not np.allclose(g.pixel_spacing, ref.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise DicomError(
                f"{folder}: inconsistent PixelSpacing: {name(ref.path)} has {ref.pixel_spacing.tolist()}, "
                f"{name(g.path)} has {g.pixel_spacing.tolist()}"
            )
    if np.any(ref.pixel_spacing <= 0):
        raise DicomError(f"{ref.path}: PixelSpacing must be positive, got {ref.pixel_spacing.tolist()}")


def _orientation_cosines(g: _SliceGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Unit row and column direction cosines; refuse ones that are not (nearly) orthonormal."""
    row, col = g.orientation[:3], g.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(
            f"{g.path}: ImageOrientationPatient {g.orientation.tolist()} is not two orthogonal unit vectors"
        )
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row  # remove rounding residue so the direction is orthonormal
    return row, col / np.linalg.norm(col)


def _check_duplicates(folder: str, positions: np.ndarray, geometry: list[_SliceGeometry]) -> None:
    gaps = np.diff(positions)
    dup = np.flatnonzero(gaps < MIN_SPACING_TOLERANCE_MM)
    if dup.size:
        i = dup[0]
        raise DicomError(
            f"{folder}: duplicate slice position z={positions[i]:.3f} mm in "
            f"{os.path.basename(geometry[i].path)} and {os.path.basename(geometry[i + 1].path)}"
        )


def _check_not_sheared(
    folder: str, positions: np.ndarray, geometry: list[_SliceGeometry], normal: np.ndarray
) -> None:
    """Slices must stack along the normal; a gantry-tilted (sheared) stack would misalign."""
    origins = np.array([g.position for g in geometry])
    along = np.outer(positions - positions[0], normal)
    inplane = np.linalg.norm(origins - origins[0] - along, axis=1)
    limit = MAX_INPLANE_SHIFT_PIXELS * float(geometry[0].pixel_spacing.min())
    worst = int(np.argmax(inplane))
    if inplane[worst] > max(limit, 1e-3):
        raise DicomError(
            f"{folder}: slices do not stack along the slice normal ({os.path.basename(geometry[worst].path)} "
            f"is shifted {inplane[worst]:.3f} mm in-plane; gantry-tilted or sheared series are not supported)"
        )


def _check_gaps(folder: str, positions: np.ndarray, spacing_tolerance: float) -> float:
    """Return the median slice gap; refuse missing slices and uneven spacing."""
    gaps = np.diff(positions)
    median = float(np.median(gaps))
    tolerance = max(spacing_tolerance * median, MIN_SPACING_TOLERANCE_MM)
    if np.all(np.abs(gaps - median) <= tolerance):
        return median
    missing = np.flatnonzero(gaps > 1.5 * median)
    if missing.size:
        i = missing[0]
        raise DicomError(
            f"{folder}: missing slice(s) between z={positions[i]:.3f} and z={positions[i + 1]:.3f} mm "
            f"(gap {gaps[i]:.3f} mm, expected {median:.3f} mm)"
        )
    i = int(np.argmax(np.abs(gaps - median)))
    raise DicomError(
        f"{folder}: uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
        f"(median {median:.3f} mm, tolerance {tolerance:.3f} mm), worst between "
        f"z={positions[i]:.3f} and z={positions[i + 1]:.3f} mm"
    )


def _check_pixel_tags(headers: list[Dataset], files: tuple[str, ...]) -> None:
    """Refuse, before reading pixels, what cannot become grey-level HU slices."""
    checked_syntaxes: set[str] = set()
    for path, ds in zip(files, headers):
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DicomError(f"{path}: SamplesPerPixel is {ds.SamplesPerPixel}; CT slices must be greyscale")
        rescale_type = str(ds.get("RescaleType", "") or "").strip()
        if rescale_type and rescale_type.upper() != "HU":
            raise DicomError(f"{path}: RescaleType is {rescale_type!r}, not HU")
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if not syntax:
            raise DicomError(f"{path}: no TransferSyntaxUID in the file meta header (truncated file?)")
        if str(syntax) not in checked_syntaxes:
            _check_decoder(path, UID(str(syntax)))
            checked_syntaxes.add(str(syntax))


def _check_decoder(path: str, syntax: UID) -> None:
    """Refuse a transfer syntax whose pixel data no installed plugin can decode."""
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise DicomError(f"{path}: no decoder exists for transfer syntax {_syntax_name(syntax)}") from exc
    if not decoder.is_available:
        raise DicomError(
            f"{path}: pixel data is compressed as {_syntax_name(syntax)} and no decoder for it is installed; "
            f"{_INSTALL_HINT}"
        )


def _syntax_name(syntax: UID) -> str:
    return f"'{syntax.name}' ({syntax})" if syntax.name != str(syntax) else str(syntax)


def _read_hu(files: tuple[str, ...], rows: int, columns: int) -> np.ndarray:
    """Decode each slice and apply its RescaleSlope/Intercept; int16 (z, y, x)."""
    hu = np.empty((len(files), rows, columns), dtype=np.int16)
    for k, path in enumerate(files):
        try:
            ds = pydicom.dcmread(path, force=False)
        except Exception as exc:
            raise DicomError(f"{path}: cannot read DICOM file ({_one_line(exc)})") from exc
        if "PixelData" not in ds:
            raise DicomError(f"{path}: no pixel data (truncated file?)")
        try:
            pixels = ds.pixel_array  # signed when PixelRepresentation is 1
        except Exception as exc:
            syntax = UID(str(ds.file_meta.TransferSyntaxUID))
            if syntax.is_compressed:
                raise DicomError(
                    f"{path}: cannot decode pixel data compressed as {_syntax_name(syntax)} "
                    f"({_one_line(exc)}); if the file is intact, {_INSTALL_HINT}"
                ) from exc
            raise DicomError(f"{path}: corrupt pixel data ({_one_line(exc)})") from exc
        if pixels.shape != (rows, columns):
            raise DicomError(f"{path}: pixel data has shape {pixels.shape}, expected ({rows}, {columns})")
        slope = _float_tag(ds, "RescaleSlope", 1.0, path)
        intercept = _float_tag(ds, "RescaleIntercept", 0.0, path)
        if slope == 1 and intercept.is_integer():  # the usual case: exact and fast in integers
            values = pixels.astype(np.int32) + int(intercept)
        else:
            values = np.rint(pixels * slope + intercept)
        hu[k] = np.clip(values, _INT16_MIN, _INT16_MAX)
    return hu


def _float_tag(ds: Dataset, keyword: str, default: float, path: str) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DicomError(f"{path}: malformed {keyword} {value!r}") from exc


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (pydicom's span several, and some carry a traceback's text,
    which is cut off)."""
    text = str(exc).split("Traceback (most recent call last)")[0]
    return " ".join(text.split()) or type(exc).__name__


# --------------------------------------------------------------------------- NIfTI


#: Column i holds the (z, y, x) index unit of NIfTI axis i (NIfTI indexes x, y, z).
_ZYX_FROM_XYZ = np.eye(4)[:, [2, 1, 0, 3]]
#: DICOM's LPS world to NIfTI's RAS world.
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_affine(volume: CTVolume) -> np.ndarray:
    """4x4 RAS affine for an array stored as NIfTI (x, y, z) over ``volume``.

    NIfTI indexes (i, j, k) = (x, y, z) and its world is RAS, so the LPS affine
    of (z, y, x) indices gets its index columns permuted and its first two world
    rows negated (L -> R, P -> A).
    """
    return _RAS_FROM_LPS @ volume.affine_lps() @ _ZYX_FROM_XYZ


def write_nifti(
    array: np.ndarray,
    volume: CTVolume,
    path: str | os.PathLike,
    dtype: np.dtype | type = np.uint8,
) -> None:
    """Write ``array`` (z, y, x), on ``volume``'s grid, as NIfTI that overlays the scan.

    The file's qform and sform (code 1, scanner) both hold :func:`nifti_affine`.
    Use a ``.nii.gz`` suffix for a compressed file.
    """
    import nibabel as nib  # deferred: only the writers need it

    array = np.asarray(array)
    if array.shape != volume.shape:
        raise ValueError(f"array shape {array.shape} does not match the volume's {volume.shape}")
    affine = nifti_affine(volume)
    # (x, y, z) as NIfTI orders it: a view, which nibabel writes in its own (Fortran) order without a copy
    image = nib.Nifti1Image(array.astype(dtype, copy=False).transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, os.fspath(path))


def read_nifti_mask(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI back as (array in (z, y, x) order, 4x4 RAS affine of (x, y, z) indices)."""
    import nibabel as nib

    image = nib.load(os.fspath(path))
    data = np.asanyarray(image.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{Path(path)}: expected a 3D image, got shape {data.shape}")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), image.affine


def write_series(
    folder: str | os.PathLike,
    hu: np.ndarray,
    *,
    spacing: Sequence[float],
    origin: Sequence[float],
    patient_id: str,
    study_uid: str,
    series_uid: str,
    slice_z: Sequence[float] | None = None,
    file_names: Sequence[str] | None = None,
    slice_thickness: float | None = None,
    intercept: int = -1024,
    description: str = "",
    extra_tags: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write a (z, y, x) int16 HU volume as an axial CT series, one file per slice.

    Slice ``k`` lies at ``origin + (0, 0, slice_z[k] - slice_z[0])`` (``slice_z``
    defaults to ``origin z + k * spacing[0]``), with feet-to-head axial
    orientation; pixels are stored as unsigned 16 bit with ``RescaleIntercept``
    ``intercept``, so the file holds what a scanner would write. ``extra_tags``
    (DICOM keyword -> value, e.g. ``{"Manufacturer": "..."}``) are set on every
    slice last, so they may also replace a default such as ``ImageType``. Used
    by the LIDC twin and by tests; the result reads back through :func:`read_series`.
    """
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu)
    n, rows, columns = hu.shape
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if slice_z is None:
        slice_z = [origin[2] + k * spacing[0] for k in range(n)]
    if file_names is None:
        file_names = [f"{k + 1:06d}.dcm" for k in range(n)]
    if len(slice_z) != n or len(file_names) != n:
        raise ValueError(f"need {n} slice positions and file names, got {len(slice_z)} and {len(file_names)}")
    unknown = [kw for kw in (extra_tags or {}) if tag_for_keyword(kw) is None]
    if unknown:
        raise ValueError(f"extra_tags: not DICOM keywords: {', '.join(unknown)}")
    stored = np.clip(hu.astype(np.int32) - intercept, 0, np.iinfo(np.uint16).max).astype(np.uint16)
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame"])
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(slice_z[k])]
        ds.SliceLocation = float(slice_z[k])
        ds.SliceThickness = float(slice_thickness if slice_thickness is not None else spacing[0])
        ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = stored[k].tobytes()
        for keyword, value in (extra_tags or {}).items():
            setattr(ds, keyword, value)
        path = out / file_names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: What lungseg supports as a chest CT (:func:`check_chest_ct`): slice gap and pixel size (mm), slice count.
SUPPORTED_SLICE_GAP_MM = (0.2, 10.0)
SUPPORTED_PIXEL_MM = (0.2, 3.0)
MIN_SLICES = 3
#: Any chest CT holds air (outside the body, the airways, the lungs) and soft tissue (muscle, heart, vessels).
AIR_HU, SOFT_TISSUE_HU, MIN_TISSUE_FRACTION = -900.0, (-150.0, 150.0), 0.01


def check_chest_ct(volume: CTVolume, *, min_extent_mm: float = 0.0) -> None:
    """Refuse, with a one-line :class:`~lungseg.errors.DicomError`, a volume lungseg cannot read as a chest CT.

    Supported: at least :data:`MIN_SLICES` slices spanning ``min_extent_mm``
    (the models' ROI depth), slice gaps and pixels within
    :data:`SUPPORTED_SLICE_GAP_MM` and :data:`SUPPORTED_PIXEL_MM`, and
    Hounsfield units: at least 1 % of the voxels air (<= -900 HU) and 1 %
    soft tissue (-150 to 150 HU); real chest CT has some 40 % and 30 %. Data
    stored without its rescale (air near 0 or +1000) or scaled (air at -500)
    fail the air test.
    """
    where = volume.path or volume.series_uid or "volume"
    n, (dz, dy, dx) = volume.shape[0], volume.spacing
    if n < MIN_SLICES or n * dz < min_extent_mm:
        raise DicomError(f"{where}: {n} slices of {dz:g} mm; lungseg needs a chest CT of at least {MIN_SLICES} "
                         f"slices spanning {min_extent_mm:g} mm")
    lo, hi = SUPPORTED_SLICE_GAP_MM
    if not lo <= dz <= hi:
        raise DicomError(f"{where}: slices {dz:g} mm apart; lungseg supports {lo:g} to {hi:g} mm")
    lo, hi = SUPPORTED_PIXEL_MM
    if not (lo <= dy <= hi and lo <= dx <= hi):
        raise DicomError(f"{where}: pixels of {dy:g} x {dx:g} mm; lungseg supports {lo:g} to {hi:g} mm")
    sample = volume.hu[::2, ::4, ::4]
    air = float((sample <= AIR_HU).mean())
    soft = float(((sample > SOFT_TISSUE_HU[0]) & (sample < SOFT_TISSUE_HU[1])).mean())
    if air < MIN_TISSUE_FRACTION or soft < MIN_TISSUE_FRACTION:
        raise DicomError(f"{where}: values do not look like chest CT Hounsfield units ({air:.1%} of voxels at or "
                         f"below {AIR_HU:g} HU, {soft:.1%} between {SOFT_TISSUE_HU[0]:g} and {SOFT_TISSUE_HU[1]:g}; "
                         f"a chest CT has about 40 % and 30 %; values {int(volume.hu.min())} to "
                         f"{int(volume.hu.max())}): is the rescale (RescaleSlope, RescaleIntercept) missing or wrong?")


def hu_volume(path: str | os.PathLike, data: np.ndarray, min_hu_below: float | None = -500.0) -> np.ndarray:
    """Image values read from ``path`` as int16 HU, refused when they do not look like HU.

    Not HU: no voxel below ``min_hu_below`` (a chest CT holds air, about
    -1000 HU), or, whatever ``min_hu_below``, none below 0 (raw stored values
    without the rescale). ``None`` for tight crops that may hold no air. The
    one rule of lungseg's readers of non-DICOM images (NIfTI, MetaImage).
    """
    if data.size and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise DicomError(f"{path}: {int((~np.isfinite(data)).sum())} voxels are not finite (NaN or infinite)")
    low = float(np.min(data)) if data.size else 0.0
    if data.size == 0 or (low >= 0 if min_hu_below is None else low > min_hu_below):
        raise DicomError(f"{path}: values do not look like Hounsfield units (minimum "
                         f"{low if data.size else 'n/a'}; air should be about -1000)")
    if data.dtype == np.int16:
        return data
    return np.clip(np.round(data), _INT16_MIN, _INT16_MAX).astype(np.int16)


def read_nifti_volume(path: str | os.PathLike, *, min_hu_below: float | None = -500.0) -> CTVolume:
    """Read a 3D NIfTI CT image in Hounsfield units as a :class:`CTVolume`.

    The NIfTI (x, y, z) RAS affine is turned back into lungseg's (z, y, x) LPS
    geometry (the inverse of :func:`nifti_affine`). Refuses images that are not
    3D, whose affine is not a rotation times spacing, or whose values do not
    look like HU: no voxel below ``min_hu_below`` (a chest CT holds air, about
    -1000 HU), or, whatever ``min_hu_below``, no voxel below 0 (raw stored
    values without the rescale). Pass ``None`` for tight crops that may hold
    no air.
    """
    path = Path(path)
    try:
        data, affine_ras = read_nifti_mask(path)
    except (OSError, ValueError) as exc:
        raise DicomError(f"{path}: cannot read as a 3D NIfTI image ({_one_line(exc)})") from None
    affine_lps = np.linalg.inv(_RAS_FROM_LPS) @ affine_ras @ np.linalg.inv(_ZYX_FROM_XYZ)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise DicomError(f"{path}: the NIfTI affine has a zero voxel size")
    direction = affine_lps[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise DicomError(f"{path}: the NIfTI affine is sheared; resample it to an orthogonal grid first")
    hu = hu_volume(path, data, min_hu_below)
    normal = direction[:, 0]
    origin = affine_lps[:3, 3]
    positions = float(origin @ normal) + spacing[0] * np.arange(hu.shape[0])
    return CTVolume(hu=hu, spacing=tuple(float(s) for s in spacing), origin=tuple(float(v) for v in origin),
                    direction=direction, slice_positions=positions, patient_id="", study_uid="",
                    series_uid=path.name.split(".")[0], sop_uids=(), files=(str(path),), path=str(path))


# --------------------------------------------------------------------------- inputs of predict


@dataclass(frozen=True)
class SeriesJob:
    """One input series: a DICOM folder (with its series UID) or a NIfTI file.

    ``name`` is its report folder under ``--out``; ``files`` are the files it
    is read from (their bytes make :func:`input_sha256`; none: the ``path``);
    ``problem``: why a folder of the tree could not be read (the job fails).
    """

    path: Path
    series_uid: str | None
    name: str
    files: tuple[str, ...] = ()
    problem: str | None = None


def input_sha256(job: SeriesJob) -> str:
    """SHA-256 over the bytes of the job's files, in order: what its report was made from."""
    h = hashlib.sha256()
    for f in job.files or (str(job.path),):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def unique_names(jobs: Sequence[SeriesJob]) -> list[SeriesJob]:
    """The jobs with distinct report names: a name that recurs (an edited copy of a series keeps its UID) gets
    ``-2``, ``-3``... in the jobs' order."""
    seen: dict[str, int] = {}
    out = []
    for job in jobs:
        seen[job.name] = seen.get(job.name, 0) + 1
        out.append(job if seen[job.name] == 1 else dataclasses.replace(job, name=f"{job.name}-{seen[job.name]}"))
    return out


def nifti_stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii`` or ``.nii.gz`` (``scan.v1.nii.gz`` -> ``scan.v1``)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")] if name.endswith(".nii") \
        else path.stem


def find_inputs(source: str | os.PathLike) -> list[SeriesJob]:
    """The series under ``source``: a NIfTI file, or every CT series in a DICOM folder tree (distinct names)."""
    source = Path(source)
    if source.is_file():
        if not source.name.endswith((".nii", ".nii.gz")):
            raise LungsegError(f"{source}: expected a DICOM folder or a .nii/.nii.gz file")
        return [SeriesJob(source, None, nifti_stem(source), (str(source),))]
    errors: list[tuple[str, str]] = []
    series = [s for s in find_series(source, errors) if s.modality == "CT"]
    if not series and not errors:
        raise LungsegError(f"{source}: no CT series found in this folder or below it")
    return unique_names([SeriesJob(Path(s.folder), s.series_uid, s.series_uid, tuple(s.files)) for s in series] +
                        [SeriesJob(Path(f), None, Path(f).name, problem=message) for f, message in errors])


def read_job(job: SeriesJob) -> CTVolume:
    """The volume of one input: a DICOM series or a NIfTI file."""
    return read_nifti_volume(job.path) if job.series_uid is None else read_series(job.path, job.series_uid)

"""The HDF5 cache of preprocessed scans that training and evaluation read.

Layout on disk: ``CACHE.h5`` plus a folder ``CACHE.h5.scans/`` with one HDF5
file per scan. ``CACHE.h5`` holds the run's settings and one external link per
finished scan, so ``h5py.File("CACHE.h5")["scans/<series uid>"]`` reads a scan
as if it were stored inside. Move or copy both together.

Why two levels: a scan file is written under a temporary name and renamed when
complete, and ``CACHE.h5`` (small: settings and links) is rewritten the same way
after each scan. An interrupted run therefore always leaves a readable cache
that lacks at most the scan in flight, and a rerun skips finished scans.

Schema, version 3 (``SCHEMA_VERSION``; version 2 caches still read). All arrays are (z, y, x) on the
resampled grid unless named otherwise; world coordinates are DICOM LPS, mm.

``CACHE.h5``
    attrs: ``schema_version`` (int), ``lungseg_version`` (str), ``config`` (JSON
    of :class:`lungseg.preprocess.PreprocessConfig`)
    ``scans/<series uid>``: external link to ``CACHE.h5.scans/<series uid>.h5:/``

scan file, root attrs
    ``schema_version``, ``patient_id``, ``study_uid``, ``series_uid``,
    ``source`` (folder read), ``original_shape``, ``original_spacing`` (z, y, x mm),
    ``origin`` (LPS mm of original voxel 0,0,0), ``direction`` (3x3, columns =
    LPS directions of the z, y, x array axes), ``spacing`` (resampled z, y, x mm),
    ``shape`` (resampled), ``lung_volume_ml``, ``n_nodules``
``subcases/image``   (S, 48, 192, 192) float16, HU windowed -1000..400 to 0..1
``subcases/mask``    (S, ...) uint8, consensus nodule mask (all nodules)
``subcases/lung``    (S, ...) uint8, lung parenchyma mask
``subcases/start``   (S, 3) int32, index of the sub-case's first voxel in the
                     resampled volume (negative or past the end where padded)
``rois/image``       (N, 16, 48, 48) float16, windowed, centred on each nodule
``rois/mask``        (N, ...) uint8, that nodule's consensus mask
``rois/start``       (N, 3) int32, as ``subcases/start``
``nodules/*``        one row per nodule (N rows):
    ``index`` (int16, cluster index in the scan), ``n_readers`` (int8),
    ``ratings`` (N, 4, 9) int8 in :data:`lungseg.lidc.CHARACTERISTICS` order,
    -1 where fewer than 4 readers, ``annotation_ids`` (N, 4) int32 (-1 likewise),
    ``malignancy_median`` (float32), ``label`` (int8: 0 benign, 1 malignant,
    -1 excluded), ``diameter_mm`` (float32, equivalent-sphere diameter of the
    consensus mask; it sets the size category), ``long_axis_mm`` (mean of the
    readers' longest in-plane diameters, as pylidc's ``Annotation.diameter``), ``volume_mm3``, ``mean_hu`` (inside the consensus mask, original
    grid), ``size_category`` (int8 index into :data:`SIZE_CATEGORIES`),
    ``centroid_voxel`` (N, 3) float32 original-grid (z, y, x) index,
    ``centroid_world`` (N, 3) float32 LPS mm, ``centroid_resampled`` (N, 3)
    float32 resampled-grid index, ``features`` (N, 7) float32: :data:`FEATURES`
    measured on the original grid (:func:`nodule_features`; absent in caches
    written before it); crops and composites also have
    ``ratings_majority`` (N, 9) int8, the readers' majority votes.
``irrelevant/*``     nodules marked by fewer readers than the cache's ``min_readers``
    (LIDC scans, composites of LIDC backgrounds): ``centroid_resampled`` (M, 3)
    float32 and ``diameter_mm`` (M,) float32. Detection scoring (LUNA16)
    neither counts nor penalises findings on them.

``candidates/*``    the detector's candidates (:mod:`lungseg.detect`; absent with
    ``PreprocessConfig.candidates`` off and in caches written before it), most
    blob-like first (K rows): ``centre`` (K, 3) float32 resampled-grid index,
    ``radius_mm``, ``response`` (LoG, HU), ``label`` (int8: 1 within a relevant
    nodule's radius, -1 within a nodule of fewer readers', 0 otherwise),
    ``nodule`` (row of the nodule table hit, -1 none), ``start`` (K, 3) int32:
    the first voxel of each candidate's ROI, centred as ``rois/*``. The ROIs
    themselves are cut from ``volume/*`` when read (:meth:`Cache.candidate_rois`);
    version 2 stored them cut, as ``image`` (K, 16, 48, 48) and ``mask``.
``volume/image``     the whole resampled volume, windowed as ``subcases/image`` (float16),
``volume/mask``      and every relevant nodule's mask (uint8); with ``candidates/*`` only.
Scan attributes ``kind`` ("crop", "composite"; absent for LIDC scans) and, for
composites, ``background`` say where an entry came from.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from . import __version__
from .errors import CacheError

log = logging.getLogger(__name__)

#: 2: ROIs of scans centred on voxel ``roi_shape // 2`` (:func:`lungseg.preprocess.roi_centre`),
#: as crop ROIs always were; version 1 centred them half a voxel lower.
#: 3: candidates keep only their ROIs' starts, the ROIs are cut from ``volume/*`` (a sixth of the bytes).
SCHEMA_VERSION = 3
#: The versions this lungseg reads (:meth:`Cache.candidate_rois` reads both candidate layouts).
READABLE_SCHEMAS = (2, 3)

#: Paper A's size categories (Table 2): upper diameter bound in mm, name.
SIZE_CATEGORIES = (
    (5.0, "micro"),
    (10.0, "small"),
    (30.0, "nodule"),
    (float("inf"), "mass"),
)
LABEL_NAMES = {0: "benign", 1: "malignant", -1: "excluded"}


#: Measured features of a nodule, on its own (original) grid: :func:`nodule_features`.
FEATURES = ("volume_mm3", "diameter_mm", "mean_hu", "std_hu", "p90_hu", "calcified_fraction", "surface_to_volume")
#: Voxels at or above this HU count as calcified.
CALCIFIED_HU = 200.0


def nodule_features(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """:data:`FEATURES` of one nodule: its mask and HU on the same grid of ``spacing`` (z, y, x mm)."""
    mask = np.asarray(mask, bool)
    spacing = np.asarray(spacing, float)
    voxel = float(np.prod(spacing))
    n = int(mask.sum())
    if n == 0:
        return np.full(len(FEATURES), np.nan)
    volume = n * voxel
    values = np.asarray(hu, np.float64)[mask]
    faces = 0.0
    for axis in range(3):
        padded = np.pad(mask, [(1, 1) if a == axis else (0, 0) for a in range(3)])
        faces += float(np.count_nonzero(np.diff(padded.astype(np.int8), axis=axis))) * voxel / spacing[axis]
    return np.array([volume, equivalent_diameter_mm(volume), values.mean(), values.std(),
                     float(np.percentile(values, 90)), float((values >= CALCIFIED_HU).mean()), faces / volume])


def equivalent_diameter_mm(volume_mm3: float) -> float:
    """Diameter of the sphere of ``volume_mm3``: the nodule size that sets its category."""
    return float((6.0 * volume_mm3 / math.pi) ** (1 / 3))


def size_category(diameter_mm):
    """Index into :data:`SIZE_CATEGORIES`: micro <= 5, small 5-10, nodule 10-30, mass > 30 mm.

    The one size rule of lungseg (upper bounds inclusive). A number gives an
    int, an array an array of indices; a negative or non-finite diameter is a
    ``ValueError``.
    """
    d = np.asarray(diameter_mm, dtype=float)
    if np.any(~np.isfinite(d)) or np.any(d < 0):
        raise ValueError(f"diameters must be finite and >= 0 mm, got {diameter_mm}")
    index = np.searchsorted([upper for upper, _ in SIZE_CATEGORIES], d, side="left")
    return int(index) if index.ndim == 0 else index


def scans_dir(path: str | os.PathLike) -> Path:
    """The folder that holds the per-scan files of cache ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".scans")


def _atomic_h5(final: Path):
    """A temporary HDF5 path beside ``final``; rename it onto ``final`` when complete."""
    fd, tmp = tempfile.mkstemp(prefix="." + final.name + ".", suffix=".tmp", dir=final.parent)
    os.close(fd)
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@dataclass
class ScanRecordData:
    """Everything written for one scan: root attributes and named arrays."""

    series_uid: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]   # "subcases/image", "nodules/label", ...


#: Chunks of ``volume/*``: one candidate ROI's size, so that a ROI cut at random reads a few chunks.
VOLUME_CHUNKS = (16, 48, 48)


def _storage(name: str, arr: np.ndarray) -> dict:
    """How an array is stored. Stacks (sub-cases, ROIs) item by item, compressed with LZF (h5py's own: 2.5x
    faster than gzip 4, 16 % larger). ``volume/*`` in ROI-sized chunks, the image uncompressed: ROIs are cut
    from it at random while training, and decompressing the chunks a ROI touches took 10x the read."""
    if arr.ndim < 3 or arr.size <= 4096:
        return {}
    if not name.startswith("volume/"):
        return {"chunks": (1,) + arr.shape[1:], "compression": "lzf", "shuffle": True}
    chunks = tuple(min(c, n) for c, n in zip(VOLUME_CHUNKS, arr.shape))
    return {"chunks": chunks} if arr.dtype.kind == "f" else {"chunks": chunks, "compression": "lzf", "shuffle": True}


class CacheWriter:
    """Adds scans to a cache, one complete scan file at a time.

    Opening an existing cache checks its schema version and that it was made
    with the same ``config``; a cache made with other settings is refused
    rather than mixed.
    """

    def __init__(self, path: str | os.PathLike, config: Mapping[str, Any]):
        self.path = Path(path)
        self.config_json = json.dumps(dict(config), sort_keys=True)
        self.dir = scans_dir(self.path)
        if self.path.exists():
            with _open(self.path) as f:
                _check_version(f, self.path)
                old = f.attrs.get("config", "{}")
            if json.loads(old) != json.loads(self.config_json):
                raise CacheError(
                    f"{self.path}: was made with other preprocessing settings; "
                    "write to a new --out file or delete it first"
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink()
        if not self.path.exists():
            self._write_master()

    def done(self) -> set[str]:
        """Series UIDs whose scan files are complete."""
        return {p.stem for p in self.dir.glob("*.h5")}

    def add(self, record: ScanRecordData) -> None:
        """Write one scan file atomically, then relink the cache to include it.

        Refuses up front, with a :class:`CacheError`, when the disk has less
        free space than the scan's arrays take uncompressed (HDF5 handles a
        full disk in the middle of a write badly).
        """
        final = self.dir / f"{record.series_uid}.h5"
        need = sum(np.asarray(a).nbytes for a in record.arrays.values()) + (1 << 20)
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise CacheError(f"{self.dir}: {free / 1e6:.0f} MB free, scan {record.series_uid} needs up to "
                             f"{need / 1e6:.0f} MB; free some space and run the command again (finished scans are "
                             "kept)")
        tmp = _atomic_h5(final)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                for key, value in record.attrs.items():
                    f.attrs[key] = value
                for name, arr in record.arrays.items():
                    arr = np.asarray(arr)
                    f.create_dataset(name, data=arr, **_storage(name, arr))
            _fsync(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._write_master()

    def _write_master(self) -> None:
        tmp = _atomic_h5(self.path)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["schema_version"] = SCHEMA_VERSION
                f.attrs["lungseg_version"] = __version__
                f.attrs["config"] = self.config_json
                scans = f.create_group("scans")
                for uid in sorted(self.done()):
                    scans[uid] = h5py.ExternalLink(f"{self.dir.name}/{uid}.h5", "/")
            _fsync(tmp)
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()


#: Per-scan files a Cache keeps open for reuse (each also stays open while a group read from it is held).
_OPEN_SCANS = 64

#: What every scan of a cache holds (LIDC scans, composites and crops alike).
_REQUIRED_GROUPS = ("nodules", "rois")


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise CacheError(f"{path}: no such cache file") from None
    except OSError as exc:
        raise CacheError(f"{path}: not a readable HDF5 cache ({exc})") from None


def _check_version(f: h5py.File, path: Path) -> None:
    version = f.attrs.get("schema_version")
    if version is None:
        raise CacheError(f"{path}: not a lungseg cache (no schema_version attribute)")
    if int(version) not in READABLE_SCHEMAS:
        raise CacheError(
            f"{path}: cache schema version {int(version)}, this lungseg reads versions "
            f"{', '.join(map(str, READABLE_SCHEMAS))}; run lungseg preprocess again"
        )


class Cache:
    """Read access to a cache; opens the file lazily, once per process.

    Safe to create in the main process and use inside DataLoader workers: the
    HDF5 handle is opened on first use in each process.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._scans: dict[str, h5py.File] = {}
        self._pid: int | None = None
        with _open(self.path) as f:
            _check_version(f, self.path)
            self.config = json.loads(f.attrs.get("config", "{}"))
            self.series_uids = sorted(f["scans"].keys()) if "scans" in f else []

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file, self._scans = _open(self.path), {}
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_scans"] = None, {}
        return state

    def close(self) -> None:
        for f in self._scans.values():
            f.close()
        self._scans = {}
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.series_uids)

    def scan(self, series_uid: str) -> h5py.Group:
        """A scan's group, read from its per-scan file in the ``.scans`` folder beside this cache (by this
        cache's own name, so a cache renamed with its folder still reads)."""
        self.file                                                   # per process: reopen after a fork
        if series_uid in self._scans:
            self._scans[series_uid] = self._scans.pop(series_uid)      # most recently used last
            return self._scans[series_uid]["/"]
        if series_uid not in self.series_uids:
            raise CacheError(f"{self.path}: no scan {series_uid}")
        part = scans_dir(self.path) / f"{series_uid}.h5"
        if not part.exists():
            raise CacheError(f"{part}: missing; a cache is {self.path.name} together with the folder "
                             f"{part.parent.name} beside it: copy or move both")
        try:
            f = h5py.File(part, "r")
        except OSError:
            raise CacheError(f"{part}: cannot be read (truncated or corrupt); delete it and run lungseg "
                             "preprocess again with the same --out to rebuild that scan") from None
        missing = [name for name in _REQUIRED_GROUPS if name not in f]
        if missing:
            f.close()
            raise CacheError(f"{part}: no {', '.join(m + '/' for m in missing)} group; not written by lungseg "
                             "preprocess or import-crops, or damaged: delete it and run that command again")
        self._scans[series_uid] = f
        if len(self._scans) > _OPEN_SCANS:         # forget the least recently used: it closes once no group of it
            self._scans.pop(next(iter(self._scans)))   # is held any more, so a large cache stays under the fd limit
        return f["/"]

    def candidates(self, series_uid: str) -> h5py.Group:
        """A scan's detector candidates (``candidates/*``); a clear error for caches written before the detector."""
        g = self.scan(series_uid)
        if "candidates" not in g:
            raise CacheError(f"{self.path}: scan {series_uid} has no detector candidates (preprocessed with "
                             "--no-candidates, or before the detector came); preprocess the scans again into a new "
                             "cache")
        return g["candidates"]

    def candidate_rois(self, series_uid: str, which=slice(None), *, masks: bool = False):
        """The ROIs of a scan's candidates ``which`` (an index, a slice or an index array), float16 windowed.

        One index gives one (16, 48, 48) ROI, else a (K, 16, 48, 48) stack; with
        ``masks``, also the relevant nodules' masks there (uint8), as a pair.
        Cut from ``volume/*`` at ``candidates/start`` (:class:`lungseg.preprocess.Crops`,
        zero past the volume); a version 2 scan had them stored cut.
        """
        from .preprocess import Crops

        c, g = self.candidates(series_uid), self.scan(series_uid)
        single = isinstance(which, (int, np.integer))
        pick = (lambda ds: ds[which]) if single or isinstance(which, slice) else (lambda ds: ds[()][which])
        if "image" in c:                                        # schema version 2
            out = [pick(c[name]) for name in (("image", "mask") if masks else ("image",))]
        else:
            starts = pick(c["start"]).reshape(-1, 3)
            shape = g["rois/image"].shape[1:]
            out = []
            for name in ("volume/image", "volume/mask") if masks else ("volume/image",):
                ds = g[name]
                rois = Crops(ds if len(starts) < 8 else ds[()], starts, shape)   # many ROIs: read the volume once
                out.append(rois[0] if single else rois[:])
        return tuple(out) if masks else out[0]

    def nodule_table(self, series_uid: str) -> dict[str, np.ndarray]:
        g = self.scan(series_uid)
        return {k: g["nodules"][k][()] for k in g["nodules"].keys()} if "nodules" in g else {}

    def summary(self) -> dict[str, Any]:
        """Scans, nodules per size category and label, and per-scan and per-nodule details."""
        from .lidc import CHARACTERISTICS

        scans = []
        by_size = {name: 0 for _, name in SIZE_CATEGORIES}
        by_label = {name: 0 for name in ("benign", "malignant", "excluded")}
        for uid in self.series_uids:
            g = self.scan(uid)
            a = g.attrs
            table = self.nodule_table(uid)
            nodules = []
            for i in range(int(a["n_nodules"])):
                cat = SIZE_CATEGORIES[int(table["size_category"][i])][1]
                label = LABEL_NAMES[int(table["label"][i])]
                by_size[cat] += 1
                by_label[label] += 1
                n = int(table["n_readers"][i])
                nodules.append({
                    "index": int(table["index"][i]),
                    "diameter_mm": round(float(table["diameter_mm"][i]), 2),
                    "long_axis_mm": round(float(table["long_axis_mm"][i]), 2),
                    "volume_mm3": round(float(table["volume_mm3"][i]), 1),
                    "mean_hu": round(float(table["mean_hu"][i]), 1),
                    "n_readers": n,
                    "ratings": [dict(zip(CHARACTERISTICS, map(int, r))) for r in table["ratings"][i][:n]
                                if (r >= 0).any()],
                    "malignancy_median": float(table["malignancy_median"][i]),
                    **({"ratings_majority": dict(zip(CHARACTERISTICS, map(int, table["ratings_majority"][i])))}
                       if "ratings_majority" in table else {}),
                    "label": label,
                    "size_category": cat,
                    "centroid_world_lps_mm": [round(float(v), 2) for v in table["centroid_world"][i]],
                })
            scans.append({
                "kind": str(a.get("kind", "scan")),
                "patient_id": str(a["patient_id"]),
                "series_uid": uid,
                "n_slices": int(a["original_shape"][0]),
                "original_spacing_mm": [float(v) for v in a["original_spacing"]],
                "lung_volume_ml": round(float(a["lung_volume_ml"]), 1),
                "n_subcases": int(g["subcases/image"].shape[0]),
                "nodules": nodules,
            })
        return {
            "cache": str(self.path),
            "schema_version": SCHEMA_VERSION,
            "n_scans": len(scans),
            "n_nodules": sum(len(s["nodules"]) for s in scans),
            "nodules_by_size_category": by_size,
            "nodules_by_label": by_label,
            "scans": scans,
        }


def format_summary(summary: Mapping[str, Any], *, per_scan: bool = True) -> str:
    """The summary as plain text for the terminal."""
    sizes = ", ".join(f"{k} {v}" for k, v in summary["nodules_by_size_category"].items())
    labels = ", ".join(f"{k} {v}" for k, v in summary["nodules_by_label"].items())
    lines = [
        f"{summary['cache']}: {summary['n_scans']} scans, {summary['n_nodules']} nodules",
        f"  by size (<=5, 5-10, 10-30, >30 mm): {sizes}",
        f"  by label: {labels}",
    ]
    if per_scan:
        for s in summary["scans"]:
            if s.get("kind") == "crop":
                lines.append(f"{s['patient_id']}  crop {s['series_uid']}  ({s['n_slices']} slices)")
            else:
                lines.append(
                    f"{s['patient_id']}  {s['n_slices']} slices  lungs {s['lung_volume_ml'] / 1000:.2f} L"
                    f"  {len(s['nodules'])} nodules  {s['series_uid']}"
                )
            for n in s["nodules"]:
                mal = ",".join(str(r["malignancy"]) for r in n["ratings"]) or \
                    f"{n.get('ratings_majority', {}).get('malignancy', '?')} (majority)"
                lines.append(
                    f"  nodule {n['index']}: {n['diameter_mm']:.1f} mm ({n['size_category']}), "
                    f"{n['volume_mm3']:.0f} mm3, mean {n['mean_hu']:.0f} HU, "
                    f"{n['n_readers']} readers, malignancy {mal} -> {n['label']}"
                )
    return "\n".join(lines)

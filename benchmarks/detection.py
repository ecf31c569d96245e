"""Detection benchmark, the LUNA16 way: FROC and CPM on real scans with real nodules pasted in.

    python benchmarks/detection.py [--data ../shared/data] [--out benchmarks/out/detection]
                                   [--fold 4] [--per-background 2] [--seed 0]

Builds the test set reproducibly from ``../shared/data`` (every step is a
``lungseg`` command, printed before it runs and kept in ``OUT/commands.sh``):

1. **Test nodules** only from the held-out fold ``--fold`` of the committed
   patient-level folds (``data_manifests/nodules_folds5_seed0_fold{F}.csv``):
   fold 4 by default, the fold of LIDC-IDRI-0001, so that a model trained on
   the other folds has seen neither the pasted nodules nor 0001's.
2. **Test backgrounds** that no model here trained on: the real LIDC-IDRI-0001
   (with its own annotated nodule), Lung_Dx-A0002 and the RICORD series (a
   licence for testing and benchmarking only), ``--per-background`` composites
   each (``lungseg composite``), and the real 0001 as it is.
3. ``lungseg preprocess`` of all of them into one cache, then ``lungseg
   evaluate --split all`` of each model: FROC, CPM with a bootstrap interval
   over scans, sensitivity per size category, Table 4 on detected nodules.
4. The models of today: the 3D Res U-Net trained on the crops of the other
   folds (``--preset cpu``, the real-nodule benchmark's recipe) and the demo's
   segmenter (trained on six LIDC twins by ``lungseg demo``).
5. Realism: a figure of composites next to the real nodule of 0001, and the
   mean HU profile across the nodule boundary (signed distance to the mask,
   mm) of 0001's real nodule in its scan, of the crops in their own margins,
   and of the pasted nodules in the composites.

Writes ``OUT/results.json``, ``OUT/results.md`` and the figures
``benchmarks/figures/detection_composites.png`` and ``detection_boundary_profile.png``. Resumable: finished steps are skipped. Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from lungseg.splits import MANIFESTS_DIR, fold_files
from real_nodules import ROOT, Runner, lungseg

#: CPM of published detectors on LUNA16 (10-fold CV on 888 scans; other data, so not one-to-one).
LUNA16_CPM = [("Liu et al. 2019", 0.952), ("nnDetection (Baumgartner et al. 2021)", 0.930),
              ("MONAI RetinaNet", 0.93), ("Ding et al. 2017", 0.891), ("DeepLung (Zhu et al. 2018)", 0.842)]
BACKGROUNDS = ["lidc/LIDC-IDRI-0001", "ct/Lung_Dx-A0002", "ct/MIDRC-RICORD-1A-419639-000082"]
PROFILE_MM = np.arange(-4.0, 8.01, 0.5)        # signed distance bins: negative inside the mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "detection")
    parser.add_argument("--fold", type=int, default=4)
    parser.add_argument("--per-background", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out, data = args.out.resolve(), args.data.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(out)
    folds = fold_files(MANIFESTS_DIR, "nodules", 5, 0)
    split = folds[f"fold{args.fold}"]

    composites, cache = out / "composites", out / "test.h5"
    run(lungseg("composite", *[data / b for b in BACKGROUNDS], "--crops", data / "nodules", "--out", composites,
                "--per-background", args.per_background, "--split-file", split, "--split", "test",
                "--seed", args.seed))
    run(lungseg("preprocess", "--composite-root", composites, "--out", cache))
    run(lungseg("preprocess", "--lidc-root", data / "lidc", "--out", cache))

    models = {}
    crops = out / "crops.h5"
    if not (out / "import.done").exists():
        run(lungseg("import-crops", data / "nodules", "--out", crops))
        (out / "import.done").write_text("")
    seg_run = out / "runs" / f"resunet3d-cpu-fold{args.fold}"
    failed = seg_run / "training_failed.txt"
    if (not (seg_run / "last.pt").exists() or _epochs(seg_run) < 8) and not failed.exists():
        resume = ["--resume"] if (seg_run / "last.pt").exists() else []
        try:
            run(lungseg("train-seg", "--cache", crops, "--split-file", split, "--out", seg_run, "--preset", "cpu",
                        *resume))
        except subprocess.CalledProcessError as exc:     # e.g. a non-finite loss: keep the last good epoch
            if not (seg_run / "last.pt").exists():
                raise
            failed.write_text(f"train-seg stopped ({exc.returncode}); evaluating last.pt after "
                              f"{_epochs(seg_run)} epochs\n")
            print(failed.read_text(), end="")
    epochs = _epochs(seg_run)
    models[f"Res U-Net on crops (cpu preset, {epochs} epochs, folds except {args.fold})"] = seg_run / "last.pt"
    demo = out / "demo"
    if not (demo / "train-seg" / "last.pt").exists():
        run(lungseg("demo", "--out", demo))
    seg_demo = demo / "train-seg" / ("best.pt" if (demo / "train-seg" / "best.pt").exists() else "last.pt")
    models["Res U-Net of lungseg demo (6 twins)"] = seg_demo

    results = {"data": {"cache": str(cache), "fold": args.fold, "split_file": str(split),
                        "backgrounds": BACKGROUNDS, "per_background": args.per_background, "seed": args.seed},
               "models": {}}
    for i, (name, ckpt) in enumerate(models.items()):
        dest = out / "eval" / f"model{i}"
        if not (dest / "evaluation.json").exists() or (dest / "evaluation.json").stat().st_mtime < ckpt.stat().st_mtime:
            run(lungseg("evaluate", "--cache", cache, "--seg", ckpt, "--split", "all", "--out", dest,
                        "--bootstrap", 1000))
        report = json.loads((dest / "evaluation.json").read_text())
        results["models"][name] = {"checkpoint": str(ckpt), "segmentation": report["segmentation"]}
    results["profile"] = boundary_profiles(data, composites)
    results["test_set"] = test_set_summary(composites, cache)
    figures = ROOT / "benchmarks" / "figures"
    composite_figure(data, composites, figures / "detection_composites.png")
    profile_figure(results["profile"], figures / "detection_boundary_profile.png")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    text = markdown(results)
    (out / "results.md").write_text(text + "\n")
    print(text)


def _epochs(run: Path) -> int:
    log = run / "log.jsonl"
    return sum(1 for line in open(log) if line.strip()) if log.exists() else 0


# --------------------------------------------------------------------------
# The test set
# --------------------------------------------------------------------------

def test_set_summary(composites: Path, cache: Path) -> dict:
    from lungseg.cache import Cache

    reports = [json.loads(p.read_text()) for p in sorted(composites.glob("*/nodules.json"))]
    placements: dict[str, int] = {}
    for r in reports:
        for n in r["nodules"]:
            placements[n["placement"]] = placements.get(n["placement"], 0) + 1
    with Cache(cache) as c:
        n_scans = len(c.series_uids)
        diameters = np.concatenate([c.nodule_table(u)["diameter_mm"] for u in c.series_uids])
        readers = np.concatenate([c.nodule_table(u)["n_readers"] for u in c.series_uids])
    return {"scans": n_scans, "composites": len(reports), "nodules": int(len(diameters)),
            "relevant_nodules": int(((readers >= 3) & (diameters >= 3)).sum()), "placements": placements,
            "diameter_mm_median": float(np.median(diameters)), "diameter_mm_range": [float(diameters.min()),
                                                                                      float(diameters.max())]}


# --------------------------------------------------------------------------
# Realism: boundary profiles and a figure
# --------------------------------------------------------------------------

def _profile(hu: np.ndarray, mask: np.ndarray, spacing, region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of HU per signed-distance bin (PROFILE_MM) around ``mask`` (inside negative)."""
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    d = np.where(mask, -inside, outside)
    keep = (d >= PROFILE_MM[0] - 0.25) & (d < PROFILE_MM[-1] + 0.25)
    if region is not None:
        keep &= region
    b = np.clip(np.round((d[keep] - PROFILE_MM[0]) / 0.5).astype(int), 0, len(PROFILE_MM) - 1)
    return (np.bincount(b, weights=hu[keep].astype(float), minlength=len(PROFILE_MM)),
            np.bincount(b, minlength=len(PROFILE_MM)).astype(float))


def _box(mask: np.ndarray, pad_vox) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0) - pad_vox, idx.max(0) + pad_vox + 1
    return tuple(slice(max(int(a), 0), int(b)) for a, b in zip(lo, hi))


def boundary_profiles(data: Path, composites: Path) -> dict:
    """Mean HU by signed distance to the nodule mask: real 0001 nodule, the crops' margins, pasted nodules."""
    from lungseg import dicomio, lidc
    from lungseg.crops import find_crops, read_crop

    out = {"distance_mm": PROFILE_MM.tolist()}
    # 1. LIDC-IDRI-0001's nodule in its scan (consensus of >= 3 readers).
    volume = dicomio.read_series(data / "lidc" / "LIDC-IDRI-0001")
    with lidc.LidcDatabase() as db:
        record = db.scan(series_uid=volume.series_uid)
        k_to_slice = lidc.slice_index_map(record, volume.slice_z_world())
        (nodule,) = lidc.find_nodules(record, db.annotations(record.id), min_readers=3)
        mask, box = lidc.consensus_mask(nodule, record.slice_zvals, volume.shape, mask_readers=3, k_to_slice=k_to_slice)
    full = np.zeros(volume.shape, bool)
    full[box] = mask
    sl = _box(full, np.ceil(10 / np.asarray(volume.spacing)).astype(int))
    s, n = _profile(volume.hu[sl], full[sl], volume.spacing)
    out["real_0001"] = _mean(s, n)
    # 2. The crops, in their own margins (every 4th crop, enough for a mean curve).
    items, _ = find_crops(data / "nodules")
    s_all, n_all = np.zeros(len(PROFILE_MM)), np.zeros(len(PROFILE_MM))
    for row, image, mask_path in items[::4]:
        vol, m = read_crop(image, mask_path)
        s, n = _profile(vol.hu, m, vol.spacing)
        s_all += s
        n_all += n
    out["crops"] = _mean(s_all, n_all)
    out["n_crops"] = len(items[::4])
    # 3. The pasted nodules in the composites, per background.
    per_bg: dict[str, list[np.ndarray]] = {}
    for path in sorted(composites.glob("*/nodules.json")):
        report = json.loads(path.read_text())
        vol = dicomio.read_series(path.parent / "dicom")
        labels, _ = dicomio.read_nifti_mask(path.parent / "nodules.nii.gz")
        name = report["background"]["name"]
        acc = per_bg.setdefault(name, [np.zeros(len(PROFILE_MM)), np.zeros(len(PROFILE_MM))])
        for nod in report["nodules"]:
            if nod["source"] != "crop":
                continue
            m = labels == nod["id"]
            sl = _box(m, np.ceil(10 / np.asarray(vol.spacing)).astype(int))
            s, n = _profile(vol.hu[sl], m[sl], vol.spacing, region=None)
            acc[0] += s
            acc[1] += n
    out["composites"] = {name: _mean(s, n) for name, (s, n) in per_bg.items()}
    return out


def _mean(s: np.ndarray, n: np.ndarray) -> list[float | None]:
    return [float(a / b) if b else None for a, b in zip(s, n)]


def profile_figure(profile: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(profile["distance_mm"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(d, np.array(profile["real_0001"], float), "k-", lw=2, label="LIDC-IDRI-0001 nodule, real scan")
    ax.plot(d, np.array(profile["crops"], float), "k--", lw=1.5, label=f"crops, own margins ({profile['n_crops']})")
    for name, values in profile["composites"].items():
        ax.plot(d, np.array(values, float), "-", lw=1, label=f"pasted into {name}")
    ax.axvline(0, color="grey", lw=0.5)
    ax.axvspan(0, 3, color="C1", alpha=0.1, label="blending margin (3 mm)")
    ax.set_xlabel("signed distance to the nodule mask, mm (inside < 0)")
    ax.set_ylabel("mean HU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def composite_figure(data: Path, composites: Path, path: Path, per_row: int = 5) -> None:
    """Axial patches (48 mm) through real and pasted nodules, one pair of rows per background:
    as a reader sees them, then outlined and named."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lungseg import dicomio

    rows: dict[str, list] = {}
    for p in sorted(composites.glob("*/nodules.json")):
        report = json.loads(p.read_text())
        bg = report["background"]["name"]
        if bg in rows:
            continue                      # the first composite of each background
        vol = dicomio.read_series(p.parent / "dicom")
        labels, _ = dicomio.read_nifti_mask(p.parent / "nodules.nii.gz")
        rows[bg] = [(vol, labels == n["id"], n) for n in report["nodules"]][:per_row]
    fig, axes = plt.subplots(2 * len(rows), per_row, figsize=(2.1 * per_row, 4.4 * len(rows)), squeeze=False)
    for r, (bg, tiles) in enumerate(rows.items()):
        for c in range(per_row):
            for k in (0, 1):
                axes[2 * r + k, c].axis("off")
            if c >= len(tiles):
                continue
            vol, m, nod = tiles[c]
            z, y, x = (int(round(v)) for v in nod["centre_voxel_zyx"])
            h = int(round(24 / vol.spacing[1]))
            sl = (z, slice(max(y - h, 0), y + h), slice(max(x - h, 0), x + h))
            img = np.clip((vol.hu[sl].astype(float) + 1000) / 1400, 0, 1)
            for k in (0, 1):
                ax = axes[2 * r + k, c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                if k:
                    ax.contour(m[sl], [0.5], colors="red", linewidths=0.7)
                    kind = "real (LIDC)" if nod["source"] == "lidc" else f"pasted, {nod['placement']}"
                    ax.set_title(f"{kind}, {nod['diameter_mm']:.0f} mm", fontsize=6)
        axes[2 * r, 0].set_title(f"{bg} ({vol.spacing[0]:g} mm slices)", fontsize=7, loc="left")
    fig.suptitle("Odd rows: as a reader sees them; even rows: which is which (red: mask)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

def _ci(v, digits=3) -> str:
    return f"{v[0]:.{digits}f} [{v[1][0]:.{digits}f}, {v[1][1]:.{digits}f}]"


def markdown(results: dict) -> str:
    ts = results["test_set"]
    lines = [f"Test set: {ts['scans']} scans ({ts['composites']} composites and the real LIDC-IDRI-0001), "
             f"{ts['nodules']} nodules ({ts['relevant_nodules']} relevant: >= 3 readers, >= 3 mm; median "
             f"{ts['diameter_mm_median']:.1f} mm, {ts['diameter_mm_range'][0]:.1f}-{ts['diameter_mm_range'][1]:.1f} mm); "
             f"pasted: {', '.join(f'{k} {v}' for k, v in sorted(ts['placements'].items()))}.", "",
             "| model | CPM [95 % CI] | sens. @1 FP/scan | @2 | @4 | FP/scan at max sens. | max sens. |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["models"].items():
        f = m["segmentation"].get("froc")
        if not f:
            lines.append(f"| {name} | (no FROC) | | | | | |")
            continue
        at = {float(k): v for k, v in f["sensitivity_at_fp_rates"].items()}
        curve = f["curve"]
        top = (f"{curve['fp_per_scan'][-1]:.1f} | {curve['sensitivity'][-1]:.3f}" if curve["sensitivity"]
               else "- | 0.000")
        lines.append(f"| {name} | {f['cpm']:.3f} [{f['cpm_ci95'][0]:.3f}, {f['cpm_ci95'][1]:.3f}] | "
                     f"{at[1.0]:.3f} | {at[2.0]:.3f} | {at[4.0]:.3f} | {top} |")
    for name, cpm in LUNA16_CPM:
        lines.append(f"| {name}, LUNA16 (other data) | {cpm:.3f} | | | | | |")
    p = results["profile"]
    d = list(p["distance_mm"])
    shown = [-3.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
    lines += ["", "Mean HU by signed distance to the nodule mask (mm; inside < 0; blending margin 0-3 mm):", "",
              "| nodules | " + " | ".join(f"{x:g}" for x in shown) + " |", "|---|" + "---|" * len(shown)]
    curves = [("LIDC-IDRI-0001, real scan", p["real_0001"]), (f"crops, own margins ({p['n_crops']})", p["crops"])]
    curves += [(f"pasted into {k}", v) for k, v in p["composites"].items()]
    for name, values in curves:
        cells = [values[d.index(x)] for x in shown]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.0f}" for v in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

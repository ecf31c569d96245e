"""Paper B on real nodules: Table I, Mask R-CNN and the 2D U-Net, the ``cpu`` preset.

    python benchmarks/maskrcnn.py [--data ../shared/data] [--out benchmarks/out/maskrcnn]
                                  [--stage all|data|train|report]

One command, resumable (finished steps are skipped); every step is a ``lungseg``
command, printed before it runs and kept in ``OUT/commands.sh``.

Data: LUNA16 images cannot be had here, so the slices come from real nodules in
a real lung. The nodule crops of ``../shared/data/nodules`` are split by patient
with the committed folds (``data_manifests/nodules_folds5_seed0.csv``): folds
0-2 train, fold 3 val, fold 4 test (60/20/20, paper B's 2134/711/711 slices are
60/20/20 too), written to ``data_manifests/maskrcnn_split_seed0.csv``. Each
split's nodules are pasted into the real LIDC-IDRI-0001 (``lungseg composite``,
10 nodules per composite), the only real scan here that LUNA16 would include
(2.5 mm slices). The background is therefore shared by the three splits: the
nodules, which are what is learned, are unseen in val and test, but the lung
around them is not; figures on a new patient's lung may be lower. The
composites are exported to the LUNA16 layout (``lungseg maskrcnn export``) and
cut into slices and patches from there, as paper B does from LUNA16. The
background's own nodule (LIDC-IDRI-0001's 23 mm nodule, in every composite)
is moved to ``annotations_excluded.csv`` in every split: it would otherwise be
one nodule seen in training and tested ten times.

Training (``--preset cpu`` of each command, :mod:`lungseg_maskrcnn.configs`):
the seven Table I patch classifiers; Mask R-CNN ResNet18-FPN with both of paper
B's schedules; the 2D U-Net. Evaluation: ``lungseg maskrcnn evaluate`` on the
test slices (95 % intervals by bootstrap over composites). About an hour on 2
CPU cores.

Writes ``OUT/results.json``, ``OUT/results.md`` and
``benchmarks/figures/maskrcnn.png``. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import sys
import time
from pathlib import Path

from lungseg.splits import MANIFESTS_DIR
from real_nodules import ROOT, Runner, lungseg

SPLIT_FILE = MANIFESTS_DIR / "maskrcnn_split_seed0.csv"
FOLD_SPLITS = {"0": "train", "1": "train", "2": "train", "3": "val", "4": "test"}
#: Composites of LIDC-IDRI-0001 per split, 10 nodules each.
COMPOSITES = {"train": 30, "val": 8, "test": 10}
NODULES_PER_COMPOSITE = 10
SEEDS = {"train": 11, "val": 12, "test": 13}
BACKGROUND = "lidc/LIDC-IDRI-0001"


def write_split() -> Path:
    """Folds 0-2 train, 3 val, 4 test, from the committed patient folds."""
    with open(MANIFESTS_DIR / "nodules_folds5_seed0.csv") as f:
        rows = [(r["patient_id"], FOLD_SPLITS[r["fold"].strip()]) for r in csv.DictReader(f)]
    SPLIT_FILE.write_text("patient_id,split\n" + "".join(f"{p},{s}\n" for p, s in rows))
    return SPLIT_FILE


PATCH_ARCHS = ("lenet", "alexnet", "vgg16", "resnet18", "resnet20", "resnet50", "resnet101")
SCHEDULES = ("all", "staged")


def exclude_own(composites: Path, luna: Path) -> int:
    """Move the backgrounds' own nodules from annotations.csv to annotations_excluded.csv; returns how many."""
    from lungseg_maskrcnn import luna16

    own = set()
    for js in composites.glob("*/nodules.json"):
        for n in json.loads(js.read_text())["nodules"]:
            if n.get("placement") == "own":
                own.add(tuple(round(v, 1) for v in n["centre_world_lps_mm"]))
    rows = luna16.read_annotations(luna / "annotations.csv")
    keep = [r for r in rows if (round(r["coordX"], 1), round(r["coordY"], 1), round(r["coordZ"], 1)) not in own]
    moved = [r for r in rows if r not in keep]
    luna16.write_annotations(luna / "annotations.csv", keep)
    luna16.write_annotations(luna / "annotations_excluded.csv", moved)
    return len(moved)


def data_stage(run: Runner, data: Path, out: Path) -> None:
    split = write_split()
    for part, n in COMPOSITES.items():
        composites, luna, slices = out / "composites" / part, out / "luna16" / part, out / "slices" / f"{part}.h5"
        run(lungseg("composite", data / BACKGROUND, "--crops", data / "nodules", "--out", composites,
                    "--per-background", n, "--nodules", NODULES_PER_COMPOSITE, "--split-file", split,
                    "--split", part, "--seed", SEEDS[part]))
        if slices.exists():
            continue
        run(lungseg("maskrcnn", "export", *sorted(p.parent for p in composites.glob("*/nodules.json")),
                    "--out", luna, "--compress"))
        print(f"# {part}: {exclude_own(composites, luna)} rows of the background's own nodule excluded", flush=True)
        run(lungseg("maskrcnn", "slices", luna, "--out", slices))


def _runs(out: Path) -> dict[str, tuple[Path, list]]:
    """name -> (run folder, train command)."""
    s = out / "slices"
    runs = {f"patch-{a}": (out / "runs" / f"patch-{a}",
                           ["train-patch", "--train", s / "train.h5", "--val", s / "val.h5", "--arch", a,
                            "--preset", "cpu"]) for a in PATCH_ARCHS}
    runs |= {f"mask-{k}": (out / "runs" / f"mask-{k}", ["train", "--train", s / "train.h5", "--preset", "cpu",
                                                      "--schedule", k]) for k in ("staged", "all")}
    runs["unet"] = (out / "runs" / "unet", ["train-unet", "--train", s / "train.h5", "--preset", "cpu"])
    # shorter runs, for how far training had got
    runs |= {f"mask-{k}-450": (out / "runs" / f"mask-{k}-450", [*runs[f"mask-{k}"][1], "--iterations", 450])
             for k in SCHEDULES}
    runs["unet-300"] = (out / "runs" / "unet-300", [*runs["unet"][1], "--iterations", 300])
    return runs


def finished(folder: Path) -> bool:
    """Whether a run has logged its last epoch or step."""
    if not (folder / "config.json").exists() or not (folder / "log.jsonl").exists():
        return False
    cfg = json.loads((folder / "config.json").read_text())
    rows = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if x.strip()]
    key, last = ("epoch", cfg.get("epochs")) if cfg["kind"] == "patch" else ("step", cfg.get("iterations"))
    return bool(rows) and rows[-1][key] == last


def train_stage(run: Runner, out: Path, only: list[str] | None) -> dict[str, float]:
    seconds = {}
    times = out / "train_seconds.json"
    if times.exists():
        seconds = json.loads(times.read_text())
    for name, (folder, cmd) in _runs(out).items():
        if only and name not in only:
            continue
        if finished(folder):
            print(f"# {name}: trained", flush=True)
            continue
        resume = ["--resume"] if (folder / "last.pt").exists() else []
        (folder.parent).mkdir(parents=True, exist_ok=True)
        seconds[name] = seconds.get(name, 0.0) + run(lungseg("maskrcnn", *cmd, "--out", folder, *resume),
                                                     log_file=folder.parent / f"{name}.log")
        times.write_text(json.dumps(seconds, indent=2))
    return seconds


def paper_timing(out: Path) -> dict:
    """Seconds per training step and per test slice of paper B's configuration (ResNet101-FPN, 512 x 512)."""
    path = out / "paper_timing.json"
    if path.exists():
        return json.loads(path.read_text())
    import numpy as np
    import torch

    from lungseg_maskrcnn import configs, train
    from lungseg_maskrcnn.slices import read_slices

    cfg = configs.MaskConfig()
    data = read_slices(out / "slices" / "test.h5")
    torch.manual_seed(0)
    model = train.build_model("mask", cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    images, maps = train._batch(data, cfg, 1)
    x = [torch.from_numpy(im)[None].expand(3, -1, -1) for im in images]
    targets = [train.targets_of(m) for m in maps]
    steps = []
    for _ in range(2):
        t = time.perf_counter()
        model.train()
        loss = sum(model(x, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - t)
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        model([torch.from_numpy(np.ascontiguousarray(images[0]))[None].expand(3, -1, -1)])
    result = {"config": "paper B: ResNet101-FPN, whole 512 x 512 slices, batch 2, torchvision's proposals",
              "train_step_s": round(min(steps), 1), "test_slice_s": round(time.perf_counter() - t, 1),
              "iterations": cfg.iterations}
    path.write_text(json.dumps(result, indent=2))
    return result


#: Whole real scans for ``lungseg maskrcnn predict``: the background of every composite (its own nodule was an
#: excluded finding in training) and a scan no model saw (8 mm slices, outside LUNA16's rule).
PREDICT_SCANS = ("lidc/LIDC-IDRI-0001", "ct/Lung_Dx-A0002")


def predict_real(run: Runner, out: Path, data: Path, model: Path) -> dict:
    """Findings of a Mask R-CNN on whole real scans; for 0001, whether the readers' nodule is hit (LUNA16's rule:
    a finding within the nodule's radius of its centre)."""
    import numpy as np

    from lungseg_maskrcnn import luna16

    _, rows = luna16.reference_list(lidc_root=data / "lidc")
    reference = [r for r in rows if not np.isnan(r["coordX"])]
    result = {}
    for scan in PREDICT_SCANS:
        folder = out / "predict" / Path(scan).name
        if not list(folder.glob("*/nodules.json")):
            folder.mkdir(parents=True, exist_ok=True)
            run(lungseg("maskrcnn", "predict", data / scan, "--model", model, "--out", folder))
        report = json.loads(next(folder.glob("*/nodules.json")).read_text())
        row = {"findings": report["n_nodules"], "seconds": report["timings_s"],
               "top": [{k: n[k] for k in ("diameter_mm", "nodule_probability", "slices", "centroid_world_lps_mm")}
                       for n in report["nodules"][:5]]}
        for ref in reference:
            if ref["seriesuid"] == report["series_uid"]:
                centre = np.array([ref["coordX"], ref["coordY"], ref["coordZ"]])
                ranks = [i + 1 for i, n in enumerate(report["nodules"])
                         if np.linalg.norm(np.array(n["centroid_world_lps_mm"]) - centre) <= ref["diameter_mm"] / 2]
                row["reference_nodule"] = {"diameter_mm": round(ref["diameter_mm"], 1),
                                           "hit_rank": ranks[0] if ranks else None}
        result[Path(scan).name] = row
    return result


def report_stage(run: Runner, out: Path, data: Path) -> dict:
    from lungseg_maskrcnn.evaluate import PAPER, PAPER_TABLE1
    from lungseg_maskrcnn.slices import counts

    results = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPU cores",
               "data": {p: counts(out / "slices" / f"{p}.h5") for p in COMPOSITES},
               "train_seconds": json.loads((out / "train_seconds.json").read_text()), "test": {}}
    for name, (folder, _) in _runs(out).items():
        if not (folder / "model.pt").exists():
            continue
        report = out / "test" / name
        report.mkdir(parents=True, exist_ok=True)
        if not (report / "results.json").exists():
            t = time.perf_counter()
            run(lungseg("maskrcnn", "evaluate", "--slices", out / "slices" / "test.h5", "--model", folder / "model.pt",
                        "--out", report), log_file=out / "test" / f"{name}.log")
            r = json.loads((report / "results.json").read_text())
            r["seconds"] = round(time.perf_counter() - t, 1)
            (report / "results.json").write_text(json.dumps(r, indent=2))
        results["test"][name] = json.loads((report / "results.json").read_text())
        log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines() if x.strip()]
        results["test"][name]["log"] = log
    results["paper"] = {"table1": PAPER_TABLE1, **PAPER}
    results["paper_config_timing"] = paper_timing(out)
    best = "mask-staged" if "mask-staged" in results["test"] else None
    if best:
        results["predict"] = predict_real(run, out, data, out / "runs" / best / "model.pt")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    figure(out, results)
    return results


def _ci(v: dict) -> str:
    return f"{v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def markdown(results: dict) -> str:
    t, paper = results["test"], results["paper"]
    secs = results["train_seconds"]
    lines = ["Data (slices, nodule masks, patches before balancing):", ""]
    for part, c in results["data"].items():
        lines.append(f"- {part}: {c['scans']} composites, {c['slices']} slices, {c['instances']} nodule masks, "
                     f"{c['patches_positive_before_balancing']} positive / {c['patches_negative_before_balancing']} "
                     f"negative patches")
    lines += ["", "| network | accuracy (test patches) | paper B Table I | best epoch (val accuracy) | train s |",
              "|---|---|---|---|---|"]
    for a in PATCH_ARCHS:
        r = t.get(f"patch-{a}")
        if r:
            best = max(r["log"], key=lambda x: x["val_accuracy"])
            lines.append(f"| {a} | {_ci(r['accuracy'])} ({r['n_patches']} patches) | {paper['table1'][a]:.4f} | "
                         f"{best['epoch']} ({best['val_accuracy']:.3f}) | {secs.get(f'patch-{a}', 0):.0f} |")
    lines += ["", "| Mask R-CNN (cpu preset) | box AP50 | box AP[.5:.95] | mask AP50 | mask AP[.5:.95] | paper B mAP | "
              "train s | test s |", "|---|---|---|---|---|---|---|---|"]
    for k in ("staged", "all", "staged-450", "all-450"):
        key = "map_staged" if k.startswith("staged") else "map_all_layers"
        r = t.get(f"mask-{k}")
        if r:
            lines.append(f"| schedule {k.split('-')[0]}, {r['step']} steps | {_ci(r['box_ap50'])} | {_ci(r['box_ap'])} | {_ci(r['mask_ap50'])} | "
                         f"{_ci(r['mask_ap'])} | {paper[key]} | {secs.get(f'mask-{k}', 0):.0f} | {r['seconds']:.0f} |")
    cats = ["micro", "small", "nodule", "mass", "all"]
    lines += ["", "| Dice per slice (test) | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for name in ("mask-staged", "mask-all", "mask-staged-450", "mask-all-450", "unet", "unet-300"):
        r = t.get(name)
        if r:
            cells = [f"{_ci(r['dice'][c]['dice'])} (n={r['dice'][c]['n_slices']})" if c in r["dice"] else "-"
                     for c in cats]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    p = results.get("paper_config_timing")
    if p:
        lines += ["", f"Paper B's configuration ({p['config']}) on this machine: {p['train_step_s']} s per training "
                      f"step, {p['test_slice_s']} s per test slice; its {p['iterations']} steps would take "
                      f"{p['train_step_s'] * p['iterations'] / 86400:.1f} days."]
    if results.get("predict"):
        lines.append("")
    for scan, r in results.get("predict", {}).items():
        ref = r.get("reference_nodule")
        hit = "" if ref is None else (f"; the readers' {ref['diameter_mm']} mm nodule is finding #{ref['hit_rank']}"
                                      if ref["hit_rank"] else f"; the readers' {ref['diameter_mm']} mm nodule is missed")
        lines.append(f"- `lungseg maskrcnn predict` (mask-staged) on {scan}: {r['findings']} findings{hit}; "
                     f"{sum(r['seconds'].values()):.0f} s")
    return "\n".join(lines) + "\n"


def figure(out: Path, results: dict) -> None:
    """Test slices of the best Mask R-CNN and of the U-Net (copied from their evaluate reports)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    pngs = [(n, out / "test" / n / "slices.png") for n in ("mask-staged", "mask-all", "unet")
            if (out / "test" / n / "slices.png").exists()]
    if not pngs:
        return
    fig, axes = plt.subplots(len(pngs), 1, figsize=(16, 3.6 * len(pngs)))
    for ax, (n, p) in zip(list(axes) if len(pngs) > 1 else [axes], pngs):
        ax.imshow(mpimg.imread(p))
        ax.axis("off")
    fig.tight_layout()
    target = ROOT / "benchmarks" / "figures" / "maskrcnn.png"
    fig.savefig(target, dpi=80)
    plt.close(fig)
    shutil.copy(target, out / "maskrcnn.png")
    print(f"-> {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "maskrcnn")
    parser.add_argument("--stage", choices=["all", "data", "train", "report"], default="all")
    parser.add_argument("--only", nargs="*", help="train only these runs (patch-lenet, mask-all, unet, ...)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.out)
    if args.stage in ("all", "data"):
        data_stage(run, args.data, args.out)
    if args.stage in ("all", "train"):
        train_stage(run, args.out, args.only)
    if args.stage in ("all", "report"):
        report_stage(run, args.out, args.data)


if __name__ == "__main__":
    sys.exit(main())

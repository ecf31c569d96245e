"""Where ``lungseg predict`` spends its time, this checkout beside the previous release, in one run.

    python benchmarks/predict.py [--baseline REV] [--runs 3] [--scan DIR] [--skip-folder] [--skip-scaling]

Both checkouts (this one, and ``--baseline``, by default the previous release
:data:`PREVIOUS_RELEASE`, checked out into a temporary git worktree) run the
same measurements on the same machine, one after the other:

1. ``lungseg predict`` on the real LIDC-IDRI-0001 (default
   ``$LUNGSEG_SHARED_DATA/lidc/LIDC-IDRI-0001``) as a user runs it, process
   start included, with the bundled models: median wall time over ``--runs``,
   peak memory (the sum of proportional set sizes over the process and its
   helpers, and the largest single process, sampled every 20 ms in one more
   run, whose time does not count: sampling takes CPU), runs of the two
   checkouts taking turns, the stages the report times, and
   whether the findings and masks agree (Dice of the nodule and lung masks);
2. the detector's achieved GFLOP/s on the candidates against this machine's
   measured matmul rate in the precision predict uses (``auto``: bf16 where
   the CPU has it natively, else fp32);
3. how the time grows with the number of slices: a short (the first 50
   slices), the typical (133) and a long (the same scan resampled to 1.25 mm,
   265 slices) volume, in one process with the models loaded once;
4. series per minute over a folder of 10 series (copies of the three real
   CTs of ``../shared/data``), models loaded once.

Figures, not asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The previous release: main as it stood before the speed work (commit of 2026-12-03).
PREVIOUS_RELEASE = "ea9b73c"

PREDICT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import cli
assert cli.__file__.startswith(sys.argv[1]), cli.__file__
sys.argv = ["lungseg", "predict", *sys.argv[2:]]
(getattr(cli, "run", None) or cli.main)()
"""

SCALING = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from lungseg import dicomio, infer
from lungseg.preprocess import resample
volume = dicomio.read_series(sys.argv[2])
seg, cls, det = infer.checkpoint_paths()
models = infer.Models.load(seg, cls, "cpu", det_path=det)
def sub(v, hu, spacing, positions):
    import dataclasses
    return dataclasses.replace(v, hu=hu, spacing=spacing, slice_positions=positions, sop_uids=(), files=(),
                               **({"headers": ()} if hasattr(v, "headers") else {}))
dz = volume.spacing[0]
long_hu = resample(volume.hu, volume.spacing, (dz / 2, *volume.spacing[1:])).astype(np.int16)
cases = {"short": sub(volume, volume.hu[:50], volume.spacing, volume.slice_positions[:50]),
         "typical": volume,
         "long": sub(volume, long_hu, (dz / 2, *volume.spacing[1:]),
                     volume.slice_positions[0] + dz / 2 * np.arange(len(long_hu)))}
out = {}
for name, v in cases.items():
    infer.predict_volume(cases["short"], models) if not out else None      # warm
    t = time.perf_counter()
    pred = infer.predict_volume(v, models)
    out[name] = {"slices": v.shape[0], "seconds": time.perf_counter() - t, "findings": len(pred.nodules),
                 **pred.timings}
print(json.dumps(out))
"""

DETECTOR_FLOPS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch.utils.flop_counter import FlopCounterMode
from lungseg import dicomio, infer
from lungseg.checkpoints import load_model
from lungseg.detect import candidates
model, _ = load_model(infer.checkpoint_paths()[2], kind="det")
with FlopCounterMode(display=False) as fc, torch.no_grad():
    model(torch.zeros(1, 1, 16, 48, 48))
seg, cls, det = infer.checkpoint_paths()
pre = infer.Models.load(seg, cls, "cpu", det_path=det).preprocess
hu_r, lungs_r = infer.model_grid(dicomio.read_series(sys.argv[2]), pre)
print(json.dumps({"flops_per_roi": fc.get_total_flops(), "candidates": len(candidates(hu_r, lungs_r, pre.spacing))}))
"""


# ------------------------------------------------------------------ measuring a process tree

def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(sum, largest) memory in MB of ``pid`` and its descendants (Linux /proc): the sum is of proportional set
    sizes (PSS: a page two processes share counts half in each), the largest a resident set size."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    todo, total, largest = [pid], 0.0, 0.0
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) for line in f if line.split()[-1] == "kB"}
        except (OSError, ValueError, IndexError):
            continue
        total += fields.get("Pss", 0) / 1024
        largest = max(largest, fields.get("Rss", 0) / 1024)
    return total, largest


def run_measured(cmd: list[str], cwd: Path | None = None, memory: bool = False) -> dict:
    """Run ``cmd``; wall seconds, its output, and with ``memory`` its peak summed and single-process memory (MB),
    sampled every 20 ms (which costs the command CPU time: time it in runs without)."""
    peak = {"sum": 0.0, "largest": 0.0}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def sample():
        while memory and not done.is_set():
            total, largest = _tree_memory_mb(proc.pid)
            peak["sum"], peak["largest"] = max(peak["sum"], total), max(peak["largest"], largest)
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    return {"wall_s": wall, "peak_sum_mb": peak["sum"], "peak_largest_mb": peak["largest"],
            "returncode": proc.returncode, "output": output}


def matmul_gflops(dtype_name: str = "float32", n: int = 1024, repeats: int = 10, trials: int = 5) -> float:
    """This machine's matmul rate in GFLOP/s (best of ``trials``: the machine's speed varies)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


# ------------------------------------------------------------------ the measurements

def end_to_end(checkouts: dict[str, Path], scan: Path, runs: int, work: Path) -> dict[str, dict]:
    """``lungseg predict SCAN`` ``runs`` times in each checkout, taking turns (a drift in the machine's speed
    then touches both alike): per checkout the median run's figures and report, the peaks over all runs."""
    results: dict[str, list] = {name: [] for name in checkouts}
    for i in range(runs + 1):               # the last run of each samples the memory, and is not timed
        for name, checkout in checkouts.items():
            out = work / f"{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured([sys.executable, "-c", PREDICT, str(checkout), str(scan), "--out", str(out)],
                             cwd=checkout, memory=i == runs)
            if r["returncode"]:
                raise SystemExit(f"{checkout}: predict failed:\n{r['output'][-2000:]}")
            r["report"] = next(out.glob("*/nodules.json"))
            results[name].append(r)
    summary = {}
    for name, runs_and_memory in results.items():
        rs, memory = runs_and_memory[:-1], runs_and_memory[-1]
        ordered = sorted(rs, key=lambda r: r["wall_s"])
        median = dict(ordered[len(ordered) // 2])
        median["walls"] = [r["wall_s"] for r in rs]
        median["peak_sum_mb"], median["peak_largest_mb"] = memory["peak_sum_mb"], memory["peak_largest_mb"]
        summary[name] = median
    return summary


def dice(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def agreement(report_a: Path, report_b: Path) -> dict:
    from lungseg import dicomio

    a, b = json.loads(report_a.read_text()), json.loads(report_b.read_text())
    masks = {}
    for name in ("nodules.nii.gz", "lungs.nii.gz"):
        ma, _ = dicomio.read_nifti_mask(report_a.parent / name)
        mb, _ = dicomio.read_nifti_mask(report_b.parent / name)
        masks[name] = dice(ma, mb)
    same = [(n["centroid_voxel_zyx"], n["diameter_mm"]) for n in a["nodules"]] == \
        [(n["centroid_voxel_zyx"], n["diameter_mm"]) for n in b["nodules"]]
    return {"findings": (a["n_nodules"], b["n_nodules"]), "same_findings": same, **masks}


def folder_of_ten(work: Path) -> Path:
    """Ten series: copies of the real CTs of ../shared/data (4 x LIDC-IDRI-0001 and 3 x each other one)."""
    from lungseg.configs import shared_data_dir

    data = shared_data_dir()
    sources = [data / "lidc" / "LIDC-IDRI-0001"] * 4 + sorted((data / "ct").iterdir()) * 3
    folder = work / "ten"
    if not folder.exists():
        for i, src in enumerate(sources[:10]):
            shutil.copytree(src, folder / f"{i:02d}-{src.name}")
    return folder


def series_per_minute(checkout: Path, folder: Path, work: Path) -> dict:
    out = work / f"ten-{checkout.name}"
    shutil.rmtree(out, ignore_errors=True)
    r = run_measured([sys.executable, "-c", PREDICT, str(checkout), str(folder), "--out", str(out)], cwd=checkout,
                     memory=True)
    done = len(list(out.glob("*/nodules.json")))
    return {"series": done, "wall_s": r["wall_s"], "per_minute": 60 * done / r["wall_s"],
            "peak_sum_mb": r["peak_sum_mb"], "failed": r["returncode"] != 0}


def child_json(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ printing

def side_by_side(title: str, rows: list[tuple[str, float | None, float | None, str]]) -> None:
    print(f"\n{title}")
    print(f"  {'':<28} {'previous':>10} {'this':>10} {'this/prev':>10}")
    for label, a, b, unit in rows:
        fa = f"{a:10.2f}" if a is not None else f"{'-':>10}"
        fb = f"{b:10.2f}" if b is not None else f"{'-':>10}"
        ratio = f"{b / a:10.2f}" if a and b is not None else f"{'':>10}"
        print(f"  {label:<28} {fa} {fb} {ratio}  {unit}")


def main() -> None:
    from lungseg.configs import shared_data_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=PREVIOUS_RELEASE, help="git revision to compare with")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scan", type=Path, default=shared_data_dir() / "lidc" / "LIDC-IDRI-0001")
    parser.add_argument("--skip-folder", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    args = parser.parse_args()
    if not args.scan.is_dir():
        raise SystemExit(f"{args.scan}: no such scan folder (set LUNGSEG_SHARED_DATA or pass --scan)")

    import torch

    from lungseg.device import cpu_has_native_bf16

    work = Path(tempfile.mkdtemp(prefix="lungseg-bench-"))
    previous = work / "previous"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(previous), args.baseline],
                   check=True)
    this = ROOT
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        native = cpu_has_native_bf16()
        rates = {"fp32": matmul_gflops("float32"), **({"bf16": matmul_gflops("bfloat16")} if native else {})}
        rate = rates["bf16" if native else "fp32"]        # predict's --precision auto: bf16 where it is native
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"native CPU bf16: {native}; matmul 1024^3: "
              + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
        print(f"previous: {args.baseline}; this: {rev} (with uncommitted changes, if any); scan {args.scan}")

        e2e = end_to_end({"previous": previous, "this": this}, args.scan, args.runs, work)
        p, t = e2e["previous"], e2e["this"]
        tp = json.loads(p["report"].read_text())["timings_s"]
        tt = json.loads(t["report"].read_text())["timings_s"]
        side_by_side(f"lungseg predict {args.scan.name}, as a user runs it (median of {args.runs}; "
                     f"walls this {', '.join(f'{w:.1f}' for w in t['walls'])} s)", [
                         ("wall, process start incl.", p["wall_s"], t["wall_s"], "s"),
                         ("peak memory, all processes", p["peak_sum_mb"], t["peak_sum_mb"], "MB (PSS)"),
                         ("peak memory, largest one", p["peak_largest_mb"], t["peak_largest_mb"], "MB"),
                         *[(f"  {k[:-2]}", tp.get(k), tt.get(k), "s") for k in dict.fromkeys([*tp, *tt])],
                         ("  outside the stages", p["wall_s"] - sum(tp.values()),
                          t["wall_s"] - sum(tt.values()), "s (start, imports, models; overlapped in this)")])
        agree = agreement(p["report"], t["report"])
        print(f"  findings previous/this: {agree['findings']}, same positions and sizes: {agree['same_findings']}; "
              f"Dice of the nodule masks {agree['nodules.nii.gz']:.4f}, of the lung masks "
              f"{agree['lungs.nii.gz']:.4f}")

        got = child_json(DETECTOR_FLOPS, str(this), str(args.scan))
        flops, n_cand = got["flops_per_roi"], got["candidates"]
        print(f"\ndetector: {flops / 1e9:.3f} GFLOP per candidate ROI x {n_cand} candidates")
        for name, timings in (("previous", tp), ("this", tt)):
            s = timings.get("fp_reduction_s")
            if s:
                print(f"  {name:<9} {n_cand * flops / 1e9 / s:6.1f} GFLOP/s "
                      f"({n_cand * flops / 1e9 / s / rate:.0%} of the {'bf16' if native else 'fp32'} matmul rate)")

        if not args.skip_scaling:
            scaling = {name: child_json(SCALING, str(checkout), str(args.scan))
                       for name, checkout in (("previous", previous), ("this", this))}
            side_by_side("time by scan length (predict_volume, models loaded once, one process)", [
                (f"{case} ({scaling['this'][case]['slices']} slices)", scaling["previous"][case]["seconds"],
                 scaling["this"][case]["seconds"], "s") for case in ("short", "typical", "long")])
            for case in ("short", "typical", "long"):
                stages = {k: v for k, v in scaling["this"][case].items() if k.endswith("_s")}
                print(f"  this, {case}: " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in stages.items()))

        if not args.skip_folder:
            folder = folder_of_ten(work)
            ten = {name: series_per_minute(checkout, folder, work) for name, checkout in
                   (("previous", previous), ("this", this))}
            side_by_side("a folder of 10 series (4 x LIDC-IDRI-0001, 3 x each other real CT), models loaded once", [
                ("series per minute", ten["previous"]["per_minute"], ten["this"]["per_minute"], "/min"),
                ("wall", ten["previous"]["wall_s"], ten["this"]["wall_s"], "s"),
                ("peak memory, all processes", ten["previous"]["peak_sum_mb"], ten["this"]["peak_sum_mb"],
                 "MB (PSS)")])
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(previous)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

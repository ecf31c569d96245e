"""Real-nodule benchmark: paper A's networks trained and tested on 791 real LIDC-IDRI nodule crops.

    python benchmarks/real_nodules.py [--data ../shared/data/nodules] [--out benchmarks/out/real_nodules]
                                      [--jobs 2] [--models NAME ...] [--stage all|train|report]

Every step is a ``lungseg`` command, printed before it runs (the exact
sequence is in ``OUT/commands.sh``):

1. ``lungseg import-crops`` the crop folder into ``OUT/crops.h5``.
2. ``lungseg folds``: seeded patient-level 5-fold cross-validation, written to
   ``data_manifests/nodules_folds5_seed0*.csv`` (committed; regenerated here
   and compared).
3. For each model and fold ``lungseg train-cls`` / ``train-seg`` on the other
   four folds, for a fixed number of epochs without validation (last.pt is
   the model), then ``lungseg evaluate`` on the held-out fold. The main
   models are also trained once on all patients (``_all.csv``): the final
   checkpoints, ``OUT/runs/<model>/all/last.pt``.
4. Pooled out-of-fold results with 95 % patient-bootstrap intervals, next to
   paper A's figures and to simple baselines on the same folds (logistic
   regression on mask features; a -500 HU threshold segmentation), written
   to ``OUT/results.json`` and ``OUT/results.md``.

Runs are resumable: a finished run is skipped, an interrupted one resumed.
``--jobs`` runs train in parallel, each with ``cpu_count // jobs`` threads.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
K, SEED = 5, 0
FOLDS_STEM = f"nodules_folds{K}_seed{SEED}"

#: name -> (kind, extra train options, trained on all patients too)
MODELS = {
    "resnet3d50-cpu": ("cls", ["--preset", "cpu"], True),
    "resunet3d-cpu": ("seg", ["--preset", "cpu"], True),
    "unet3d-cpu": ("seg", ["--preset", "cpu", "--arch", "unet3d"], False),
    "resnet3d50_plain": ("cls", ["--arch", "resnet3d50_plain", "--epochs", "3"], False),
    "resnet2d50": ("cls", ["--arch", "resnet2d50", "--epochs", "3"], False),
    # The paper's full-width 3D ResNet50 for 52 epochs: a GPU job (about 0.15 ROIs/s
    # per CPU thread here). Not in the default set; --models resnet3d50-paper runs it.
    "resnet3d50-paper": ("cls", [], True),
}
DEFAULT_MODELS = ["resnet3d50-cpu", "resunet3d-cpu", "unet3d-cpu", "resnet3d50_plain", "resnet2d50"]
#: Training order: the main models' folds, the cheap baselines, the final
#: models on all patients, and the costliest baseline last.
PRIORITY = ["resnet3d50-cpu", "resunet3d-cpu", "resnet2d50", "unet3d-cpu", "resnet3d50-paper", "resnet3d50_plain"]


def lungseg(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("lungseg")), *map(str, args)]


class Runner:
    """Runs commands, echoes them and appends them to OUT/commands.sh."""

    def __init__(self, out: Path):
        self.log = out / "commands.sh"

    def __call__(self, cmd: list[str], *, env: dict | None = None, log_file: Path | None = None) -> float:
        shown = " ".join(shlex.quote(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c) for c in cmd)
        prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        line = f"{prefix} {shown}".strip()
        print(f"$ {line}", flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")
        t0 = time.perf_counter()
        full_env = {**os.environ, **(env or {})}
        if log_file is None:
            subprocess.run(cmd, check=True, cwd=ROOT, env=full_env)
        else:
            with open(log_file, "a") as f:
                subprocess.run(cmd, check=True, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
        return time.perf_counter() - t0


def epochs_done(run: Path) -> int:
    log = run / "log.jsonl"
    return sum(1 for line in open(log) if line.strip()) if log.exists() else 0


def planned_epochs(run: Path) -> int | None:
    cfg = run / "config.json"
    return json.loads(cfg.read_text())["epochs"] if cfg.exists() else None


def train_jobs(models: list[str], out: Path, cache: Path) -> list[tuple[str, str, Path, list[str]]]:
    """(model, fold, run folder, command) in :data:`PRIORITY` order; final ("all") runs
    after every fold run except those of the last model."""
    jobs = []
    order = [(name, f"fold{i}") for name in models for i in range(K)]
    order += [(name, "all") for name in models if MODELS[name][2]]
    rank = {name: i for i, name in enumerate(PRIORITY)}
    group = lambda job: 1 if job[1] == "all" else 2 if job[0] == PRIORITY[-1] else 0  # noqa: E731
    order.sort(key=lambda job: (group(job), rank.get(job[0], len(rank))))
    for name, fold in order:
        kind, extra, _ = MODELS[name]
        run = out / "runs" / name / fold
        split = ROOT / "data_manifests" / f"{FOLDS_STEM}_{fold}.csv"
        cmd = lungseg(f"train-{kind}", "--cache", cache, "--split-file", split, "--out", run, *extra)
        jobs.append((name, fold, run, cmd))
    return jobs


def run_training(jobs, runner: Runner, n_parallel: int) -> dict[str, float]:
    threads = max(1, (os.cpu_count() or 1) // n_parallel)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    seconds = {}

    def one(job):
        name, fold, run, cmd = job
        done, planned = epochs_done(run), planned_epochs(run)
        if planned is not None and done >= planned:
            print(f"  {name}/{fold}: finished ({done} epochs), skipped", flush=True)
            return
        run.parent.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"] if (run / "last.pt").exists() else []
        seconds[f"{name}/{fold}"] = runner(cmd + resume, env=env, log_file=run.parent / f"{fold}.log")
        print(f"  {name}/{fold}: {seconds[f'{name}/{fold}']:.0f} s", flush=True)

    with ThreadPoolExecutor(max_workers=n_parallel) as pool:
        for f in [pool.submit(one, job) for job in jobs]:
            f.result()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "nodules")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "real_nodules")
    parser.add_argument("--jobs", type=int, default=2, help="training runs in parallel")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    parser.add_argument("--stage", choices=["all", "train", "report"], default="all")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(out)
    cache = out / "crops.h5"
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}

    if args.stage in ("all", "train"):
        if not (cache.exists() and (out / "import.done").exists()):
            timing["import"] = runner(lungseg("import-crops", args.data.resolve(), "--out", cache))
            (out / "import.done").write_text("")
        runner(lungseg("folds", cache, "--k", K, "--seed", SEED, "--out", ROOT / "data_manifests"))
        changed = subprocess.run(["git", "status", "--porcelain", "data_manifests"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip()
        if changed:
            print(f"note: the regenerated folds differ from the committed ones:\n{changed}")
        seconds = run_training(train_jobs(args.models, out, cache), runner, args.jobs)
        timing.setdefault("train", {}).update(seconds)
        timing_path.write_text(json.dumps(timing, indent=2))
    if args.stage in ("all", "report"):
        from real_nodules_report import report   # noqa: E402 (benchmarks/ is on sys.path when run as a script)
        report(args.models, out, cache, runner, timing)


if __name__ == "__main__":
    main()

"""Training throughput: samples per second of each network's training step, this checkout beside the previous release.

    python benchmarks/train.py [--baseline REV] [--steps 3] [--seg-batch 2] [--cls-batch 8] [--det-batch 32]
                               [--preset paper|cpu] [--seg-shape D H W] [--nets NAME ...] [--bf16 auto|on]

Each checkout (this one, and ``--baseline``, by default the previous release
of ``benchmarks/predict.py``, checked out into a temporary git worktree) runs
lungseg's own training step (:func:`lungseg.train.train_one_epoch`: forward,
loss, backward, Adam step) on random inputs, in a process of its own, with
the network laid out as its ``train-seg`` / ``train-cls`` / ``train-det`` lay
it out (this checkout: channels-last 3D on the CPU,
:func:`lungseg.device.fast_layout`); both print samples per second side by
side, network by network with the checkouts in turn (the machine's speed
drifts), with the mean loss of the timed steps (the same inputs and initial
weights: equal to float rounding, up to the batch-norm ResNets' sensitivity
at initialisation, see ``tests/ddp_gradients.py``). Networks: the Res U-Net and U-Net
(segmentation, 1 x 48 x 192 x 192 by default, ``--seg-shape`` for another
patch), the ResNet50s and nodulenet (classification, 16 x 48 x 48 ROIs) and
the detector's network. One warm-up step is not timed. bf16 rows run only
where the CPU has native bf16, or with ``--bf16 on``. Figures, not asserts.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from predict import PREVIOUS_RELEASE  # noqa: E402

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from lungseg import device as dv, train
from lungseg.configs import make_config
from lungseg.losses import SegLoss, nll_loss
args = json.loads(sys.argv[2])
layout = getattr(dv, "fast_layout", lambda model, device: model)
seg_loss = SegLoss(schedule="dice")
nets = [("resunet3d", "seg", (1, *args["seg_shape"]), args["seg_batch"], {}),
        ("unet3d", "seg", (1, *args["seg_shape"]), args["seg_batch"], {}),
        ("resnet3d50", "cls", (1, 16, 48, 48), args["cls_batch"], {}),
        ("resnet3d50_plain", "cls", (1, 16, 48, 48), args["cls_batch"], {}),
        ("resnet2d50", "cls", (1, 16, 48, 48), args["cls_batch"], {}),
        ("nodulenet", "cls", (2, 16, 48, 48), args["cls_batch"], {"mask_channel": True}),
        ("candidatenet", "det", (1, 16, 48, 48), args["det_batch"], {})]
for name, kind, shape, batch, extra in nets:
    if args["nets"] and name not in args["nets"]:
        continue
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not (dv.cpu_has_native_bf16() or args["bf16"] == "on"):
            continue
        torch.manual_seed(0)
        x = torch.rand(batch, *shape)
        if kind == "seg":
            y = (torch.rand(batch, 1, *shape[1:]) > 0.99).float()
            loss_fn = lambda out, t: seg_loss(out, t, epoch=10)
        else:
            y = torch.randint(0, 2, (batch,))
            loss_fn = lambda out, t: nll_loss(out[:, :2], t)
        preset = args["preset"] if kind == "seg" else "paper"
        model = layout(make_config(kind, preset, arch=name, **extra).build_model(), "cpu")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        device = torch.device("cpu")
        batches = [(x, y)] * (args["steps"] + 1)
        train.train_one_epoch(model, batches[:1], loss_fn, optimizer, device=device, precision=precision)
        t = time.perf_counter()
        loss = train.train_one_epoch(model, batches[1:], loss_fn, optimizer, device=device, precision=precision)
        rate = args["steps"] * batch / (time.perf_counter() - t)
        print(json.dumps({"net": name, "input": "x".join(map(str, shape)), "batch": batch, "precision": precision,
                          "samples_per_s": rate, "loss": loss}), flush=True)
"""


NETS = ("resunet3d", "unet3d", "resnet3d50", "resnet3d50_plain", "resnet2d50", "nodulenet", "candidatenet")


def rows_of(checkout: Path, options: dict) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(checkout), json.dumps(options)], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"{checkout}: {out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=PREVIOUS_RELEASE, help="git revision to compare with")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seg-batch", type=int, default=2)
    parser.add_argument("--cls-batch", type=int, default=8)
    parser.add_argument("--det-batch", type=int, default=32)
    parser.add_argument("--bf16", choices=["auto", "on"], default="auto",
                        help="auto: time bf16 only where the hardware has it")
    parser.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                        help="segmentation network sizes (lungseg.configs.PRESETS)")
    parser.add_argument("--seg-shape", type=int, nargs=3, default=(48, 192, 192), metavar=("D", "H", "W"))
    parser.add_argument("--nets", nargs="+", default=None, help="only these networks")
    args = parser.parse_args()
    options = {"steps": args.steps, "seg_batch": args.seg_batch, "cls_batch": args.cls_batch,
               "det_batch": args.det_batch, "bf16": args.bf16, "preset": args.preset,
               "seg_shape": list(args.seg_shape), "nets": args.nets}

    import torch

    work = Path(tempfile.mkdtemp(prefix="lungseg-train-bench-"))
    previous = work / "previous"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(previous), args.baseline],
                   check=True)
    try:
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__} ({torch.get_num_threads()} threads); previous: {args.baseline}, this: "
              + subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True).stdout.strip())
        print(f"{'network':<17} {'input':<14} {'batch':>5} {'precision':<9} {'previous':>9} {'this':>9} "
              f"{'this/prev':>9}  samples/s; mean loss previous / this")
        for net in args.nets or NETS:         # network by network, the checkouts in turn: a drift touches both
            one = {**options, "nets": [net]}
            before, after = rows_of(previous, one), rows_of(ROOT, one)
            for a, b in zip(before, after):
                print(f"{b['net']:<17} {b['input']:<14} {b['batch']:>5} {b['precision']:<9} "
                      f"{a['samples_per_s']:9.2f} {b['samples_per_s']:9.2f} "
                      f"{b['samples_per_s'] / a['samples_per_s']:9.2f}  {a['loss']:.5f} / {b['loss']:.5f}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(previous)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

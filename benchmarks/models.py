"""Size and speed of paper A's networks and baselines at the paper's input sizes.

    python benchmarks/models.py [--reps N] [--bf16 auto|on|off] [--only NAME ...]

For each network, batch 1: parameters, forward FLOPs (counted with
``torch.utils.flop_counter.FlopCounterMode``; one multiply-add = 2 FLOPs), and
seconds per sample for a forward pass (eval mode, no grad) and a forward plus
backward pass (train mode), on the CPU in fp32 and bf16 autocast, and on CUDA
(fp32 and bf16) when a GPU is present. MONAI's ``UNet`` with residual units at
the same widths is the reference row when ``monai`` is installed (it is not a
lungseg dependency: ``pip install monai`` to get the row).

bf16 on a CPU without native bf16 instructions (AVX512-BF16 or AMX) runs
emulated 3D convolutions that are one to two orders of magnitude slower than
fp32 (a 3D Res U-Net forward pass takes minutes), so by default (``--bf16
auto``) such a CPU times bf16 only for networks of at most
``--emulated-bf16-gflop`` (5) forward GFLOP and prints "skip" for the others,
with one small convolution timed in both precisions to show the emulation's
cost. ``--bf16 on`` times every network; ``--bf16 off`` none. Figures are
printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lungseg.device import autocast_context, cpu_has_native_bf16
from lungseg.resnet3d import resnet2d50, resnet3d50, resnet3d50_plain
from lungseg.resunet3d import resunet3d, unet3d

SEG_INPUT = (1, 1, 48, 192, 192)
ROI_INPUT = (1, 1, 16, 48, 48)


def monai_resunet() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32, 64, 128),
                strides=(2, 2, 2, 2), num_res_units=2, norm="instance")


NETWORKS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("3D Res U-Net (paper A)", resunet3d, SEG_INPUT),
    ("3D U-Net (baseline)", unet3d, SEG_INPUT),
    ("MONAI UNet, res units", monai_resunet, SEG_INPUT),
    ("3D ResNet50 (paper A)", resnet3d50, ROI_INPUT),
    ("plain 3D ResNet50", resnet3d50_plain, ROI_INPUT),
    ("2D ResNet50, central", resnet2d50, ROI_INPUT),
]


def forward_flops(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> int:
    """Forward FLOPs, counted on the meta device (no arithmetic is done)."""
    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(shape)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_sample(model: nn.Module, shape: tuple[int, ...], device: torch.device, *,
                    bf16: bool, backward: bool, reps: int) -> float:
    """Seconds of one pass: the best of ``reps`` timed runs after one warm-up run.

    The best rather than the median: on a shared machine the spread comes from
    other processes, and the fastest run is the closest to the network's cost.
    """
    x = torch.rand(shape, device=device)
    model.train(backward)
    times = []
    for i in range(reps + 1):
        model.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with autocast_context(device, enabled=bf16, dtype=torch.bfloat16 if bf16 else None):
            if backward:
                out = model(x)
            else:
                with torch.no_grad():
                    out = model(x)
        if backward:
            out.float().mean().backward()
        _sync(device)
        if i:                                   # the first run is the warm-up
            times.append(time.perf_counter() - t0)
    return min(times) / shape[0]


def emulated_bf16_cost(reps: int = 3) -> tuple[float, float]:
    """fp32 and bf16-autocast seconds of one 8 -> 8 channel 3x3x3 convolution on 16 x 64 x 64."""
    conv = nn.Conv3d(8, 8, 3, padding=1)
    x = torch.rand(1, 8, 16, 64, 64)
    out = []
    for bf16 in (False, True):
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            with torch.no_grad(), autocast_context("cpu", enabled=bf16, dtype=torch.bfloat16):
                conv(x)
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out[0], out[1]


def fmt_s(v: float | None) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="timed runs per figure after one warm-up; the best is shown (3)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast columns: where native (auto), always (on), never (off)")
    parser.add_argument("--emulated-bf16-gflop", type=float, default=5.0,
                        help="with --bf16 auto on a CPU without native bf16: largest forward GFLOP to time (5)")
    parser.add_argument("--only", nargs="*", default=None, help="networks whose name contains any of these")
    args = parser.parse_args()

    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    native_cpu_bf16 = cpu_has_native_bf16()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda else [])
    print(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads (os.cpu_count {os.cpu_count()}), "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native CPU bf16: {'yes' if native_cpu_bf16 else 'no'}, "
          f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    try:
        import monai
        print(f"monai {monai.__version__}: reference row = monai.networks.nets.UNet(spatial_dims=3, "
              "channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2, norm=instance)")
        have_monai = True
    except ImportError:
        print("note: monai is not installed; the MONAI UNet row is skipped (pip install monai to add it)")
        have_monai = False
    print(f"batch 1; seconds per sample, best of {args.reps} runs after 1 warm-up; "
          "fwd = eval forward without grad, f+b = train forward + backward; GFLOP = 1e9 FLOPs, "
          "multiply-add = 2")

    def bf16_on(device: torch.device, gflop: float) -> bool:
        if args.bf16 == "off":
            return False
        if args.bf16 == "on":
            return True
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return native_cpu_bf16 or gflop <= args.emulated_bf16_gflop

    columns = [(d, bf) for d in devices for bf in (False, True)]
    head = f"{'network':<24}{'input':<18}{'params':>11}{'GFLOP':>9}"
    for d, bf in columns:
        tag = f"{d.type} {'bf16' if bf else 'fp32'}"
        head += f" | {tag + ' fwd':>14}{'f+b':>8}"
    print()
    print(head)
    print("-" * len(head))
    skipped_bf16 = False
    for name, build, shape in NETWORKS:
        if args.only and not any(s.lower() in name.lower() for s in args.only):
            continue
        if build is monai_resunet and not have_monai:
            print(f"{name:<24}(skipped: monai not installed)")
            continue
        model = build()
        params = sum(p.numel() for p in model.parameters())
        gflop = forward_flops(build, shape) / 1e9
        row = f"{name:<24}{'x'.join(map(str, shape[1:])):<18}{params:>11,}{gflop:>9.1f}"
        for d, bf in columns:
            if bf and not bf16_on(d, gflop):
                skipped_bf16 = skipped_bf16 or (args.bf16 == "auto" and d.type == "cpu")
                mark = "skip" if args.bf16 == "auto" else "off"
                row += f" | {mark:>14}{mark:>8}"
                continue
            m = model.to(d)
            fwd = time_per_sample(m, shape, d, bf16=bf, backward=False, reps=args.reps)
            fb = time_per_sample(m, shape, d, bf16=bf, backward=True, reps=args.reps)
            row += f" | {fmt_s(fwd):>14}{fmt_s(fb):>8}"
        print(row, flush=True)
        del model
    if skipped_bf16:
        fp32, bf16 = emulated_bf16_cost()
        print(f"\nnote: this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 autocast is emulated and "
              f"'skip' marks networks above {args.emulated_bf16_gflop:g} forward GFLOP. One 8->8 channel "
              f"3x3x3 conv on 16x64x64 takes {fp32 * 1e3:.1f} ms in fp32 and {bf16 * 1e3:.1f} ms in bf16 "
              f"autocast here ({bf16 / fp32:.0f}x). --bf16 on times every network anyway (minutes per pass).")


if __name__ == "__main__":
    main()

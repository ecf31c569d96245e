"""Training throughput: samples per second of each network's training step, at paper A's input sizes.

    python benchmarks/train.py [--steps 2] [--seg-batch 2] [--cls-batch 4] [--bf16 auto|on]
                               [--preset paper|cpu] [--seg-shape D H W] [--nets NAME ...]

Runs lungseg's own training step (:func:`lungseg.train.train_one_epoch`: forward,
loss, backward, Adam step) on random inputs of the paper's shapes (segmentation
1 x 48 x 192 x 192, classification 1 x 16 x 48 x 48) for every network, on the
CPU in fp32 and bf16 autocast, and on CUDA when present. Prints figures; asserts
nothing. ``--preset cpu`` times the networks of the ``cpu`` preset instead,
``--seg-shape`` another segmentation patch (e.g. 32 96 96 for patch sampling),
``--nets`` a subset. One warm-up step is not timed. On CPUs without native bf16 (AVX512-BF16
or AMX) autocast emulates it at a fraction of fp32's speed, so those rows are
skipped unless ``--bf16 on``.
"""

import argparse
import platform
import time

import torch

from lungseg import train
from lungseg.configs import make_config
from lungseg.device import cpu_has_native_bf16
from lungseg.losses import SegLoss, nll_loss

SEG_SHAPE = (1, 48, 192, 192)
CLS_SHAPE = (1, 16, 48, 48)


def step_rate(model, batch, loss_fn, device, precision, steps: int) -> float:
    """Samples per second over ``steps`` timed training steps."""
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = [tuple(t.to(device) for t in batch)] * (steps + 1)
    train.train_one_epoch(model, batches[:1], loss_fn, optimizer, device=device, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train.train_one_epoch(model, batches[1:], loss_fn, optimizer, device=device, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch[0].shape[0] / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seg-batch", type=int, default=2)
    parser.add_argument("--cls-batch", type=int, default=4)
    parser.add_argument("--bf16", choices=["auto", "on"], default="auto",
                        help="auto: time bf16 only where the hardware has it")
    parser.add_argument("--preset", choices=["paper", "cpu"], default="paper", help="network sizes (lungseg.configs.PRESETS)")
    parser.add_argument("--seg-shape", type=int, nargs=3, default=SEG_SHAPE[1:], metavar=("D", "H", "W"))
    parser.add_argument("--nets", nargs="+", default=None, help="only these networks")
    args = parser.parse_args()
    seg_shape = (1, *args.seg_shape)

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, native CPU bf16: {cpu_has_native_bf16()}")
    print(f"{'network':<18} {'input':<18} {'batch':>5} {'device':<6} {'precision':<9} {'samples/s':>10}")
    seg_loss = SegLoss(schedule="dice")
    torch.manual_seed(0)
    nets = [
        ("resunet3d", "seg", seg_shape, args.seg_batch),
        ("unet3d", "seg", seg_shape, args.seg_batch),
        ("resnet3d50", "cls", CLS_SHAPE, args.cls_batch),
        ("resnet3d50_plain", "cls", CLS_SHAPE, args.cls_batch),
        ("resnet2d50", "cls", CLS_SHAPE, args.cls_batch),
    ]
    for name, kind, shape, batch in nets:
        if args.nets and name not in args.nets:
            continue
        x = torch.rand(batch, *shape)
        if kind == "seg":
            y = (torch.rand(batch, *shape) > 0.99).float()
            loss_fn = lambda out, t: seg_loss(out, t, epoch=10)  # noqa: E731
            model = make_config("seg", args.preset, arch=name).build_model()
        else:
            y = torch.randint(0, 2, (batch,))
            loss_fn = nll_loss
            model = make_config("cls", args.preset, arch=name).build_model()
        for device in devices:
            for precision in ("fp32", "bf16"):
                if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16() and args.bf16 == "auto":
                    print(f"{name:<18} {'':<18} {'':>5} {device.type:<6} {precision:<9} {'skipped':>10}"
                          "  (emulated bf16; --bf16 on to time it)")
                    continue
                rate = step_rate(model, (x, y), loss_fn, device, precision, args.steps)
                shape_s = "x".join(map(str, shape))
                print(f"{name:<18} {shape_s:<18} {batch:>5} {device.type:<6} {precision:<9} {rate:>10.2f}",
                      flush=True)


if __name__ == "__main__":
    main()

"""Time ``lungseg predict`` on the real LIDC-IDRI-0001 scan: wall time per stage and peak memory.

    python benchmarks/predict.py --seg SEG.pt --cls CLS.pt [--scan DIR] [--precision fp32 bf16]

Runs :func:`lungseg.infer.predict_volume` on the real series (default
``$LUNGSEG_SHARED_DATA/lidc/LIDC-IDRI-0001``) once per precision, in a fresh
process each so peak memory (max RSS) is per run, and prints the stages, the
number of network windows, their FLOPs (counted with torch's FlopCounterMode)
and the segmentation time against this machine's measured fp32 matmul rate.
Figures, not asserts; the checkpoints' accuracy is not the point here.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from torch.utils.flop_counter import FlopCounterMode
from lungseg import dicomio, infer

scan, seg, cls, precision = sys.argv[1:5]
t = time.perf_counter()
volume = dicomio.read_series(scan)
load = time.perf_counter() - t
models = infer.Models.load(seg, cls, "cpu")
cfg = infer.PredictConfig(precision=precision)
pred = infer.predict_volume(volume, models, cfg)
pre = models.preprocess
with FlopCounterMode(display=False) as fc:
    with torch.no_grad():
        models.seg(torch.zeros(1, 1, *pre.subcase_shape))
seg_flops = fc.get_total_flops()
with FlopCounterMode(display=False) as fc:
    with torch.no_grad():
        models.cls(torch.zeros(1, 1, *pre.roi_shape))
cls_flops = fc.get_total_flops()
print(json.dumps({"load_s": load, **pred.timings, "n_nodules": len(pred.nodules),
                  "seg_window_flops": seg_flops, "cls_roi_flops": cls_flops,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def count_windows(shape, window, overlap) -> int:
    from lungseg.infer import _starts
    n = 1
    for length, size in zip(shape, window):
        n *= len(_starts(max(length, size), size, overlap))
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from lungseg.configs import shared_data_dir

    shared = shared_data_dir()
    parser.add_argument("--scan", type=Path, default=shared / "lidc" / "LIDC-IDRI-0001")
    parser.add_argument("--seg", type=Path, required=True)
    parser.add_argument("--cls", type=Path, required=True)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    args = parser.parse_args()

    import numpy as np
    import torch
    from scipy import ndimage

    from lungseg import dicomio, infer
    from lungseg.device import cpu_has_native_bf16
    from lungseg.preprocess import lung_mask, resample, resampled_shape

    rate = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native CPU bf16: {cpu_has_native_bf16()}")
    print(f"measured fp32 matmul (1024^3): {rate:.1f} GFLOP/s")
    # How many windows the lung region needs, from the same preprocessing.
    volume = dicomio.read_series(args.scan)
    pre = infer.Models.load(args.seg, args.cls, "cpu").preprocess
    hu_r = resample(volume.hu, volume.spacing, pre.spacing, shape=resampled_shape(volume.shape, volume.spacing,
                                                                               pre.spacing))
    box = ndimage.find_objects(lung_mask(hu_r, pre.spacing).astype(np.uint8))[0]
    windows = count_windows([b.stop - b.start for b in box], pre.subcase_shape, infer.PredictConfig().overlap)
    print(f"scan {args.scan.name}: {volume.shape} voxels, lung region {[b.stop - b.start for b in box]} "
          f"on the {pre.spacing} mm grid -> {windows} windows of {pre.subcase_shape}")
    for precision in args.precision:
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.scan), str(args.seg), str(args.cls), precision],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{precision}: failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        stages = ("load_s", "preprocess_s", "segment_s", "components_s", "classify_s")
        total = sum(r[s] for s in stages)
        seg_gflop = windows * r["seg_window_flops"] / 1e9
        print(f"\n{precision}: total {total:.1f} s, peak memory {r['peak_rss_mb']:.0f} MB, {r['n_nodules']} nodules")
        for s in stages:
            print(f"  {s[:-2]:<12} {r[s]:8.2f} s")
        print(f"  segmentation: {windows} x {r['seg_window_flops'] / 1e9:.1f} GFLOP = {seg_gflop:.0f} GFLOP "
              f"in {r['segment_s']:.1f} s = {seg_gflop / r['segment_s']:.1f} GFLOP/s "
              f"({seg_gflop / r['segment_s'] / rate:.0%} of the measured matmul rate)")
        print(f"  classification: {r['cls_roi_flops'] / 1e9:.2f} GFLOP per ROI")


if __name__ == "__main__":
    main()

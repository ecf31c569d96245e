"""Training settings: frozen dataclasses whose defaults are paper A's ("Experiment settings").

Kept free of heavy imports so that the command line can show the defaults in
``--help`` at once; :mod:`lungseg.train` uses them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SEG_ARCHS = ("resunet3d", "unet3d")
CLS_ARCHS = ("resnet3d50", "resnet3d50_plain", "resnet2d50")


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by both loops. ``precision``: auto, fp32, bf16 or fp16."""

    epochs: int
    batch_size: int
    lr: float
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    seed: int = 0
    augment: bool = True
    device: str = "auto"
    precision: str = "auto"
    grad_clip: float = 0.0          # max gradient norm; 0 = off (the paper does not clip)
    compile: bool = False
    workers: int = 0
    max_batches: int = 0            # batches per epoch, 0 = all (quick runs, demos)
    split_file: str = "data_manifests/lidc_split_seed0.csv"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SegConfig(TrainConfig):
    epochs: int = 64
    batch_size: int = 6
    lr: float = 1e-2
    lr_milestones: tuple[int, ...] = (32, 48)
    arch: str = "resunet3d"                          # or "unet3d" (the baseline)
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    loss: str = "paper"                              # paper | dice | bce | dice+bce
    switch_epoch: int = 3
    threshold: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.arch not in SEG_ARCHS:
            raise ValueError(f"arch must be one of {sorted(SEG_ARCHS)}, got {self.arch!r}")


@dataclass(frozen=True)
class ClsConfig(TrainConfig):
    epochs: int = 52
    batch_size: int = 16
    lr: float = 1e-4
    arch: str = "resnet3d50"                         # or resnet3d50_plain, resnet2d50
    width: int = 64
    balance: bool = False                            # draw benign and malignant equally often

    def __post_init__(self):
        super().__post_init__()
        if self.arch not in CLS_ARCHS:
            raise ValueError(f"arch must be one of {sorted(CLS_ARCHS)}, got {self.arch!r}")




#: Named presets: overrides of the paper's defaults. ``cpu`` is for machines
#: without a GPU, sized for 2 CPU cores on 16 x 48 x 48 ROIs, where the paper's
#: 3D ResNet50 (width 64) trains at about 0.15 ROIs/s per thread and width 8
#: (1/64 of the multiply-adds) at about 2 ROIs/s in a real run; the Res U-Net
#: at half widths runs about 2.5 times faster than at full widths (on
#: 16 x 48 x 48 patches about 12 patches/s). The paper's loss schedule (BCE
#: for 3 epochs, then Dice) keeps 5 Dice epochs. Everything else (lr, batch,
#: loss schedule, augmentation) stays the paper's.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "seg": {"paper": {}, "cpu": {"widths": (4, 8, 16, 32, 64), "epochs": 8}},
    "cls": {"paper": {}, "cpu": {"width": 8, "epochs": 5}},
}


def make_config(kind: str, preset: str = "paper", **options: Any) -> SegConfig | ClsConfig:
    """The config of ``kind`` ("seg"/"cls"): paper defaults, then ``preset``, then ``options``."""
    if preset not in PRESETS[kind]:
        raise ValueError(f"unknown {kind} preset {preset!r}; presets are {sorted(PRESETS[kind])}")
    Config = SegConfig if kind == "seg" else ClsConfig
    return Config(**{**PRESETS[kind][preset], **options})

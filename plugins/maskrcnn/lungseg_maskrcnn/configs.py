"""Settings of the plugin's training runs: paper B's values by default, a ``cpu`` preset for 2 cores.

Paper B gives: 50 x 50 patches balanced 1:1 (24,000 train, 8,000 val, 8,000
test) for Table I; Mask R-CNN on 512 x 512 slices with a ResNet101-FPN
backbone, lr 1e-4, momentum 0.9, translation and rotation augmentation, two
schedules (all layers at once: 0.7334 mAP; heads, then ResNet stage 3 and up,
then all: 0.7965 mAP). It gives no epochs, iterations, batch size or
optimiser for the patch classifiers and the U-Net; the values below that it
does not give are marked as lungseg's choice.

The ``cpu`` preset (measured on 2 CPU cores by ``benchmarks/maskrcnn.py``: a
training step of the paper's configuration on 2 whole slices takes about 6 s,
so its 30,000 steps would take two days)
keeps every rule and shrinks what costs time: a ResNet18-FPN backbone, 192 x
192 training crops (each containing a nodule three times in four, else
anywhere in the lungs), 2,000 iterations (about 20 minutes) with a larger learning rate
(0.01 after a warm-up: at 1e-4 a network trained from scratch learns next to
nothing in that few steps), fewer region proposals (500 in training, 100 at
test, 128 sampled for the heads: a slice holds a few nodules, not COCO's
dozens of objects; the box head on torchvision's 1000 test proposals is most
of a forward pass here), a 16-channel U-Net on 256 x 256 crops, and a tenth
of the paper's patches for fewer epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .nets import ANCHOR_SIZES, BACKBONES, PATCH_ARCHS

SCHEDULES = ("all", "staged")


@dataclass(frozen=True)
class PatchConfig:
    """``lungseg maskrcnn train-patch``: one Table I classifier."""

    arch: str = "resnet101"
    epochs: int = 20                 # lungseg's choice (paper B gives none)
    batch_size: int = 64             # lungseg's choice
    lr: float = 1e-4                 # Adam; lungseg's choice
    max_train: int = 0               # patches used (0: all; paper B: 24,000)
    max_eval: int = 0                # val and test patches used (0: all; paper B: 8,000 each)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.arch not in PATCH_ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; one of {', '.join(PATCH_ARCHS)}")
        _positive(self, "epochs", "batch_size", "lr")


@dataclass(frozen=True)
class MaskConfig:
    """``lungseg maskrcnn train``: Mask R-CNN on slices."""

    backbone: str = "resnet101"
    schedule: str = "staged"          # "all": every layer at once; "staged": heads, 3+, all (a third each)
    iterations: int = 30000           # lungseg's choice (paper B gives none)
    batch_size: int = 2               # lungseg's choice
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4        # lungseg's choice
    warmup: int = 0                   # iterations of linear lr warm-up
    crop: int = 0                     # training crop side (0: the whole slice)
    anchor_sizes: tuple[int, ...] = ANCHOR_SIZES
    proposals: tuple[int, int] = (2000, 1000)   # after NMS, training and test (torchvision's)
    rois_per_image: int = 512                   # sampled for the heads in training (torchvision's)
    augment: bool = True              # translation and rotation
    weights: str = ""                 # a local weights file (e.g. COCO Mask R-CNN); never downloaded
    save_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; one of {', '.join(BACKBONES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; one of {', '.join(SCHEDULES)}")
        _positive(self, "iterations", "batch_size", "lr", "save_every")
        if self.crop and self.crop % 32:
            raise ValueError(f"crop must be a multiple of 32 (or 0), got {self.crop}")
        object.__setattr__(self, "anchor_sizes", tuple(int(a) for a in self.anchor_sizes))
        object.__setattr__(self, "proposals", tuple(int(a) for a in self.proposals))
        if len(self.proposals) != 2 or min(self.proposals) < 1 or self.rois_per_image < 1:
            raise ValueError(f"proposals needs 2 positive counts (training, test), got {self.proposals}")


@dataclass(frozen=True)
class UNetConfig:
    """``lungseg maskrcnn train-unet``: the 2D U-Net baseline."""

    width: int = 64                   # the original U-Net's
    iterations: int = 20000           # lungseg's choice
    batch_size: int = 4               # lungseg's choice
    lr: float = 1e-4                  # Adam; lungseg's choice
    crop: int = 0                     # training crop side (0: the whole slice)
    augment: bool = True
    save_every: int = 50
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _positive(self, "width", "iterations", "batch_size", "lr", "save_every")
        if self.crop and self.crop % 16:
            raise ValueError(f"crop must be a multiple of 16 (or 0), got {self.crop}")


PRESETS = {
    "patch": {"paper": {}, "cpu": {"epochs": 5, "max_train": 2400, "max_eval": 800}},
    "mask": {"paper": {}, "cpu": {"backbone": "resnet18", "crop": 192, "iterations": 2000, "batch_size": 2,
                                  "lr": 0.01, "warmup": 50, "proposals": (500, 100), "rois_per_image": 128}},
    "unet": {"paper": {}, "cpu": {"width": 16, "crop": 256, "iterations": 1000, "batch_size": 4, "lr": 1e-3}},
}
CONFIGS = {"patch": PatchConfig, "mask": MaskConfig, "unet": UNetConfig}


def _positive(cfg, *names: str) -> None:
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")


def make_config(kind: str, preset: str = "paper", **overrides):
    """The config of ``kind`` from a preset, with the options a user gave (``None`` = not given)."""
    if preset not in PRESETS[kind]:
        raise ValueError(f"unknown preset {preset!r}; one of {', '.join(PRESETS[kind])}")
    values = {**PRESETS[kind][preset], **{k: v for k, v in overrides.items() if v is not None}}
    return CONFIGS[kind](**values)


def to_dict(cfg) -> dict:
    """Plain data for a checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def from_dict(kind: str, data: dict):
    """A config back from a checkpoint (unknown keys refused)."""
    names = {f.name for f in fields(CONFIGS[kind])}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {kind} settings: {', '.join(sorted(unknown))}")
    return replace(CONFIGS[kind](), **data)

"""Settings: frozen dataclasses whose defaults are paper A's ("Preprocessing", "Experiment settings").

This module is the one home of:

- the preprocessing settings (:class:`PreprocessConfig`: spacing, window,
  sub-case and ROI shapes, readers, lung mask), which caches record and
  checkpoints copy, and the fields a model of each kind depends on
  (:data:`MODEL_INPUT_FIELDS`, compared by :func:`input_mismatch`);
- the settings of each training task (:class:`SegConfig`, :class:`ClsConfig`;
  their common fields in :class:`TrainConfig`), found by kind in
  :data:`CONFIGS`; a checkpoint stores its config as plain data and
  :func:`config_from_dict` rebuilds it;
- the networks each task can train (:data:`ARCHS`: name -> builder), so the
  command line's choices, training and checkpoint loading read one table;
  ``config.build_model()`` builds the network a config describes;
- the settings of ``lungseg predict`` (:class:`PredictConfig`) and of
  ``lungseg composite`` (:class:`CompositeConfig`);
- where the optional real data lives (:func:`shared_data_dir`);
- named presets (:data:`PRESETS`) and :func:`make_config` (paper defaults,
  then a preset, then explicit options), from which the command line reads
  its defaults.

Kept free of heavy imports so that the command line can show the defaults in
``--help`` at once: the network modules (and torch) are imported only when a
model is built or a segmenter's widths are checked. Where the training loop
lives: :mod:`lungseg.train`; where splits live: :mod:`lungseg.splits`.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .splits import DEFAULT_SPLIT_FILE

#: Where real data for tests, benchmarks and the demo lives when present (never required):
#: ``$LUNGSEG_SHARED_DATA``, else ``../shared/data`` beside the project folder.
SHARED_DATA_ENV = "LUNGSEG_SHARED_DATA"


def shared_data_dir() -> Path:
    """The shared real-data folder (``$LUNGSEG_SHARED_DATA``, else ``<project>/../shared/data``); may not exist."""
    return Path(os.environ.get(SHARED_DATA_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"))

#: Networks by task: name -> "module:builder" inside lungseg (imported when built).
ARCHS: dict[str, dict[str, str]] = {
    "seg": {"resunet3d": "resunet3d:resunet3d", "unet3d": "resunet3d:unet3d"},
    "cls": {"resnet3d50": "resnet3d:resnet3d50", "resnet3d50_plain": "resnet3d:resnet3d50_plain",
            "resnet2d50": "resnet3d:resnet2d50", "nodulenet": "malignancy:nodulenet"},
    "det": {"candidatenet": "detect:candidate_net"},
}
SEG_ARCHS = tuple(ARCHS["seg"])
#: What a segmenter trains on: paper A's sub-cases, or the ROIs of the detector's
#: candidates on nodules (nodules in their real surroundings, centred where the
#: detector finds them; :class:`lungseg.datasets.CandidateSegDataset`).
SEG_PATCHES = ("subcase", "candidate")
CLS_ARCHS = tuple(ARCHS["cls"])
#: Classifiers that can read the nodule's mask as a second channel and regress the readers' ratings.
CLS_MULTI_ARCHS = ("nodulenet",)
#: FROC findings (``lungseg evaluate``): probability map voxels at or above
#: CANDIDATE_THRESHOLD form them. Low on purpose: the FROC sweeps the findings'
#: scores (their maximum probability), so it only sets the lowest operating
#: point. At most FROC_MAX_FINDINGS per scan, as in LUNA16.
CANDIDATE_THRESHOLD = 0.1
FROC_MAX_FINDINGS = 100
#: ``--precision`` values: auto (bf16 autocast where the hardware has it), fp32, bf16, fp16.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of ``lungseg preprocess``; the defaults are paper A's."""

    spacing: tuple[float, float, float] = (3.0, 1.5, 1.5)      # z, y, x mm
    window: tuple[float, float] = (-1000.0, 400.0)             # HU mapped to 0..1
    subcase_shape: tuple[int, int, int] = (48, 192, 192)
    roi_shape: tuple[int, int, int] = (16, 48, 48)
    min_readers: int = 3          # a nodule counts when this many readers marked it
    mask_readers: int = 3         # its mask: voxels this many readers included
    lung_threshold_hu: float = -320.0
    lung_closing_mm: float = 10.0
    candidates: bool = True       # store the detector's candidates (lungseg.detect) per scan

    def __post_init__(self):
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (low, high) with low < high, got {self.window}")
        for name in ("subcase_shape", "roi_shape"):
            if any(int(s) < 1 for s in getattr(self, name)):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 1 <= self.mask_readers <= 4 or not 1 <= self.min_readers <= 4:
            raise ValueError("min_readers and mask_readers must be 1..4")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, settings: dict) -> "PreprocessConfig":
        """The config of a cache's or checkpoint's settings (keys of other kinds, e.g. a crop cache's, ignored)."""
        known = cls.__dataclass_fields__
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in known})


#: What a network of each kind needs to see as it was trained: the settings of
#: its input. A segmenter is fully convolutional (any sub-case size); a
#: classifier's ROI shape is fixed by its weights' receptive field and pooling.
MODEL_INPUT_FIELDS = {
    "seg": ("spacing", "window"),
    "cls": ("spacing", "window", "roi_shape"),
    "det": ("spacing", "window", "roi_shape"),
}


def _close(a, b) -> bool:
    a, b = (tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in (a, b))
    return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
                                    for x, y in zip(a, b))


def input_mismatch(fields: tuple[str, ...], trained: dict, given: dict) -> str:
    """'' when ``trained`` and ``given`` settings agree on ``fields``; else what differs."""
    diffs = []
    for name in fields:
        a, b = trained.get(name), given.get(name)
        if a is None or b is None:
            continue        # a setting one side does not record cannot be checked
        if not _close(a, b):
            diffs.append(f"{name} {tuple(a)} vs {tuple(b)}")
    return "; ".join(diffs)


@dataclass(frozen=True)
class PredictConfig:
    """Settings of ``lungseg predict``."""

    threshold: float = 0.5            # on the segmentation probability
    min_volume_mm3: float = 14.0      # a 3 mm sphere: LIDC's smallest outlined nodules
    det_threshold: float | None = None  # on p(nodule); None: the detector's operating point
    overlap: float = 0.5              # of neighbouring windows, per axis
    device: str = "auto"
    precision: str = "auto"           # one of lungseg.configs.PRECISIONS

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.det_threshold is not None and not 0 <= self.det_threshold <= 1:
            raise ValueError(f"det_threshold must be in [0, 1], got {self.det_threshold}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class DetectConfig:
    """Candidate generation of the detector (:func:`lungseg.detect.candidates`), on the preprocessing grid."""

    sigmas_mm: tuple[float, ...] = (1.2, 2.0, 3.2, 5.0, 8.0)   # blob radii ~ sqrt(3) sigma: 2-14 mm
    min_response: float = 40.0        # -sigma^2 LoG at the peak, HU
    min_hu: float = -750.0            # lightly smoothed HU at the centre
    nms_mm: float = 2.5               # one peak per this neighbourhood (half-width)
    max_candidates: int = 1000        # per scan, most blob-like first
    blob_weight: float = 0.75         # rank = response x (1 - w + w x blobness); 0: by response alone

    def __post_init__(self):
        if not self.sigmas_mm or any(s <= 0 for s in self.sigmas_mm):
            raise ValueError(f"sigmas_mm must be positive, got {self.sigmas_mm}")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")
        if not 0 <= self.blob_weight <= 1:
            raise ValueError(f"blob_weight must be in [0, 1], got {self.blob_weight}")
        object.__setattr__(self, "sigmas_mm", tuple(float(s) for s in self.sigmas_mm))


@dataclass(frozen=True)
class CompositeConfig:
    """Settings of ``lungseg composite``."""

    nodules_per_scan: int = 6
    margin_mm: float = 3.0            # blending margin outside the nodule's mask
    touch_mm: float = 2.0             # juxta-pleural / juxta-vascular: mask this close to the wall / a vessel
    scale_min: float = 0.85
    scale_max: float = 1.2
    min_diameter_mm: float = 3.0      # crops whose pasted nodule would be smaller are drawn again
    max_diameter_mm: float = 40.0
    tries: int = 400                  # centre draws per nodule before giving up on it
    min_air_fraction: float = 0.6     # of the background under the nodule and of the lung in its margin:
                                      # aerated (< -500 HU), so that no nodule lands on the hilum, a tumour
                                      # or a consolidation

    def __post_init__(self):
        if self.nodules_per_scan < 1:
            raise ValueError(f"nodules_per_scan must be >= 1, got {self.nodules_per_scan}")
        if not self.margin_mm > 0 or not self.touch_mm > 0:
            raise ValueError("margin_mm and touch_mm must be > 0")
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if not 0 <= self.min_air_fraction <= 1:
            raise ValueError(f"min_air_fraction must be in [0, 1], got {self.min_air_fraction}")


def _builder(kind: str, arch: str):
    module, name = ARCHS[kind][arch].split(":")
    return getattr(importlib.import_module(f"lungseg.{module}"), name)


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by both loops. ``precision``: one of :data:`PRECISIONS`."""

    kind: ClassVar[str] = ""
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
    split_file: str = str(DEFAULT_SPLIT_FILE)
    arch: str = ""

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.arch not in ARCHS.get(self.kind, {}):
            raise ValueError(f"arch must be one of {sorted(ARCHS.get(self.kind, {}))}, got {self.arch!r}")
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))
        object.__setattr__(self, "split_file", str(self.split_file))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def build_model(self):
        """The (untrained) network this config describes."""
        raise NotImplementedError


@dataclass(frozen=True)
class SegConfig(TrainConfig):
    kind: ClassVar[str] = "seg"
    epochs: int = 64
    batch_size: int = 6
    lr: float = 1e-2
    lr_milestones: tuple[int, ...] = (32, 48)
    arch: str = "resunet3d"                          # or "unet3d" (the baseline)
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    loss: str = "paper"                              # paper | dice | bce | dice+bce
    switch_epoch: int = 3
    threshold: float = 0.5
    patches: str = "subcase"                         # or "candidate" (SEG_PATCHES)

    def __post_init__(self):
        super().__post_init__()
        from .resunet3d import UNet3dConfig

        if self.patches not in SEG_PATCHES:
            raise ValueError(f"patches must be one of {', '.join(SEG_PATCHES)}, got {self.patches!r}")

        object.__setattr__(self, "widths", UNet3dConfig(widths=self.widths).widths)   # the network's rule

    def build_model(self):
        return _builder("seg", self.arch)(widths=self.widths)


@dataclass(frozen=True)
class ClsConfig(TrainConfig):
    kind: ClassVar[str] = "cls"
    epochs: int = 52
    batch_size: int = 16
    lr: float = 1e-4
    arch: str = "resnet3d50"                         # or resnet3d50_plain, resnet2d50, nodulenet
    width: int = 64
    balance: bool = False                            # draw benign and malignant equally often
    # Not in paper A (lungseg.malignancy): the mask as a second input channel, the
    # readers' ratings as auxiliary targets, Adam's weight decay, and K >= 2
    # cross-fitted members (calibrated and stacked with measured features).
    mask_channel: bool = False
    aux_weight: float = 0.0
    weight_decay: float = 0.0
    members: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if (self.mask_channel or self.aux_weight > 0) and self.arch not in CLS_MULTI_ARCHS:
            raise ValueError(f"mask_channel and aux_weight need arch {' or '.join(CLS_MULTI_ARCHS)}, not {self.arch}")
        if self.aux_weight < 0 or self.weight_decay < 0:
            raise ValueError("aux_weight and weight_decay must be >= 0")
        if self.members == 1 or self.members < 0:
            raise ValueError(f"members must be 0 (one network) or >= 2 (cross-fitted), got {self.members}")
        if self.balance and self.aux_weight > 0:
            raise ValueError("balance is not available with aux_weight (nodules without a label train the ratings)")

    def build_model(self):
        if self.arch in CLS_MULTI_ARCHS:
            from .lidc import CHARACTERISTICS

            member = lambda: _builder("cls", self.arch)(  # noqa: E731
                num_classes=2, width=self.width, in_channels=1 + int(self.mask_channel),
                n_aux=len(CHARACTERISTICS) if self.aux_weight > 0 else 0)
        else:
            member = lambda: _builder("cls", self.arch)(num_classes=2, width=self.width)  # noqa: E731
        if self.members:
            from .malignancy import NoduleEnsemble

            return NoduleEnsemble([member() for _ in range(self.members)])
        return member()


@dataclass(frozen=True)
class DetConfig(TrainConfig):
    """The detector's false-positive reduction (:func:`lungseg.detect.candidate_net`); not in paper A."""

    kind: ClassVar[str] = "det"
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    lr_milestones: tuple[int, ...] = (8,)
    arch: str = "candidatenet"
    max_batches: int = 250                           # an epoch: 8000 balanced draws of about 50k candidates
    width: int = 12
    balance: bool = True                             # nodules and other candidates equally often
    target_fp_per_scan: float = 1.0                  # the operating point chosen on the val split

    def __post_init__(self):
        super().__post_init__()
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if not self.target_fp_per_scan > 0:
            raise ValueError(f"target_fp_per_scan must be > 0, got {self.target_fp_per_scan}")

    def build_model(self):
        return _builder("det", self.arch)(width=self.width)


#: The config type of each task kind, as checkpoints name it.
CONFIGS: dict[str, type[TrainConfig]] = {"seg": SegConfig, "cls": ClsConfig, "det": DetConfig}


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
    "cls": {"paper": {}, "cpu": {"width": 8, "epochs": 5},
            # lungseg.malignancy: a small two-channel network with the readers' ratings as
            # auxiliary targets, 5 cross-fitted members; about 4 min per member on 2 cores
            # for 630 crops (benchmarks/malignancy.py).
            "nodule": {"arch": "nodulenet", "width": 16, "mask_channel": True, "aux_weight": 0.5, "members": 5,
                       "epochs": 30, "batch_size": 32, "lr": 1e-3, "lr_milestones": (20,), "weight_decay": 1e-4}},
    # The detector is not paper A's: "paper" is its defaults, sized for 2 CPU cores.
    "det": {"paper": {}},
}
#: The segmenter of ``lungseg predict`` with the detector: the cpu preset's Res U-Net
#: on candidate ROIs (nodules in real surroundings), for ``train-seg --preset context``;
#: 631 ROIs per epoch on the detector benchmark's training cache.
PRESETS["seg"]["context"] = {**PRESETS["seg"]["cpu"], "patches": "candidate", "epochs": 40, "batch_size": 8,
                             "lr_milestones": (30,), "switch_epoch": 3}


def make_config(kind: str, preset: str = "paper", **options: Any) -> TrainConfig:
    """The config of ``kind`` ("seg"/"cls"/"det"): defaults, then ``preset``, then ``options``."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown task kind {kind!r}; kinds are {sorted(CONFIGS)}")
    if preset not in PRESETS[kind]:
        raise ValueError(f"unknown {kind} preset {preset!r}; presets are {sorted(PRESETS[kind])}")
    return CONFIGS[kind](**{**PRESETS[kind][preset], **options})


def config_from_dict(kind: str, data: dict[str, Any]) -> SegConfig | ClsConfig:
    """A config from its plain-data form (a checkpoint's ``config``); unknown keys are an error."""
    if kind not in CONFIGS:
        raise ValueError(f"unknown task kind {kind!r}; kinds are {sorted(CONFIGS)}")
    return CONFIGS[kind](**data)

"""3D ResNet50 of paper A (Fig. 5, "Classification network architecture") and its Table 5 baselines.

Paper A classifies each nodule ROI of 16 x 48 x 48 voxels (3 x 1.5 x 1.5 mm)
as benign or malignant with ResNet50 (He et al., bottleneck blocks [3, 4, 6, 3])
changed in three ways: (1) 3D instead of 2D convolutions; (2) a smaller kernel
in the first convolution and in "the last 2 residual blocks"; (3) no pooling
layer and reduced convolution strides. Output: two-class scores trained with
NLL on log-softmax (eq. 4). The models here return logits;
:func:`lungseg.losses.nll_loss` applies the log-softmax.

Shapes (N = batch), defaults of :func:`resnet3d50`::

    input     (N, 1, 16, 48, 48)
    stem      (N, 64, 16, 48, 48)     conv 3x3x3 stride 1, BN, ReLU; no max-pool
    layer1    (N, 256, 16, 48, 48)    3 bottlenecks, 3x3x3, stride 1
    layer2    (N, 512, 8, 24, 24)     4 bottlenecks, 3x3x3, stride 2
    layer3    (N, 1024, 4, 12, 12)    6 bottlenecks, 1x3x3, stride 2
    layer4    (N, 2048, 2, 6, 6)      3 bottlenecks, 1x3x3, stride 2
    head      (N, num_classes)        global average, flatten(1), linear -> logits

Choices the paper leaves open, and why
--------------------------------------
- First convolution: 3x3x3, stride 1, padding 1 (ResNet50: 7x7, stride 2). "Reduce
  the kernel size" with no size given; 3 is the smallest kernel that still sees
  a neighbourhood, and stride 1 is the "reduced stride" that keeps the 16-slice
  depth intact (a stride-2 stem plus pool would leave 4 slices after the stem).
- "The last 2 residual blocks": read as the last two *stages* (layer3 and
  layer4, ResNet's conv4_x and conv5_x), whose middle convolution becomes
  1x3x3 instead of 3x3x3. At the default strides those stages see 4 and 2
  slices of 12 mm and 24 mm each; a kernel 3 deep there reads mostly zero
  padding and spans the whole ROI depth, which is the paper's stated reason
  ("large convolution kernel introduces many padding voxels at the edge").
  In-plane the maps are still 12 x 12 and 6 x 6, so the 3x3 in-plane kernel is
  kept. ``kernels=((3,3,3), (3,3,3), (1,1,1), (1,1,1))`` gives the stricter
  reading (pointwise last stages).
- "Abandon pooling layer": the stem max-pool is removed. The global average
  pool before the classifier stays; it is the head, not a down-sampling layer,
  and without it the classifier would be tied to one ROI size.
- "Reduce stride": stem stride 1 and no pool, stages (1, 2, 2, 2): the network
  down-samples 8x instead of ResNet's 32x, so layer4 is 2 x 6 x 6 rather than
  a single voxel.
- Stride on the 3x3 convolution of the first block of a stage (torchvision's
  ResNet "v1.5"); projection shortcut = 1x1x1 conv (stride s) + norm.
- Batch normalization (ResNet's), injectable (``norm_layer``); Xavier-uniform
  weights as the paper's "Experiment settings" state, norm weights 1, biases 0.
- Width 64 (ResNet50's), so stage outputs are 256, 512, 1024, 2048 channels.

Baselines (Table 5)
-------------------
- :func:`resnet3d50_plain`, "Plain 3D ResNet50": ResNet50 made 3D and nothing
  else: 7x7x7 stem with stride 2, 3x3x3 max-pool with stride 2, stages (1, 2, 2, 2),
  3x3x3 kernels everywhere. On 16 x 48 x 48 its layer4 map is 1 x 2 x 2.
- :func:`resnet2d50`, "2D ResNet50 [25]": He et al.'s ResNet50 on the ROI's
  *central slice* (slice ``D // 2``, index 8 of 16) by default, following the
  paper's argument that a 2D network must rely on one key slice.
  ``input="slices"`` instead feeds all 16 slices as input channels. One input
  channel and Xavier initialization, no ImageNet weights (the paper does not
  mention pretraining, and the 3D networks have none to match). Both take
  the same (N, 1, 16, 48, 48) ROI tensor as the 3D networks, so one data
  pipeline serves all three.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .resunet3d import xavier_init

NormLayer = Callable[[int], nn.Module]

INPUTS = ("volume", "central_slice", "slices")
NORMS = ("batch", "instance", "group")


def _ints(value, name: str) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if any(not isinstance(v, numbers.Integral) or isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must hold ints, got {value!r}")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class ResNetConfig:
    """Settings of :class:`ResNet`; the defaults are paper A's 3D ResNet50.

    ``kernels[i]`` is the middle (3x3-type) kernel of stage ``i``'s bottlenecks,
    one entry per spatial dimension (an int means a cube); ``strides[i]`` the stride of the stage's
    first block. ``input``: "volume" for 3D; for 2D, "central_slice" (slice
    ``D // 2`` of a (N, C, D, H, W) ROI) or "slices" (the D slices as channels;
    ``in_channels`` must then equal C * D).
    """

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 2
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    stem_kernel: int = 3
    stem_stride: int = 1
    stem_pool: bool = False
    strides: tuple[int, ...] = (1, 2, 2, 2)
    kernels: tuple[tuple[int, ...], ...] = ((3, 3, 3), (3, 3, 3), (1, 3, 3), (1, 3, 3))
    norm: str = "batch"
    input: str = "volume"
    zero_init_residual: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        set_("layers", _ints(self.layers, "layers"))
        set_("strides", _ints(self.strides, "strides"))
        set_("kernels", tuple(_ints(k, "kernels") if isinstance(k, (tuple, list))
                              else _ints(k, "kernels") * self.spatial_dims for k in self.kernels))
        for name in ("in_channels", "num_classes", "width", "stem_kernel", "stem_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"layers must be a non-empty tuple of positive block counts, got {self.layers}")
        if len(self.strides) != len(self.layers) or any(s < 1 for s in self.strides):
            raise ValueError(f"strides must hold one positive stride per stage ({len(self.layers)}), "
                             f"got {self.strides}")
        if len(self.kernels) != len(self.layers):
            raise ValueError(f"kernels must hold one kernel per stage ({len(self.layers)}), got {self.kernels}")
        for k in self.kernels:
            if len(k) != self.spatial_dims or any(v < 1 or v % 2 == 0 for v in k):
                raise ValueError(f"each kernel must have {self.spatial_dims} odd sizes, got {k}")
        if self.stem_kernel % 2 == 0:
            raise ValueError(f"stem_kernel must be odd, got {self.stem_kernel}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {INPUTS}, got {self.input!r}")
        if (self.spatial_dims == 3) != (self.input == "volume"):
            raise ValueError(f"input={self.input!r} does not fit spatial_dims={self.spatial_dims}: "
                             "3D networks take 'volume', 2D ones 'central_slice' or 'slices'")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"], out["strides"] = list(self.layers), list(self.strides)
        out["kernels"] = [list(k) for k in self.kernels]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ResNetConfig":
        return cls(**dict(data))


def norm_factory(norm: str, spatial_dims: int) -> NormLayer:
    """``channels -> nn.Module`` for "batch", "instance" (affine) or "group" (32 groups or fewer)."""
    if norm == "batch":
        return nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d
    if norm == "instance":
        inst = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
        return lambda c: inst(c, affine=True)
    if norm == "group":
        return lambda c: nn.GroupNorm(min(32, c), c)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 -> k (stride s) -> 1x1 (x4 channels), plus shortcut, then ReLU.

    (N, in_channels, *S) -> (N, 4 * planes, *ceil(S / stride)) for odd ``kernel``.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, kernel: Sequence[int], stride: int,
                 norm_layer: NormLayer, spatial_dims: int = 3):
        super().__init__()
        Conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        out = planes * self.expansion
        self.conv1 = Conv(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = Conv(planes, planes, tuple(kernel), stride=stride,
                          padding=tuple(k // 2 for k in kernel), bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = Conv(planes, out, 1, bias=False)
        self.bn3 = norm_layer(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(Conv(in_channels, out, 1, stride=stride, bias=False),
                                            norm_layer(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet, 2D or 3D: ROI -> logits (N, num_classes).

    3D: (N, in_channels, D, H, W). 2D: (N, C, D, H, W) ROIs are reduced to
    (N, C, H, W) by ``config.input`` (see :class:`ResNetConfig`); (N, C, H, W)
    tensors are taken as they are. ``norm_layer`` overrides ``config.norm``.

    Submodules: ``stem`` (conv, norm, ReLU[, max-pool]), ``layer1`` ..
    ``layerK``, ``avgpool``, ``fc``.
    """

    def __init__(self, config: ResNetConfig | None = None, *, norm_layer: NormLayer | None = None):
        super().__init__()
        self.config = c = config or ResNetConfig()
        nd = c.spatial_dims
        norm_layer = norm_layer or norm_factory(c.norm, nd)
        Conv = nn.Conv3d if nd == 3 else nn.Conv2d
        MaxPool = nn.MaxPool3d if nd == 3 else nn.MaxPool2d
        stem = [Conv(c.in_channels, c.width, c.stem_kernel, stride=c.stem_stride,
                     padding=c.stem_kernel // 2, bias=False),
                norm_layer(c.width), nn.ReLU(inplace=True)]
        if c.stem_pool:
            stem.append(MaxPool(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        cin = c.width
        self.stage_names = []
        for i, (blocks, stride, kernel) in enumerate(zip(c.layers, c.strides, c.kernels)):
            planes = c.width * 2 ** i
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, planes, kernel=kernel, stride=stride if b == 0 else 1,
                                        norm_layer=norm_layer, spatial_dims=nd))
                cin = planes * Bottleneck.expansion
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*stage))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool3d(1) if nd == 3 else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, c.num_classes)
        self.num_features = cin
        xavier_init(self)
        if c.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and getattr(m.bn3, "weight", None) is not None:
                    nn.init.zeros_(m.bn3.weight)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` and, for 2D networks, turn a (N, C, D, H, W) ROI into (N, C', H, W)."""
        c = self.config
        if c.spatial_dims == 3:
            if x.ndim != 5:
                raise ValueError(f"expected a 3D ROI (N, C, D, H, W), got shape {tuple(x.shape)}")
        elif x.ndim == 5:
            x = x[:, :, x.shape[2] // 2] if c.input == "central_slice" else x.flatten(1, 2)
        elif x.ndim != 4:
            raise ValueError(f"expected (N, C, D, H, W) or (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c.in_channels:
            what = "C x D (slices as channels)" if c.input == "slices" else "channel(s)"
            raise ValueError(f"expected {c.in_channels} input {what}, got {x.shape[1]} "
                             f"(input shape {tuple(x.shape)})")
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(input) -> pooled features (N, num_features)."""
        x = self.stem(self.prepare_input(x))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def _build(defaults: ResNetConfig, norm_layer: NormLayer | None, overrides: dict[str, Any]) -> ResNet:
    fields = {f.name for f in dataclasses.fields(ResNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; options are {sorted(fields)}")
    return ResNet(dataclasses.replace(defaults, **overrides), norm_layer=norm_layer)


def resnet3d50(*, num_classes: int = 2, in_channels: int = 1, width: int = 64,
               norm_layer: NormLayer | None = None, **overrides: Any) -> ResNet:
    """Paper A's 3D ResNet50 for (N, 1, 16, 48, 48) ROIs; ``overrides`` are :class:`ResNetConfig` fields."""
    return _build(ResNetConfig(num_classes=num_classes, in_channels=in_channels, width=width),
                  norm_layer, overrides)


def resnet3d50_plain(*, num_classes: int = 2, in_channels: int = 1, width: int = 64,
                     norm_layer: NormLayer | None = None, **overrides: Any) -> ResNet:
    """Table 5's plain 3D ResNet50: 7x7x7 stride-2 stem, max-pool, strides (1, 2, 2, 2), 3x3x3 kernels."""
    cfg = ResNetConfig(num_classes=num_classes, in_channels=in_channels, width=width,
                       stem_kernel=7, stem_stride=2, stem_pool=True,
                       kernels=((3, 3, 3),) * 4)
    return _build(cfg, norm_layer, overrides)


def resnet2d50(*, num_classes: int = 2, input: str = "central_slice", roi_depth: int = 16,
               in_channels: int | None = None, width: int = 64, norm_layer: NormLayer | None = None,
               **overrides: Any) -> ResNet:
    """Table 5's 2D ResNet50 (He et al.) on the ROI's central slice, or its slices as channels.

    ``in_channels`` defaults to 1 for "central_slice" and to ``roi_depth`` (16)
    for "slices".
    """
    if input not in ("central_slice", "slices"):
        raise ValueError(f"input must be 'central_slice' or 'slices', got {input!r}")
    if in_channels is None:
        in_channels = roi_depth if input == "slices" else 1
    cfg = ResNetConfig(spatial_dims=2, num_classes=num_classes, in_channels=in_channels, width=width,
                       stem_kernel=7, stem_stride=2, stem_pool=True, kernels=((3, 3),) * 4,
                       input=input)
    return _build(cfg, norm_layer, overrides)

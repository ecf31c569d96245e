"""Paper B's networks: the patch classifiers of Table I, Mask R-CNN, the 2D U-Net.

**Patch classifiers** (Table I; :func:`patch_classifier`): LeNet, AlexNet,
VGG16, ResNet18, ResNet20, ResNet50, ResNet101 deciding whether a 50 x 50
patch's centre is nodule. torchvision's builders where it has them (AlexNet,
VGG16, ResNet18/50/101, ``weights=None``: nothing is downloaded), the grey
patch repeated to 3 channels; AlexNet's strides need at least 63 px, so it
gets the patch resized to 64 x 64, the others take it at 50 x 50. LeNet (LeCun 1998: two 5 x 5 conv +
max-pool stages, 120-84-2) and ResNet20 (He et al. 2016's CIFAR network:
3 x 3 stages of basic blocks at 16/32/64 channels, 1 x 1 projection shortcuts
where the shape changes) are written here and take the 50 x 50 patch itself.
All return 2 logits (normal, nodule).

**Mask R-CNN** (:func:`maskrcnn`): torchvision's ``MaskRCNN`` on a ResNet-FPN
backbone (``resnet101`` as paper B; ``resnet50``, ``resnet18`` as options),
two classes (background, nodule). Choices the paper leaves open:

- anchors sized for nodules: 4, 8, 16, 32, 64 px on the five FPN levels
  (nodules of 3-30 mm at 0.5-0.9 mm pixels are 4-60 px), square only (a
  nodule's box is square);
- no resizing: images are used at their own pixel size (1 px stays 1 px, so
  the anchors keep their meaning); torchvision would scale to 800 px;
- the grey slice repeated to 3 channels, torchvision's ImageNet mean and std
  (so that COCO weights given with ``weights=`` fit);
- from scratch (the default, no COCO weights can be had here) the backbone's
  batch norm trains; with given weights it is frozen, as torchvision fine-tunes.

**2D U-Net** (:func:`unet2d`): Ronneberger et al. 2015, two 3 x 3 conv + batch
norm + ReLU per level, four 2 x 2 max-pools, transposed-conv up-sampling and
skip connections, ``width`` channels at the top (64 in the original; paper B
gives none), one logit per pixel.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PATCH_ARCHS = ("lenet", "alexnet", "vgg16", "resnet18", "resnet20", "resnet50", "resnet101")
TORCHVISION_PATCH = {"alexnet", "vgg16", "resnet18", "resnet50", "resnet101"}
#: Input side a torchvision classifier needs at least (AlexNet: 63 px); smaller patches are resized to it.
MIN_INPUT = {"alexnet": 64}
BACKBONES = ("resnet101", "resnet50", "resnet18")
ANCHOR_SIZES = (4, 8, 16, 32, 64)


# --------------------------------------------------------------------------
# Patch classifiers (Table I)
# --------------------------------------------------------------------------

class LeNet(nn.Module):
    """LeNet-5 on a (B, 1, 50, 50) patch: conv 5x5 (6) - pool - conv 5x5 (16) - pool - 120 - 84 - classes."""

    def __init__(self, num_classes: int = 2, size: int = 50):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        side = ((size - 4) // 2 - 4) // 2
        self.size = size
        self.classifier = nn.Sequential(nn.Linear(16 * side * side, 120), nn.ReLU(inplace=True),
                                        nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"this LeNet takes {self.size} x {self.size} patches, got {tuple(x.shape[-2:])}")
        return self.classifier(self.features(x).flatten(1))


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al. 2016's CIFAR ResNet-20: 3x3 conv (16), 3 stages of 3 basic blocks (16, 32, 64), pool, fc."""

    def __init__(self, num_classes: int = 2, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(blocks):
                layers.append(_Basic(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class _Torchvision(nn.Module):
    """A torchvision classifier on a grey patch: repeated to 3 channels, resized up to ``min_size`` if smaller."""

    def __init__(self, net: nn.Module, min_size: int = 0):
        super().__init__()
        self.net, self.min_size = net, min_size

    def forward(self, x):
        if min(x.shape[-2:]) < self.min_size:
            x = F.interpolate(x, size=(self.min_size, self.min_size), mode="bilinear", align_corners=False)
        return self.net(x.expand(-1, 3, -1, -1))


def patch_classifier(arch: str, *, num_classes: int = 2) -> nn.Module:
    """A Table I network for (B, 1, 50, 50) patches in [0, 1]; returns (B, num_classes) logits."""
    if arch not in PATCH_ARCHS:
        raise ValueError(f"unknown patch classifier {arch!r}; one of {', '.join(PATCH_ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if arch == "lenet":
        return LeNet(num_classes)
    if arch == "resnet20":
        return ResNet20(num_classes)
    import torchvision.models as tvm

    return _Torchvision(getattr(tvm, arch)(weights=None, num_classes=num_classes), MIN_INPUT.get(arch, 0))


# --------------------------------------------------------------------------
# Mask R-CNN
# --------------------------------------------------------------------------

def _keep_size_transform(transform):
    """torchvision's transform without its resize: images keep their pixel size."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class KeepSize(GeneralizedRCNNTransform):
        def resize(self, image, target=None):
            return image, target

    return KeepSize(transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                    size_divisible=transform.size_divisible)


def maskrcnn(backbone: str = "resnet101", *, num_classes: int = 2, anchor_sizes=ANCHOR_SIZES,
             frozen_norm: bool = False, detections_per_image: int = 20, proposals=(2000, 1000),
             rois_per_image: int = 512) -> nn.Module:
    """torchvision Mask R-CNN on a ResNet-FPN ``backbone`` for nodules (see the module docstring).

    Input: a list of (3, H, W) float tensors in [0, 1]; training also takes
    targets (``boxes`` (N, 4) x0 y0 x1 y1, ``labels`` (N,), ``masks`` (N, H, W)).
    ``proposals``: region proposals kept after NMS in training and at test
    (torchvision's 2000 and 1000 by default); ``rois_per_image``: proposals
    sampled per image for the box and mask heads in training (torchvision's 512).
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import misc

    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; one of {', '.join(BACKBONES)}")
    if len(anchor_sizes) != 5 or any(s <= 0 for s in anchor_sizes):
        raise ValueError(f"anchor_sizes needs 5 positive sizes (one per FPN level), got {anchor_sizes}")
    norm = misc.FrozenBatchNorm2d if frozen_norm else nn.BatchNorm2d
    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=norm, trainable_layers=5)
    anchors = AnchorGenerator(sizes=tuple((int(s),) for s in anchor_sizes), aspect_ratios=((1.0,),) * 5)
    train_n, test_n = (int(p) for p in proposals)
    model = MaskRCNN(body, num_classes=num_classes, rpn_anchor_generator=anchors,
                     box_detections_per_img=detections_per_image,
                     rpn_pre_nms_top_n_train=train_n, rpn_post_nms_top_n_train=train_n,
                     rpn_pre_nms_top_n_test=test_n, rpn_post_nms_top_n_test=test_n,
                     box_batch_size_per_image=rois_per_image)
    model.transform = _keep_size_transform(model.transform)
    return model


#: Parameter-name prefixes trained in each step of paper B's staged schedule (matterport's names:
#: "heads" = FPN + RPN + box and mask heads; "3+" = ResNet stage 3 (torchvision's layer2) and up).
STAGES = {
    "heads": ("backbone.fpn.", "rpn.", "roi_heads."),
    "3+": ("backbone.fpn.", "rpn.", "roi_heads.", "backbone.body.layer2.", "backbone.body.layer3.",
           "backbone.body.layer4."),
    "all": ("",),
}


def set_trainable(model: nn.Module, stage: str) -> int:
    """Train only the parameters of ``stage`` (:data:`STAGES`); returns how many tensors train."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(STAGES[stage]))
        n += p.requires_grad
    return n


def load_weights(model: nn.Module, path) -> dict:
    """Load a local weights file (e.g. torchvision's COCO Mask R-CNN), skipping tensors whose shape differs.

    Never downloads. Returns counts of loaded, skipped and missing tensors.
    """
    from lungseg.errors import LungsegError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LungsegError(f"{path}: cannot load weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise LungsegError(f"{path}: not a state dict")
    own = model.state_dict()
    fit = OrderedDict((k, v) for k, v in state.items() if k in own and own[k].shape == v.shape)
    if not fit:
        raise LungsegError(f"{path}: no tensor fits this network (another architecture?)")
    model.load_state_dict(fit, strict=False)
    counts = {"loaded": len(fit), "skipped": len(state) - len(fit), "missing": len(own) - len(fit)}
    log.info("%s: %s", path, counts)
    return counts


# --------------------------------------------------------------------------
# 2D U-Net
# --------------------------------------------------------------------------

def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet2d(nn.Module):
    """2D U-Net: (B, 1, H, W), H and W divisible by 16 -> (B, 1, H, W) logits."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width}, {depth}")
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double(1, chans[0])] + [_double(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_double(2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], 1, 1)
        self.depth = depth

    def forward(self, x):
        m = 2 ** self.depth
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"H and W must be divisible by {m}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([skips.pop(), up(x)], 1))
        return self.head(x)


def unet2d(*, width: int = 64, depth: int = 4) -> UNet2d:
    """The 2D U-Net baseline."""
    return UNet2d(width, depth)

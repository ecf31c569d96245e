"""Where lungseg computes: device choice and mixed-precision autocast.

The one home of device choice and of ``--precision``: training, evaluation
and prediction all call :func:`resolve_device` and :func:`precision_context`.
One rule for every command (project convention): ``"auto"`` means CUDA when
PyTorch sees a GPU, else the CPU; an explicitly requested device that is not
there is an error, never a silent fallback. Mixed precision is bfloat16
autocast where the hardware runs it natively (CUDA GPUs with bf16 support,
float16 on older GPUs; CPUs with AVX512-BF16 or AMX) and switchable, since
paper A trained in full precision. Only float16 needs a ``GradScaler``.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from .errors import DeviceError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` if available else ``cpu``; ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` as given.

    Raises :class:`DeviceError` (a ``ValueError``) for an unknown name or a
    device this machine or PyTorch build does not have.
    """
    if isinstance(name, str) and name.strip().lower() == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        dev = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available "
                              f"(PyTorch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise DeviceError(f"device {name!r} requested but only {count} CUDA device(s) "
                              f"exist (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {name!r} requested but Apple MPS is not available")
        return torch.device("mps")
    raise DeviceError(f"device type {dev.type!r} is not supported; use auto, cpu, cuda, cuda:N or mps")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 instructions (AVX512-BF16 or AMX); else bf16 is emulated (slow)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype worth using on ``device``, or None for full precision."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if dev.type == "mps":
        return torch.float16
    return None


def autocast_context(device: torch.device | str, enabled: bool = True,
                     dtype: torch.dtype | None = None) -> ContextManager:
    """``torch.autocast`` for ``device``, or a no-op context.

    ``enabled=False``: no-op (full precision). ``dtype=None``: the dtype of
    :func:`autocast_dtype` (no-op where none helps, e.g. CPUs without native
    bf16). An explicit ``dtype`` is used as asked, even where it is slow.
    """
    if not enabled:
        return contextlib.nullcontext()
    dev = torch.device(device)
    dtype = dtype if dtype is not None else autocast_dtype(dev)
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(device_type=dev.type, dtype=dtype)


def precision_context(device: torch.device | str, precision: str = "auto") -> ContextManager:
    """The autocast context of a ``--precision`` setting (:data:`lungseg.configs.PRECISIONS`).

    ``auto``: bf16 (or fp16) autocast where the hardware runs it natively,
    else full precision; ``fp32``: full precision; ``bf16``/``fp16``: that
    dtype as asked, even where it is emulated and slow.
    """
    if precision == "auto":
        return autocast_context(device)
    if precision == "fp32":
        return autocast_context(device, enabled=False)
    if precision == "bf16":
        return autocast_context(device, dtype=torch.bfloat16)
    if precision == "fp16":
        return autocast_context(device, dtype=torch.float16)
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def _fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold each eval-mode batch norm into the convolution that alone feeds it; returns how many were folded.

    The pairs are found by tracing the forward pass (:mod:`torch.fx`); where a
    network does not trace (control flow on its input), each of its children is
    tried in turn. The convolution takes the folded weights and the batch norm
    becomes an identity in place, so the network keeps its class and attributes.
    """
    from torch import fx, nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:       # noqa: BLE001  (fx could not trace it: fold within its parts)
        return sum(_fold_batch_norms(child) for child in model.children())
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(modules.get(src.target), nn.modules.conv._ConvNd)
                and modules[node.target].track_running_stats):
            pairs.append((src.target, node.target))

    def put(name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)

    for conv, bn in pairs:
        put(conv, fuse_conv_bn_eval(modules[conv], modules[bn]))
        put(bn, nn.Identity())
    return len(pairs)


def inference_ready(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """A network on ``device`` in eval mode, made faster for prediction with the same outputs (to float rounding).

    Batch norms are folded into their convolutions, and the network takes
    :func:`fast_layout`'s memory format (the detector's 1,000 candidate ROIs
    of LIDC-IDRI-0001: 2.8 s -> 0.7 s on two cores, with 16-ROI batches).
    Only for inference: the folded network cannot train.
    """
    dev = torch.device(device)
    model = model.eval().to(dev)
    with torch.no_grad():
        _fold_batch_norms(model)
    return fast_layout(model, dev)


def fast_layout(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``model`` with the memory format its convolutions run fastest in on ``device``: channels-last 3D on the
    CPU (oneDNN's 3D convolutions, pooling and their gradients: 1.4-3x the default layout on two cores,
    ``python benchmarks/train.py``), as it is elsewhere. The values are unchanged; training and prediction
    both use it."""
    if torch.device(device).type == "cpu" and any(isinstance(m, torch.nn.Conv3d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last_3d)
    return model

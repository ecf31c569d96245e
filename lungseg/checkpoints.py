"""Checkpoints: the one place that writes, reads and checks them.

A checkpoint is a dict of tensors and plain Python data, loaded with
``torch.load(..., weights_only=True)`` (never unpickling arbitrary objects):

- ``format`` (:data:`CHECKPOINT_FORMAT`), ``kind`` ("seg" or "cls", a key of
  :data:`lungseg.configs.CONFIGS`), ``config`` (the training config as plain
  data), ``model``, ``optimizer``, ``scheduler``, ``scaler`` and ``rng``
  states, ``epoch``, ``best_metric``, ``metric``, ``val``;
- ``preprocess``: the settings of the cache it was trained on (spacing,
  window, sub-case and ROI shapes, ...), the model's input contract;
- ``data`` (cache, split file, item counts) and ``lungseg_version``.

:func:`check_input` compares a checkpoint's ``preprocess`` with a cache's or
another checkpoint's, over the fields :data:`lungseg.preprocess.MODEL_INPUT_FIELDS`
names for its kind, and refuses a mismatch in one line naming both files.
Files are written to a temporary name and renamed, so an interrupted write
never leaves a torn checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configs import CONFIGS, MODEL_INPUT_FIELDS, config_from_dict, input_mismatch
from .errors import CheckpointError
from .files import replacing

CHECKPOINT_FORMAT = 1


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (checkpoints are named by it in reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The module itself under a ``torch.compile`` and a DistributedDataParallel wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename (atomic)."""
    with replacing(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Load a lungseg checkpoint safely (``weights_only=True``), checking its kind."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, pickled objects
        raise CheckpointError(f"{path}: not a loadable lungseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a lungseg checkpoint (format {CHECKPOINT_FORMAT})")
    if ckpt.get("kind") not in CONFIGS:
        raise CheckpointError(f"{path}: unknown checkpoint kind {ckpt.get('kind')!r}")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path}: a {ckpt['kind']} checkpoint, expected a {kind} checkpoint")
    return ckpt


def load_model(path: str | os.PathLike, *, kind: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A network with a checkpoint's weights, in eval mode, and the checkpoint."""
    ckpt = load_checkpoint(path, kind=kind)
    try:
        model = config_from_dict(ckpt["kind"], ckpt["config"]).build_model()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config describes no network of this lungseg ({exc})") from None
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


#: What only resuming a training run needs; a model for prediction drops it.
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "rng")


def for_inference(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint without its training state: what predict and evaluate load (bundled models)."""
    return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}


def describe(path: str | os.PathLike, ckpt: dict[str, Any]) -> dict[str, Any]:
    """What a report says of a checkpoint: path, hash, kind, architecture, epoch, training data."""
    return {"path": str(path), "sha256": sha256(path), "kind": ckpt["kind"], "arch": ckpt["config"]["arch"],
            "epoch": ckpt.get("epoch"), "trained_on": ckpt.get("data", {})}


def check_input(path: str | os.PathLike, ckpt: dict[str, Any], settings: dict[str, Any],
                where: str | os.PathLike, fields: tuple[str, ...] | None = None) -> None:
    """Refuse a checkpoint whose input settings differ from ``settings`` (those of ``where``).

    ``settings`` are a cache's config or another checkpoint's ``preprocess``;
    ``fields`` default to those its kind depends on (:data:`MODEL_INPUT_FIELDS`).
    """
    trained = ckpt.get("preprocess") or {}
    diff = input_mismatch(fields or MODEL_INPUT_FIELDS[ckpt["kind"]], trained, settings)
    if diff:
        raise CheckpointError(f"{path} was trained on other preprocessing than {where} ({diff}); "
                              "use a checkpoint and data made with the same settings")


__all__ = ["CHECKPOINT_FORMAT", "TRAINING_STATE", "sha256", "unwrap", "save_checkpoint", "load_checkpoint",
           "load_model", "for_inference", "describe", "check_input"]

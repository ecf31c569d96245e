"""The models that ship inside lungseg, each beside its model card.

``lungseg predict SCAN_DIR --out OUT`` uses them when no checkpoint is given,
so a fresh install works offline. This folder holds, per model, a lungseg
checkpoint stripped of its training state (``NAME.pt``, loadable with
``torch.load(..., weights_only=True)``) and its card (``NAME_card.md``: training
data and licences, protocol, the command and commit that produced it,
measured figures with intervals, intended use, known limits), and one
manifest, ``manifest.json``, with each file's SHA-256. :func:`path` checks
the hash before a model is used and refuses a file that differs.

``python benchmarks/bundle.py`` trains the three from ``../shared/data`` and
writes them here with :func:`add`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..checkpoints import for_inference, load_checkpoint, save_checkpoint, sha256
from ..errors import CheckpointError

BUNDLE_DIR = Path(__file__).resolve().parent
MANIFEST = BUNDLE_DIR / "manifest.json"
MANIFEST_FORMAT = 1
#: The bundled model predict uses for each checkpoint kind.
ROLES = {"det": "detector", "seg": "segmenter", "cls": "classifier"}


def manifest(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """The bundled models by name (empty when none are bundled)."""
    file = (folder or BUNDLE_DIR) / MANIFEST.name
    if not file.is_file():
        return {}
    data = json.loads(file.read_text())
    if data.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{file}: manifest format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
    return data["models"]


def path(name: str, folder: Path | None = None) -> Path:
    """The file of bundled model ``name``, after checking it against the manifest's SHA-256."""
    folder = folder or BUNDLE_DIR
    models = manifest(folder)
    if name not in models:
        raise CheckpointError(f"no bundled model {name!r}; bundled: {', '.join(sorted(models)) or 'none'}")
    entry = models[name]
    file = folder / entry["file"]
    if not file.is_file():
        raise CheckpointError(f"{file}: bundled model {name!r} is missing; reinstall lungseg")
    digest = sha256(file)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{file}: SHA-256 {digest[:12]}... differs from the manifest's "
                              f"{entry['sha256'][:12]}...; the file was altered, reinstall lungseg")
    return file


def default(kind: str, folder: Path | None = None) -> Path:
    """The checked file of the bundled model of checkpoint ``kind`` ("det", "seg" or "cls")."""
    return path(ROLES[kind], folder)


def card(name: str, folder: Path | None = None) -> str:
    """The model card of bundled model ``name`` (Markdown)."""
    folder = folder or BUNDLE_DIR
    models = manifest(folder)
    if name not in models:
        raise CheckpointError(f"no bundled model {name!r}; bundled: {', '.join(sorted(models)) or 'none'}")
    return (folder / models[name]["card"]).read_text()


def add(name: str, checkpoint: str | os.PathLike, card_text: str | Callable[[dict], str], *, summary: str,
        data: dict | None = None, folder: Path | None = None) -> dict[str, Any]:
    """Bundle ``checkpoint`` as model ``name``: its inference part, its card, and a manifest entry.

    ``card_text`` is the card, or a function of the manifest entry (file,
    size, SHA-256, ...) that returns it. ``data`` replaces the checkpoint's
    record of its training data (for instance with paths relative to the
    project rather than to one machine).
    """
    if name not in ROLES.values():
        raise ValueError(f"bundled model names are {sorted(ROLES.values())}, got {name!r}")
    folder = folder or BUNDLE_DIR
    ckpt = load_checkpoint(checkpoint)
    if ROLES[ckpt["kind"]] != name:
        raise CheckpointError(f"{checkpoint}: a {ckpt['kind']} checkpoint cannot be the {name}")
    file, card_file = folder / f"{name}.pt", folder / f"{name}_card.md"
    save_checkpoint(file, {**for_inference(ckpt), **({"data": data} if data is not None else {})})
    entry = {"file": file.name, "card": card_file.name, "kind": ckpt["kind"], "arch": ckpt["config"]["arch"],
             "bytes": file.stat().st_size, "sha256": sha256(file), "summary": summary}
    card_file.write_text(card_text(entry) if callable(card_text) else card_text)
    models = {**manifest(folder), name: entry}
    tmp = folder / f".{MANIFEST.name}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "models": dict(sorted(models.items()))}, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST.name)
    return entry


__all__ = ["BUNDLE_DIR", "MANIFEST", "ROLES", "manifest", "path", "default", "card", "add"]

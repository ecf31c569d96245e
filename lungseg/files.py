"""Writing a file so that a failed or interrupted write leaves nothing half written.

Every output lungseg later reads back as "done" (a checkpoint, a report, a
split, a composite's record) is written to a temporary file beside its final
name and renamed over it only when complete; on any error (a full disk, a
kill, an exception while writing) the temporary file is removed and the final
name keeps its previous content, or stays absent.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block ends without error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


__all__ = ["replacing", "write_text"]

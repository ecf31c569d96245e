"""Reading and writing beside the networks: the helper process of ``lungseg predict``.

``predict`` runs the networks in its own process and hands the input and
output work to one helper (:class:`Lane`), a process of its own that never
imports PyTorch:

- it finds the series and reads the first one (and hashes its bytes), its
  headers read once, while ``predict`` is still importing PyTorch and
  loading the models;
- it loads the writer's libraries (nibabel, matplotlib, highdicom) while the
  networks run;
- over a folder of series it reads the next series and writes the last
  report while the networks work on the current one.

The helper keeps each volume it read until the report is written, so only
the prediction travels back to it. Arrays cross between the two processes as
``.npy`` files in a folder of the lane's (the page cache makes that a copy
in memory), several times faster than through a pipe. Errors of the input (:class:`LungsegError`)
come back as the job's failure, as in the single-process loop
(:func:`lungseg.infer.report_each`); any other error is raised in ``predict``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from .dicomio import CTVolume, SeriesJob, find_inputs, input_sha256, read_job
from .errors import LungsegError
from .report import Prediction, report_of_input, write_report

def _stash(array: np.ndarray, folder: Path) -> Path:
    """Put an array where the other process takes it (:func:`_take`)."""
    path = folder / f"{uuid.uuid4().hex}.npy"
    np.save(path, array)
    return path


def _take(path: Path) -> np.ndarray:
    """The array :func:`_stash` put at ``path``; the file is removed."""
    array = np.load(path)
    os.unlink(path)
    return array


# ---------------------------------------------------------------- the helper's side (a process of its own)

#: Volumes the helper read, by job name, until their report is written.
_VOLUMES: dict[str, CTVolume] = {}


def _read(job: SeriesJob, folder: Path, exchange: Path) -> tuple:
    """Read a job for predict: ('skipped', report) when a report of the same input exists, ('failed', message),
    or ('read', input sha256, the volume without its headers or voxels, the voxels' file in ``exchange``,
    seconds)."""
    t = time.perf_counter()
    try:
        sha = input_sha256(job)
        done = report_of_input(folder, sha)
        if done is not None:
            return "skipped", done
        volume = read_job(job)
    except LungsegError as exc:
        return "failed", str(exc)
    _VOLUMES[job.name] = volume
    return ("read", sha, dataclasses.replace(volume, hu=np.zeros((0, 0, 0), volume.hu.dtype), headers=()),
            _stash(volume.hu, exchange), round(time.perf_counter() - t, 3))


def _discover(source, out: Path, exchange: Path) -> tuple:
    """Find the inputs under ``source`` and read the first: ('failed', message) or ('found', jobs, the first
    readable job's name or None, its :func:`_read` result)."""
    try:
        jobs = find_inputs(source)
    except LungsegError as exc:
        return "failed", str(exc)
    first = next((job for job in jobs if not job.problem), None)
    return "found", jobs, first and first.name, first and _read(first, out / first.name, exchange)


def _warm() -> None:
    """Import what writing a report needs, while the networks run elsewhere."""
    import matplotlib

    matplotlib.use("Agg")
    import highdicom  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import nibabel  # noqa: F401

    try:                        # highdicom reads its tables of the standard on first use (about 0.5 s)
        from highdicom._standard_utils import get_module_attribute_map
        get_module_attribute_map()
    except (ImportError, AttributeError, TypeError):
        pass


def _write(name: str, folder: Path, pred: Prediction, masks: tuple[Path, Path], checkpoints: dict, settings: dict,
           sha: str) -> tuple:
    """Write the report of a job read by :func:`_read` (``masks``: the files of its labels and lungs):
    ('done', report) or ('failed', message)."""
    volume = _VOLUMES.pop(name)
    pred = dataclasses.replace(pred, labels=_take(masks[0]), lungs=_take(masks[1]))
    try:
        return "done", write_report(folder, volume, pred, checkpoints=checkpoints, settings=settings,
                                    input_sha256=sha)
    except LungsegError as exc:
        return "failed", str(exc)


def _forget(name: str) -> None:
    _VOLUMES.pop(name, None)


def _start() -> None:
    """The helper's start: at its exit, end at once, without the interpreter's teardown.

    Its work is in closed files by then, and clearing the modules it loaded
    (matplotlib, highdicom) would keep ``predict`` waiting for most of a
    second. Registered after the exit handlers of the modules already loaded,
    this handler runs first of them.
    """
    import atexit
    import os
    import sys

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)

    atexit.register(end)


# ---------------------------------------------------------------- predict's side

class Lane:
    """One helper process that reads and writes for ``predict`` (a context manager).

    ``read`` asks for a job once (asking again gives the same future), so the
    caller can read ahead; ``write`` hands a prediction back for its report.
    The helper is started with ``spawn``: it shares nothing with a process
    that has PyTorch's threads running.
    """

    def __init__(self):
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start)
        self._reads: dict[str, Future] = {}
        self._exchange = Path(tempfile.mkdtemp(prefix="lungseg-lane-"))

    def __enter__(self) -> "Lane":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
        shutil.rmtree(self._exchange, ignore_errors=True)

    def read(self, job: SeriesJob, folder: Path) -> Future:
        """The future of ``_read``'s result, the volume's voxels in place (asked for once per job)."""
        if job.name not in self._reads:
            self._reads[job.name] = self._pool.submit(_read, job, folder, self._exchange)
        return self._reads[job.name]

    def volume(self, job: SeriesJob, folder: Path) -> tuple:
        """:meth:`read`'s result, with the volume's voxels taken from the helper."""
        got = self.read(job, folder).result()
        if got[0] != "read":
            return got
        _, sha, volume, voxels, seconds = got
        return "read", sha, dataclasses.replace(volume, hu=_take(voxels)), seconds

    def discover(self, source, out: Path) -> Future:
        """Find the inputs under ``source`` and read the first one in the helper; :meth:`jobs` takes the result."""
        return self._pool.submit(_discover, source, out, self._exchange)

    def jobs(self, found: Future) -> list[SeriesJob]:
        """The jobs :meth:`discover` found (its read of the first is kept for :meth:`volume`)."""
        try:
            got = found.result()
        except BrokenProcessPool as exc:
            raise LungsegError(f"the helper process that reads and writes for predict stopped ({exc}); a script "
                               "that calls lungseg.infer.predict must do so under if __name__ == '__main__':, "
                               "as any program that starts processes") from None
        if got[0] == "failed":
            raise LungsegError(got[1])
        _, jobs, first, read = got
        if first is not None:
            done: Future = Future()
            done.set_result(read)
            self._reads[first] = done
        return jobs

    def warm(self) -> Future:
        return self._pool.submit(_warm)

    def write(self, job: SeriesJob, folder: Path, pred: Prediction, *, checkpoints: dict, settings: dict,
              sha: str) -> Future:
        self._reads.pop(job.name, None)
        masks = _stash(pred.labels, self._exchange), _stash(pred.lungs, self._exchange)
        light = dataclasses.replace(pred, labels=np.zeros(0, pred.labels.dtype), lungs=np.zeros(0, pred.lungs.dtype))
        return self._pool.submit(_write, job.name, folder, light, masks, checkpoints, settings, sha)

    def forget(self, job: SeriesJob) -> None:
        """Drop a job's volume (its prediction failed)."""
        self._reads.pop(job.name, None)
        self._pool.submit(_forget, job.name)

"""Fuzz target of lungseg's DICOM reader (atheris): any bytes, as one slice beside valid ones, give a volume or a
one-line :class:`lungseg.errors.LungsegError`, never another exception.

    python tests/fuzz/fuzz_dicom.py -runs=2000 [CORPUS_DIR]

With no corpus folder, it starts from a valid slice it writes itself. ``tests/test_fuzz.py`` runs it briefly.
"""

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np
    import pydicom

    from lungseg import dicomio
    from lungseg.errors import LungsegError

WORK = Path(tempfile.mkdtemp(prefix="lungseg-fuzz-"))
SERIES = WORK / "series"


def _valid_slices() -> list[bytes]:
    """Three 16 x 16 slices of a small axial series, as bytes."""
    folder = WORK / "valid"
    hu = np.full((3, 16, 16), -1000, np.int16)
    hu[:, 4:12, 4:12] = 40
    files = dicomio.write_series(folder, hu, spacing=(2.5, 0.7, 0.7), origin=(0.0, 0.0, 0.0), patient_id="FUZZ",
                                 study_uid=pydicom.uid.generate_uid(), series_uid=pydicom.uid.generate_uid())
    return [f.read_bytes() for f in files]


VALID = _valid_slices()


def TestOneInput(data: bytes) -> None:
    SERIES.mkdir(exist_ok=True)
    for old in SERIES.iterdir():
        old.unlink()
    (SERIES / "a.dcm").write_bytes(VALID[0])
    (SERIES / "b.dcm").write_bytes(VALID[2])
    (SERIES / "x.dcm").write_bytes(data)
    try:
        volume = dicomio.read_series(SERIES)
    except LungsegError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    assert volume.hu.dtype == np.int16 and volume.hu.ndim == 3


def main() -> None:
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):              # no corpus: seed one with a valid slice
        corpus = WORK / "corpus"
        corpus.mkdir()
        (corpus / "slice.dcm").write_bytes(VALID[1])
        args.append(str(corpus))
    atheris.Setup(args, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()

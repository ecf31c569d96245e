"""The DICOM reader's fuzz target (tests/fuzz/fuzz_dicom.py, atheris), run briefly: no input escapes as a crash."""

import subprocess
import sys
from pathlib import Path

import pytest

atheris = pytest.importorskip("atheris")

TARGET = Path(__file__).parent / "fuzz" / "fuzz_dicom.py"


@pytest.mark.slow
def test_the_dicom_reader_survives_fuzzing(tmp_path):
    result = subprocess.run([sys.executable, "-W", "ignore", str(TARGET), "-runs=2000", "-seed=1",
                             f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    crashes = list(tmp_path.glob("crash-*"))
    assert result.returncode == 0 and not crashes, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr

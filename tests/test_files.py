"""files.py: a failed write leaves the old file as it was and no temporary file behind."""

import pytest

from lungseg import files


def test_a_complete_write_replaces_the_file(tmp_path):
    path = tmp_path / "report.json"
    files.write_text(path, "old")
    files.write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "last.pt"
    path.write_text("epoch 3")
    with pytest.raises(OSError, match="No space"):
        with files.replacing(path) as tmp:
            tmp.write_text("half of epoch 4")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "epoch 3" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with pytest.raises(KeyboardInterrupt):
        with files.replacing(tmp_path / "new.csv") as tmp:
            tmp.write_text("a,b")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

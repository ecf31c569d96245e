"""lungseg maskrcnn ...: the plugin is listed by lungseg, its commands run end to end on an LIDC twin."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("lungseg_maskrcnn")

from cli import main  # noqa: E402

COMMANDS = ["export", "luna16-list", "slices", "train-patch", "train", "train-unet", "evaluate", "predict"]
#: 95 slices of 2.5 mm (LUNA16 takes it), 4 nodules of >= 3 readers: the smallest such LIDC scan.
TWIN = "LIDC-IDRI-0171"


def test_the_plugin_is_listed_and_every_command_has_help():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "maskrcnn" in top.output
    group = runner.invoke(main, ["maskrcnn", "--help"])
    assert group.exit_code == 0
    for name in COMMANDS:
        assert name in group.output
        result = runner.invoke(main, ["maskrcnn", name, "--help"])
        assert result.exit_code == 0, (name, result.output)


def test_without_the_plugin_lungseg_works_the_same(monkeypatch):
    import cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "maskrcnn" not in result.output and "predict" in result.output


def test_a_missing_dependency_is_one_line(monkeypatch, tmp_path, tiny_slices):
    import builtins

    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    result = CliRunner().invoke(main, ["maskrcnn", "train", "--train", str(tiny_slices), "--out", str(tmp_path / "r"),
                                       "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: lungseg maskrcnn needs torchvision")


def test_bad_input_is_one_line(tmp_path):
    runner = CliRunner()
    (tmp_path / "x.h5").write_text("not hdf5")
    result = runner.invoke(main, ["maskrcnn", "train", "--train", str(tmp_path / "x.h5"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error:") and "x.h5" in result.output
    result = runner.invoke(main, ["maskrcnn", "train", "--train", str(tmp_path / "x.h5"), "--out", str(tmp_path / "r"),
                                  "--crop", "100"])
    assert result.exit_code == 1 and "multiple of 32" in result.output
    result = runner.invoke(main, ["maskrcnn", "slices", str(tmp_path), "--out", str(tmp_path / "s.h5")])
    assert result.exit_code == 1 and "annotations.csv" in result.output


@pytest.mark.slow
def test_end_to_end_on_a_twin(tmp_path):
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    ok("synth", "--out", tmp_path / "twin", "--patient", TWIN, "--seed", "1")
    ok("maskrcnn", "export", tmp_path / "twin" / TWIN, "--out", tmp_path / "luna")
    assert len((tmp_path / "luna" / "annotations.csv").read_text().splitlines()) == 1 + 4
    out = ok("maskrcnn", "slices", tmp_path / "luna", "--out", tmp_path / "s.h5")
    assert "1 scans" in out
    s = tmp_path / "s.h5"
    ok("maskrcnn", "train-patch", "--train", s, "--val", s, "--arch", "resnet20", "--epochs", 1, "--max-train", 64,
       "--max-eval", 64, "--out", tmp_path / "p", "--device", "cpu")
    ok("maskrcnn", "train", "--train", s, "--preset", "cpu", "--iterations", 2, "--crop", 64, "--out", tmp_path / "m",
       "--device", "cpu")
    ok("maskrcnn", "train-unet", "--train", s, "--preset", "cpu", "--iterations", 2, "--width", 4, "--crop", 64,
       "--out", tmp_path / "u", "--device", "cpu")
    for run, kind in (("p", "patch"), ("m", "mask"), ("u", "unet")):
        ok("maskrcnn", "evaluate", "--slices", s, "--model", tmp_path / run / "model.pt", "--out", tmp_path / f"e{run}",
           "--resamples", 5, "--max-eval", 64, "--device", "cpu")
        result = json.loads((tmp_path / f"e{run}" / "results.json").read_text())
        assert result["kind"] == kind
        assert ("accuracy" in result) if kind == "patch" else ("all" in result["dice"])
    assert {"box_ap50", "mask_ap", "mask_ap50", "box_ap"} <= set(json.loads((tmp_path / "em" / "results.json").read_text()))
    assert (tmp_path / "em" / "slices.png").exists()
    out = ok("maskrcnn", "predict", tmp_path / "twin" / TWIN, "--model", tmp_path / "m" / "model.pt",
             "--out", tmp_path / "pred", "--threshold", 0.9, "--device", "cpu")
    reports = list((tmp_path / "pred").glob("*/nodules.json"))
    assert len(reports) == 1 and "finding(s)" in out
    report = json.loads(reports[0].read_text())
    assert report["settings"]["pipeline"].startswith("paper B") and report["patient_id"] == TWIN

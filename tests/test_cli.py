"""cli.py: fast help for every command, plugins (good and broken), one-line errors."""

import subprocess
from pathlib import Path
import sys
from importlib.metadata import EntryPoint

import pytest
from click.testing import CliRunner

import cli
from cli import main
from conftest import requires_bundle

COMMANDS = ["synth", "composite", "preprocess", "info", "import-crops", "folds", "manifest", "train-seg", "train-cls",
            "train-det", "evaluate", "predict", "demo", "models"]


def test_the_command_list_is_complete():
    assert sorted(main.commands) == sorted(COMMANDS)


def test_every_command_has_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "Usage: main " + name in sub.output or f"{name} [OPTIONS]" in sub.output


def test_help_defers_heavy_imports():
    code = ("import sys; from click.testing import CliRunner; import cli; "
            "r = CliRunner().invoke(cli.main, ['preprocess', '--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('numpy', 'torch', 'h5py', 'scipy', 'pydicom') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def plugins(monkeypatch, tmp_path):
    (tmp_path / "good_plugin.py").write_text(
        "import click\n@click.command()\ndef hello():\n    'Say hello.'\n    click.echo('hello from plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        EntryPoint("hello", "good_plugin:hello", cli.PLUGIN_GROUP),
        EntryPoint("broken", "no_such_module_xyz:cmd", cli.PLUGIN_GROUP),
        EntryPoint("notacommand", "os:getcwd", cli.PLUGIN_GROUP),
    ]
    monkeypatch.setattr(cli, "entry_points", lambda group: eps if group == cli.PLUGIN_GROUP else [])


def test_plugins_appear_and_a_broken_one_does_not_break_the_cli(plugins):
    runner = CliRunner()
    listing = runner.invoke(main, ["--help"])
    assert listing.exit_code == 0
    assert "hello" in listing.output and "broken" in listing.output
    assert runner.invoke(main, ["hello"]).output.strip() == "hello from plugin"
    broken = runner.invoke(main, ["broken"])
    assert broken.exit_code == 1
    assert "plugin 'broken' failed to load" in broken.output and "no_such_module_xyz" in broken.output
    assert runner.invoke(main, ["notacommand"]).exit_code == 1
    assert runner.invoke(main, ["info", "--help"]).exit_code == 0


def test_bad_input_gives_one_line_errors(tmp_path):
    runner = CliRunner()
    not_h5 = tmp_path / "c.h5"
    not_h5.write_text("not hdf5")
    result = runner.invoke(main, ["info", str(not_h5)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "not a readable HDF5 cache" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(main, ["preprocess", "--lidc-root", str(empty), "--out", str(tmp_path / "x.h5")])
    assert result.exit_code == 1 and "no LIDC-IDRI-XXXX patient folders" in result.output
    result = runner.invoke(main, ["preprocess", "--lidc-root", str(empty), "--out", str(tmp_path / "x.h5"),
                                  "--scans", "LIDC-IDRI-9999"])
    assert result.exit_code == 1 and "LIDC-IDRI-9999" in result.output
    result = runner.invoke(main, ["preprocess", "--lidc-root", str(tmp_path / "nope"), "--out", "x.h5"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(main, ["preprocess", "--lidc-root", str(empty), "--out", "x.h5", "--spacing", "0", "1", "1"])
    assert result.exit_code == 2 and "spacing must be positive" in result.output


def test_bad_fractions_are_refused_before_anything_is_written(tmp_path):
    result = CliRunner().invoke(main, ["manifest", "--out", str(tmp_path / "m"), "--fractions", "0.5", "0.5", "0.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--fractions" in result.output and "summing to 1" in result.output
    assert not (tmp_path / "m").exists()


def test_bad_widths_are_a_one_line_error(tiny_trained, tmp_path):
    args = ["train-seg", "--cache", str(tiny_trained["cache"]), "--split-file", str(tiny_trained["split"]),
            "--out", str(tmp_path / "run")]
    for widths, message in (("8", "at least 2 entries"), ("8,0,4", "widths must be positive"),
                            ("8,x", "comma-separated integers")):
        result = CliRunner().invoke(main, [*args, "--widths", widths])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "run").exists()


def test_training_defaults_come_from_the_configs():
    from lungseg.configs import ClsConfig, SegConfig
    from lungseg.splits import DEFAULT_SPLIT_FILE

    runner = CliRunner()
    seg = runner.invoke(main, ["train-seg", "--help"]).output
    assert f"paper A's {SegConfig.epochs}" in seg and DEFAULT_SPLIT_FILE.name in seg
    assert "resunet3d|unet3d" in seg.replace("\n", "").replace(" ", "")
    cls = runner.invoke(main, ["train-cls", "--help"]).output
    assert f"paper A's {ClsConfig.epochs}" in cls and "resnet3d50_plain" in cls


def test_a_preset_sets_what_the_command_line_leaves_unset():
    from lungseg.configs import PRESETS, DetConfig, SegConfig

    unset = {"preset": "context", "compile_": False, "lr_milestones": None, "max_batches": None, "epochs": None}
    cfg = cli._train_config(SegConfig, unset)
    assert cfg.epochs == PRESETS["seg"]["context"]["epochs"] and cfg.patches == "candidate"
    assert cli._train_config(SegConfig, {**unset, "epochs": 3}).epochs == 3
    det = {**unset, "preset": "paper"}
    assert cli._train_config(DetConfig, det).max_batches == DetConfig.max_batches > 0
    assert cli._train_config(DetConfig, {**det, "max_batches": 0}).max_batches == 0


@requires_bundle
def test_models_lists_the_bundled_models_and_prints_a_card():
    from lungseg import models

    runner = CliRunner()
    listed = runner.invoke(main, ["models"])
    assert listed.exit_code == 0, listed.output
    for name, entry in models.manifest().items():
        assert name in listed.output and entry["sha256"][:12] in listed.output
    card = runner.invoke(main, ["models", "detector"])
    assert card.exit_code == 0 and card.output.startswith("# lungseg detector")
    bad = runner.invoke(main, ["models", "nope"])
    assert bad.exit_code == 1 and "no bundled model 'nope'" in bad.output and "Traceback" not in bad.output


@requires_bundle
@pytest.mark.slow
def test_predict_without_checkpoints_uses_the_bundled_models(tiny_lidc, tmp_path):
    import json

    from lungseg import models

    root, _ = tiny_lidc
    result = CliRunner().invoke(main, ["predict", str(root / "LIDC-IDRI-9001"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    report = json.loads(next((tmp_path / "p").glob("*/nodules.json")).read_text())
    bundled = models.manifest()
    assert {k: v["sha256"] for k, v in report["checkpoints"].items()} == {
        k: bundled[models.ROLES[k]]["sha256"] for k in ("det", "seg", "cls")}
    folder = next((tmp_path / "p").glob("*/"))
    assert (folder / "report.html").exists() and (folder / "overview.png").exists()


def test_models_says_so_in_one_line_when_none_are_bundled(monkeypatch, tmp_path):
    from lungseg import models

    monkeypatch.setattr(models, "BUNDLE_DIR", tmp_path)
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 1 and "no models are bundled" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["predict", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_file_system_errors_are_one_line(tmp_path):
    """--out below a file, and the messages for a full disk or a read-only place."""
    import errno

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["synth", "--out", str(blocker / "twins"), "--patient", "LIDC-IDRI-0001"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)       # not an uncaught error
    assert "a file stands where a folder is needed" in result.output and str(blocker) in result.output
    full = cli.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/x/last.pt"))
    assert full.startswith("/x/last.pt: No space left on device; free some space")
    assert "writable --out" in cli.os_error_message(OSError(errno.EROFS, "Read-only file system", "/ro"))


def test_a_failed_decode_is_one_line_without_pydicom_tracebacks(tmp_path, tiny_trained):
    from pydicom.uid import JPEG2000Lossless
    from test_dicomio import write_series

    written = write_series(tmp_path / "in", transfer_syntax=JPEG2000Lossless)
    out = subprocess.run([sys.executable, "cli.py", "predict", str(written.folder), "--out", str(tmp_path / "o"),
                          "--seg", str(tiny_trained["seg"]), "--cls", str(tiny_trained["cls"])],
                         capture_output=True, text=True, cwd=Path(cli.__file__).parent)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot decode pixel data compressed as 'JPEG 2000" in out.stderr and "1 series failed" in out.stderr


def test_a_full_disk_behind_a_librarys_own_error_is_one_line():
    import errno

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device") from inner
    except OSError as outer:
        found = cli._fixable_os_error(outer)
    assert found is not None and found.errno == errno.ENOSPC
    assert cli._fixable_os_error(OSError("a bug, not the disk")) is None


def test_the_console_command_keeps_exit_codes_output_and_exit_handlers(tmp_path):
    """``cli.run`` ends without the interpreter's teardown: codes, piped output and atexit work must survive."""
    here = Path(cli.__file__).parent
    ok = subprocess.run([sys.executable, "cli.py", "--version"], capture_output=True, text=True, cwd=here)
    assert ok.returncode == 0 and "lungseg" in ok.stdout
    bad = subprocess.run([sys.executable, "cli.py", "predict", str(tmp_path / "missing"), "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=here)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    marker = tmp_path / "atexit-ran"
    code = (f"import atexit, sys, cli; atexit.register(lambda: open({str(marker)!r}, 'w').close()); "
            "sys.argv = ['lungseg', 'models']; print('x' * 100000, end=''); cli.run()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=here)
    assert out.returncode == 0 and out.stdout.startswith("x" * 100000) and "sha256" in out.stdout
    assert marker.exists()

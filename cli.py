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

import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click

from lungseg import __version__
from lungseg.errors import LungsegError

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


@click.group(cls=LungsegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lungseg")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Lung-nodule CAD for chest CT: preprocess LIDC-IDRI, train, evaluate, predict."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def shared_data_dir() -> Path:
    """Folder of the real LIDC-IDRI data (``$LUNGSEG_SHARED_DATA``, default ``../shared/data``)."""
    return Path(os.environ.get("LUNGSEG_SHARED_DATA", Path(__file__).resolve().parent.parent / "shared" / "data"))


# --------------------------------------------------------------------------
# preprocess, info, manifest
# --------------------------------------------------------------------------

def _triple(kind):
    return click.Tuple([kind, kind, kind])


@main.command()
@click.option("--lidc-root", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="LIDC-IDRI folder holding LIDC-IDRI-XXXX patient folders.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="HDF5 cache to write (a rerun adds the missing scans).")
@click.option("--scans", multiple=True, metavar="ID",
              help="Patient id (LIDC-IDRI-0001) or series UID; repeat. Default: all found under --lidc-root.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Scans processed in parallel.")
@click.option("--spacing", type=_triple(float), default=(3.0, 1.5, 1.5), show_default=True,
              help="Resampled voxel size z y x, mm.")
@click.option("--window", type=(float, float), default=(-1000.0, 400.0), show_default=True,
              help="HU window mapped to 0..1.")
@click.option("--subcase-shape", type=_triple(int), default=(48, 192, 192), show_default=True)
@click.option("--roi-shape", type=_triple(int), default=(16, 48, 48), show_default=True)
@click.option("--min-readers", type=click.IntRange(1, 4), default=3, show_default=True,
              help="Readers who must mark a nodule for it to count.")
@click.option("--mask-readers", type=click.IntRange(1, 4), default=3, show_default=True,
              help="Readers who must include a voxel for the nodule mask.")
def preprocess(lidc_root, out, scans, workers, spacing, window, subcase_shape, roi_shape,
               min_readers, mask_readers):
    """Resample LIDC-IDRI scans, mask lungs and nodules, cut sub-cases and ROIs into an HDF5 cache."""
    from lungseg import cache, lidc
    from lungseg.preprocess import PreprocessConfig, preprocess_dataset, select_scans

    try:
        cfg = PreprocessConfig(spacing=spacing, window=window, subcase_shape=subcase_shape,
                               roi_shape=roi_shape, min_readers=min_readers, mask_readers=mask_readers)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    db = lidc.LidcDatabase()
    jobs = select_scans(lidc_root, db, scans)
    failed = []
    counts = {"done": 0, "skipped": 0, "failed": 0}
    with click.progressbar(length=len(jobs), label=f"preprocess {len(jobs)} scans", file=sys.stderr,
                           item_show_func=lambda r: r and f"{r.record.patient_id} {r.status}") as bar:
        for result in preprocess_dataset(jobs, out, db, cfg, workers=workers):
            counts[result.status] += 1
            if result.status == "failed":
                failed.append(result)
            bar.update(1, result)
    click.echo(f"{counts['done']} scans written, {counts['skipped']} already cached, {counts['failed']} failed")
    for r in failed:
        click.echo(f"failed: {r.record.patient_id}: {r.message}", err=True)
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


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data_manifests"),
              show_default=True, help="Folder for the CSV files.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--fractions", type=(float, float, float), default=(0.85, 0.05, 0.10), show_default=True,
              help="Train, validation, test shares of the included patients.")
def manifest(out, seed, fractions):
    """Write the LIDC-IDRI scan list (inclusion and reason) and a seeded patient-level split."""
    from lungseg import lidc

    out.mkdir(parents=True, exist_ok=True)
    with lidc.LidcDatabase() as db:
        rows = lidc.scan_manifest(db)
    scans_csv = out / "lidc_scans.csv"
    lidc.write_csv(scans_csv, rows)
    patients = sorted({r["patient_id"] for r in rows if r["included"]})
    split = lidc.patient_split(patients, seed=seed, fractions=fractions)
    split_csv = out / f"lidc_split_seed{seed}.csv"
    lidc.write_csv(split_csv, [{"patient_id": p, "split": s} for p, s in split.items()])
    n_in = sum(r["included"] for r in rows)
    sizes = {s: list(split.values()).count(s) for s in ("train", "val", "test")}
    click.echo(f"{scans_csv}: {len(rows)} scans, {n_in} included")
    click.echo(f"{split_csv}: patients " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


# --------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------

@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Folder for everything the demo writes.")
@click.option("--lidc-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="LIDC folder to run on. Default: the real scan in $LUNGSEG_SHARED_DATA/lidc.")
@click.pass_context
def demo(ctx, out, lidc_root):
    """Run the pipeline end to end on the default data and say where everything went."""
    root = lidc_root or shared_data_dir() / "lidc"
    if not root.is_dir():
        raise click.ClickException(
            f"{root}: no LIDC data; pass --lidc-root or set LUNGSEG_SHARED_DATA")
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "cache.h5"
    click.echo(f"== preprocess {root} -> {cache_path}")
    ctx.invoke(preprocess, lidc_root=root, out=cache_path, scans=(), workers=1,
               spacing=(3.0, 1.5, 1.5), window=(-1000.0, 400.0), subcase_shape=(48, 192, 192),
               roi_shape=(16, 48, 48), min_readers=3, mask_readers=3)
    click.echo(f"== info {cache_path}")
    ctx.invoke(info, cache_file=cache_path, as_json=False)
    click.echo(f"demo finished: cache {cache_path} (+ {cache_path.name}.scans/)")


if __name__ == "__main__":
    main()

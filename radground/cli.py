"""The ``radground`` command line: a thin layer over the same functions the flows call.

Library code raises typed errors (radground.errors); only this module turns them
into one-line messages and exit codes. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from radground import __version__
from radground.errors import RadgroundError
from radground.runtime import progress_hook
from radground.settings import Settings, load_settings

EXIT_ERROR = 2
console = Console(stderr=True)
out = Console()

app = typer.Typer(
    name="radground",
    help="Turn hospital DICOM + report drops into versioned, spatially grounded VLM datasets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal instead of keeping source line breaks
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")
datasets_app = typer.Typer(help="Dataset versions: list, show, pull.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
lineage_app = typer.Typer(help="Audit lineage: what is behind a version, where a patient is used.",
                          no_args_is_help=True)
app.add_typer(lineage_app, name="lineage")


@dataclass
class _State:
    config_file: Path | None = None
    debug: bool = False
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        # Loaded on first use, so `--help` and `version` work even with broken settings.
        if self._settings is None:
            self._settings = load_settings(self.config_file)
        return self._settings


state = _State()


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", envvar="RADGROUND_CONFIG", dir_okay=False,
            help="YAML settings file. Environment variables (RADGROUND_*) override it.",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """radground: spatially grounded radiology datasets without manual annotation."""
    state.config_file = config
    state.debug = debug
    level = logging.DEBUG if debug else logging.WARNING
    terminal = logging.StreamHandler()
    # At the handler too: libraries that set their loggers to INFO (Prefect's run logger, DVC)
    # propagate those records past the root logger's level.
    terminal.setLevel(level)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[terminal])


@app.command()
def version() -> None:
    """Print the radground version and the versions of the libraries it runs on."""
    table = Table(show_header=False, box=None)
    table.add_row("radground", __version__)
    table.add_row("python", platform.python_version())
    for dist in ("pydicom", "prefect", "ray", "torch", "transformers", "mlflow", "dvc", "minio"):
        try:
            table.add_row(dist, metadata.version(dist))
        except metadata.PackageNotFoundError:
            table.add_row(dist, "not installed")
    out.print(table)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the drop into.")],
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, max=10_000,
                                          help="Number of patients.")] = 20,
    seed: Annotated[int, typer.Option("--seed", "-s", min=0, help="Random seed; same seed, same bytes.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is not empty.")] = False,
) -> None:
    """Generate a synthetic hospital drop (DICOM + reports.csv) with planted PHI and bad inputs.

    The ground truth (planted PHI, organ boxes per slice, bad files) goes to
    OUT.truth.json beside the drop, never inside it.
    """
    from radground.synth.drop import generate_drop  # heavy imports only when needed

    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), TextColumn("patients"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("patients", total=patients)
        result = generate_drop(out_dir, patients=patients, seed=seed, overwrite=force,
                               on_patient=lambda done: progress.update(task, completed=done))
    summary = Table(title=f"synthetic drop (seed {seed})", show_header=False)
    summary.add_row("drop", str(result.drop_dir))
    summary.add_row("truth sidecar", str(result.truth_path))
    summary.add_row("patients / studies / series", f"{result.patients} / {result.studies} / {result.series}")
    summary.add_row("DICOM files", str(result.dicom_files))
    summary.add_row("bad inputs planted", str(result.bad_files))
    summary.add_row("reports", str(result.reports))
    summary.add_row("size", f"{result.total_bytes / 1e6:.1f} MB")
    summary.add_row("time", f"{result.seconds:.1f} s")
    out.print(summary)


@app.command()
def rebuild(
    drops: Annotated[list[str] | None, typer.Argument(
        metavar="[DROP]...", help="Drop folders, or store:PREFIX for a drop inside the object store. None: bring "
        "the latest version up to date with the current settings and code.")] = None,
    overlays: Annotated[int | None, typer.Option(
        "--overlays", min=0, help="Write PNG overlays of this many grounded slices per drop "
        "(<data_dir>/overlays/<drop_id>/).")] = None,
) -> None:
    """Rebuild the dataset with new or changed drops: ingest, curate, segment, ground, check, version.

    Incremental: a stage runs for a drop only when its inputs, its settings or the code
    changed; the new version holds the latest version's drops plus these (minus forgotten
    patients). With nothing changed it starts nothing and reports the current version.
    Runs the Prefect flow rebuild_dataset on Ray: embedded by default (a Prefect API on
    127.0.0.1 and a local Ray with ray.num_cpus CPUs), or on prefect.api_url / ray.address.
    """
    from radground.runtime import libraries_off_the_terminal

    settings = state.settings
    if overlays is not None:
        settings = settings.model_copy(update={
            "grounding": settings.grounding.model_copy(update={"overlays": overlays})})
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("series"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        bar = progress.add_task("starting Prefect + Ray", total=None)

        def follow(stage: str, done: int, total: int) -> None:
            progress.update(bar, description=stage, completed=done, total=total)

        # Prefect's, Ray's, DVC's and MLflow's own lines go to data_dir/logs, not this terminal.
        with progress_hook(follow), libraries_off_the_terminal(settings) as library_log:
            # Imported here: Prefect creates its home on import, which must be data_dir's by then.
            from flows.rebuild import run_rebuild

            summaries = run_rebuild(drops or [], settings)
    from tasks.curate.stage import summary_line as curate_line
    from tasks.ground_stage import summary_line as ground_line
    from tasks.segment.stage import summary_line as segment_line

    for result in summaries:
        out.print(result.ingest.line())
        out.print(curate_line(result.curate))
        out.print(segment_line(result.segment))
        out.print(ground_line(result.ground))
    from tasks.version_stage import summary_line as version_line

    if summaries and summaries[0].version:
        out.print(version_line(summaries[0].version))
    store = settings.store_root.resolve() if settings.storage.backend == "local" else settings.storage.bucket
    out.print(f"stage outputs: {store} (prefixes ingest/, curate/, segment/, ground/ + <drop_id>/)")
    out.print(f"library logs (Prefect, Ray, DVC, MLflow): {library_log}")


@app.command()
def keywords(
    text: Annotated[str, typer.Argument(help="A sentence (or several) to analyse.")],
    lang: Annotated[str, typer.Option("--lang", "-l", help="Language of TEXT: de or en.")] = "de",
    backend: Annotated[str | None, typer.Option(
        "--backend", "-b", help="lexicon or openai; default: the llm.backend setting.")] = None,
) -> None:
    """Print one JSON object per anatomical keyword found in TEXT (keyword, class, start, end, negated).

    Offsets are character offsets into TEXT. Try: radground keywords "Lunge beidseits frei, LWK 5 o.B."
    """
    from radground.errors import ConfigError
    from tasks.curate.base import ExtractionFailure
    from tasks.curate.sentences import split_sentences
    from tasks.curate.stage import keyword_backend

    if lang not in ("de", "en"):
        raise ConfigError(f"--lang {lang!r}: expected de or en.")
    if backend not in (None, "lexicon", "openai"):
        raise ConfigError(f"--backend {backend!r}: expected lexicon or openai.")
    settings = state.settings
    if backend is not None:
        settings = settings.model_copy(update={"llm": settings.llm.model_copy(update={"backend": backend})})
    extractor = keyword_backend(settings)
    spans = split_sentences(text, lang) or []
    for span, result in zip(spans, extractor.extract([s.text for s in spans], lang), strict=True):
        if isinstance(result, ExtractionFailure):
            raise ConfigError(f"keywords could not be extracted ({result.reason}): {result.detail}")
        for kw in result:
            print(json.dumps({"keyword": kw.keyword, "class": kw.class_name, "class_id": kw.class_id,
                              "start": span.start + kw.start, "end": span.start + kw.end,
                              "negated": kw.negated}, ensure_ascii=False))


@app.command()
def show(
    image_id: Annotated[str, typer.Argument(help="A slice's image_id (de-identified SOP Instance UID).")],
    out_file: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write; default "
                                                  "<data_dir>/overlays/show/IMAGE_ID.png.")] = None,
    language: Annotated[str, typer.Option("--lang", "-l", help="Keyword language to label: de or en.")] = "de",
) -> None:
    """Render one slice with its masks, grounded boxes and keywords as a PNG, to check the pipeline by eye."""
    from radground.errors import ConfigError
    from tasks.ground_stage import render_image

    if language not in ("de", "en"):
        raise ConfigError(f"--lang {language!r}: expected de or en.")
    settings = state.settings
    target = out_file or settings.data_dir / "overlays" / "show" / f"{image_id}.png"
    path = render_image(image_id, target, language, settings)
    out.print(f"overlay written to [bold]{path}[/]")


@app.command()
def demo(
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, help="Patients in the demo drop.")] = 6,
    seed: Annotated[int, typer.Option("--seed", "-s", min=0, help="Random seed of the demo drop.")] = 0,
) -> None:
    """Run the main job on the embedded default: every stage that exists, on a synthetic drop.

    Writes under data_dir (default ./.radground). Stages: synth, then rebuild: ingest, curate,
    segment (classical), ground (with 4 overlay PNGs to look at), quality + version (DVC,
    MLflow). Run it again and the rebuild finds nothing changed: same version, no work. What
    the libraries log goes to data_dir/logs/libraries.log, not to the terminal.
    """
    data_dir = state.settings.data_dir.resolve()
    drop_dir = data_dir / "drops" / "demo"
    synth(drop_dir, patients=patients, seed=seed, force=True)
    out.print(f"demo drop written to [bold]{drop_dir}[/] (ground truth: {drop_dir}.truth.json)")
    rebuild([str(drop_dir)], overlays=4)


def _version_dir(version: str) -> Path:
    from radground.errors import ConfigError
    from tasks.version_stage import versions_root

    root = versions_root(state.settings)
    matches = sorted(p for p in root.glob(f"{version[:16]}*") if p.is_dir()) if root.is_dir() else []
    if len(matches) != 1:
        raise ConfigError(f"version {version!r}: {'no' if not matches else 'more than one'} version folder in "
                          f"{root} matches. Run `radground datasets list` for the digests.")
    return matches[0]


@datasets_app.command("list")
def datasets_list() -> None:
    """List the dataset versions under data_dir, newest first, with their row counts."""
    from tasks.version import read_manifest
    from tasks.version_stage import latest_version_dir, versions_root

    root = versions_root(state.settings)
    table = Table("version", "parent", "drops", "rows", "created")
    latest_dir = latest_version_dir(state.settings)
    latest = latest_dir.name if latest_dir else None
    folders = [p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()] if root.is_dir() else []
    for folder in sorted(folders, key=lambda p: read_manifest(p).created_at, reverse=True):
        m = read_manifest(folder)
        rows = ", ".join(f"{n} {t.rows}" for n, t in m.tables.items())
        table.add_row(folder.name + (" (latest)" if folder.name == latest else ""),
                      (m.parent_digest or "-")[:16], str(len(m.drops)), rows, m.created_at[:19])
    out.print(table)


@datasets_app.command("show")
def datasets_show(version: Annotated[str, typer.Argument(help="A version digest (16+ characters).")]) -> None:
    """Print a version's manifest as JSON."""
    out.print_json((_version_dir(version) / "manifest.json").read_text(encoding="utf-8"))


@datasets_app.command("pull")
def datasets_pull(version: Annotated[str, typer.Argument(help="A version digest (16+ characters).")]) -> None:
    """Fetch a version's files from the DVC remote into data_dir/versions."""
    from radground.dvc import DvcRepo
    from tasks.version_stage import versions_root

    folder = DvcRepo(versions_root(state.settings), state.settings).pull(version[:16])
    out.print(f"version pulled into [bold]{folder}[/]")


def _lineage():
    from radground.lineage import lineage_index

    return lineage_index(state.settings.data_dir.resolve() / "lineage", settings=state.settings)


@app.command()
def forget(
    patient: Annotated[str, typer.Option("--patient", help="A patient pseudonym (P + 20 hex), or the hospital's "
                                         "patient ID (hashed with the key; never printed).")],
) -> None:
    """Forget a patient: a new version without their rows, and every later rebuild leaves them out.

    Prints JSON naming the patient by pseudonym only: the new version, the rows removed per
    table, and the earlier versions (and MLflow runs that used them) that still hold the
    patient, which you delete or supersede.
    """
    from radground.lineage import pseudonym_for
    from tasks.version_stage import forget as forget_patient

    result = forget_patient(state.settings, pseudonym_for(state.settings, patient))
    version = result["version"]
    result["version"] = version and {k: version[k] for k in ("digest", "parent_digest", "version_dir", "rows",
                                                             "mlflow_run")}
    out.print_json(json.dumps(result, default=str))


@lineage_app.command("trace")
def lineage_trace(version: Annotated[str, typer.Argument(help="A version digest.")]) -> None:
    """The drops and raw file hashes behind a version (JSON)."""
    from tasks.version import read_manifest

    digest = read_manifest(_version_dir(version)).digest
    out.print_json(json.dumps(_lineage().trace(digest), default=str))


@lineage_app.command("where-used")
def lineage_where_used(
    patient: Annotated[str, typer.Option("--patient", help="A patient pseudonym (P + 20 hex), or the hospital's "
                                         "patient ID (hashed with the key; never printed).")],
) -> None:
    """Every version (and MLflow run) that contains a patient — named by pseudonym only."""
    from radground.lineage import pseudonym_for

    out.print_json(json.dumps(_lineage().where_used(pseudonym_for(state.settings, patient)), default=str))


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings as JSON (secrets masked)."""
    out.print_json(json.dumps(state.settings.public_dict(), default=str))


def main() -> None:
    """Console entry point: one line per error, non-zero exit, traceback with --debug.

    Only radground's own messages are printed: a library's error text can quote the input
    (patient data), so it is shown with --debug alone, on this terminal, and stored nowhere.
    """
    try:
        app()
    except RadgroundError as exc:
        if state.debug:
            original = getattr(exc, "original", None)
            if original is not None:
                console.print("[bold]the withheld library error (--debug, this terminal only):[/]")
                console.print("".join(traceback.format_exception(original)), highlight=False, markup=False)
            raise
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:  # noqa: BLE001 - the last boundary before the terminal
        if state.debug:
            raise
        console.print(f"[bold red]error:[/] radground failed with {type(exc).__name__} (its text is withheld: "
                      "library errors can quote patient data). Re-run with --debug to see it on this terminal.",
                      highlight=False, soft_wrap=True)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()

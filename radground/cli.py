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
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from typer.core import TyperGroup

from radground import __version__
from radground.errors import RadgroundError
from radground.layout import FOLDER_DIGEST_LENGTH, MIN_DIGEST_PREFIX
from radground.runtime import progress_hook
from radground.settings import Settings, data_dir_origin, load_settings, unknown_env_warnings

EXIT_ERROR = 2
# soft_wrap: a line is never broken at the terminal's width (80 columns when piped), so a path,
# a digest or a command in it can be copied whole; the terminal wraps it for display instead.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

_CONFIG_OPTIONS = ("--config", "-c")


def _is_config(arg: str) -> bool:
    """--config / -c with its value apart (False for those: the value follows), or joined to it."""
    return arg.startswith("--config=") or (arg.startswith("-c") and not arg.startswith("--") and arg != "-c")


def config_option_first(args: list[str]) -> list[str]:
    """``args`` with a ``--config FILE`` given after the command moved in front of it.

    Click parses a group's options only before the subcommand; users type ``--config`` where
    they think of it, so both ``radground --config x.yaml datasets list`` and ``radground
    datasets list --config x.yaml`` mean the same. No subcommand has a --config or -c of its own.
    """
    start, given = 0, 0
    while start < len(args) and args[start].startswith("-"):  # the group's own options
        if args[start] in _CONFIG_OPTIONS or _is_config(args[start]):
            given += 1
        start += 2 if args[start] in _CONFIG_OPTIONS else 1
    moved, after = [], []
    rest = iter(args[start + 1:])
    for arg in rest:
        if arg == "--":  # what follows is positional, whatever it looks like
            after += [arg, *rest]
        elif arg in _CONFIG_OPTIONS:
            value = next(rest, None)
            if value is None:
                raise typer.BadParameter("needs a YAML settings file after it.", param_hint=f"'{arg}'")
            moved += [arg, value]
            given += 1
        elif arg.startswith("--config="):
            moved.append(arg)
            given += 1
        else:
            after.append(arg)
    if given > 1:
        raise typer.BadParameter("given more than once; give one YAML settings file, before or after the command.",
                                 param_hint="'--config'")
    return moved + args[:start + 1] + after


class _ConfigAnywhereGroup(TyperGroup):
    """The top-level group: accepts --config after the subcommand too (see config_option_first)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, config_option_first(args))


# Plain (click-style) help, not typer's rich panels: typer 0.29's rich help prints "<bool>" after
# every flag (--force, --json, --help), as if it took a value, and plain help does not.
app = typer.Typer(
    name="radground",
    help="Turn hospital DICOM + report drops into versioned, spatially grounded VLM datasets.",
    cls=_ConfigAnywhereGroup,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    # Up to 120 columns on a wide terminal: the command list shows whole first sentences there.
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
)
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
datasets_app = typer.Typer(help="Dataset versions: list, show, pull.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(datasets_app, name="datasets")
lineage_app = typer.Typer(help="Audit lineage: what is behind a version, where a patient is used.",
                          no_args_is_help=True, rich_markup_mode=None)
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
            for warning in unknown_env_warnings():  # a typo'd variable is otherwise ignored without a word
                console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        return self._settings


state = _State()


def _data_dir_line() -> str:
    settings = state.settings
    return f"data_dir: {settings.data_dir.resolve()} ({data_dir_origin(state.config_file)})"


def note_data_dir() -> None:
    """Say on stderr which data_dir a reading command uses, and why that one: run from another
    folder, the default ./.radground is another (often empty) data_dir."""
    console.print(_data_dir_line(), highlight=False, soft_wrap=True, markup=False)


def nothing_here(what: str = "no dataset versions") -> str:
    """The hint for a data_dir that holds nothing: how to point at the right one."""
    settings = state.settings
    return (f"data_dir {settings.data_dir.resolve()} ({data_dir_origin(state.config_file)}) holds {what}. If your "
            "data is elsewhere, point at its data_dir with "
            "RADGROUND_DATA_DIR=/path/to/data_dir, or with --config FILE (a YAML file with data_dir: in it; "
            "before or after the command). To build a dataset here: radground rebuild DROP.")


@app.callback()
def main_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", envvar="RADGROUND_CONFIG", dir_okay=False, metavar="FILE",
            help="YAML settings file; may also follow the command (radground datasets list --config FILE). "
            "Environment variables (RADGROUND_*) override it.",
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
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, max=10_000, metavar="N",
                                          help="Number of patients.")] = 20,
    seed: Annotated[int, typer.Option("--seed", "-s", min=0, metavar="SEED",
                                      help="Random seed; same seed, same bytes.")] = 0,
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
        metavar="DROP", help="Drop folders, or store:PREFIX for a drop inside the object store. PREFIX is "
        "relative to storage.prefix: with storage.prefix 'site-a/', store:drops/0412 reads "
        "s3://<bucket>/site-a/drops/0412/ (local backend: <data_dir>/store/drops/0412/). None: bring "
        "the latest version up to date with the current settings and code.")] = None,
    overlays: Annotated[int | None, typer.Option(
        "--overlays", min=0, metavar="N", help="Write PNG overlays of this many grounded slices per drop "
        "(<data_dir>/overlays/<drop_id>/).")] = None,
) -> None:
    """Rebuild the dataset with new or changed drops: ingest, curate, segment, ground, check, version.

    Incremental: a stage runs for a drop only when its inputs, its settings or the code
    changed; the new version holds the latest version's drops plus these (minus forgotten
    patients). With nothing changed it starts nothing and reports the current version.
    Runs the Prefect flow rebuild_dataset on Ray: embedded by default (a Prefect API on
    127.0.0.1 and a local Ray with ray.num_cpus CPUs), or on prefect.api_url / ray.address.
    """
    from radground.runtime import libraries_off_the_terminal, ui_commands
    from tasks.discover import check_drops

    settings = state.settings
    if overlays is not None:
        settings = settings.model_copy(update={
            "grounding": settings.grounding.model_copy(update={"overlays": overlays})})
    # Seconds, not minutes: a wrong folder is named before Prefect, Ray or the key are touched.
    check_drops(drops or [], settings)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("starting", total=None)

        def follow(stage: str, done: int, total: int) -> None:
            # total 0: a step of unknown length (the bar pulses instead of standing still)
            progress.update(bar, description=stage, completed=done, total=total or None)

        def notice(message: str) -> None:
            progress.console.print(message, highlight=False, markup=False, soft_wrap=True)

        # Prefect's, Ray's, DVC's and MLflow's own lines go to data_dir/logs, not this terminal.
        with progress_hook(follow, notice), libraries_off_the_terminal(settings) as library_log:
            # Imported here: Prefect creates its home on import, which must be data_dir's by then.
            from flows.rebuild import run_rebuild

            summaries = run_rebuild(drops or [], settings)
    for result in summaries:
        for line in result.lines():  # a stage that did not run says "current", not its old summary
            out.print(line, highlight=False, markup=False)
    from tasks.version_stage import summary_line as version_line

    if summaries and summaries[0].version:
        out.print(version_line(summaries[0].version), highlight=False)
    store = settings.store_root.resolve() if settings.storage.backend == "local" else settings.storage.bucket
    out.print(f"stage outputs: {store} (prefixes ingest/, curate/, segment/, ground/ + <drop_id>/)", highlight=False)
    for line in ui_commands(settings):  # the embedded servers are gone: how to look at what they recorded
        out.print(line, highlight=False, markup=False)
    out.print(f"library logs (Prefect, Ray, DVC, MLflow): {library_log}", highlight=False)


@app.command()
def train(
    version: Annotated[str | None, typer.Option(
        "--version", metavar="DIGEST", help="The dataset version to train on (8 to 64 hex characters of its "
        "digest); default: the latest.")] = None,
    preset: Annotated[str | None, typer.Option(
        "--preset", metavar="tiny|paligemma2-3b-224", help="Model preset; default: the model.preset setting. "
        "paligemma2-3b-224 reads model.paligemma_path (never downloads).")] = None,
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", min=1, metavar="N", help="Stop after N optimizer steps (default: train.max_steps, else "
        "train.epochs epochs).")] = None,
) -> None:
    """Train RadGrounder on a dataset version with Ray Train; checkpoints and lineage go to MLflow.

    Trains on the version's train split and keeps the checkpoints with the lowest validation loss
    (val split). Runs the Prefect flow train_model on Ray Train (train.workers workers, GPUs when
    the cluster has them): embedded by default, or on prefect.api_url / ray.address. Prints the
    MLflow run, the best checkpoint and how to trace it back to the raw files.
    """
    from radground.errors import ConfigError

    settings = state.settings
    if preset is not None and preset not in ("tiny", "paligemma2-3b-224"):
        raise ConfigError(f"--preset {preset!r}: expected tiny or paligemma2-3b-224.")
    if max_steps is not None:
        settings = settings.model_copy(update={"train": settings.train.model_copy(update={"max_steps": max_steps})})
    _check_training_inputs(settings, version, preset)
    result, library_log = _run_training(settings, version, preset)
    for line in result.lines():
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    out.print(f"library logs (Prefect, Ray, MLflow): {library_log}", highlight=False)


def _check_training_inputs(settings: Settings, version: str | None, preset: str | None) -> None:
    """Seconds, not minutes: no version, a version without val, a missing PaliGemma folder are named before
    Prefect, Ray or anything under data_dir is touched."""
    from models.training import check_splits, split_counts, training_version

    if (preset or settings.model.preset) == "paligemma2-3b-224":
        from models.radgrounder.configuration import paligemma_path

        paligemma_path(settings)
    _, digest = training_version(settings, version)
    check_splits(settings, digest, split_counts(settings, digest))


def _run_training(settings: Settings, version: str | None, preset: str | None):
    """run_training behind a progress bar, library output in data_dir/logs; (TrainResult, log path)."""
    from radground.runtime import libraries_off_the_terminal

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        bar = progress.add_task("starting", total=None)

        def follow(stage: str, done: int, total: int) -> None:
            progress.update(bar, description=stage if stage != "training" else "training (optimizer steps)",
                            completed=done, total=total or None)

        def notice(message: str) -> None:
            progress.console.print(message, highlight=False, markup=False, soft_wrap=True)

        with progress_hook(follow, notice), libraries_off_the_terminal(settings) as library_log:
            from flows.train import run_training  # Prefect's home must be data_dir's by its import

            return run_training(version, settings, preset=preset), library_log


@app.command()
def keywords(
    text: Annotated[str, typer.Argument(metavar="TEXT", help="A sentence (or several) to analyse.")],
    lang: Annotated[str, typer.Option("--lang", "-l", metavar="de|en", help="Language of TEXT: de or en.")] = "de",
    backend: Annotated[str | None, typer.Option(
        "--backend", "-b", metavar="lexicon|openai", help="lexicon or openai; default: the llm.backend setting."
    )] = None,
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
    image_id: Annotated[str, typer.Argument(metavar="IMAGE_ID",
                                            help="A slice's image_id (de-identified SOP Instance UID).")],
    out_file: Annotated[Path | None, typer.Option("--out", "-o", metavar="PNG", help="PNG to write; default "
                                                  "<data_dir>/overlays/show/IMAGE_ID.png.")] = None,
    language: Annotated[str, typer.Option("--lang", "-l", metavar="de|en", help="Keyword language to label: de or "
                                          "en (a report's own language, or its translation when one was made).")
                        ] = "de",
) -> None:
    """Render one slice with its masks, grounded boxes and keywords as a PNG, to check the pipeline by eye."""
    from radground.errors import ConfigError
    from tasks.ground_stage import render_image

    if language not in ("de", "en"):
        raise ConfigError(f"--lang {language!r}: expected de or en.")
    settings = state.settings
    note_data_dir()
    if settings.storage.backend == "local" and not settings.store_root.is_dir():  # before anything creates it
        raise ConfigError(f"image {image_id}: not found. {nothing_here('no stage outputs (no store folder)')}")
    target = out_file or settings.data_dir / "overlays" / "show" / f"{image_id}.png"
    path = render_image(image_id, target, language, settings)
    out.print(f"overlay written to [bold]{path}[/]")
    grounded = _grounded_languages(image_id, settings)
    if grounded[language]:
        console.print(f"{grounded[language]} grounded keyword(s) labelled ({_LANGUAGES[language]}).")
    else:
        console.print(f"[bold yellow]note:[/] {_why_no_keywords(language, grounded)}", highlight=False,
                      soft_wrap=True)


_LANGUAGES = {"de": "German", "en": "English"}


def _grounded_languages(image_id: str, settings: Settings) -> Counter[str]:
    """How many grounded keywords the slice has per language, over every drop's grounding table."""
    from radground.store import open_store
    from radground.tables import read_table

    store = open_store(settings)
    counts: Counter[str] = Counter()
    for key in store.list("ground/"):
        if key.endswith("/grounding.parquet"):
            table = read_table(store, key).select(["image_id", "language"]).to_pylist()
            counts.update(row["language"] for row in table if row["image_id"] == image_id)
    return counts


def _why_no_keywords(language: str, grounded: Counter[str]) -> str:
    """Why the overlay labels no keyword in ``language``, and what to do instead."""
    others = [other for other in _LANGUAGES if other != language and grounded[other]]
    if others:
        other = others[0]
        return (f"this slice's report is {_LANGUAGES[other]}; no {_LANGUAGES[language]} keywords (the report was "
                f"not translated: translation backend off when it was built), so the overlay shows the masks only. "
                f"Use --lang {other}, or enable translation (translation.backend) and rebuild.")
    return ("this slice has no grounded keyword in any language (no keyword of its report names a class found on "
            "it), so the overlay shows the masks only. Grounded slices are in ground/<drop_id>/grounding.parquet "
            "of the store.")


#: The demo's training run: the tiny preset, a few optimizer steps on CPU with 2 Ray workers (a minute or so).
DEMO_TRAIN = {"workers": 2, "use_gpu": "false", "max_steps": 4, "batch_size": 2, "effective_batch": 4,
              "eval_every": 2, "eval_items": 8, "optimizer": "adamw", "lr": 1e-3, "warmup_ratio": 0.25}
DEMO_MAX_NEW_TOKENS = 16  # generated tokens per answer in the demo's evaluation and prediction
DEMO_SEED_TRIES = 64  # P(none of 64 seeds fits) = 0.53 ** 64 with 6 patients and the 0.8/0.1/0.1 shares


@app.command()
def demo(
    patients: Annotated[int, typer.Option("--patients", "-n", min=1, metavar="N",
                                          help="Patients in the demo drop.")] = 6,
    seed: Annotated[int | None, typer.Option(
        "--seed", "-s", min=0, metavar="SEED", help="Random seed of the demo drop; default: the first seed from 0 "
        "that puts at least one patient in train and one in val under this data_dir's key.")] = None,
    train_model: Annotated[bool, typer.Option("--train/--no-train", help="Train the tiny model on the version "
                                              "afterwards.")] = True,
) -> None:
    """Run the main job on the embedded default: every stage that exists, on a synthetic drop, then training.

    Writes under data_dir (default ./.radground). Stages: synth, then rebuild: ingest, curate,
    segment (classical), ground (with 4 overlay PNGs to look at), quality + version (DVC,
    MLflow); then the tiny RadGrounder preset trains for a few steps on CPU through the
    train_model flow with 2 Ray workers, and the run, its best checkpoint and the command that
    traces it back to the raw files are printed. Run it again and the rebuild finds nothing
    changed: same version, no work (the training runs again, as a new run). What the libraries
    log goes to data_dir/logs/libraries.log, not to the terminal.
    """
    data_dir = state.settings.data_dir.resolve()
    drop_dir = data_dir / "drops" / "demo"
    if seed is None:  # the first seed whose patients split into train, val and test (checked again after synth)
        fits = [s for s in range(DEMO_SEED_TRIES) if _demo_has_val(state.settings, _synth_patient_ids(s, patients))]
        with_test = [s for s in fits if _demo_has_val(state.settings, _synth_patient_ids(s, patients), "test")]
        seed = (with_test or fits or [0])[0]
    if _same_demo_drop(drop_dir, patients, seed):
        # Written again it would be the same bytes with new times, and the rebuild would start
        # Prefect and Ray only to re-hash them: kept, a second demo starts nothing.
        out.print(f"demo drop kept: {drop_dir} (the same seed and patients as before)", highlight=False)
    else:
        synth(drop_dir, patients=patients, seed=seed, force=True)
        out.print(f"demo drop written to [bold]{drop_dir}[/] (ground truth: {drop_dir}.truth.json)")
    truth = json.loads(drop_dir.with_name(drop_dir.name + ".truth.json").read_text(encoding="utf-8"))
    if not _demo_has_val(state.settings, [str(p["patient_id"]) for p in truth.get("patients") or []]):
        out.print(f"[bold yellow]note:[/] seed {seed}: no patient of the demo drop lands in the val split under "
                      "this data_dir's key (splits are by keyed patient hash), so the training step will be skipped; "
                      "try another --seed or more --patients.", highlight=False, soft_wrap=True)
    rebuild([str(drop_dir)], overlays=4)
    if train_model and (trained := _demo_train()) is not None and trained.best_checkpoint:
        _demo_model(trained.run_id, drop_dir)


def _synth_patient_ids(seed: int, patients: int) -> list[str]:
    """The patient IDs ``radground synth`` writes for (seed, patients), without writing the drop: the first
    draws of radground.synth.drop's per-patient generator (tests/flows/test_train.py checks they agree)."""
    import random

    import numpy as np

    from radground.synth.reports import random_person

    used: set[str] = set()
    ids = []
    for seq in np.random.SeedSequence(seed).spawn(patients + 1)[1:]:
        rng = random.Random(int(seq.generate_state(2)[1]))
        language = "de" if rng.random() < 0.75 else "en"
        random_person(rng, language)
        rng.randint(0, 65 * 365)  # birth date
        rng.random()  # upper-case name
        while (value := str(rng.randint(10_000_000, 99_999_999))) in used:
            pass
        used.add(value)
        ids.append(value)
    return ids


def _demo_has_val(settings: Settings, patient_ids: list[str], *also: str) -> bool:
    """Would these patients include one in train and one in val (and one in each of ``also``)? The real split
    function on their pseudonyms (this data_dir's key, created here if new; earlier patients keep their split)."""
    from radground.keys import load_key
    from tasks.deid import patient_pseudonym
    from tasks.version import assign_splits, read_splits
    from tasks.version_stage import latest_version_dir

    key = load_key(settings)
    latest = latest_version_dir(settings)
    previous = read_splits(latest) if latest is not None else {}
    pseudonyms = [patient_pseudonym(key, patient_id, "") for patient_id in patient_ids]
    splits = assign_splits(pseudonyms, previous, settings.version, key)
    return {"train", "val", *also} <= {splits[p] for p in pseudonyms}


def _demo_train():
    """The demo's training run on the latest version (see DEMO_TRAIN); its TrainResult, or None when skipped."""
    from models.training import TrainError  # (flows.train imports Prefect: only once its home is set)

    settings = state.settings
    settings = settings.model_copy(update={
        "train": settings.train.model_copy(update=DEMO_TRAIN),
        "model": settings.model.model_copy(update={"preset": "tiny"})})
    try:
        _check_training_inputs(settings, None, "tiny")
        result, _ = _run_training(settings, None, "tiny")
    except TrainError as exc:  # e.g. a version without a val patient (--seed given)
        out.print(f"[bold yellow]note:[/] training skipped: {exc}", highlight=False, soft_wrap=True)
        return None
    out.print(f"trained the tiny preset for {settings.train.max_steps} steps on CPU with 2 Ray workers:",
              highlight=False)
    for line in result.lines():
        out.print("  " + line, highlight=False, markup=False, soft_wrap=True)
    return result


def _demo_model(run_id: str, drop_dir: Path) -> None:
    """After training: evaluate the run's best checkpoint on the version's test split, register it (the first
    version becomes champion through the gate), and predict on one demo DICOM; says where each result is."""
    # Short answers keep the demo within its minutes: the untrained model never stops on its own (the
    # demo's yes/no questions need 1-2 tokens); the cap is logged with the evaluation.
    settings = state._settings = state.settings.model_copy(update={
        "model": state.settings.model.model_copy(update={"max_new_tokens": DEMO_MAX_NEW_TOKENS})})
    split = "test" if _demo_split_has_items(settings, "test") else "val"
    if split != "test":
        out.print("[bold yellow]note:[/] no demo patient landed in the test split; the demo evaluates on val "
                  "(a real evaluation uses test).", highlight=False, soft_wrap=True)
    evaluation = settings.data_dir.resolve() / "evaluations" / f"demo-{run_id[:8]}"
    out.print(f"evaluating the best checkpoint on the version's {split} split:", highlight=False)
    cli_model.evaluate(benchmark=None, data=None, version=None, split=split, model=run_id, predictions=None,
                       out_dir=evaluation)
    _demo_register_and_predict(run_id, evaluation, drop_dir)


def _demo_register_and_predict(run_id: str, evaluation: Path, drop_dir: Path) -> None:
    """Register the evaluated checkpoint, pass it through the promotion gate, and ground one demo slice."""
    from models.checkpoints import resolve_model
    from models.inference import predict_dicom
    from models.registry import promote, register

    settings = state.settings
    source = resolve_model(settings, run_id)
    registered = register(settings, source, evaluation=cli_model.evaluation_doc(evaluation, source))
    name, number = registered["name"], registered["version"]
    out.print(f"registered {name} version {number} (alias challenger), with the metrics above: "
              f"radground models show {number}", highlight=False)
    gate = promote(settings, number)
    out.print(f"promotion gate: {gate['reason']}", highlight=False, soft_wrap=True)
    # a series folder, not one file: the drop plants broken files and localizers, which a folder skips
    series = sorted({p.parent for p in drop_dir.rglob("*.dcm")})[0]
    _, model, processor = cli_model.load_model_ref(f"models:/{name}/{number}")
    found = predict_dicom(settings, series, model, processor, task="ground")
    text = found["text"] if found["text"] is not None else f"(malformed, dropped: {found['error']})"
    out.print(f"grounded prediction on the middle slice of one demo series ({found['image']['modality']} "
              f"{found['image']['rows']}x{found['image']['cols']}): {len(found['groundings'])} grounding(s); text: "
              f"{text}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"  overlay: {found['overlay']}", highlight=False, markup=False)
    # the series path is not printed: synthetic drops name folders after the (made-up) patient, as hospitals do
    out.print(f"  as JSON: radground predict SERIES_FOLDER --model models:/{name}/{number} --task ground (a series "
              f"folder of {drop_dir})", highlight=False, markup=False, soft_wrap=True)
    out.print(f"  trace the model back to the raw files: radground lineage trace models:/{name}/{number}",
              highlight=False, markup=False)


def _demo_split_has_items(settings: Settings, split: str) -> bool:
    from models.data import VersionDataset
    from tasks.version_stage import latest_version_dir

    folder = latest_version_dir(settings)
    return folder is not None and len(VersionDataset(folder, split, allow_test=True)) > 0


def _same_demo_drop(drop_dir: Path, patients: int, seed: int) -> bool:
    """Does ``drop_dir`` hold the synthetic drop this seed and patient count would write?"""
    from radground.synth.drop import GENERATOR_VERSION

    truth = drop_dir.with_name(drop_dir.name + ".truth.json")
    try:
        doc = json.loads(truth.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return ((doc.get("generator_version"), doc.get("seed"), len(doc.get("patients") or [])) ==
            (GENERATOR_VERSION, seed, patients) and (drop_dir / "reports.csv").is_file())


VERSION_HELP = ("A version digest: the 16 hex characters `radground datasets list` prints, the whole 64, or any "
                f"prefix of {MIN_DIGEST_PREFIX} or more that only one version starts with.")


def _resolve_version(version: str, names: list[str], where: Path, what: str) -> str:
    """The one of ``names`` (version folder names) that ``version`` names."""
    from radground.errors import ConfigError
    from radground.layout import match_version

    if not names:
        raise ConfigError(f"version {version.strip().lower()}: {nothing_here(what)}")
    return match_version(version, names, where, error=ConfigError)


def _version_dir(version: str) -> Path:
    from radground.errors import ConfigError
    from tasks.version import read_manifest
    from tasks.version_stage import versions_root

    root = versions_root(state.settings)
    folders = [p.name for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()] if root.is_dir() else []
    folder = root / _resolve_version(version, folders, root, "no dataset versions")
    digest = read_manifest(folder).digest
    if not digest.startswith(version.strip().lower()):  # more than 16 characters given: all of them must match
        raise ConfigError(f"version {version.strip().lower()}: version {folder.name} has digest {digest}, which "
                          "does not start with it. Run `radground datasets list --json` for the full digests.")
    return folder


@datasets_app.command("list")
def datasets_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table: one object per version "
                                          "with its full digest, parent, drops, rows per table and time.")] = False,
) -> None:
    """List the dataset versions under data_dir, newest first, with their row counts.

    The version column is what `datasets show`, `datasets pull` and `lineage trace` take: the
    digest's first 16 hex characters (any unambiguous prefix of 8 or more works too).
    """
    from tasks.retention import is_retired
    from tasks.version import read_manifest
    from tasks.version_stage import latest_version_dir, versions_root

    note_data_dir()
    root = versions_root(state.settings)
    latest_dir = latest_version_dir(state.settings)
    latest = latest_dir.name if latest_dir else None
    folders = [p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").exists()] if root.is_dir() else []
    manifests = sorted(((folder, read_manifest(folder)) for folder in folders), key=lambda fm: fm[1].created_at,
                       reverse=True)
    if not manifests:
        console.print(f"[bold yellow]note:[/] {nothing_here()}", highlight=False, soft_wrap=True, markup=True)
    if as_json:
        print(json.dumps([{"version": folder.name, "digest": m.digest, "parent_digest": m.parent_digest,
                           "latest": folder.name == latest, "retired": is_retired(folder), "drops": m.drops,
                           "rows": {name: t.rows for name, t in m.tables.items()}, "created_at": m.created_at}
                          for folder, m in manifests], indent=2))
        return
    if not manifests:
        return
    # The ids to copy are never cut or wrapped, however narrow the terminal: the other columns give way.
    table = Table(Column("version", no_wrap=True, min_width=FOLDER_DIGEST_LENGTH, overflow="ignore"),
                  Column("parent", no_wrap=True, min_width=FOLDER_DIGEST_LENGTH, overflow="ignore"), "drops", "rows",
                  Column("created (UTC)", no_wrap=True, min_width=16))
    for folder, m in manifests:
        rows = ", ".join(f"{n} {t.rows}" for n, t in m.tables.items())
        # "(latest)" / "(retired)" on a line of its own: a double click on the id copies the id alone.
        marks = ["(latest)"] * (folder.name == latest) + ["(retired)"] * is_retired(folder)
        table.add_row("\n".join([folder.name, *marks]),
                      (m.parent_digest or "-")[:FOLDER_DIGEST_LENGTH], str(len(m.drops)), rows,
                      m.created_at[:16].replace("T", " "))
    out.print(table)


@datasets_app.command("show")
def datasets_show(version: Annotated[str, typer.Argument(metavar="VERSION", help=VERSION_HELP)]) -> None:
    """Print a version's manifest as JSON."""
    note_data_dir()
    out.print_json((_version_dir(version) / "manifest.json").read_text(encoding="utf-8"))


@datasets_app.command("pull")
def datasets_pull(version: Annotated[str, typer.Argument(metavar="VERSION", help=VERSION_HELP)]) -> None:
    """Fetch a version's files from the DVC remote into data_dir/versions."""
    from radground.dvc import DvcRepo
    from tasks.version_stage import versions_root

    note_data_dir()
    root = versions_root(state.settings)
    tracked = [p.stem for p in root.glob("*.dvc") if p.is_file()] if root.is_dir() else []
    name = _resolve_version(version, tracked, root, "no tracked dataset versions (no versions/*.dvc files)")
    folder = DvcRepo(root, state.settings).pull(name)
    out.print(f"version pulled into [bold]{folder}[/]")


@datasets_app.command("retire")
def datasets_retire(
    apply: Annotated[bool, typer.Option("--apply/--dry-run", help="--dry-run (the default) prints the plan and "
                                        "changes nothing; --apply retires the versions it lists.")] = False,
) -> None:
    """Retire old dataset versions: remove their shards and splits (manifests are kept forever),
    their DVC objects no other version uses (cache and remote), and tag the MLflow runs that used them.

    Kept: the latest, pinned ones (retention.pinned), those a registered model was trained on, the
    retention.keep_last newest and those younger than retention.keep_days (a version holding a
    forgotten patient is kept only as the latest, pinned or for a model). Runs under the rebuild lock.
    """
    from tasks.retention import retire

    note_data_dir()
    report = retire(state.settings, dry_run=not apply)
    table = Table(Column("version", no_wrap=True, min_width=FOLDER_DIGEST_LENGTH, overflow="ignore"),
                  Column("created (UTC)", no_wrap=True), "action", "why", Column("files", justify="right"),
                  Column("bytes", justify="right"))
    for item in report["retired"]:
        why = "older than the rules keep" + ("; holds a forgotten patient" if item["holds_forgotten"] else "")
        table.add_row(item["version"], item["created_at"][:16].replace("T", " "),
                      "retire" if report["dry_run"] else "retired", why, str(item["files"]), f"{item['bytes']:,}")
    for name, reason in report["kept"].items():
        table.add_row(name, "", "keep", reason, "", "")
    if report["retired"] or report["kept"]:
        out.print(table)
    dvc = report["dvc"]
    verb = "would retire" if report["dry_run"] else "retired"
    freed = (f"{dvc.get('dvc_objects', 0)} DVC object(s), {dvc.get('dvc_cache_bytes', 0):,} bytes in the cache"
             if report["dry_run"] else f"{dvc.get('dvc_cache_objects_deleted', 0)} DVC cache object(s) and "
             f"{dvc.get('dvc_remote_objects_deleted', 0)} remote object(s) deleted")
    runs = len(report["mlflow_runs"] if report["dry_run"] else report["mlflow_runs_tagged"])
    out.print(f"{verb} {report['versions']} version(s): {report['files']} file(s), {report['bytes']:,} bytes; "
              f"{freed}; {runs} MLflow run(s) {'to tag' if report['dry_run'] else 'tagged'} radground.retired=true; "
              f"kept {len(report['kept'])}, retired earlier {len(report['already_retired'])}.",
              highlight=False, markup=False)
    if report["dry_run"] and report["versions"]:
        console.print("dry run: nothing was changed. Run `radground datasets retire --apply` to retire them.",
                      highlight=False, markup=False)


def _lineage():
    from radground.lineage import lineage_index

    return lineage_index(state.settings.data_dir.resolve() / "lineage", settings=state.settings)


@app.command()
def forget(
    patient: Annotated[str, typer.Option("--patient", help="A patient pseudonym (P + 20 hex, any case), or the "
                                         "hospital's patient ID (hashed with the key; never printed).")],
    not_yet_delivered: Annotated[bool, typer.Option(
        "--not-yet-delivered", help="The patient is in no drop yet: only put them on the exclusion list, so no "
        "later delivery brings them in.")] = False,
    purge: Annotated[bool, typer.Option(
        "--purge", help="Erase the patient physically: stage outputs, caches, older versions (see --older), DVC "
        "cache and remote; ends with a byte scan.")] = False,
    older: Annotated[str | None, typer.Option(
        "--older", metavar="rewrite|remove", help="With --purge: rewrite each older version that holds the patient "
        "without them (new digest), or remove those versions.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --purge: list what would be touched; change "
                                          "nothing.")] = False,
) -> None:
    """Forget a patient: a new version without their rows, and every later rebuild leaves them out.

    Prints JSON naming the patient by pseudonym only: the new version, the rows removed per
    table, and the earlier versions (and MLflow runs that used them) that still hold the
    patient. A patient found in no version and no stage output is an error (nothing recorded),
    unless --not-yet-delivered. With --purge the patient is erased physically everywhere under
    data_dir, the object store and the DVC remote; the exclusion list and the audit record
    (state/purges/) keep the pseudonym, by design.
    """
    from radground.errors import ConfigError
    from radground.lineage import pseudonym_for

    settings = state.settings
    if (dry_run or older is not None) and not purge:
        raise ConfigError("--dry-run and --older go with --purge: add --purge (or drop them for a plain forget).")
    if purge and not_yet_delivered:
        raise ConfigError("--purge erases a patient who is in the data; --not-yet-delivered records one who is not. "
                          "Use one of them.")
    if purge and older not in ("rewrite", "remove"):
        raise ConfigError(f"--older {older!r}: with --purge choose --older rewrite (each older version holding the "
                          "patient is rewritten without them, new digest) or --older remove (those versions are "
                          "deleted).")
    pseudonym = pseudonym_for(settings, patient)
    if purge:
        _purge(settings, pseudonym, older, dry_run)
        return
    from tasks.version_stage import forget as forget_patient

    result = forget_patient(settings, pseudonym, not_yet_delivered=not_yet_delivered)
    version = result["version"]
    result["version"] = version and {k: version[k] for k in ("digest", "parent_digest", "version_dir", "rows",
                                                             "mlflow_run")}
    out.print_json(json.dumps(result, default=str))


def _purge(settings: Settings, pseudonym: str, older: str, dry_run: bool) -> None:
    """Run the purge, print its report; a scan that still finds the patient fails the command."""
    from tasks.purge import PurgeError, purge

    report = purge(settings, pseudonym, older=older, dry_run=dry_run)  # type: ignore[arg-type]
    out.print_json(json.dumps(report, default=str))
    if dry_run:
        console.print("dry run: nothing was changed.")
        return
    scan = report["scan"]
    if report.get("current_version_error"):
        raise PurgeError(f"purge done (final scan {'clean' if scan['clean'] else 'NOT clean'}), but no current "
                         f"version could be published without the patient: {report['current_version_error']}")
    if not scan["clean"]:
        raise PurgeError(f"purge done, but the final scan still finds the patient in {len(scan['files_still_holding'])}"
                         f" file(s): {', '.join(scan['files_still_holding'][:10])}. Delete or rewrite them, then run "
                         "the purge again (it scans again).")
    console.print(f"scan: {scan['files_scanned']} files under {settings.data_dir.resolve()} and the DVC remote hold "
                  "no byte of the patient's pseudonym or ids (kept by design: the exclusion list and the audit "
                  "record). Raw drops are outside the purge: delete the patient at the source of "
                  f"{', '.join(report['drops_holding_patient']) or 'no drop'}.")


@lineage_app.command("trace")
def lineage_trace(target: Annotated[str, typer.Argument(
        metavar="VERSION|RUN_ID|CHECKPOINT_DIR|models:/NAME/N",
        help=VERSION_HELP + " Or an MLflow training run id (32 hex characters), a checkpoint folder holding "
        "lineage.json, or a registered model version (models:/radgrounder/N or models:/radgrounder@champion).")]
) -> None:
    """The drops and raw file hashes behind a version, a training run, a checkpoint or a registered model (JSON).

    A registered model version -> its training run -> version -> raw files. A folder (or lineage.json) is a
    checkpoint: checkpoint -> training run -> version -> raw files. A hex
    value is looked up as a version first; if no version starts with it and it has the 32 characters of an
    MLflow run id, as a training run. "resolved_as" in the output says which it was.
    """
    from radground.errors import ConfigError
    from radground.lineage import looks_like_run_id, trace_checkpoint, trace_model, trace_run
    from tasks.version import read_manifest

    note_data_dir()
    if target.startswith("models:/"):
        out.print_json(json.dumps(trace_model(state.settings, target), default=str))
        return
    path = Path(target).expanduser()
    if "://" in target or (("/" in target or path.name == "lineage.json") and not path.exists()):
        raise ConfigError(f"checkpoint {target}: not a folder on this machine. Give a local checkpoint folder "
                          "(copy one from the object store first), or the training run's id, which lists its "
                          "checkpoints.")
    if path.is_dir() or (path.name == "lineage.json" and path.is_file()):
        out.print_json(json.dumps(trace_checkpoint(state.settings, path), default=str))
        return
    try:
        digest = read_manifest(_version_dir(target)).digest
    except ConfigError as exc:
        if not looks_like_run_id(target):
            raise
        try:
            traced = trace_run(state.settings, target)
        except RadgroundError as run_exc:
            raise ConfigError(f"{target.strip()}: not a version ({exc}) and not a run ({run_exc})") from None
        out.print_json(json.dumps(traced, default=str))
        return
    out.print_json(json.dumps({"resolved_as": "version", **_lineage().trace(digest)}, default=str))


@lineage_app.command("where-used")
def lineage_where_used(
    patient: Annotated[str, typer.Option("--patient", help="A patient pseudonym (P + 20 hex, any case), or the "
                                         "hospital's patient ID (hashed with the key; never printed).")],
) -> None:
    """Every version, MLflow run, training run and checkpoint that used a patient — named by pseudonym only.

    training_runs: the runs that trained on the patient (their split of the version was train or val; the
    split is named), checkpoints: those runs' checkpoints; evaluated_on: evaluation runs. A patient only in
    a version's test split is in no training run.
    """
    from radground.lineage import pseudonym_for

    settings = state.settings
    pseudonym = pseudonym_for(settings, patient)
    lineage = settings.data_dir.resolve() / "lineage"
    used = _lineage().where_used(pseudonym) if lineage.is_dir() and any(lineage.glob("*.parquet")) else None
    if not used or not used["versions"]:
        _not_in_any_version(settings, pseudonym)
    out.print_json(json.dumps(used, default=str))


def _not_in_any_version(settings: Settings, pseudonym: str) -> None:
    """Fail: an empty list would read as "used nowhere" when the ID may simply be wrong."""
    from radground.lineage import LineageError
    from tasks.purge import in_stage_outputs

    drops = in_stage_outputs(settings, pseudonym)
    where = (f"; their records are in the stage outputs of drop {', '.join(sorted(drops))}, not yet in a version"
             if drops else ". Check the ID, and that deid.key is the key the data was built with")
    raise LineageError(f"no patient with this ID/pseudonym in any version under {settings.data_dir.resolve()}{where}.")


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings as JSON (secrets masked)."""
    note_data_dir()
    out.print_json(json.dumps(state.settings.public_dict(), default=str))


@config_app.command("reference")
def config_reference() -> None:
    """Print the settings reference (Markdown: every setting, its environment variable, type, default
    and description), generated from the settings model; docs/settings.md is the same text."""
    from radground.reference_docs import settings_markdown

    sys.stdout.write(settings_markdown())


# The model half (evaluate, predict, models ...) registers its commands on ``app``.
from radground import cli_model  # noqa: E402, F401


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

"""The model half of the ``radground`` command line: evaluate, predict and the model registry.

Registered on :data:`radground.cli.app` when radground.cli is imported; the same error handling
(one line per error, ``--debug`` for tracebacks) applies. Heavy imports (torch, transformers,
MLflow) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from radground.cli import app, console, note_data_dir, out, state
from radground.errors import ConfigError

models_app = typer.Typer(help="The model registry: register, promote, list, show.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(models_app, name="models")

MODEL_HELP = ("The model: an MLflow training run id (its best checkpoint), a checkpoint folder, or a registered "
              "version as models:/radgrounder/N or models:/radgrounder@champion.")
BENCHMARKS = ("slake", "vqa-rad")
TASKS = ("report", "vqa", "ground")


def _bar(description: str) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def load_model_ref(ref: str):
    """(source, model, processor) for a model reference, with what was resolved said on stderr."""
    from models.checkpoints import load_model, resolve_model
    from radground.runtime import libraries_off_the_terminal

    settings = state.settings
    source = resolve_model(settings, ref)
    with libraries_off_the_terminal(settings):
        model, processor = load_model(source)
    console.print(f"model: {source.ref} ({source.kind}; checkpoint {source.folder})", highlight=False,
                  markup=False, soft_wrap=True)
    return source, model, processor


def model_info(source: Any) -> dict[str, Any]:
    """What an evaluation records about the model; (training run, step) identify its checkpoint."""
    return {**source.describe(), "checkpoint": source.checkpoint_uri or str(source.folder),
            "training_run_id": source.lineage.get("training_run_id"), "step": source.lineage.get("step"),
            "max_new_tokens": state.settings.model.max_new_tokens}


def _same_checkpoint(evaluated: dict[str, Any], source: Any) -> bool:
    return (evaluated.get("training_run_id"), evaluated.get("step")) == (
        source.lineage.get("training_run_id"), source.lineage.get("step")) and evaluated.get("step") is not None


# ------------------------------------------------------------------------------------------ evaluate


@app.command()
def evaluate(
    benchmark: Annotated[str | None, typer.Option(
        "--benchmark", "-b", metavar="slake|vqa-rad", help="Score on a public benchmark (needs --data); default: "
        "a dataset version's split.")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", metavar="DIR", help="The benchmark's folder in its published layout (SLAKE: imgs/ and "
        "test.json; VQA-RAD: its JSON list and images).")] = None,
    version: Annotated[str | None, typer.Option(
        "--version", metavar="DIGEST", help="Dataset version to score on (8 to 64 hex characters of its digest); "
        "default: the latest. Ignored with --benchmark.")] = None,
    split: Annotated[str, typer.Option("--split", metavar="SPLIT", help="Split to score: test (default), val, or "
                                       "train.")] = "test",
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="MODEL", help=MODEL_HELP)] = None,
    predictions: Annotated[Path | None, typer.Option(
        "--predictions", "-p", metavar="FILE", dir_okay=False, help="Score another system's answers instead of "
        "a model: JSON lines {\"qid\": …, \"answer\": \"…\"}. A missing qid scores as an empty answer.")] = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="DIR", help="Where metrics.json and samples.csv go; default "
        "<data_dir>/evaluations/<test set>-<UTC time>.")] = None,
) -> None:
    """Score a model (or a predictions file) with the published protocol; metrics.json, samples.csv, MLflow.

    VQA answers: exact match after normalising, token F1 and recall, BLEU-1/4, ROUGE-L and CIDEr
    (corpus-level), closed and open questions apart and together. On a dataset version also the
    reports (same text metrics) and grounding (keyword match, box or mask IoU, F1 and F1@IoU>=0.5,
    mean IoU, Dice). The run is logged to MLflow (experiment mlflow.eval_experiment) with the prompts
    and the test set's digest; a registered model version gets the metrics as tags, which the
    promotion gate (radground models promote) compares.
    """
    settings = state.settings
    if (model is None) == (predictions is None):
        raise ConfigError("evaluate: give exactly one of --model MODEL (a model to run) or --predictions FILE "
                          "(answers to score).")
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise ConfigError(f"--benchmark {benchmark!r}: expected slake or vqa-rad.")
    if benchmark is not None and data is None:
        raise ConfigError(f"--benchmark {benchmark} needs --data DIR: the benchmark's folder in its published layout.")
    if benchmark is None and data is not None:
        raise ConfigError("--data names a benchmark folder: add --benchmark slake|vqa-rad (or drop --data to score "
                          "a dataset version).")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split {split!r}: expected test, val or train.")
    note_data_dir()
    from models.evaluation import evaluate_benchmark, evaluate_version

    source = loaded = None
    if model is not None:
        source, *loaded = load_model_ref(model)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = out_dir or settings.data_dir.resolve() / "evaluations" / f"{benchmark or 'version'}-{split}-{stamp}"
    info = model_info(source) if source is not None else None
    with _bar("evaluate") as progress:
        bar = progress.add_task("answering" if model else "scoring", total=None)

        def follow(done: int, total: int) -> None:
            progress.update(bar, completed=done, total=total)

        common = {"model": tuple(loaded) if loaded else None, "model_info": info, "predictions": predictions,
                  "out": target, "progress": follow}
        if benchmark is not None:
            result = evaluate_benchmark(settings, benchmark, data, split, **common)
        else:
            version = version or _latest_version()
            result = evaluate_version(settings, version, split, **common)
    if source is not None and source.kind == "registry":
        from models.registry import attach_evaluation

        attach_evaluation(settings, source.model_name, source.model_version, test_set_key=result.test_set["key"],
                          metrics=result.metrics, eval_run_id=result.run_id)
        console.print(f"metrics attached to {source.model_name} version {source.model_version} "
                      f"(test set {result.test_set['key']})", highlight=False, markup=False)
    _print_metrics(result.metrics)
    out.print(f"metrics: {result.metrics_path}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"per sample: {result.samples_path}", highlight=False, markup=False, soft_wrap=True)
    out.print(f"MLflow evaluation run: {result.run_id} (test set {result.test_set['key']})", highlight=False,
              markup=False)


def _latest_version() -> str:
    from tasks.version import read_manifest
    from tasks.version_stage import latest_version_dir

    folder = latest_version_dir(state.settings)
    if folder is None:
        from radground.cli import nothing_here

        raise ConfigError(f"no dataset version to evaluate on. {nothing_here()}")
    return read_manifest(folder).digest


def _print_metrics(metrics: dict[str, Any]) -> None:
    from models.metrics import SCORED_SECTIONS

    sections = [s for s in SCORED_SECTIONS if isinstance(metrics.get(s), dict)]
    names = list(dict.fromkeys(n for s in sections for n in metrics[s]))
    table = Table("metric", *sections, title="metrics", title_justify="left")
    for name in names:
        cells = []
        for section in sections:
            value = metrics[section].get(name)
            cells.append("" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        table.add_row(name, *cells)
    out.print(table)


# ------------------------------------------------------------------------------------------ predict


@app.command()
def predict(
    # no exists=True: typer's own error would echo the path, and file names can hold patient names
    path: Annotated[Path, typer.Argument(metavar="PATH", help="A DICOM file, or a folder holding one series (the "
                                         "--slice-th slice in position order is used).")],
    model: Annotated[str, typer.Option("--model", "-m", metavar="MODEL", help=MODEL_HELP)],
    task: Annotated[str, typer.Option("--task", "-t", metavar="report|vqa|ground", help="report: describe the "
                                      "slice; vqa: answer --question; ground: name findings with boxes and "
                                      "masks.")] = "report",
    question: Annotated[str | None, typer.Option("--question", "-q", metavar="TEXT",
                                                 help="The question for --task vqa.")] = None,
    language: Annotated[str, typer.Option("--lang", "-l", metavar="en|de", help="Prompt language.")] = "en",
    slice_index: Annotated[int | None, typer.Option("--slice", min=0, metavar="N", help="Slice of a series "
                                                    "folder, in position order; default the middle one.")] = None,
    overlay: Annotated[Path | None, typer.Option(
        "--out", "-o", metavar="PNG", help="Overlay picture; default <data_dir>/predictions/<file hash>-<task>.png "
        "(never named after the input, whose name may hold patient data).")] = None,
) -> None:
    """Run the model on one DICOM slice: generated text, boxes and masks (JSON on stdout) and an overlay PNG.

    The slice goes through ingest's decoding and windowing. Boxes are in the DICOM's own pixel grid
    (x = column, y = row), masks are COCO RLE on that grid. Nothing from the DICOM header (names, IDs,
    dates, UIDs) nor the input's path appears in the output.
    """
    if task not in TASKS:
        raise ConfigError(f"--task {task!r}: expected report, vqa or ground.")
    if language not in ("en", "de"):
        raise ConfigError(f"--lang {language!r}: expected en or de.")
    if task == "vqa" and not (question or "").strip():
        raise ConfigError("--task vqa needs --question TEXT.")
    note_data_dir()
    from models.inference import predict_dicom, read_slice

    read_slice(state.settings, path, slice_index)  # a bad input fails before a large model is loaded
    _, model_obj, processor = load_model_ref(model)
    with console.status("generating"):
        result = predict_dicom(state.settings, path, model_obj, processor, task=task, question=question,
                               language=language, slice_index=slice_index, overlay=overlay)
    out.print_json(json.dumps(result, default=str))
    console.print(f"overlay written to {result['overlay']}", highlight=False, markup=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ models


@models_app.command("register")
def models_register(
    ref: Annotated[str, typer.Argument(metavar="MODEL", help="A training run id or a checkpoint folder (or an "
                                       "already registered models:/… to register again).")],
    evaluation: Annotated[Path | None, typer.Option(
        "--eval", metavar="DIR", help="An evaluate output folder (metrics.json) of this same checkpoint: its "
        "metrics go on the version, for the promotion gate.")] = None,
) -> None:
    """Register a checkpoint as a new version of the registered model (alias challenger).

    The version is an MLflow pyfunc over the checkpoint folder, tagged with its dataset digest, code
    version and training run. Promote it with `radground models promote`.
    """
    from models.checkpoints import resolve_model
    from models.registry import register

    settings = state.settings
    note_data_dir()
    source = resolve_model(settings, ref)
    doc = evaluation_doc(evaluation, source) if evaluation is not None else None
    with console.status("registering (copies the checkpoint into the MLflow artifact store)"):
        result = register(settings, source, evaluation=doc)
    out.print_json(json.dumps(result, default=str))


def evaluation_doc(folder: Path, source: Any) -> dict[str, Any]:
    """metrics.json of an evaluate folder, checked to be about ``source``'s checkpoint."""
    path = folder / "metrics.json" if folder.is_dir() else folder
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(f"--eval {folder}: no readable metrics.json there. Give the --out folder of "
                          "`radground evaluate --model …`.") from None
    if not _same_checkpoint(doc.get("model") or {}, source):
        raise ConfigError(f"--eval {folder}: it scored another model ({(doc.get('model') or {}).get('ref')}), not "
                          f"{source.ref}. Evaluate this checkpoint first: radground evaluate --model {source.ref}.")
    from models.registry import flatten_metrics

    return {"test_set_key": doc["test_set"]["key"], "metrics": flatten_metrics(doc), "eval_run_id": doc.get("run_id")}


@models_app.command("promote")
def models_promote(
    version: Annotated[str | None, typer.Argument(metavar="[VERSION]", help="Version number to promote; "
                                                  "default: the challenger.")] = None,
    test_set: Annotated[str | None, typer.Option(
        "--test-set", metavar="KEY", help="Compare on this test set (a key shown by `radground models show`); "
                                          "default: the newest one both versions were evaluated on.")] = None,
) -> None:
    """Make a version the champion if it passes the promotion gate.

    The gate: the first model passes; later ones need every metric of model.promotion_metrics that
    both were evaluated on (same test set) to be >= the champion's minus model.promotion_tolerance.
    A version trained on a forgotten patient is refused. Exit status 2 when refused, with the metric
    that blocked it.
    """
    from models.registry import promote

    note_data_dir()
    result = promote(state.settings, version, test_set=test_set)
    out.print_json(json.dumps(result, default=str))
    if not result.get("promoted"):
        raise typer.Exit(2)


@models_app.command("list")
def models_list() -> None:
    """Every registered version: aliases, dataset, training run, evaluated test sets."""
    from models.registry import list_versions

    note_data_dir()
    rows = list_versions(state.settings)
    if not rows:
        out.print(f"no registered version of {state.settings.model.registry_name} yet: register one with "
                  "`radground models register RUN_ID`.", highlight=False)
        return
    table = Table("version", "aliases", "created", "dataset", "training run", "evaluated on", "forgotten patient")
    for row in rows:
        table.add_row(str(row["version"]), ", ".join(row.get("aliases") or []), str(row.get("created") or ""),
                      str(row.get("dataset_digest") or "")[:16], str(row.get("training_run") or ""),
                      ", ".join(sorted(row.get("evaluations") or {})), "yes" if row.get("contains_forgotten") else "")
    out.print(table)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(metavar="VERSION|@ALIAS", help="A version number or an "
                                                   "alias such as @champion.")]) -> None:
    """One registered version as JSON: tags, aliases, lineage and metrics per test set."""
    from models.registry import show_version

    note_data_dir()
    out.print_json(json.dumps(show_version(state.settings, ref), default=str))

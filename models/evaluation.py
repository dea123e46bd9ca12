"""Evaluation of RadGrounder (or of another system's answers) on a benchmark or a dataset version's split.

Two test sets:

* a benchmark (:func:`evaluate_benchmark`): SLAKE (English items only) or VQA-RAD (split by image,
  paraphrases on one side, or ``train.vqa_rad_split_file``) through models/benchmarks.py; every
  question is scored as closed or open by its ``answer_type``;
* a dataset version's split (:func:`evaluate_version`, default ``test``): its VQA items (closed =
  ``question_type`` closed (yes/no) or multiple (with choices), open otherwise), its reports (one
  item per study and language, as :class:`models.data.VersionDataset` builds the text) and its
  grounded slices (detection and/or segmentation per ``train.grounding``, one item per slice,
  language and task).

Answers come from a model (greedy ``predict``, ``model.max_new_tokens`` tokens) or from a predictions
file (JSON lines ``{"qid": …, "answer": "…"}``; text tasks only: a file carries no boxes or masks).
Nothing is drawn at random: the items, their images and the prompts are a function of the test set.

Outputs in ``out``: ``metrics.json`` (sections closed, open, all, and for a version report and
grounding, each kept with n=0 when empty; plus test_set, model, prompts, missing, created_at) and
``samples.csv`` (one row per scored item). Both are logged to MLflow by
:func:`radground.lineage.log_evaluation`. No pseudonym or patient id enters either: a version's
question ids are built from the de-identified image / study UIDs and the row position.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from models.data import PROMPTS, vqa_prompt
from radground import tokens
from radground.errors import RadgroundError

log = logging.getLogger(__name__)

BENCHMARKS = ("slake", "vqa-rad")
TEXT_METRICS = ("accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider")
GROUNDING_METRICS = ("precision", "recall", "f1", "precision_iou50", "recall_iou50", "f1_iou50", "mean_iou",
                     "dice")
GROUNDING_COUNTS = ("n_images", "n_predicted", "n_reference")
#: samples.csv columns: text metrics for VQA/report rows, grounding_* for grounded rows (their keyword
#: precision/recall/F1 would collide with the text columns of the same name).
CSV_COLUMNS = ("qid", "task", "answer_type", "language", "prediction", "reference", *TEXT_METRICS,
               "grounding_n_predicted", "grounding_n_reference", *(f"grounding_{m}" for m in GROUNDING_METRICS),
               "error")
PREDICTIONS_NOTE = ("predictions mode scores text tasks only (VQA, report): a predictions file carries no boxes "
                    "or masks, so grounding is not scored")
_PIXEL_CACHE = 64  # decoded benchmark images kept while scoring (questions share images)
_NAMED_MISSING = 5  # benchmark qids named in the missing-answers warning

Progress = Callable[[int, int], None]


class EvaluationError(RadgroundError):
    """An evaluation cannot run as asked: a bad predictions file, an unknown benchmark, conflicting inputs."""


@dataclass
class EvalItem:
    """One scored question / report / grounded slice. ``pixels`` loads its image on demand."""

    qid: str
    task: str  # "vqa" | "report" | "detection" | "segmentation"
    answer_type: str  # "CLOSED" | "OPEN" for vqa; "" otherwise
    language: str
    prompt: str
    reference: str
    pixels: Callable[[], torch.Tensor] | None = None
    grounding_reference: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    metrics_path: Path
    samples_path: Path
    run_id: str
    test_set: dict[str, str]

    @property
    def test_set_key(self) -> str:
        return self.test_set["key"]


# ------------------------------------------------------------------------------------ benchmarks


def _load_benchmark(settings: Any, name: str, data_dir: Path | None, split: str):
    from models.benchmarks import load_slake, load_vqa_rad

    if name not in BENCHMARKS:
        raise EvaluationError(f"benchmark {name!r}: expected one of {', '.join(BENCHMARKS)}.")
    if name == "slake":
        folder = data_dir if data_dir is not None else settings.train.slake_dir
        if folder is None:
            raise EvaluationError("benchmark slake: no folder given; pass --data DIR (the folder holding imgs/ and "
                                  "test.json) or set train.slake_dir.")
        return load_slake(folder, split)
    folder = data_dir if data_dir is not None else settings.train.vqa_rad_dir
    if folder is None:
        raise EvaluationError("benchmark vqa-rad: no folder given; pass --data DIR (the folder holding the JSON list "
                              "and its images) or set train.vqa_rad_dir.")
    return load_vqa_rad(folder, split, split_file=settings.train.vqa_rad_split_file)


def benchmark_digest(dataset: Any) -> str:
    """sha256 over the split's questions as the loader returns them (qid, question, answer, answer_type,
    image name), then every image used (name, size, bytes) in name order: a changed answer or image
    changes the digest, a moved folder does not."""
    h = hashlib.sha256()
    images: dict[str, Path] = {}
    for item in dataset.items:
        row = [item.qid, item.question, item.answer, item.answer_type, item.image_id]
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        images.setdefault(item.image_id, item.image)
    for name in sorted(images):
        data = images[name].read_bytes()
        h.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def _benchmark_items(dataset: Any) -> list[EvalItem]:
    from models.benchmarks import benchmark_pixels

    cache: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def loader(path: Path) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if path not in cache:
                cache[path] = benchmark_pixels(path)
                while len(cache) > _PIXEL_CACHE:
                    cache.popitem(last=False)
            return cache[path]
        return load

    return [EvalItem(qid=item.qid, task="vqa", answer_type=item.answer_type, language="en",
                     prompt=vqa_prompt(item.question, "en"), reference=item.answer, pixels=loader(item.image))
            for item in dataset.items]


def evaluate_benchmark(settings: Any, name: str, data_dir: Path | str | None, split: str = "test", *,
                       model: tuple[Any, Any] | None = None, model_info: dict | None = None,
                       predictions: Path | str | None = None, out: Path | str,
                       progress: Progress | None = None) -> EvalResult:
    """Score a model, or a predictions file, on SLAKE's or VQA-RAD's ``split`` (see the module docstring).

    ``data_dir`` None takes ``train.slake_dir`` / ``train.vqa_rad_dir``. Exactly one of ``model``
    ((model, processor)) and ``predictions`` is given; ``model_info`` describes the model for
    metrics.json and MLflow (``ModelSource.describe()`` of models/checkpoints.py).
    """
    _one_source(model, predictions)
    dataset = _load_benchmark(settings, name, Path(data_dir) if data_dir is not None else None, split)
    digest = benchmark_digest(dataset)
    test_set = {"kind": "benchmark", "name": name, "split": split, "digest": digest,
                "key": f"{name}-{split}-{digest[:12]}"}
    items = _benchmark_items(dataset)
    prompts = {"vqa.en": vqa_prompt("{question}", "en")}
    return _run(settings, items, test_set=test_set, prompts=prompts, model=model, info=model_info,
                predictions=predictions, out=Path(out), progress=progress, name_missing=True)


# ------------------------------------------------------------------------------------ versions

_VQA_COLUMNS = ["study_uid", "image_id", "patient_pseudonym", "language", "question", "answer", "choices",
                "question_type"]


def _grounding_tasks(settings: Any) -> tuple[str, ...]:
    mode = settings.train.grounding
    return ("detection", "segmentation") if mode == "mixed" else (mode,)


def _study_entry(entries: list) -> Any:
    """The slice a study-level item (report, study VQA) is asked on: the middle ungrounded slice of the
    study in the version's order (grounded slices are the grounding task's), else the middle slice."""
    pool = [e for e in entries if not e.grounded] or entries
    return pool[len(pool) // 2]


def _version_items(settings: Any, ds: Any, *, with_grounding: bool) -> list[EvalItem]:
    """The split's VQA rows, reports and (``with_grounding``) grounded slices, in a fixed order.

    Uses VersionDataset's index (entries, label rows, ``pixels``) so the images, report texts and
    grounding references are exactly those training sees.
    """
    import pyarrow as pa

    from models.data import model_pixels, read_version_table

    entries = ds.entries
    by_image = {e.image_id: e for e in entries}
    by_study: dict[str, list] = defaultdict(list)
    for e in entries:
        by_study[e.study_uid].append(e)

    def loader(entry: Any) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            values, modality = ds.pixels(entry)
            return model_pixels(values, modality)
        return load

    items: list[EvalItem] = []
    # VQA: every row of the split's patients, in table order; qid = image (or study) UID + position.
    vqa = read_version_table(ds.version_dir, ds.manifest, "vqa", _VQA_COLUMNS,
                             pa.array(sorted(ds.patients), pa.string()))
    seen: dict[str, int] = defaultdict(int)
    skipped = 0
    for row in ([] if vqa is None else vqa.to_pylist()):
        anchor = row["image_id"] or row["study_uid"]
        position = seen[anchor]
        seen[anchor] += 1
        entry = by_image.get(row["image_id"]) if row["image_id"] else None
        if entry is None and by_study.get(row["study_uid"]):
            entry = _study_entry(by_study[row["study_uid"]])
        if entry is None:
            skipped += 1
            continue
        choices = row["choices"] or ()
        kind = row.get("question_type") or ("multiple" if choices else "open")
        items.append(EvalItem(
            qid=f"vqa:{anchor}:{position}", task="vqa", answer_type="OPEN" if kind == "open" else "CLOSED",
            language=row["language"], prompt=vqa_prompt(row["question"], row["language"], choices),
            reference=row["answer"].strip(), pixels=loader(entry)))
    # Reports: one item per study and language (the report's own, and its full translation).
    for study in ds.report_studies:
        if not by_study.get(study):
            skipped += 1
            continue
        entry = _study_entry(by_study[study])
        for language, text in sorted(ds.report_languages(entry).items()):
            items.append(EvalItem(qid=f"report:{study}:{language}", task="report", answer_type="",
                                  language=language, prompt=PROMPTS["report"][language], reference=text,
                                  pixels=loader(entry)))
    if skipped:
        log.warning("version %s split %s: %d VQA or report item(s) have no slice in the images table; not scored",
                    ds.digest[:16], ds.split, skipped)
    if with_grounding:
        items += _grounding_items(settings, ds, loader)
    return items


def _grounding_items(settings: Any, ds: Any, loader: Callable) -> list[EvalItem]:
    """One item per grounded slice, language and task; the reference is built as models/data.py builds
    the training target: spans in text order, detection boxes per (span, class) as the union box of the
    class's components on the 224 grid, segmentation masks per span (union of its classes) resized to 224."""

    from models.data import detection_spans, span_mask, spans_in_text_order

    items: list[EvalItem] = []
    for entry in ds.entries:
        if not entry.grounded:
            continue
        rows = ds.grounding_rows(entry.image_id)
        for language in sorted({r["language"] for r in rows}):
            by_sentence: dict[int, list[dict]] = defaultdict(list)
            for r in rows:
                if r["language"] == language:
                    by_sentence[r["sentence_index"]].append(r)
            for task in _grounding_tasks(settings):
                reference: list[tuple[str, Any]] = []
                for index in sorted(by_sentence):
                    group = by_sentence[index]
                    sentence = group[0]["sentence"]
                    spans = spans_in_text_order(group)
                    if task == "detection":
                        reference += [(sentence[s.start:s.end], s.box) for s in detection_spans(spans)]
                    else:
                        reference += [(sentence[s:e], span_mask(span_rows).numpy()) for (s, e), span_rows in spans]
                items.append(EvalItem(qid=f"{task}:{entry.image_id}:{language}", task=task, answer_type="",
                                      language=language, prompt=PROMPTS[task][language],
                                      reference="; ".join(k for k, _ in reference), pixels=loader(entry),
                                      grounding_reference=reference))
    return items


def _version_prompts(items: Sequence[EvalItem]) -> dict[str, str]:
    """The prompt templates used, per task and language (``{question}`` / ``{choices}`` stand for the item's)."""
    prompts: dict[str, str] = {}
    for item in items:
        if item.task == "vqa":
            with_choices = "Options:" in item.prompt or "Optionen:" in item.prompt
            key = f"vqa_choices.{item.language}" if with_choices else f"vqa.{item.language}"
            prompts[key] = vqa_prompt("{question}", item.language, ("{choices}",) if with_choices else ())
        else:
            prompts[f"{item.task}.{item.language}"] = PROMPTS[item.task][item.language]
    return dict(sorted(prompts.items()))


def evaluate_version(settings: Any, version: str, split: str = "test", *, model: tuple[Any, Any] | None = None,
                     model_info: dict | None = None, predictions: Path | str | None = None, out: Path | str,
                     progress: Progress | None = None) -> EvalResult:
    """Score a model (VQA, reports, grounding) or a predictions file (VQA, reports) on a version's split."""
    from models.data import VersionDataset, resolve_version

    _one_source(model, predictions)
    folder = resolve_version(settings, version)
    ds = VersionDataset(folder, split, allow_test=True, seed=settings.train.seed,
                        grounding=settings.train.grounding, slices="all")
    items = _version_items(settings, ds, with_grounding=predictions is None)
    digest = ds.digest
    test_set = {"kind": "version", "name": "version", "split": split, "digest": digest,
                "key": f"version-{digest[:16]}-{split}"}
    prompts = _version_prompts(items)
    if predictions is None:  # the grounding prompts are logged even when the split has no grounded slice
        for task in _grounding_tasks(settings):
            for language in ("de", "en"):
                prompts.setdefault(f"{task}.{language}", PROMPTS[task][language])
        prompts = dict(sorted(prompts.items()))
    return _run(settings, items, test_set=test_set, prompts=prompts, model=model, info=model_info,
                predictions=predictions, out=Path(out), progress=progress, name_missing=False, version=True)


# ------------------------------------------------------------------------------------ answers


def _one_source(model: Any, predictions: Any) -> None:
    if (model is None) == (predictions is None):
        raise EvaluationError("evaluation needs exactly one source of answers: a model (--model) or a predictions "
                              "file (--predictions), not " + ("both." if model is not None else "neither."))


def read_predictions(path: Path | str, qids: Sequence[str]) -> dict[str, str]:
    """{qid: answer} from a JSON-lines file; every qid must be one of ``qids``, at most once.

    Errors name the file and the line, never the line's content (a file could hold anything).
    """
    path = Path(path)
    known = set(qids)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EvaluationError(f"predictions file {path} does not exist; pass the JSON-lines file of answers.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"predictions file {path}: cannot be read as UTF-8 text ({type(exc).__name__}); "
                              "write it as JSON lines {\"qid\": …, \"answer\": \"…\"}.") from None
    answers: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EvaluationError(f"predictions file {path}, line {number}: not a JSON object; write one "
                                  "{\"qid\": …, \"answer\": \"…\"} per line.") from None
        if not isinstance(record, dict) or "qid" not in record:
            raise EvaluationError(f"predictions file {path}, line {number}: no \"qid\"; write one "
                                  "{\"qid\": …, \"answer\": \"…\"} per line.")
        if not isinstance(record.get("answer"), str):
            raise EvaluationError(f"predictions file {path}, line {number}: \"answer\" is missing or not a string; "
                                  "write the answer as a JSON string (\"\" for no answer).")
        qid = record["qid"]
        qid = str(qid) if isinstance(qid, (str, int)) and not isinstance(qid, bool) else None
        if qid is None or qid not in known:
            raise EvaluationError(f"predictions file {path}, line {number}: its qid is not a question of this test "
                                  "set; check the file was made for this benchmark (or version) and split.")
        if qid in answers:
            raise EvaluationError(f"predictions file {path}, line {number}: its qid was already answered on line "
                                  f"{first_line[qid]}; keep one answer per question.")
        answers[qid] = record["answer"]
        first_line[qid] = number
    return answers


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Answer:
    text: str
    predicted: list[tuple[str, Any]] = field(default_factory=list)  # grounding: (keyword, box | mask)
    error: str | None = None


def _model_answer(model: Any, processor: Any, item: EvalItem, max_new_tokens: int) -> _Answer:
    task = item.task if item.task in ("detection", "segmentation") else "text"
    pred = model.predict(processor, item.pixels(), item.prompt, task, max_new_tokens=max_new_tokens)
    if task == "text":  # the target was escape_text(answer): undo it, as the decoders do for grounded text
        return _Answer(tokens.unescape_text(pred.plain if pred.plain is not None else pred.text).strip())
    plain = pred.plain or ""
    if task == "detection":
        predicted = [(plain[s.start:s.end], s.box) for s in pred.spans if s.box is not None]
    else:
        predicted = [(plain[s:e], mask) for (s, e), mask in zip(pred.spans, pred.masks, strict=True)]
    return _Answer("; ".join(k for k, _ in predicted), predicted, pred.error)


# ------------------------------------------------------------------------------------ scoring


def _empty_text() -> dict[str, Any]:
    return {"n": 0, **dict.fromkeys(TEXT_METRICS)}


def _empty_grounding() -> dict[str, Any]:
    return {"n": 0, **dict.fromkeys(GROUNDING_COUNTS, 0), **dict.fromkeys(GROUNDING_METRICS)}


def _clean(value: Any) -> Any:
    """JSON-safe numbers: numpy scalars to Python, NaN/inf to None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _section(summary: dict) -> dict[str, Any]:
    return {k: _clean(v) for k, v in summary.items()}


def _score(items: Sequence[EvalItem], answers: Sequence[_Answer], *, version: bool, grounding_scored: bool,
           grounding_tasks: Sequence[str]) -> tuple[dict[str, dict], list[dict]]:
    from models.metrics import GroundingSample, grounding_scores, text_scores, vqa_scores

    rows: list[dict[str, Any]] = [{"qid": i.qid, "task": i.task, "answer_type": i.answer_type,
                                   "language": i.language, "prediction": a.text, "reference": i.reference,
                                   "error": a.error or ""} for i, a in zip(items, answers, strict=True)]
    sections: dict[str, dict] = {}
    vqa = [n for n, i in enumerate(items) if i.task == "vqa"]
    sections.update({k: _section(v) for k, v in vqa_scores(
        [(items[n].answer_type, answers[n].text, items[n].reference) for n in vqa]).items()})
    # Per-sample text metrics come from the group they are summarised in: CIDEr's document
    # frequencies are the group's, so a row's cider matches its section's.
    groups = [[n for n in vqa if items[n].answer_type == t] for t in ("CLOSED", "OPEN")]
    report = [n for n, i in enumerate(items) if i.task == "report"]
    if version:
        sections["report"] = _empty_text()
        if report:
            scores = text_scores([answers[n].text for n in report], [items[n].reference for n in report])
            sections["report"] = _section(scores.summary)
    for group in [*groups, report]:
        if group:
            per = text_scores([answers[n].text for n in group], [items[n].reference for n in group]).per_sample
            for n, values in zip(group, per, strict=True):
                rows[n].update({k: _clean(values.get(k)) for k in TEXT_METRICS})
    if version:
        grounded = [n for n, i in enumerate(items) if i.task in ("detection", "segmentation")]
        sections["grounding"] = _empty_grounding()
        if grounding_scored:
            sample = {n: GroundingSample(predicted=answers[n].predicted, reference=items[n].grounding_reference)
                      for n in grounded}
            if grounded:
                sections["grounding"] = {"n": len(grounded), **_section(grounding_scores(list(sample.values())))}
            if len(grounding_tasks) > 1:  # mixed: each task also on its own
                for task in grounding_tasks:
                    mine = [sample[n] for n in grounded if items[n].task == task]
                    sections[f"grounding_{task}"] = ({"n": len(mine), **_section(grounding_scores(mine))}
                                                     if mine else _empty_grounding())
            for n in grounded:
                one = grounding_scores([sample[n]])
                rows[n]["grounding_n_predicted"] = _clean(one.get("n_predicted"))
                rows[n]["grounding_n_reference"] = _clean(one.get("n_reference"))
                rows[n].update({f"grounding_{k}": _clean(one.get(k)) for k in GROUNDING_METRICS})
    return sections, rows


def _write_samples(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS})


def _run(settings: Any, items: list[EvalItem], *, test_set: dict, prompts: dict[str, str], model: Any, info: Any,
         predictions: Path | str | None, out: Path, progress: Progress | None, name_missing: bool,
         version: bool = False) -> EvalResult:
    from radground import lineage

    total = len(items)
    missing = 0
    if predictions is not None:
        path = Path(predictions)
        given = read_predictions(path, [i.qid for i in items])
        absent = [i.qid for i in items if i.qid not in given]
        missing = len(absent)
        if missing:
            named = f" (e.g. {', '.join(absent[:_NAMED_MISSING])})" if name_missing else ""
            log.warning("predictions file: %d of %d questions have no answer%s; each is scored as an empty answer",
                        missing, total, named)
        answers = [_Answer(given.get(i.qid, "")) for i in items]
        info = {"ref": "predictions", "kind": "predictions", "sha256": _file_sha256(path)}
        if progress is not None:
            progress(total, total)
    else:
        net, processor = model
        answers = []
        if progress is not None:
            progress(0, total)
        with torch.no_grad():
            for done, item in enumerate(items, start=1):
                answers.append(_model_answer(net, processor, item, settings.model.max_new_tokens))
                if progress is not None:
                    progress(done, total)
        base = {"ref": None, "kind": None, "run_id": None, "model_name": None, "model_version": None,
                "dataset_digest": None}
        info = {**base, **(info or {})}
    sections, rows = _score(items, answers, version=version, grounding_scored=predictions is None,
                            grounding_tasks=_grounding_tasks(settings) if version else ())
    metrics: dict[str, Any] = dict(sections)
    metrics.update({"test_set": test_set, "model": info, "prompts": prompts, "missing": missing,
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds")})
    if predictions is not None and version:
        metrics["note"] = PREDICTIONS_NOTE
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, samples_path = out / "metrics.json", out / "samples.csv"
    metrics_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_samples(samples_path, rows)
    run_id = lineage.log_evaluation(settings, model=info, test_set=test_set, prompts=prompts, metrics=sections,
                                    files=[metrics_path, samples_path])
    # The local copy also names its run (the logged artifact cannot: the run id exists only after logging),
    # so `radground models register --eval DIR` can link the version to this evaluation run.
    metrics["run_id"] = run_id
    metrics_path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("evaluation of %s on %s: %d items, run %s", info.get("ref"), test_set["key"], total, run_id)
    return EvalResult(metrics=metrics, metrics_path=metrics_path, samples_path=samples_path, run_id=run_id,
                      test_set=test_set)


__all__ = ["BENCHMARKS", "EvalItem", "EvalResult", "EvaluationError", "benchmark_digest",
           "evaluate_benchmark", "evaluate_version", "read_predictions"]

"""The MLflow model registry of RadGrounder: registered model ``model.registry_name`` (default
``radgrounder``), its versions, aliases ``champion`` / ``challenger`` and the promotion gate.

A version is an MLflow **pyfunc** (:class:`RadGrounderPyfunc`) whose one artifact ``checkpoint`` is the
``save_pretrained`` folder (model weights incl. the mask decoder, processor files, lineage.json; the
optimizer state is left out). ``mlflow.transformers`` cannot hold this model (a custom class with a
mask head), and the pyfunc loads it with models.checkpoints.load_model. The model code (packages
``models`` and ``radground``) travels as the pyfunc's code paths, so a serving host needs only the
pinned requirements.

pyfunc input: a pandas DataFrame, one row per image, columns

* ``image``: the pixels as base64 of a ``.npy`` file (``numpy.save``) of a float32 array ``[3, 224, 224]``
  in ``[-1, 1]`` (what models.data gives; :func:`encode_image` makes it). Base64 .npy, not a nested list:
  exact float32, a tenth of the size of JSON numbers;
* ``prompt``: the prefix (e.g. models.data.PROMPTS' ``Caption this image:``);
* ``task``: ``text`` | ``detection`` | ``segmentation`` (optional, default ``text``).

Param ``max_new_tokens`` (default ``model.max_new_tokens`` at registration). Output: a DataFrame with
``text`` (radground/tokens.py form), ``plain`` (the sentence without markup), ``spans`` (JSON list:
detection ``{keyword, start, end, class_id, box: [x1, y1, x2, y2]}`` in pixels of the 224 x 224 input;
segmentation ``{keyword, start, end, rle, rows, cols}`` with radground.masks.encode_rle's COCO RLE) and
``error`` (why grounding markup was dropped, else empty).

Version tags: ``radground.dataset_digest``, ``radground.code_version``, ``radground.training_run``,
``radground.checkpoint`` (URI), ``radground.preset``; per evaluated test set ``radground.eval.<key>``
(compact JSON {section.metric: value}) and ``radground.eval_run.<key>`` (the evaluation run id); after a
forget or purge of a patient it was trained on, ``radground.contains_forgotten=true``.

Promotion (:func:`promote`): the first model passes; later ones pass when, on one test set both were
evaluated on, every metric of ``model.promotion_metrics`` that both have is >= the champion's minus
``model.promotion_tolerance``. On success ``champion`` moves to the version, the version loses
``challenger``, and the replaced champion gets ``previous-champion`` (so a rollback target stays named).
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import math
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.checkpoints import CHECKPOINT_ARTIFACT, ModelError, ModelSource, checkpoint_source, load_model
from radground import lineage
from radground.lineage import _mlflow

if TYPE_CHECKING:
    from radground.settings import Settings

mlflow = _mlflow()  # telemetry off before the first import of mlflow (radground.lineage)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
EVAL_TAG = "radground.eval."
EVAL_RUN_TAG = "radground.eval_run."
TAGS = {"digest": lineage.MODEL_DIGEST_TAG, "code": "radground.code_version",
        "run": lineage.MODEL_TRAINING_RUN_TAG, "checkpoint": "radground.checkpoint", "preset": "radground.preset"}
SKIPPED_FILES = ("trainer_state.pt",)  # optimizer and schedule state: for resuming training, not for serving
# What the pyfunc needs at serving time, pinned to radground's own dependency pins (pyproject.toml);
# listed, not inferred: MLflow's inference imports the model and may reach the network.
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "numpy", "pandas", "scipy", "pycocotools", "pillow",
                    "pydantic", "pydantic-settings", "pyyaml")
TASKS = ("text", "detection", "segmentation")
_KEY = re.compile(r"[^A-Za-z0-9_\-.]")


# --------------------------------------------------------------------------- the pyfunc


def encode_image(pixels: Any) -> str:
    """A float32 ``[3, 224, 224]`` array (numpy or torch) -> the base64 .npy string the pyfunc reads."""
    array = np.asarray(pixels.detach().cpu().numpy() if hasattr(pixels, "detach") else pixels, dtype=np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str) -> np.ndarray:
    """The inverse of :func:`encode_image`; ValueError when it is not a float32 [3, 224, 224] array."""
    try:
        array = np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"image: not base64 of a .npy file ({type(exc).__name__}); encode it with "
                         "models.registry.encode_image") from None
    if array.shape != (3, 224, 224):
        raise ValueError(f"image: shape {tuple(array.shape)}; expected (3, 224, 224) float32 in [-1, 1]")
    return array.astype(np.float32, copy=False)


def prediction_row(prediction) -> dict[str, str]:
    """A GroundedPrediction -> the pyfunc's output row (spans as JSON, masks as RLE)."""
    from radground.masks import encode_rle

    plain = prediction.plain or ""
    spans = []
    if prediction.masks:
        for (start, end), mask in zip(prediction.spans, prediction.masks, strict=True):
            spans.append({"keyword": plain[start:end], "start": start, "end": end, "rle": encode_rle(mask),
                          "rows": int(mask.shape[0]), "cols": int(mask.shape[1])})
    else:
        for span in prediction.spans:
            spans.append({"keyword": span.keyword, "start": span.start, "end": span.end, "class_id": span.class_id,
                          "box": [round(float(v), 2) for v in span.box] if span.box is not None else None})
    return {"text": prediction.text, "plain": plain, "spans": json.dumps(spans), "error": prediction.error or ""}


class RadGrounderPyfunc(mlflow.pyfunc.PythonModel):
    """RadGrounder as an MLflow pyfunc over its checkpoint folder (artifact ``checkpoint``)."""

    def __init__(self, max_new_tokens: int = 64) -> None:
        self.max_new_tokens = int(max_new_tokens)
        self.model = self.processor = None

    def load_context(self, context) -> None:
        import torch

        source = checkpoint_source(context.artifacts[CHECKPOINT_ARTIFACT], ref="pyfunc")
        self.model, self.processor = load_model(source, device="cuda" if torch.cuda.is_available() else "cpu")

    # model_input: pd.DataFrame is one of the hints MLflow does not infer a schema from (the explicit
    # signature stands) and stops its "add type hints" warning at class creation.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """model_input: a DataFrame with image (base64 .npy), prompt, task; returns text, plain, spans, error."""
        import torch

        max_new = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        rows = []
        for index, row in enumerate(model_input.to_dict("records")):
            task = row.get("task") or "text"
            if task not in TASKS:
                raise ValueError(f"row {index}: task {task!r}; expected one of {', '.join(TASKS)}")
            image = torch.from_numpy(decode_image(row["image"]).copy())
            prediction = self.model.predict(self.processor, image, str(row["prompt"]), task=task,
                                            max_new_tokens=max_new)
            rows.append(prediction_row(prediction))
        return pd.DataFrame(rows, columns=["text", "plain", "spans", "error"])


def _signature(max_new_tokens: int):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("string", "image"), ColSpec("string", "prompt"),
                     ColSpec("string", "task", required=False)])
    outputs = Schema([ColSpec("string", name) for name in ("text", "plain", "spans", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs,
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))]))


def pip_requirements() -> list[str]:
    """Pinned serving requirements: radground's pins (its installed metadata), else the installed version."""
    pins = {}
    for requirement in importlib.metadata.requires("radground") or []:
        found = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([^;\s]+)\s*", requirement)
        if found:
            pins[found[1].lower()] = found[2]
    out = []
    for name in SERVING_PACKAGES:
        version = pins.get(name) or importlib.metadata.version(name)
        out.append(f"{name}=={version}")
    return out


def _code_paths() -> list[str]:
    """The ``models`` package (this file's folder) and ``radground``: the code the pyfunc imports."""
    import radground

    return [str(Path(__file__).resolve().parent), str(Path(radground.__file__).resolve().parent)]


def save_pyfunc(source: ModelSource, dest: Path, *, max_new_tokens: int = 64) -> Path:
    """Write the pyfunc model folder for ``source`` at ``dest`` (the checkpoint without optimizer state)."""
    with tempfile.TemporaryDirectory(prefix="radground-register-") as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        shutil.copytree(source.folder, checkpoint, ignore=shutil.ignore_patterns(*SKIPPED_FILES, "__pycache__"))
        with warnings.catch_warnings():
            # The signature is given: MLflow's advice to add an input example (a 224 px image as base64 in
            # the MLmodel file) does not apply.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            mlflow.pyfunc.save_model(
                str(dest), python_model=RadGrounderPyfunc(max_new_tokens),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)}, code_paths=_code_paths(),
                pip_requirements=pip_requirements(), signature=_signature(max_new_tokens))
    return dest


# --------------------------------------------------------------------------- registering


def register(settings: Settings, source: ModelSource, *, evaluation: dict | None = None) -> dict:
    """Add ``source`` as a new version of ``model.registry_name`` with alias ``challenger``.

    Logged into its training run when the checkpoint has one (so the version's run is the training
    run), else into a new run of the training experiment. ``evaluation``: {test_set_key, metrics
    ({section: {metric: v}} as in metrics.json, or flattened "section.metric"), eval_run_id} is attached
    as with :func:`attach_evaluation`. Returns the version's :func:`show_version` dict plus ``champion``
    (the current champion's version, or None) and ``note`` (what to do next).
    """
    import radground

    name = settings.model.registry_name
    run_id = source.run_id or source.lineage.get("training_run_id")
    if run_id:
        try:
            run = lineage.run_checkpoint_uri(settings, run_id)
        except lineage.LineageError as exc:
            raise ModelError(f"model {source.ref}: its lineage.json names training run {run_id}, which this tracking "
                             f"store does not have ({exc}). Register where it was trained (the same data_dir or "
                             "mlflow.tracking_uri), so the version leads back to its data.") from None
        if run.get("kind") not in ("training", ""):
            raise ModelError(f"model {source.ref}: run {run_id} is a {run['kind']} run, not a training run.")
    digest = source.dataset_digest
    checkpoint_uri = lineage._without_userinfo(str(source.checkpoint_uri or source.folder))
    tags = {TAGS["digest"]: str(digest or ""), TAGS["code"]: str(source.lineage.get("code_version") or
                                                                  radground.__version__),
            TAGS["run"]: str(run_id or ""), TAGS["checkpoint"]: checkpoint_uri,
            TAGS["preset"]: str(source.lineage.get("preset") or "")}
    tags = {k: v for k, v in tags.items() if v}
    champion = _alias_version(settings, name, CHAMPION)
    with tempfile.TemporaryDirectory(prefix="radground-pyfunc-") as tmp:
        with lineage.quiet_mlflow(settings):
            folder = save_pyfunc(source, Path(tmp) / "model", max_new_tokens=settings.model.max_new_tokens)
        step = source.lineage.get("step")
        run_name = f"{(digest or 'model')[:12]}-step{step}" if step is not None else Path(source.folder).name
        version = lineage.register_model_folder(settings, name, folder, run_id=run_id, run_name=run_name, tags=tags)
    lineage.set_model_alias(settings, name, CHALLENGER, version["version"])
    if evaluation:
        attach_evaluation(settings, name, version["version"], test_set_key=evaluation["test_set_key"],
                          metrics=evaluation["metrics"], eval_run_id=evaluation.get("eval_run_id"))
    shown = show_version(settings, version["version"])
    number = shown["version"]
    if champion is None:
        note = (f"no champion yet: `radground models promote {number}` makes version {number} the champion "
                "(the first model passes the gate).")
    else:
        note = (f"version {number} is the challenger; champion is version {champion}. Evaluate it on the champion's "
                f"test set, then `radground models promote {number}`.")
    return {**shown, "champion": champion, "note": note}


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json ({section: {metric: v}}, plus test_set, model, missing…) or {"section.metric": v} ->
    {"section.metric": float}: the scored sections' numbers only (counts ``n`` and None dropped)."""
    from models.metrics import SCORED_SECTIONS

    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            if key in SCORED_SECTIONS:
                flat.update({f"{key}.{inner}": float(number) for inner, number in value.items()
                             if inner != "n" and _finite(number)})
        elif str(key).split(".", 1)[0] in SCORED_SECTIONS and _finite(value):
            flat[str(key)] = float(value)
    return flat


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def attach_evaluation(settings: Settings, name: str, version: str, *, test_set_key: str, metrics: dict[str, float],
                      eval_run_id: str | None) -> None:
    """Store one evaluation on a version: ``radground.eval.<key>`` = compact JSON {section.metric: value} and
    ``radground.eval_run.<key>`` = the evaluation run id (left out when None). A later evaluation on the same
    key replaces it."""
    key = _KEY.sub("_", test_set_key)
    if not key:
        raise ModelError("attach_evaluation: test_set_key is empty; pass the evaluation's test set key "
                         "(e.g. version-<digest16>-test).")
    flat = flatten_metrics(metrics)
    if not flat:
        raise ModelError(f"attach_evaluation: no numeric metric for test set {key}; pass metrics.json's sections.")
    text = json.dumps(flat, separators=(",", ":"), sort_keys=True)
    if len(text) > 5000:  # MLflow's tag value limit is 5000 characters
        keep = set(settings.model.promotion_metrics)
        text = json.dumps({k: v for k, v in flat.items() if k in keep}, separators=(",", ":"), sort_keys=True)
    tags = {EVAL_TAG + key: text}
    if eval_run_id:
        tags[EVAL_RUN_TAG + key] = str(eval_run_id)
    lineage.set_model_version_tags(settings, name, str(version), tags)


# --------------------------------------------------------------------------- reading


def _alias_version(settings: Settings, name: str, alias: str) -> str | None:
    for version in lineage.model_versions(settings, name):
        if alias in version["aliases"]:
            return version["version"]
    return None


def _summary(version: dict) -> dict[str, Any]:
    tags = version["tags"]
    evaluations, eval_runs = {}, {}
    for key, value in tags.items():
        if key.startswith(EVAL_TAG):
            try:
                evaluations[key[len(EVAL_TAG):]] = json.loads(value)
            except ValueError:
                continue
        elif key.startswith(EVAL_RUN_TAG):
            eval_runs[key[len(EVAL_RUN_TAG):]] = value
    return {"name": version["name"], "version": version["version"], "aliases": version["aliases"],
            "created": version["created"], "dataset_digest": tags.get(TAGS["digest"]),
            "training_run": tags.get(TAGS["run"]) or None, "checkpoint": tags.get(TAGS["checkpoint"]),
            "preset": tags.get(TAGS["preset"]), "code_version": tags.get(TAGS["code"]),
            "evaluations": evaluations, "eval_runs": eval_runs,
            "contains_forgotten": tags.get(lineage.FORGOTTEN_TAG) == "true"}


def list_versions(settings: Settings) -> list[dict]:
    """Every version of the registered model, oldest first: version, aliases, created, dataset digest,
    training run, checkpoint, preset, code version, evaluations {test set key: {metric: value}},
    eval_runs, contains_forgotten."""
    return [_summary(v) for v in lineage.model_versions(settings, settings.model.registry_name)]


def _uri(settings: Settings, ref: str | int) -> str:
    text = str(ref).strip()
    if text.startswith("models:/"):
        return text
    if text.startswith("@"):
        return f"models:/{settings.model.registry_name}{text}"
    if text.isdigit():
        return f"models:/{settings.model.registry_name}/{text}"
    raise ModelError(f"model version {text!r}: expected a number (3), an alias (@champion) or a models:/ URI.")


def show_version(settings: Settings, ref: str | int) -> dict:
    """One version (``3``, ``@champion``, ``models:/radgrounder/3``): the list's fields plus run_id, source, status
    and all tags."""
    try:
        version = lineage.model_version(settings, _uri(settings, ref))
    except lineage.LineageError as exc:
        raise ModelError(str(exc)) from None
    return {**_summary(version), "run_id": version["run_id"], "source": version["source"],
            "status": version["status"], "tags": version["tags"]}


# --------------------------------------------------------------------------- the promotion gate


def promote(settings: Settings, version: str | None = None, *, test_set: str | None = None) -> dict:
    """Make ``version`` (default: the challenger) the champion when the gate passes.

    Returns {promoted, name, version, champion (the champion before), test_set, compared:
    [{metric, challenger, champion, floor, passed}], blocked_by ({metric, challenger, champion, floor}
    of the first failing metric, else None), reason}. Refusals are results (promoted False), not errors;
    a version or alias that does not exist is a ModelError.
    """
    name = settings.model.registry_name
    if version is None:
        if _alias_version(settings, name, CHALLENGER) is None:
            raise ModelError(f"promote: {name!r} has no challenger. Register a model first (radground models register "
                             "RUN_ID|CHECKPOINT) or name the version to promote.")
        version = f"@{CHALLENGER}"
    candidate = show_version(settings, version)
    number = candidate["version"]
    champion_number = _alias_version(settings, name, CHAMPION)
    result: dict[str, Any] = {"promoted": False, "name": name, "version": number, "champion": champion_number,
                              "test_set": None, "compared": [], "blocked_by": None}
    if candidate["contains_forgotten"]:
        return {**result, "reason": f"version {number} is tagged {lineage.FORGOTTEN_TAG}=true: it was trained on a "
                "patient who has since been forgotten. Retrain on a dataset version without the patient (the one "
                "forget wrote) and register that model."}
    if champion_number == number:
        return {**result, "reason": f"version {number} is already the champion; nothing changed."}
    if champion_number is None:
        _make_champion(settings, name, number, None)
        return {**result, "promoted": True,
                "reason": f"version {number} is the first champion of {name!r} (no champion to compare with)."}
    champion = show_version(settings, champion_number)
    key, reason = _common_test_set(settings, candidate, champion, test_set)
    if key is None:
        return {**result, "reason": reason}
    ours, theirs = candidate["evaluations"][key], champion["evaluations"][key]
    metrics = [m for m in settings.model.promotion_metrics if _finite(ours.get(m)) and _finite(theirs.get(m))]
    result["test_set"] = key
    if not metrics:
        wanted = ", ".join(settings.model.promotion_metrics)
        return {**result, "reason": f"no metric of model.promotion_metrics ({wanted}) was measured for both versions "
                f"on test set {key} (version {number}: {', '.join(sorted(ours)) or 'none'}; "
                f"champion {champion_number}: {', '.join(sorted(theirs)) or 'none'}). Evaluate both with the same "
                f"tasks on {key} (radground evaluate ... --model models:/{name}/N), or set model.promotion_metrics."}
    tolerance = settings.model.promotion_tolerance
    for metric in metrics:
        floor = theirs[metric] - tolerance
        # a hair of float slack: 0.7 - 0.01 must admit 0.69
        result["compared"].append({"metric": metric, "challenger": ours[metric], "champion": theirs[metric],
                                   "floor": round(floor, 10), "passed": ours[metric] >= floor - 1e-12})
    failed = [c for c in result["compared"] if not c["passed"]]
    if failed:
        first = failed[0]
        result["blocked_by"] = {k: first[k] for k in ("metric", "challenger", "champion", "floor")}
        others = f" (and {', '.join(c['metric'] for c in failed[1:])})" if failed[1:] else ""
        return {**result, "reason": f"refused: {first['metric']} on {key} is {first['challenger']:.4f} for version "
                f"{number} vs {first['champion']:.4f} for champion {champion_number}; the gate needs >= "
                f"{first['floor']:.4f} (champion - tolerance {tolerance}){others}."}
    _make_champion(settings, name, number, champion_number)
    return {**result, "promoted": True, "reason": f"version {number} is champion: on {key} every compared metric "
            f"({', '.join(metrics)}) is >= champion {champion_number}'s - {tolerance}. Version {champion_number} is "
            f"now {PREVIOUS}."}


def _common_test_set(settings: Settings, candidate: dict, champion: dict, wanted: str | None) -> tuple[str | None, str]:
    ours, theirs = candidate["evaluations"], champion["evaluations"]
    number, other = candidate["version"], champion["version"]
    name = settings.model.registry_name
    if wanted is not None:
        key = _KEY.sub("_", wanted)
        missing = [f"version {v}" for v, have in ((number, ours), (other, theirs)) if key not in have]
        if missing:
            return None, (f"test set {key}: not evaluated for {' and '.join(missing)}. Run radground evaluate on that "
                          f"test set with --model models:/{name}/N for each, then promote again.")
        return key, ""
    common = sorted(set(ours) & set(theirs))
    if not common:
        return None, (f"version {number} and champion {other} were never evaluated on the same test set (version "
                      f"{number}: {', '.join(sorted(ours)) or 'none'}; "
                      f"champion: {', '.join(sorted(theirs)) or 'none'}). "
                      f"Evaluate version {number} on one of the champion's test sets (radground evaluate ... --model "
                      f"models:/{name}/{number}), then promote again.")
    if len(common) == 1:
        return common[0], ""
    # the newest evaluation both have: the later of the two evaluation runs' start times
    runs = {k: [candidate["eval_runs"].get(k), champion["eval_runs"].get(k)] for k in common}
    started = lineage.run_start_times(settings, sorted({r for pair in runs.values() for r in pair if r}))
    return max(common, key=lambda k: (max(started.get(r, 0) for r in runs[k] if r) if any(runs[k]) else 0, k)), ""


def _make_champion(settings: Settings, name: str, version: str, previous: str | None) -> None:
    lineage.set_model_alias(settings, name, CHAMPION, version)
    if previous is not None:
        lineage.set_model_alias(settings, name, PREVIOUS, previous)
    if _alias_version(settings, name, CHALLENGER) == version:
        lineage.set_model_alias(settings, name, CHALLENGER, None)

"""Which model a command means, and loading it: every command that takes ``--model`` (evaluate, predict,
models register) resolves its reference here.

A reference is one of

* a checkpoint folder (what ``radground train`` writes: model + processor files and ``lineage.json``);
* a training run id (32 hex): the run's best checkpoint (tag ``radground.best_checkpoint_uri``), a local
  folder or an ``s3://`` URI in the object store, downloaded once into
  ``<data_dir>/cache/models/<run>/<checkpoint>/``;
* ``models:/NAME/N`` or ``models:/NAME@alias``: a registered version (models/registry.py); its artifacts
  are downloaded once into ``<data_dir>/cache/models/registry/<NAME>/<N>/`` and the checkpoint inside
  the pyfunc folder is used.

All MLflow access goes through radground.lineage.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radground.errors import RadgroundError

if TYPE_CHECKING:
    from radground.settings import Settings

CHECKPOINT_LINEAGE = "lineage.json"
CONFIG_FILE = "config.json"
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc's artifact key (models/registry.py)
REFS = "a checkpoint folder, a training run id, models:/NAME/N or models:/NAME@alias"


class ModelError(RadgroundError):
    """A model reference cannot be resolved, loaded, registered or promoted (the message says what to do)."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the local checkpoint folder, its lineage.json, and where it came from.

    ``kind``: "checkpoint" (a folder given), "run" (a training run's best checkpoint) or "registry"
    (a registered version). ``checkpoint_uri``: where the checkpoint lives (its folder, or the
    ``s3://`` URI the training run tagged); never holds PHI.
    """

    folder: Path
    lineage: dict
    ref: str
    kind: str
    run_id: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    checkpoint_uri: str | None = None

    @property
    def dataset_digest(self) -> str | None:
        return self.lineage.get("dataset_digest")

    def describe(self) -> dict[str, Any]:
        """The ``model`` dict lineage.log_evaluation takes."""
        return {"ref": self.ref, "kind": self.kind, "run_id": self.run_id, "model_name": self.model_name,
                "model_version": self.model_version, "dataset_digest": self.dataset_digest}


def checkpoint_source(folder: Path | str, *, ref: str | None = None, kind: str = "checkpoint",
                      run_id: str | None = None, model_name: str | None = None, model_version: str | None = None,
                      checkpoint_uri: str | None = None) -> ModelSource:
    """A checkpoint folder as a ModelSource; ModelError unless it holds config.json and a valid lineage.json."""
    from radground.lineage import LineageError, read_checkpoint_lineage

    folder = Path(folder).expanduser()
    shown = ref or str(folder)
    if not folder.is_dir():
        raise ModelError(f"not a radground checkpoint: {shown} is not a folder. Give {REFS}.")
    missing = [name for name in (CONFIG_FILE, CHECKPOINT_LINEAGE) if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"not a radground checkpoint: {shown} has no {' and no '.join(missing)}. Give a "
                         "checkpoint folder that `radground train` wrote (model and processor files plus "
                         f"lineage.json), or {REFS}.")
    try:
        lineage = read_checkpoint_lineage(folder)
    except LineageError as exc:
        raise ModelError(f"not a radground checkpoint: {exc}") from None
    folder = folder.resolve()
    return ModelSource(folder=folder, lineage=lineage, ref=ref or str(folder), kind=kind,
                       run_id=run_id or lineage.get("training_run_id"), model_name=model_name,
                       model_version=model_version, checkpoint_uri=checkpoint_uri or str(folder))


def resolve_model(settings: Settings, ref: str, *, tracking_uri: str | None = None) -> ModelSource:
    """``ref`` (a checkpoint folder, a training run id, ``models:/NAME/N`` or ``models:/NAME@alias``) -> ModelSource."""
    from radground.lineage import looks_like_run_id

    text = str(ref).strip()
    if not text:
        raise ModelError(f"model reference is empty; give {REFS}.")
    if text.startswith("models:/"):
        return _from_registry(settings, text, tracking_uri)
    path = Path(text).expanduser()
    if path.exists():
        return checkpoint_source(path, ref=text)
    if looks_like_run_id(text):
        return _from_run(settings, text.lower(), tracking_uri)
    raise ModelError(f"model {text!r}: no such folder, and not a run id or models:/ URI. Give {REFS}.")


def _from_run(settings: Settings, run_id: str, tracking_uri: str | None) -> ModelSource:
    from radground.lineage import LineageError, run_checkpoint_uri

    try:
        run = run_checkpoint_uri(settings, run_id, tracking_uri=tracking_uri)
    except LineageError as exc:
        raise ModelError(str(exc)) from None
    uri = run.get("best_checkpoint_uri") or run.get("checkpoint_uri")
    if not uri:
        raise ModelError(f"run {run_id}: it names no checkpoint (no radground.best_checkpoint_uri tag; status "
                         f"{run.get('status')}). Give a run of `radground train` that wrote a checkpoint, or the "
                         "checkpoint folder itself.")
    if uri.startswith("s3://"):
        folder = _download_s3(settings, run_id, uri)
    else:
        folder = Path(uri.removeprefix("file://"))
        if not folder.is_dir():
            raise ModelError(f"run {run_id}: its best checkpoint {uri} is not on this machine. Copy it here (or "
                             "run where it was written) and give the folder, or train with an object store "
                             "(storage.backend s3) so any machine can fetch it.")
    return checkpoint_source(folder, ref=run_id, kind="run", run_id=run_id, checkpoint_uri=uri)


def _cache(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "cache" / "models"


def _complete(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / CHECKPOINT_LINEAGE).is_file()


def _download_s3(settings: Settings, run_id: str, uri: str) -> Path:
    """An s3:// checkpoint under the configured store -> ``<data_dir>/cache/models/<run>/<checkpoint>/`` (once)."""
    from radground.store import open_store

    storage = settings.storage
    root = f"s3://{storage.bucket}/{storage.prefix}"
    if storage.backend != "s3" or not uri.startswith(root):
        raise ModelError(f"run {run_id}: its checkpoint {uri} is not under the configured object store "
                         f"({root if storage.backend == 's3' else 'storage.backend is local'}). Set storage.* to the "
                         "store the run trained with.")
    key = uri[len(root):].strip("/")
    folder = _cache(settings) / run_id / key.rsplit("/", 1)[-1]
    if _complete(folder):
        return folder
    store = open_store(settings)
    keys = [k for k in store.list(key + "/") if not k.endswith("/")]
    if not keys:
        raise ModelError(f"run {run_id}: no objects under its checkpoint {uri}. The checkpoint was deleted or the "
                         "store settings point elsewhere.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".download-") as tmp:
        for name in keys:
            relative = name[len(key) + 1:]
            if relative == "trainer_state.pt":  # optimizer state: not needed to run the model
                continue
            store.get_file(name, Path(tmp) / relative)
        shutil.rmtree(folder, ignore_errors=True)
        Path(tmp).rename(folder)  # complete or absent: a half download is never used
        Path(tmp).mkdir()  # so TemporaryDirectory's cleanup finds its folder
    return folder


def _from_registry(settings: Settings, ref: str, tracking_uri: str | None) -> ModelSource:
    from radground.lineage import LineageError, download_model_version, model_version

    try:
        version = model_version(settings, ref, tracking_uri=tracking_uri)
    except LineageError as exc:
        raise ModelError(str(exc)) from None
    name, number = version["name"], version["version"]
    target = _cache(settings) / "registry" / name / number
    if not _complete(_checkpoint_in(target) or target):
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            try:
                local = download_model_version(settings, f"models:/{name}/{number}", Path(tmp) / "download",
                                               tracking_uri=tracking_uri)
            except LineageError as exc:
                raise ModelError(str(exc)) from None
            Path(local).rename(target)
    folder = _checkpoint_in(target)
    if folder is None:
        raise ModelError(f"model {ref}: version {number} of {name!r} holds no radground checkpoint (no MLmodel with a "
                         f"{CHECKPOINT_ARTIFACT!r} artifact). It was not registered by radground models register; "
                         "register a checkpoint or training run.")
    return checkpoint_source(folder, ref=ref, kind="registry", run_id=version["tags"].get("radground.training_run"),
                             model_name=name, model_version=number,
                             checkpoint_uri=version["tags"].get("radground.checkpoint"))


def _checkpoint_in(model_dir: Path) -> Path | None:
    """The checkpoint folder inside a pyfunc model folder (its MLmodel names the artifact's path)."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return None
    doc = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    artifacts = (doc.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
    path = (artifacts.get(CHECKPOINT_ARTIFACT) or {}).get("path")
    return model_dir / path if path else None


def load_model(source: ModelSource, device: str = "cpu"):
    """(model in eval mode on ``device``, processor) from the source's checkpoint folder."""
    import torch
    from transformers.utils import logging as hf_logging

    from models.radgrounder import RadGrounderForConditionalGeneration, RadGrounderProcessor

    hf_logging.disable_progress_bar()  # "Loading weights" bars: the CLI shows its own status
    try:
        processor = RadGrounderProcessor.from_pretrained(str(source.folder))
        config = json.loads((source.folder / CONFIG_FILE).read_text(encoding="utf-8"))
        # bf16 checkpoints (the PaliGemma preset) stay bf16 on a GPU, float32 on the CPU (no bf16 kernels there)
        dtype = torch.bfloat16 if config.get("dtype") == "bfloat16" and device != "cpu" else torch.float32
        model = RadGrounderForConditionalGeneration.from_pretrained(str(source.folder), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {source.ref}: the checkpoint in {source.folder} does not load ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). Was it copied whole? Re-download or give another checkpoint.") from None
    return model.to(device).eval(), processor

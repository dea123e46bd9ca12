"""Lineage: the one door to MLflow, and the record-level lineage index.

MLflow records every step: drop -> raw file hash -> image id -> dataset digest -> run ->
checkpoint. This module writes the build run of a dataset version (:func:`record_build`)
and answers lineage questions over the versions' lineage tables (:func:`lineage_index`):
which drops and raw files a version came from (``trace``), and which versions (and the
MLflow runs that consumed them) hold a patient (``where_used``).

Tracking: the embedded default is ``sqlite:///<data_dir>/mlflow/mlflow.db`` with artifacts
under ``<data_dir>/mlflow/artifacts``; production passes ``tracking_uri`` (an MLflow server).
MLflow 3.2+ sends anonymous usage telemetry by default: it is switched off here before
mlflow is first imported (``MLFLOW_DISABLE_TELEMETRY``, ``DO_NOT_TRACK``), and a telemetry
client that an earlier import already started is dropped, so nothing leaves the machine.
Everything goes through an explicit ``MlflowClient``: no global tracking URI or active run
is touched, so two builds (or a test and a build) in one process cannot interfere.

MLflow caps a dataset digest at 36 characters (``MAX_DATASET_DIGEST_SIZE``); a longer
version digest (a sha256 hex) is logged as its first 32 characters, while the dataset's
name and the input tag ``radground.version_digest`` carry the full digest.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

import radground
from radground.errors import RadgroundError
from radground.runtime import library_logs_to
from radground.schemas import arrow_schema

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from radground.settings import Settings

logger = logging.getLogger(__name__)

BUILD_CONTEXT = "build"  # the mlflow.data.context of a build run's input; training runs use "training"
VERSION_TAG = "radground.version_digest"
MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")  # each with MLflow's stderr handler
MLFLOW_DIGEST_MAX = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
PSEUDONYM_PATTERN = re.compile(r"P[0-9A-F]{20}")  # tasks.deid.patient_pseudonym's format
_PARAM_VALUE_MAX = 6000  # MLflow's param value limit
_BATCH_MAX = 100  # params per log_batch call in MLflow
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


class LineageError(RadgroundError):
    """A lineage query or record cannot be answered or written. (To move to radground/errors.py.)"""


class LineageRecord(BaseModel):
    """One image of one dataset version, back to the raw file and the drop it came from."""

    model_config = ConfigDict(extra="forbid")

    image_id: str
    drop_id: str
    source_sha256: str = Field(description="sha256 of the raw DICOM file the slice was read from.")
    series_uid: str
    study_uid: str
    patient_pseudonym: str
    version_digest: str


LINEAGE_SCHEMA = arrow_schema(LineageRecord)
LINEAGE_FILE = "lineage.parquet"


# --------------------------------------------------------------------------- MLflow access


def _mlflow():
    """Import mlflow with its telemetry off (it reads the switch when it is first imported)."""
    # Written, not read: this is the one place radground configures a third-party library
    # through its environment, because mlflow offers no other switch.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "true"
    import mlflow

    try:  # mlflow was imported earlier (by a plugin, say): drop the client it started
        from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client

        client = get_telemetry_client()
        if client is not None:
            client.flush(terminate=True)  # stop without sending what is queued
            set_telemetry_client()  # telemetry is disabled now, so this sets None
    except Exception:  # noqa: BLE001 - private API; the env switches above still hold
        logger.debug("lineage: could not reset mlflow's telemetry client", exc_info=True)
    return mlflow


def _mlflow_logs_to_data_dir(fn):
    """Run ``fn(settings, ...)`` with MLflow's log in ``<data_dir>/logs/libraries.log``, not on the terminal.

    Opening the embedded SQLite store creates or migrates its tables, and MLflow announces that
    (with alembic, for migrations) through the stderr handler it installs on import.
    """

    @functools.wraps(fn)
    def wrapper(settings: Settings, *args: Any, **kwargs: Any) -> Any:
        _mlflow()  # its import installs the handlers: route after it
        with library_logs_to(settings.data_dir, *MLFLOW_LOGGERS):
            return fn(settings, *args, **kwargs)

    return wrapper


def tracking_uri(settings: Settings, override: str | None = None) -> str:
    """The MLflow tracking URI: ``override``, else ``mlflow.tracking_uri`` (a server), else the
    embedded SQLite database under data_dir."""
    if override or settings.mlflow.tracking_uri:
        return override or settings.mlflow.tracking_uri
    folder = (settings.data_dir / "mlflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str(folder / "mlflow.db")  # absolute path: four slashes in total


def artifact_root(settings: Settings) -> Path:
    """Where the embedded default keeps MLflow artifacts."""
    return (settings.data_dir / "mlflow" / "artifacts").resolve()


def _client(settings: Settings, uri: str | None) -> MlflowClient:
    mlflow = _mlflow()
    return mlflow.MlflowClient(tracking_uri=tracking_uri(settings, uri))


def _experiment_id(client: MlflowClient, settings: Settings, name: str, embedded: bool) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = artifact_root(settings).as_uri() if embedded else None  # a server picks its own
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # a concurrent build created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def mlflow_digest(version_digest: str) -> str:
    """The digest MLflow stores for a version: itself, or its first 32 characters if longer than 36."""
    return version_digest if len(version_digest) <= MLFLOW_DIGEST_MAX else version_digest[:32]


# --------------------------------------------------------------------------- build runs


@_mlflow_logs_to_data_dir
def record_build(
    settings: Settings,
    *,
    manifest: dict,
    drops: list[str],
    stage_counts: dict[str, float],
    stage_seconds: dict[str, float],
    artifacts: list[Path],
    tracking_uri: str | None = None,
    version_uri: str | Path | None = None,
) -> str:
    """Record one dataset build as a run of experiment "dataset-builds"; returns the run id.

    ``manifest`` must carry ``digest`` (the version digest); ``parent_digest``,
    ``code_version``, ``row_counts`` ({table: rows}, or tasks.version's ``tables`` with their
    ``rows``) and ``quarantine_counts`` ({stage: n} or {stage: {reason: n}}) are used when present.
    ``stage_counts[stage]`` is the number of items the stage received;
    with ``quarantine_counts`` it gives ``quarantine_rate.<stage>``. ``artifacts`` are files or
    folders (the data docs) logged beside ``manifest.json``. ``version_uri`` is the version's
    folder or object-store prefix (default ``manifest["uri"]``, else ``<store>/versions/<digest>``);
    it becomes the source of the logged input dataset.

    Params hold the settings hash, code version, drop ids and the public settings (secrets
    masked, credentials in URLs removed). No PHI enters a param, tag or metric.
    """
    digest = manifest.get("digest")
    if not isinstance(digest, str) or not digest:
        raise LineageError(
            "record_build: the manifest has no 'digest'; expected the version digest as a string. "
            "Pass the manifest that the version stage wrote."
        )
    for item in artifacts:
        if not Path(item).exists():
            raise LineageError(f"record_build: artifact {item} does not exist; expected a file or folder to log.")
    if version_uri is None:
        version_uri = manifest.get("uri") or (settings.store_root / "versions" / digest)
    mlflow = _mlflow()
    from mlflow.entities import DatasetInput, InputTag, Metric, Param

    embedded = not (tracking_uri or settings.mlflow.tracking_uri)
    client = _client(settings, tracking_uri)
    experiment_id = _experiment_id(client, settings, settings.mlflow.build_experiment, embedded)
    tags = {VERSION_TAG: digest, "radground.kind": "dataset-build", "mlflow.runName": f"build-{digest[:12]}"}
    run = client.create_run(experiment_id, tags=tags)
    run_id = run.info.run_id
    try:
        params = _build_params(settings, manifest, drops)
        param_list = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(param_list), _BATCH_MAX):
            client.log_batch(run_id, params=param_list[start:start + _BATCH_MAX])
        metrics = _build_metrics(manifest, stage_counts, stage_seconds)
        now = int(1000 * time.time())
        metric_list = [Metric(k, v, now, 0) for k, v in metrics.items()]
        for start in range(0, len(metric_list), 1000):
            client.log_batch(run_id, metrics=metric_list[start:start + 1000])

        with tempfile.TemporaryDirectory() as tmp:
            manifest_path = Path(tmp) / "manifest.json"
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str), encoding="utf-8")
            client.log_artifact(run_id, str(manifest_path))
            if len(drops) > 0 and "drops" not in params:  # too many to fit a param
                drops_path = Path(tmp) / "drops.json"
                drops_path.write_text(json.dumps(sorted(drops)), encoding="utf-8")
                client.log_artifact(run_id, str(drops_path))
        for item in map(Path, artifacts):
            if item.is_dir():
                client.log_artifacts(run_id, str(item), artifact_path=item.name)
            else:
                client.log_artifact(run_id, str(item))

        dataset = _version_dataset(mlflow, manifest, digest, str(version_uri))
        client.log_inputs(run_id, datasets=[DatasetInput(
            dataset._to_mlflow_entity(),
            tags=[InputTag("mlflow.data.context", BUILD_CONTEXT), InputTag(VERSION_TAG, digest)],
        )])
        client.set_tag(run_id, "radground.drops", str(len(drops)))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    logger.info("lineage: build of version %s recorded as MLflow run %s (%d params, %d metrics)",
                digest[:12], run_id, len(params), len(metrics))
    return run_id


def _version_dataset(mlflow, manifest: dict, digest: str, source: str):
    import pandas as pd

    counts = _row_counts(manifest)
    frame = pd.DataFrame({"table": [str(t) for t in counts] or ["version"],
                          "rows": [float(v) for v in counts.values()] or [0.0]})  # floats: no int-schema hint
    with warnings.catch_warnings():
        # A local path matches two LocalArtifactDatasetSource registrations; either is right.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_pandas(frame, source=source, name=digest, digest=mlflow_digest(digest))


def _build_params(settings: Settings, manifest: dict, drops: list[str]) -> dict[str, str]:
    public = settings.public_dict()
    params: dict[str, str] = {
        "version_digest": str(manifest["digest"]),
        "parent_digest": str(manifest.get("parent_digest") or ""),
        "settings_hash": settings.settings_hash(),
        "code_version": str(manifest.get("code_version") or radground.__version__),
        "drop_count": str(len(drops)),
        "backend.storage": str(public["storage"]["backend"]),
        "backend.llm": str(public["llm"]["backend"]),
        "backend.translation": str(public["translation"]["backend"]),
        "backend.segmentation": ",".join(public["segmentation"]["backend"]),
    }
    drops_text = ",".join(sorted(drops))
    if len(drops_text) <= _PARAM_VALUE_MAX:
        params["drops"] = drops_text
    for key, value in _flatten(public, "settings").items():
        params[key] = value
    return params


def _flatten(value: Any, prefix: str) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, str):
        text = _without_userinfo(value)
    elif value is None:
        text = ""
    elif isinstance(value, (list, tuple)):
        text = json.dumps([_without_userinfo(v) if isinstance(v, str) else v for v in value], default=str)
    else:
        text = str(value)
    return {_KEY_CHARS.sub("_", prefix): text[:_PARAM_VALUE_MAX]}


def _without_userinfo(text: str) -> str:
    """Drop user:password@ from a URL-looking value: not a SecretStr, but a credential all the same."""
    if "://" not in text or "@" not in text:
        return text
    parts = urlsplit(text)
    if parts.username is None and parts.password is None:
        return text
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _row_counts(manifest: dict) -> dict[str, float]:
    """{table: rows} from ``row_counts``, or from tasks.version's ``tables: {name: {rows, shards}}``."""
    if manifest.get("row_counts"):
        return {str(k): float(v) for k, v in manifest["row_counts"].items() if _is_number(v)}
    tables = manifest.get("tables") or {}
    return {str(k): float(v["rows"]) for k, v in tables.items() if isinstance(v, dict) and _is_number(v.get("rows"))}


def _build_metrics(manifest: dict, stage_counts: dict[str, float],
                   stage_seconds: dict[str, float]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for stage, count in stage_counts.items():
        metrics[_KEY_CHARS.sub("_", f"count.{stage}")] = float(count)
    for stage, seconds in stage_seconds.items():
        metrics[_KEY_CHARS.sub("_", f"seconds.{stage}")] = float(seconds)
    for table, rows in _row_counts(manifest).items():
        metrics[_KEY_CHARS.sub("_", f"rows.{table}")] = float(rows)
    for stage, quarantined in (manifest.get("quarantine_counts") or {}).items():
        if isinstance(quarantined, dict):  # {stage: {reason: n}}: log the leaves, rate over the total
            for reason, n in quarantined.items():
                if _is_number(n):
                    metrics[_KEY_CHARS.sub("_", f"quarantined.{stage}.{reason}")] = float(n)
            quarantined = sum(float(n) for n in quarantined.values() if _is_number(n))
        if not _is_number(quarantined):
            continue
        metrics[_KEY_CHARS.sub("_", f"quarantined.{stage}")] = float(quarantined)
        received = stage_counts.get(stage)
        if received:
            metrics[_KEY_CHARS.sub("_", f"quarantine_rate.{stage}")] = float(quarantined) / float(received)
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


# --------------------------------------------------------------------------- lineage tables


def write_lineage(records: Iterable[LineageRecord] | pa.Table, path: Path) -> Path:
    """Write one version's lineage table (all rows of one version_digest) to ``path``.

    Rows are sorted by patient pseudonym, so Parquet row-group statistics let
    ``where_used`` skip most of a large table.
    """
    table = records if isinstance(records, pa.Table) else pa.Table.from_pylist(
        [r.model_dump() for r in records], schema=LINEAGE_SCHEMA)
    table = table.select(LINEAGE_SCHEMA.names).cast(LINEAGE_SCHEMA)
    versions = pc.unique(table["version_digest"]).to_pylist()
    if len(versions) > 1:
        raise LineageError(
            f"write_lineage: {path} would hold {len(versions)} version digests; expected one table per "
            "version. Write each version's rows to its own file."
        )
    table = table.sort_by([("patient_pseudonym", "ascending"), ("image_id", "ascending")])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, row_group_size=64 * 1024, compression="zstd")
    tmp.replace(path)  # atomic: a reader never sees half a table
    return path


def lineage_index(path: Path | str | Sequence[Path | str], *, settings: Settings | None = None,
                  tracking_uri: str | None = None) -> LineageIndex:
    """An index over every version's lineage table under ``path`` (files named lineage*.parquet,
    or any .parquet inside a ``lineage/`` folder), or over the given list of files.

    With ``settings`` (and optionally ``tracking_uri``) ``where_used`` also lists the MLflow
    runs whose input dataset is one of the patient's versions.
    """
    if isinstance(path, (str, Path)):
        root = Path(path)
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*.parquet")
                           if p.name.startswith("lineage") or p.parent.name == "lineage")
        else:
            raise LineageError(f"lineage index: {root} does not exist; expected the folder of dataset versions.")
    else:
        files = [Path(p) for p in path]
    return LineageIndex(files, settings=settings, tracking_uri=tracking_uri)


class LineageIndex:
    """Record-level lineage over many versions, answered by Arrow scans with pushed-down filters."""

    def __init__(self, files: Sequence[Path], *, settings: Settings | None = None,
                 tracking_uri: str | None = None) -> None:
        self._files = [str(f) for f in files]
        self._dataset = pads.dataset(self._files, format="parquet", schema=LINEAGE_SCHEMA)
        self._settings = settings
        self._tracking_uri = tracking_uri
        self._versions: list[str] | None = None

    def versions(self) -> list[str]:
        """Every version digest in the index, sorted."""
        if self._versions is None:
            column = self._dataset.to_table(columns=["version_digest"])["version_digest"]
            self._versions = sorted(pc.unique(column).to_pylist())
        return list(self._versions)

    def trace(self, version_digest: str) -> dict[str, Any]:
        """The drops and raw file hashes a version was built from: {version_digest, drops, raw_sha256, images}."""
        table = self._dataset.to_table(columns=["drop_id", "source_sha256"],
                                       filter=pc.field("version_digest") == version_digest)
        if table.num_rows == 0:
            raise LineageError(
                f"trace: version {version_digest} is not in the lineage index ({len(self._files)} tables). "
                "Check the digest (radground versions lists them) or index the folder that holds it."
            )
        return {
            "version_digest": version_digest,
            "drops": sorted(pc.unique(table["drop_id"]).to_pylist()),
            "raw_sha256": sorted(pc.unique(table["source_sha256"]).to_pylist()),
            "images": table.num_rows,
        }

    def where_used(self, patient_pseudonym: str) -> dict[str, Any]:
        """Where a patient's data went: {patient_pseudonym, versions, runs, checkpoints}, and with
        ``settings`` also {training_runs, evaluated_on}.

        Takes a pseudonym (use :func:`pseudonym_for` to map a source PatientID). ``runs`` lists
        the MLflow runs whose input dataset is one of ``versions`` (needs ``settings``);
        ``training_runs`` those training runs that read the patient's split of that version (train or
        val, with the split named), ``checkpoints`` their checkpoints, ``evaluated_on`` the evaluation
        runs (see :func:`training_use`). Without ``settings`` MLflow is not asked: runs and checkpoints
        are empty.
        """
        if not PSEUDONYM_PATTERN.fullmatch(patient_pseudonym):
            # never echo the value: it may be a source PatientID passed by mistake
            raise LineageError(
                "where_used: expected a patient pseudonym ('P' + 20 upper-case hex digits); got a value "
                f"of {len(patient_pseudonym)} characters that is not one. Map a source PatientID with "
                "radground.lineage.pseudonym_for(settings, patient_id) first."
            )
        table = self._dataset.to_table(columns=["version_digest"],
                                       filter=pc.field("patient_pseudonym") == patient_pseudonym)
        versions = sorted(pc.unique(table["version_digest"]).to_pylist())
        runs = self._runs_for(versions) if self._settings is not None and versions else []
        found: dict[str, Any] = {"patient_pseudonym": patient_pseudonym, "versions": versions, "runs": runs,
                                 "checkpoints": []}
        if self._settings is not None:
            found |= training_use(self._settings, patient_pseudonym, versions, runs=runs,
                                  tracking_uri=self._tracking_uri)
        return found

    def _runs_for(self, versions: list[str]) -> list[dict[str, str]]:
        return runs_using(self._settings, versions, tracking_uri=self._tracking_uri)


def runs_using(settings: Settings, versions: Sequence[str], *, tracking_uri: str | None = None) -> list[dict[str, str]]:
    """MLflow runs (any experiment) whose input dataset is one of ``versions``.

    Each: {run_id, experiment, version_digest, context}; context is "build" for build runs,
    "training"/"evaluation" for the runs that consumed the version.
    """
    if not versions:
        return []
    return _search_runs(settings, versions, tracking_uri)


@_mlflow_logs_to_data_dir
def _search_runs(settings: Settings, versions: Sequence[str], tracking_uri: str | None) -> list[dict[str, str]]:
    from mlflow.entities import ViewType

    client = _client(settings, tracking_uri)
    by_digest: dict[str, list[str]] = {}
    for version in versions:
        by_digest.setdefault(mlflow_digest(version), []).append(version)
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    if not experiments:
        return []
    quoted = ", ".join("'" + d.replace("'", "") + "'" for d in by_digest)
    found: list[dict[str, str]] = []
    page_token = None
    while True:
        page = client.search_runs(list(experiments), filter_string=f"dataset.digest IN ({quoted})",
                                  max_results=1000, page_token=page_token)
        for run in page:
            for item in run.inputs.dataset_inputs:
                tags = {t.key: t.value for t in item.tags}
                version = tags.get(VERSION_TAG) or item.dataset.name
                if version in versions:
                    found.append({"run_id": run.info.run_id, "experiment": experiments[run.info.experiment_id],
                                  "version_digest": version, "context": tags.get("mlflow.data.context", "")})
        page_token = page.token
        if not page_token:
            break
    return sorted(found, key=lambda r: (r["version_digest"], r["experiment"], r["run_id"]))


@_mlflow_logs_to_data_dir
def tag_runs(settings: Settings, tags: dict[str, dict[str, str]], *, tracking_uri: str | None = None) -> None:
    """Set tags on MLflow runs: {run_id: {tag: value}}. Callers pass digests and counts, never PHI."""
    client = _client(settings, tracking_uri)
    for run_id, values in tags.items():
        for key, value in values.items():
            client.set_tag(run_id, key, value)


# --------------------------------------------------------------------------- pseudonyms


def pseudonym_for(settings: Settings, patient_id_or_pseudonym: str, *, issuer: str = "") -> str:
    """The patient pseudonym for a pseudonym (returned as is) or a source PatientID (keyed hash).

    A value of the pseudonym form ("P" + 20 hex digits, in any case: people retype them) is taken
    as a pseudonym and returned upper-case. The source ID is never logged or put into an error message.
    """
    from radground.keys import KEY_FILE, load_key
    from tasks.deid import patient_pseudonym

    value = patient_id_or_pseudonym.strip()
    if PSEUDONYM_PATTERN.fullmatch(value.upper()) and not issuer:
        return value.upper()
    if settings.deid.key is None and not (settings.data_dir / KEY_FILE).exists():
        # load_key would create a new key, whose pseudonyms match nothing already stored
        raise LineageError(
            f"pseudonym_for: no de-identification key (deid.key unset and {settings.data_dir / KEY_FILE} "
            "missing), so a source PatientID cannot be mapped. Set deid.key (RADGROUND_DEID__KEY) to the "
            "key the data was built with, or pass the pseudonym instead."
        )
    return patient_pseudonym(load_key(settings), value, issuer)


# --------------------------------------------------------------------------- training runs

TRAIN_CONTEXT = "training"  # the mlflow.data.context of a training run's input
EVAL_CONTEXT = "evaluation"  # ... and of an evaluation run's (the next issue's)
KIND_TAG = "radground.kind"
RAY_RUN_TAG = "radground.ray_run_name"
SPLITS_TAG = "radground.splits"  # on the input: the splits of the version the run read, e.g. "train,val"
CHECKPOINT_TAG = "radground.checkpoint_uri"  # the latest checkpoint
BEST_CHECKPOINT_TAG = "radground.best_checkpoint_uri"
CHECKPOINT_ARTIFACTS = "checkpoints"  # checkpoints/<name>/lineage.json in the run's artifacts
CHECKPOINT_LINEAGE = "lineage.json"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
_RUN_ID = re.compile(r"[0-9a-f]{32}")  # what MLflow's run ids look like (uuid4 hex)


def _refuse_phi(what: str, value: Any) -> None:
    """A pseudonym in anything sent to MLflow is a bug in the caller: refuse it, never echo it."""
    if PSEUDONYM_PATTERN.search(json.dumps(value, default=str)):
        raise LineageError(f"{what} holds a patient pseudonym; MLflow must never see one. Pass counts and "
                           "digests only (lineage.json: dataset_digest, splits rows/patients, run ids).")


def _version_folder(settings: Settings, digest: str) -> Path:
    from tasks.version_stage import versions_root

    return versions_root(settings) / digest[:16]


def _training_dataset(mlflow, settings: Settings, digest: str, splits: dict[str, dict]):
    """The version as MLflow's dataset entity: the build run's (name = full digest, digest = mlflow_digest,
    the manifest's row counts) when the version folder is here, else one profiled by the split sizes."""
    folder = _version_folder(settings, digest)
    manifest: dict[str, Any] = {}
    if (folder / "manifest.json").is_file():
        try:
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
    if not _row_counts(manifest):
        manifest = {"row_counts": {f"split.{name}": (v or {}).get("rows", 0) for name, v in splits.items()}}
    return _version_dataset(mlflow, manifest, digest, str(folder))


@_mlflow_logs_to_data_dir
def start_training_run(settings: Settings, *, version_digest: str, splits: dict[str, dict],
                       params: dict[str, str], run_name: str, tracking_uri: str | None = None) -> str:
    """Open a training run in experiment ``mlflow.train_experiment``; returns its run id (status RUNNING).

    Tags ``radground.kind=training``, ``radground.ray_run_name`` (= MLflow's run name), the version digest.
    Params: ``params`` plus settings hash, code version, version digest and ``splits.<split>.<rows|patients>``.
    The input is the version as the build runs log it, with input tags ``mlflow.data.context=training``,
    the version digest and ``radground.splits`` (the splits read: ``train,val``). ``splits`` is
    ``{"train": {"rows": n, "patients": n}, "val": {...}}``: counts only, never a pseudonym.
    """
    if not re.fullmatch(r"[0-9a-f]{16,64}", version_digest or ""):
        raise LineageError(f"start_training_run: version_digest {version_digest!r} is not a version digest "
                           "(16 to 64 lower-case hex characters). Pass the manifest's digest.")
    _refuse_phi("start_training_run: params/splits/run_name", [params, splits, run_name])
    mlflow = _mlflow()
    from mlflow.entities import DatasetInput, InputTag, Param

    embedded = not (tracking_uri or settings.mlflow.tracking_uri)
    client = _client(settings, tracking_uri)
    experiment_id = _experiment_id(client, settings, settings.mlflow.train_experiment, embedded)
    tags = {KIND_TAG: "training", RAY_RUN_TAG: run_name, "mlflow.runName": run_name, VERSION_TAG: version_digest}
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    try:
        values = {str(k): str(v) for k, v in params.items()}
        values.setdefault("settings_hash", settings.settings_hash())
        values.setdefault("code_version", radground.__version__)
        values["version_digest"] = version_digest
        for split, counts in sorted(splits.items()):
            for key, count in sorted((counts or {}).items()):
                values[f"splits.{split}.{key}"] = str(count)
        items = [Param(_KEY_CHARS.sub("_", k), _without_userinfo(v)[:_PARAM_VALUE_MAX]) for k, v in values.items()]
        for start in range(0, len(items), _BATCH_MAX):
            client.log_batch(run_id, params=items[start:start + _BATCH_MAX])
        dataset = _training_dataset(mlflow, settings, version_digest, splits)
        client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[
            InputTag("mlflow.data.context", TRAIN_CONTEXT), InputTag(VERSION_TAG, version_digest),
            InputTag(SPLITS_TAG, ",".join(sorted(splits)))])])
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    logger.info("lineage: training run %s opened on version %s", run_id, version_digest[:12])
    return run_id


@_mlflow_logs_to_data_dir
def log_training_metrics(settings: Settings, run_id: str, metrics: dict[str, float], step: int, *,
                         tracking_uri: str | None = None) -> None:
    """Log ``metrics`` at ``step`` (non-finite values are left out: MLflow would store them as NaN)."""
    from mlflow.entities import Metric

    now = int(1000 * time.time())
    items = [Metric(_KEY_CHARS.sub("_", str(k)), float(v), now, int(step)) for k, v in metrics.items()
             if _is_number(v) and math.isfinite(float(v))]
    if items:
        _client(settings, tracking_uri).log_batch(run_id, metrics=items)


def _checkpoint_name(uri: str) -> str:
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return _KEY_CHARS.sub("_", name).replace(" ", "_") or "checkpoint"


@_mlflow_logs_to_data_dir
def log_checkpoint(settings: Settings, run_id: str, *, uri: str, lineage: dict, best: bool,
                   tracking_uri: str | None = None) -> None:
    """Record a checkpoint: tag ``radground.checkpoint_uri`` (latest), ``radground.best_checkpoint_uri``
    when ``best``, and its lineage.json (plus ``checkpoint_uri``) as ``checkpoints/<name>/lineage.json``."""
    _refuse_phi("log_checkpoint: lineage", lineage)
    uri = _without_userinfo(str(uri))
    client = _client(settings, tracking_uri)
    client.set_tag(run_id, CHECKPOINT_TAG, uri)
    if best:
        client.set_tag(run_id, BEST_CHECKPOINT_TAG, uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_LINEAGE
        path.write_text(json.dumps({**lineage, "checkpoint_uri": uri}, indent=2, sort_keys=True, default=str),
                        encoding="utf-8")
        client.log_artifact(run_id, str(path), artifact_path=f"{CHECKPOINT_ARTIFACTS}/{_checkpoint_name(uri)}")


@_mlflow_logs_to_data_dir
def finish_training_run(settings: Settings, run_id: str, status: str = "FINISHED", *,
                        tracking_uri: str | None = None) -> None:
    """Close a training run as FINISHED or FAILED (or KILLED)."""
    if status not in RUN_STATUSES:
        raise LineageError(f"finish_training_run: status {status!r} is not one of {', '.join(RUN_STATUSES)}.")
    _client(settings, tracking_uri).set_terminated(run_id, status=status)


# --------------------------------------------------------------------------- tracing a run or a checkpoint


def looks_like_run_id(value: str) -> bool:
    """32 lower-case hex characters: the form of an MLflow run id (also a possible version prefix)."""
    return bool(_RUN_ID.fullmatch(value.strip().lower()))


def _store_exists(settings: Settings, uri: str | None) -> bool:
    """False when the embedded store was never created: looking a run up must not create it."""
    if uri or settings.mlflow.tracking_uri:
        return True
    return (settings.data_dir / "mlflow" / "mlflow.db").is_file()


@_mlflow_logs_to_data_dir
def _run_lineage(settings: Settings, run_id: str, tracking_uri: str | None, with_checkpoints: bool = True) -> dict:
    from mlflow.exceptions import MlflowException

    if not _store_exists(settings, tracking_uri):
        raise LineageError(f"run {run_id}: there are no MLflow runs under {settings.data_dir.resolve()} "
                           "(no mlflow/mlflow.db). Point at the data_dir that trained it (RADGROUND_DATA_DIR).")
    client = _client(settings, tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LineageError(f"run {run_id}: no MLflow run with this id in {_safe_uri(settings, tracking_uri)}. "
                           "Check the id (the MLflow UI or `radground train` prints it).") from None
    experiment = client.get_experiment(run.info.experiment_id)
    inputs = []
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        inputs.append({"version_digest": tags.get(VERSION_TAG) or item.dataset.name,
                       "context": tags.get("mlflow.data.context", ""),
                       "splits": [s for s in tags.get(SPLITS_TAG, "").split(",") if s]})
    params = run.data.params
    keep = ("preset", "settings_hash", "code_version", "version_digest", "epochs", "max_steps", "batch_size",
            "effective_batch", "learning_rate", "seed", "workers", "recipe")
    info = {
        "run_id": run_id, "experiment": experiment.name if experiment else run.info.experiment_id,
        "kind": run.data.tags.get(KIND_TAG, ""), "status": run.info.status,
        "ray_run_name": run.data.tags.get(RAY_RUN_TAG), "inputs": inputs,
        "params": {k: params[k] for k in sorted(params) if k in keep or k.startswith("splits.")},
        "checkpoint_uri": run.data.tags.get(CHECKPOINT_TAG),
        "best_checkpoint_uri": run.data.tags.get(BEST_CHECKPOINT_TAG),
    }
    info["checkpoints"] = _logged_checkpoints(client, run) if with_checkpoints else []
    return info


def _logged_checkpoints(client, run) -> list[dict]:
    """The checkpoints a run logged (checkpoints/*/lineage.json), plus its tagged ones not logged so."""
    run_id = run.info.run_id
    best = run.data.tags.get(BEST_CHECKPOINT_TAG)
    found: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS):
            if not folder.is_dir:
                continue
            try:
                local = client.download_artifacts(run_id, f"{folder.path}/{CHECKPOINT_LINEAGE}", tmp)
                doc = json.loads(Path(local).read_text(encoding="utf-8"))
            except Exception:  # noqa: BLE001 - a missing or unreadable file: list the folder without details
                logger.debug("lineage: run %s artifact %s unreadable", run_id, folder.path, exc_info=True)
                doc = {}
            uri = doc.get("checkpoint_uri") or folder.path
            found[uri] = {"uri": uri, "step": doc.get("step"), "epoch": doc.get("epoch"),
                          "val_loss": doc.get("val_loss"), "best": uri == best, "training_run_id": run_id}
    for tag in (CHECKPOINT_TAG, BEST_CHECKPOINT_TAG):
        uri = run.data.tags.get(tag)
        if uri and uri not in found:
            found[uri] = {"uri": uri, "step": None, "epoch": None, "val_loss": None, "best": uri == best,
                          "training_run_id": run_id}
    return sorted(found.values(), key=lambda c: (c["step"] is None, c["step"] or 0, c["uri"]))


def _safe_uri(settings: Settings, uri: str | None) -> str:
    return _without_userinfo(tracking_uri(settings, uri))


def read_checkpoint_lineage(path: Path | str) -> dict:
    """A checkpoint folder's lineage.json (or that file itself)."""
    path = Path(path).expanduser()
    file = path / CHECKPOINT_LINEAGE if path.is_dir() else path
    if not file.is_file():
        raise LineageError(f"checkpoint {path}: no {CHECKPOINT_LINEAGE} in it. Give a checkpoint folder that "
                           "`radground train` wrote (it holds the model files and lineage.json).")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise LineageError(f"checkpoint {path}: {CHECKPOINT_LINEAGE} is not readable JSON. Was the checkpoint "
                           "copied whole?") from None
    if not isinstance(doc, dict) or not doc.get("dataset_digest"):
        raise LineageError(f"checkpoint {path}: {CHECKPOINT_LINEAGE} has no dataset_digest; expected the file "
                           "`radground train` writes.")
    return doc


def _version_trace(settings: Settings, digest: str) -> dict:
    lineage = settings.data_dir.resolve() / "lineage"
    if not lineage.is_dir() or not any(lineage.glob("*.parquet")):
        raise LineageError(f"version {digest[:16]}: no lineage tables under {lineage}. Point at the data_dir "
                           "that built the version (RADGROUND_DATA_DIR).")
    return lineage_index(lineage).trace(digest)


def trace_run(settings: Settings, run_id: str, *, tracking_uri: str | None = None) -> dict:
    """Walk back a training run: run -> dataset version (digest, splits read) -> drops and raw sha256s.

    Returns {resolved_as: "training_run", training_run: {run_id, experiment, status, params, …},
    checkpoints: [{uri, step, val_loss, best}], dataset: {digest, splits}, version: <version trace>}.
    """
    run = _run_lineage(settings, run_id.strip().lower(), tracking_uri)
    versions = [i for i in run["inputs"] if i["version_digest"]]
    if not versions:
        raise LineageError(f"run {run_id}: it logged no dataset version as input, so nothing leads back to raw "
                           "files. Trace a training run of `radground train`, or a version digest.")
    digest = versions[0]["version_digest"]
    checkpoints = run.pop("checkpoints")
    splits = {name: {k.split(".")[-1]: _number(v) for k, v in run["params"].items()
                     if k.startswith(f"splits.{name}.")} for name in versions[0]["splits"]}
    training = run["kind"] == "training"  # a build run traces too: its version, under "run"
    return {"resolved_as": "training_run" if training else f"{run['kind'] or 'mlflow'}_run",
            "training_run" if training else "run": run, "checkpoints": checkpoints,
            "dataset": {"digest": digest, "splits": splits or None}, "version": _version_trace(settings, digest)}


def trace_checkpoint(settings: Settings, path: Path | str, *, tracking_uri: str | None = None) -> dict:
    """Walk back a checkpoint folder: lineage.json -> training run -> version -> drops and raw sha256s."""
    doc = read_checkpoint_lineage(path)
    digest = str(doc["dataset_digest"])
    out: dict[str, Any] = {
        "resolved_as": "checkpoint",
        "checkpoint": {"uri": str(Path(path).expanduser().resolve()), "step": doc.get("step"),
                       "epoch": doc.get("epoch"), "val_loss": doc.get("val_loss"), "preset": doc.get("preset")},
        "training_run": None,
        "dataset": {"digest": digest, "splits": doc.get("splits")},
    }
    run_id = doc.get("training_run_id")
    if run_id:
        run = _run_lineage(settings, str(run_id), tracking_uri, with_checkpoints=False)
        run.pop("checkpoints", None)
        logged = {i["version_digest"] for i in run["inputs"]}
        if digest not in logged:
            raise LineageError(f"checkpoint {path}: lineage.json names version {digest[:16]}, but its training run "
                               f"{run_id} logged {', '.join(sorted(d[:16] for d in logged)) or 'no version'}. "
                               "The checkpoint's lineage.json does not belong to that run.")
        out["training_run"] = run
    out["version"] = _version_trace(settings, digest)
    return out


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


# --------------------------------------------------------------------------- registered models
# The MLflow model registry side of the audit: registered versions of the model (models/registry.py
# builds the pyfunc and the promotion gate), their tags, aliases and artifacts, and the walk from a
# version back to its training run and raw files. Version tags carry digests, run ids, URIs and
# metrics only, never PHI.

MODEL_URI_PREFIX = "models:/"
FORGOTTEN_TAG = "radground.contains_forgotten"  # "true": trained on a patient who was forgotten since
MODEL_TRAINING_RUN_TAG = "radground.training_run"
MODEL_DIGEST_TAG = "radground.dataset_digest"
MODEL_ARTIFACTS = "registered_model"  # registered_model/<checkpoint name>/ in the run's artifacts
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@\s]+)(?:/(?P<version>[0-9]+)|@(?P<alias>[A-Za-z0-9_\-]+))/?")


def parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME/N`` -> (NAME, "N", None); ``models:/NAME@alias`` -> (NAME, None, "alias")."""
    found = _MODEL_URI.fullmatch(ref.strip())
    if not found:
        raise LineageError(f"model {ref!r}: not a registry reference; expected models:/NAME/VERSION (e.g. "
                           "models:/radgrounder/3) or models:/NAME@ALIAS (e.g. models:/radgrounder@champion).")
    return found["name"], found["version"], found["alias"]


def _tracking(settings: Settings, uri: str | None) -> str:
    return tracking_uri(settings, uri)  # the module function: callers' ``tracking_uri`` parameter shadows it


def _version_dict(version, aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """``aliases``: the registered model's {alias: version}, for versions from a search (which carry none)."""
    from datetime import UTC, datetime

    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
    named = version.aliases if aliases is None else [a for a, v in aliases.items() if str(v) == str(version.version)]
    return {"name": version.name, "version": str(version.version), "aliases": sorted(named or []),
            "created": created, "run_id": version.run_id or None, "source": version.source,
            "status": version.status, "tags": dict(version.tags or {})}


def _registered(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


def _get_version(client, settings: Settings, name: str, version: str | None, alias: str | None,
                 tracking_uri: str | None):
    from mlflow.exceptions import MlflowException

    ref = f"{MODEL_URI_PREFIX}{name}/{version}" if version else f"{MODEL_URI_PREFIX}{name}@{alias}"
    if not _registered(client, name):
        raise LineageError(f"model {ref}: there is no registered model {name!r} in "
                           f"{_safe_uri(settings, tracking_uri)}. Register one first (radground models register "
                           "RUN_ID|CHECKPOINT).")
    try:
        if version:
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        versions = [_version_dict(v, _aliases(client, name)) for v in _all_versions(client, name)]
        if version:
            have = ", ".join(v["version"] for v in versions) or "none"
            raise LineageError(f"model {ref}: {name!r} has no version {version} (versions: {have}). "
                               "List them with radground models list.") from None
        aliases = sorted({a for v in versions for a in v["aliases"]})
        raise LineageError(f"model {ref}: {name!r} has no alias {alias!r} (aliases: {', '.join(aliases) or 'none'}). "
                           "Use one of those or a version number (models:/NAME/N).") from None


def _aliases(client, name: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in (client.get_registered_model(name).aliases or {}).items()}


def _all_versions(client, name: str | None = None) -> list:
    found, token = [], None
    where = f"name = '{name.replace(chr(39), '')}'" if name else None
    while True:
        page = client.search_model_versions(where, max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            break
    return found


@_mlflow_logs_to_data_dir
def model_version(settings: Settings, ref: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """One registered version (``models:/NAME/N`` or ``models:/NAME@alias``) as a dict: name, version,
    aliases, created (UTC ISO), run_id, source (artifact URI), status, tags."""
    name, version, alias = parse_model_uri(ref)
    if not _store_exists(settings, tracking_uri):
        raise LineageError(f"model {ref}: there are no MLflow runs or models under {settings.data_dir.resolve()}. "
                           "Point at the data_dir that registered it (RADGROUND_DATA_DIR).")
    client = _client(settings, tracking_uri)
    return _version_dict(_get_version(client, settings, name, version, alias, tracking_uri))


@_mlflow_logs_to_data_dir
def model_versions(settings: Settings, name: str, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Every version of registered model ``name`` (oldest first); [] when it is not registered."""
    if not _store_exists(settings, tracking_uri):
        return []
    client = _client(settings, tracking_uri)
    if not _registered(client, name):
        return []
    aliases = _aliases(client, name)
    return sorted((_version_dict(v, aliases) for v in _all_versions(client, name)), key=lambda v: int(v["version"]))


@_mlflow_logs_to_data_dir
def run_checkpoint_uri(settings: Settings, run_id: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """A run's checkpoints as its tags name them: {run_id, kind, status, best_checkpoint_uri, checkpoint_uri}."""
    run = _run_lineage(settings, run_id.strip().lower(), tracking_uri, with_checkpoints=False)
    return {k: run.get(k) for k in ("run_id", "kind", "status", "best_checkpoint_uri", "checkpoint_uri")}


@_mlflow_logs_to_data_dir
def download_model_version(settings: Settings, ref: str, dest: Path, *, tracking_uri: str | None = None) -> Path:
    """Download a registered version's artifacts (the pyfunc folder) into ``dest``; returns ``dest``."""
    version = model_version(settings, ref, tracking_uri=tracking_uri)
    mlflow = _mlflow()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with quiet_mlflow(settings):
        local = mlflow.artifacts.download_artifacts(artifact_uri=version["source"], dst_path=str(dest),
                                                    tracking_uri=_tracking(settings, tracking_uri))
    return Path(local)


@contextlib.contextmanager
def quiet_mlflow(settings: Settings):
    """MLflow work outside an MlflowClient call (saving a pyfunc, downloading artifacts): its log goes to
    ``<data_dir>/logs/libraries.log`` and its artifact progress bar stays off (read per call, hence set here)."""
    switch = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(switch)
    os.environ[switch] = "false"
    _mlflow()
    try:
        with library_logs_to(settings.data_dir, *MLFLOW_LOGGERS):
            yield
    finally:
        if before is None:
            os.environ.pop(switch, None)
        else:
            os.environ[switch] = before


@_mlflow_logs_to_data_dir
def register_model_folder(settings: Settings, name: str, folder: Path, *, run_id: str | None, run_name: str,
                          tags: dict[str, str], tracking_uri: str | None = None) -> dict[str, Any]:
    """Log ``folder`` (an MLflow model folder) into run ``run_id`` (the training run), or, without one, into
    a new run of the training experiment (tag radground.kind=model-registration); then add it as a new
    version of registered model ``name`` with ``tags``. Returns the version dict."""
    from mlflow.exceptions import MlflowException

    _refuse_phi("register_model_folder: tags", tags)
    embedded = not (tracking_uri or settings.mlflow.tracking_uri)
    client = _client(settings, tracking_uri)
    opened = run_id is None
    if opened:
        experiment_id = _experiment_id(client, settings, settings.mlflow.train_experiment, embedded)
        run_id = client.create_run(experiment_id, tags={KIND_TAG: "model-registration",
                                                        "mlflow.runName": run_name}).info.run_id
    try:
        path = f"{MODEL_ARTIFACTS}/{_checkpoint_name(run_name)}"
        client.log_artifacts(run_id, str(folder), artifact_path=path)
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + path
        if not _registered(client, name):
            try:
                client.create_registered_model(name, description="RadGrounder: grounded radiology VLM (pyfunc over "
                                               "the save_pretrained checkpoint). Aliases champion / challenger.")
            except MlflowException:  # created concurrently
                if not _registered(client, name):
                    raise
        version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    except BaseException:
        if opened:
            client.set_terminated(run_id, status="FAILED")
        raise
    if opened:
        client.set_terminated(run_id, status="FINISHED")
    return _version_dict(client.get_model_version(name, version.version))


@_mlflow_logs_to_data_dir
def set_model_version_tags(settings: Settings, name: str, version: str, tags: dict[str, str], *,
                           tracking_uri: str | None = None) -> None:
    """Set tags on a registered version (digests, run ids, metrics: never PHI)."""
    _refuse_phi("set_model_version_tags", tags)
    client = _client(settings, tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


@_mlflow_logs_to_data_dir
def set_model_alias(settings: Settings, name: str, alias: str, version: str | None, *,
                    tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` (None: delete the alias)."""
    client = _client(settings, tracking_uri)
    if version is None:
        client.delete_registered_model_alias(name, alias)
    else:
        client.set_registered_model_alias(name, alias, str(version))


@_mlflow_logs_to_data_dir
def run_start_times(settings: Settings, run_ids: Sequence[str], *, tracking_uri: str | None = None) -> dict[str, int]:
    """{run_id: start time in ms} of the runs that exist (an unknown id is left out)."""
    from mlflow.exceptions import MlflowException

    client = _client(settings, tracking_uri)
    found = {}
    for run_id in run_ids:
        try:
            found[run_id] = client.get_run(run_id).info.start_time or 0
        except MlflowException:
            continue
    return found


def _models_trained_by(client, run_ids: set[str]) -> list[dict[str, Any]]:
    """Registered versions (any registered model) whose training run is one of ``run_ids``: the run the
    version was logged into, or its radground.training_run tag."""
    if not run_ids:
        return []
    found, aliases = [], {}
    for version in _all_versions(client):
        tags = dict(version.tags or {})
        run = tags.get(MODEL_TRAINING_RUN_TAG) or version.run_id
        if run in run_ids or version.run_id in run_ids:
            if version.name not in aliases:
                aliases[version.name] = _aliases(client, version.name)
            found.append({"name": version.name, "version": str(version.version),
                          "uri": f"{MODEL_URI_PREFIX}{version.name}/{version.version}",
                          "aliases": _version_dict(version, aliases[version.name])["aliases"],
                          "training_run_id": run,
                          "contains_forgotten": tags.get(FORGOTTEN_TAG) == "true"})
    return sorted(found, key=lambda m: (m["name"], int(m["version"])))


@_mlflow_logs_to_data_dir
def tag_forgotten_models(settings: Settings, models: Sequence[dict], *, tracking_uri: str | None = None) -> list[dict]:
    """Tag each registered version in ``models`` (training_use's ``models``) ``radground.contains_forgotten=true``;
    returns them with ``contains_forgotten`` set. The promotion gate refuses such a version."""
    client = _client(settings, tracking_uri)
    tagged = []
    for model in models:
        client.set_model_version_tag(model["name"], str(model["version"]), FORGOTTEN_TAG, "true")
        tagged.append({**model, "contains_forgotten": True})
    return tagged


def trace_model(settings: Settings, ref: str, *, tracking_uri: str | None = None) -> dict:
    """Walk back a registered version: ``models:/NAME/N`` (or @alias) -> training run -> version -> drops and
    raw sha256s. Returns trace_run's dict with ``resolved_as: "registered_model"`` and ``model``
    ({name, version, aliases, created, run_id, source, tags}); a version registered from a checkpoint
    without a training run walks back through its radground.dataset_digest tag."""
    version = model_version(settings, ref, tracking_uri=tracking_uri)
    run_id = version["tags"].get(MODEL_TRAINING_RUN_TAG) or None
    if run_id:
        with quiet_mlflow(settings):  # trace_run downloads each checkpoint's lineage.json
            traced = trace_run(settings, run_id, tracking_uri=tracking_uri)
        digest = version["tags"].get(MODEL_DIGEST_TAG)
        if digest and digest != traced["dataset"]["digest"]:
            raise LineageError(f"model {ref}: its tag {MODEL_DIGEST_TAG} names version {digest[:16]}, but its training "
                               f"run {run_id} logged {traced['dataset']['digest'][:16]}. The version was registered "
                               "with a checkpoint of another run: register the run's own checkpoint.")
        return {**traced, "resolved_as": "registered_model", "model": version}
    digest = version["tags"].get(MODEL_DIGEST_TAG)
    if not digest:
        raise LineageError(f"model {ref}: the version has neither a {MODEL_TRAINING_RUN_TAG} nor a {MODEL_DIGEST_TAG} "
                           "tag, so nothing leads back to raw files. Register models with radground models register.")
    return {"resolved_as": "registered_model", "model": version, "training_run": None, "checkpoints": [],
            "dataset": {"digest": digest, "splits": None}, "version": _version_trace(settings, digest)}


# --------------------------------------------------------------------------- where a patient was trained on


def patient_splits(settings: Settings, pseudonym: str, versions: Sequence[str]) -> dict[str, str | None]:
    """{version digest: the patient's split there (train/val/test)}, None when the version's
    splits.parquet is not on this machine (pull the version to know)."""
    found: dict[str, str | None] = {}
    for digest in versions:
        path = _version_folder(settings, digest) / "splits.parquet"
        if not path.is_file():
            found[digest] = None
            continue
        table = pq.read_table(path, columns=["patient_pseudonym", "split"],
                              filters=[("patient_pseudonym", "=", pseudonym)])
        found[digest] = table["split"][0].as_py() if table.num_rows else None
    return found


def training_use(settings: Settings, pseudonym: str, versions: Sequence[str], *,
                 runs: Sequence[dict] | None = None, tracking_uri: str | None = None) -> dict[str, list]:
    """The training runs and checkpoints that used a patient, from the versions holding them.

    A training run used the patient when its input version holds them in a split the run read
    (``radground.splits``: train, val); a patient only in ``test`` was not trained on. Returns
    {training_runs: [{run_id, experiment, version_digest, split, status, ray_run_name, checkpoints}],
    evaluated_on: [evaluation runs of a version holding the patient, with the split],
    checkpoints: [every checkpoint of those training runs: {uri, step, val_loss, best, training_run_id}],
    models: [registered model versions trained by those runs: {name, version, uri, aliases, training_run_id,
    contains_forgotten}]}.
    A version whose splits.parquet is not here counts as used (split "unknown"): an audit must not miss one.
    """
    if runs is None:
        runs = runs_using(settings, versions, tracking_uri=tracking_uri) if versions else []
    used = [r for r in runs if r.get("context") in (TRAIN_CONTEXT, EVAL_CONTEXT)]
    if not used:
        return {"training_runs": [], "evaluated_on": [], "checkpoints": [], "models": []}
    split_of = patient_splits(settings, pseudonym, sorted({r["version_digest"] for r in used}))
    return _training_use(settings, used, split_of, tracking_uri)


@_mlflow_logs_to_data_dir
def _training_use(settings: Settings, used: Sequence[dict], split_of: dict, tracking_uri: str | None) -> dict:
    client = _client(settings, tracking_uri)
    trained, evaluated, checkpoints = [], [], []
    for entry in used:
        split = split_of.get(entry["version_digest"])
        run = client.get_run(entry["run_id"])
        read = {s for item in run.inputs.dataset_inputs for t in item.tags if t.key == SPLITS_TAG
                for s in t.value.split(",") if s}
        row = {"run_id": entry["run_id"], "experiment": entry["experiment"],
               "version_digest": entry["version_digest"], "split": split or "unknown",
               "status": run.info.status, "ray_run_name": run.data.tags.get(RAY_RUN_TAG)}
        if entry["context"] == EVAL_CONTEXT:
            evaluated.append(row)
            continue
        if split is not None and split not in (read or {"train", "val"}):
            continue  # in a split this run never read (test): not trained on
        row["checkpoints"] = _logged_checkpoints(client, run)
        checkpoints.extend(row["checkpoints"])
        trained.append(row)
    models = _models_trained_by(client, {r["run_id"] for r in trained})
    return {"training_runs": trained, "evaluated_on": evaluated, "checkpoints": checkpoints, "models": models}


# --------------------------------------------------------------------------- evaluation runs

EVAL_KIND = "evaluation"  # the radground.kind of an evaluation run
TEST_SET_TAG = "radground.test_set"  # e.g. version-<digest16>-test, slake-test-<digest12>
TEST_SET_KINDS = ("version", "benchmark")


def _eval_params(model: dict, test_set: dict, prompts: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for prefix, mapping in (("test_set", test_set), ("model", model), ("prompt", prompts)):
        for key, value in sorted(mapping.items()):
            text = "" if value is None else _without_userinfo(str(value))
            values[_KEY_CHARS.sub("_", f"{prefix}.{key}")] = text[:_PARAM_VALUE_MAX]
    values["code_version"] = radground.__version__
    return values


def _eval_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    """{section: {metric: value}} -> {"section.metric": value}, numbers only (an empty section's None
    values are left out: MLflow has no missing value)."""
    flat: dict[str, float] = {}
    for section, values in metrics.items():
        for name, value in (values or {}).items():
            if _is_number(value) and math.isfinite(float(value)):
                flat[_KEY_CHARS.sub("_", f"{section}.{name}")] = float(value)
    return flat


@_mlflow_logs_to_data_dir
def log_evaluation(settings: Settings, *, model: dict, test_set: dict, prompts: dict[str, str],
                   metrics: dict[str, dict], files: Sequence[Path], tracking_uri: str | None = None) -> str:
    """Record one evaluation as a (finished) run of experiment ``mlflow.eval_experiment``; returns its id.

    ``model``: {ref, kind, run_id, model_name, model_version, dataset_digest} (None where unknown), or
    {ref: "predictions", kind: "predictions", sha256} for a predictions file. ``test_set``: {kind:
    version|benchmark, name, split, digest, key}. Tags ``radground.kind=evaluation`` and
    ``radground.test_set=<key>``; params ``test_set.*``, ``model.*``, ``prompt.<task.language>``,
    code_version; metrics ``<section>.<metric>``; ``files`` as artifacts. A version test set is
    also the run's input dataset (context ``evaluation``, the version digest, ``radground.splits`` =
    the split), so where-used lists the run under ``evaluated_on``. Anything holding a pseudonym
    (the arguments, or a file's text) is refused before the run is created.
    """
    kind, key, split, digest = (test_set.get(k) for k in ("kind", "key", "split", "digest"))
    if kind not in TEST_SET_KINDS or not key or not split or not digest:
        raise LineageError("log_evaluation: test_set needs kind (version or benchmark), name, split, digest and key; "
                           "pass the test_set that models/evaluation.py builds.")
    if kind == "version" and not re.fullmatch(r"[0-9a-f]{16,64}", str(digest)):
        raise LineageError(f"log_evaluation: test_set digest {digest!r} is not a version digest (16 to 64 "
                           "lower-case hex characters). Pass the manifest's digest.")
    _refuse_phi("log_evaluation: model/test_set/prompts/metrics", [model, test_set, prompts, metrics])
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise LineageError(f"log_evaluation: file {path} does not exist; expected metrics.json or samples.csv "
                               "written by the evaluation.")
        if PSEUDONYM_PATTERN.search(path.read_text(encoding="utf-8", errors="replace")):
            raise LineageError(f"log_evaluation: {path.name} holds a patient pseudonym; MLflow must never see one. "
                               "Evaluation outputs carry de-identified UIDs only.")
    mlflow = _mlflow()
    from mlflow.entities import DatasetInput, InputTag, Metric, Param

    embedded = not (tracking_uri or settings.mlflow.tracking_uri)
    client = _client(settings, tracking_uri)
    experiment_id = _experiment_id(client, settings, settings.mlflow.eval_experiment, embedded)
    tags = {KIND_TAG: EVAL_KIND, TEST_SET_TAG: str(key), "mlflow.runName": f"eval-{key}"}
    if kind == "version":
        tags[VERSION_TAG] = str(digest)
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    try:
        params = [Param(k, v) for k, v in _eval_params(model, test_set, prompts).items()]
        for start in range(0, len(params), _BATCH_MAX):
            client.log_batch(run_id, params=params[start:start + _BATCH_MAX])
        now = int(1000 * time.time())
        values = [Metric(k, v, now, 0) for k, v in _eval_metrics(metrics).items()]
        for start in range(0, len(values), 1000):
            client.log_batch(run_id, metrics=values[start:start + 1000])
        for path in paths:
            client.log_artifact(run_id, str(path))
        if kind == "version":
            dataset = _training_dataset(mlflow, settings, str(digest), {str(split): {}})
            client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[
                InputTag("mlflow.data.context", EVAL_CONTEXT), InputTag(VERSION_TAG, str(digest)),
                InputTag(SPLITS_TAG, str(split))])])
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    logger.info("lineage: evaluation on %s recorded as MLflow run %s (%d metrics)", key, run_id, len(values))
    return run_id

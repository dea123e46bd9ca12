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
        """Where a patient's data went: {patient_pseudonym, versions, runs, checkpoints}.

        Takes a pseudonym (use :func:`pseudonym_for` to map a source PatientID). ``runs`` lists
        the MLflow runs whose input dataset is one of ``versions`` (needs ``settings``);
        ``checkpoints`` is reserved for the registry and empty for now.
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
        return {"patient_pseudonym": patient_pseudonym, "versions": versions, "runs": runs, "checkpoints": []}

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

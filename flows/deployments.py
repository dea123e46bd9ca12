"""The entry points of prefect.yaml: thin flows with plain JSON parameters.

Each loads the one Settings object from the environment (``RADGROUND_*``, and the YAML file
``RADGROUND_CONFIG`` names) on the worker, so a deployment's parameters never carry a secret,
and runs the same code as the CLI:

* ``rebuild_nightly()``: rebuild every registered drop location whose listing changed.
* ``watch_drops()``: announce each drop that landed in ``watch.inbox`` (event radground.drop.landed).
* ``rebuild_on_drop(drops)``: rebuild with the given drops (the trigger passes one per event).
* ``retrain(version)``: train -> evaluate on the version's test split -> register (challenger).
* ``retention(dry_run)``: retire old dataset versions (tasks/retention.py).

After a rebuild the retrain policy (:func:`retrain_due`) decides whether to emit
radground.retrain.requested, which the ``retrain`` deployment's trigger listens for.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from radground import events
from radground.errors import guarded
from radground.settings import Settings, load_settings


def deployment_settings() -> Settings:
    """Settings of a deployment run: environment + the file RADGROUND_CONFIG names. A worker sets
    PREFECT_API_URL: unless prefect.api_url says otherwise, the run uses that server (not an embedded one)."""
    config = os.environ.get("RADGROUND_CONFIG") or None
    settings = load_settings(config)
    api_url = os.environ.get("PREFECT_API_URL")
    if settings.prefect.api_url is None and api_url:
        settings = settings.model_copy(update={"prefect": settings.prefect.model_copy(update={"api_url": api_url})})
    return settings


# ------------------------------------------------------------------------------- the retrain policy
def _patients(settings: Settings, digest: str) -> set[str]:
    from models.data import resolve_version
    from tasks.version import read_splits

    return set(read_splits(resolve_version(settings, digest)))


def _settings_hash(settings: Settings, digest: str) -> str:
    from models.data import resolve_version
    from tasks.version import read_manifest

    return read_manifest(resolve_version(settings, digest)).settings_hash


def champion_digest(settings: Settings) -> str | None:
    """The dataset digest the champion model was trained on, or None when there is no champion."""
    from models.registry import CHAMPION, list_versions

    for version in list_versions(settings):
        if CHAMPION in version["aliases"]:
            return version["dataset_digest"] or None
    return None


def retrain_due(settings: Settings, new_digest: str) -> tuple[bool, str]:
    """Does version ``new_digest`` call for a retrain? (due, reason). Due when there is no champion, the
    champion's dataset version is not here, a stage setting changed (another settings hash), or the new
    version holds at least ``retrain.min_new_patients`` patients the champion's version lacks.
    The reason holds counts and digests only."""
    from models.data import DataError

    wanted = settings.retrain.min_new_patients
    base = champion_digest(settings)
    if base is None:
        return True, "no champion model yet"
    if base == new_digest:
        return False, f"the champion was trained on this version ({new_digest[:16]})"
    try:
        base_hash, base_patients = _settings_hash(settings, base), _patients(settings, base)
    except DataError:  # retired, or neither here nor tracked by DVC
        return True, f"the champion's dataset version {base[:16]} is retired or not in this data_dir"
    if _settings_hash(settings, new_digest) != base_hash:
        return True, f"stage settings changed since the champion's version {base[:16]}"
    new = len(_patients(settings, new_digest) - base_patients)
    if new >= wanted:
        return True, (f"{new} new patient(s) since the champion's version {base[:16]} "
                      f"(retrain.min_new_patients {wanted})")
    return False, f"{new} new patient(s) since the champion's version {base[:16]}, fewer than {wanted}"


def _after_rebuild(settings: Settings, results: list, logger) -> dict[str, Any]:
    if not results:
        return {"version": None, "retrain": False, "reason": "nothing was rebuilt"}
    digest = results[0].version["digest"]
    if results[0].version.get("unchanged"):  # built and recorded before: asked then, not again each night
        logger.info("version %s unchanged: the retrain policy ran when it was built", digest[:16])
        return {"version": digest, "drops": len(results), "retrain": False, "reason": "version unchanged"}
    due, reason = retrain_due(settings, digest)
    logger.info("version %s; retrain %s: %s", digest[:16], "requested" if due else "not due", reason)
    if due:
        events.emit([events.retrain_requested(digest)])
    return {"version": digest, "drops": len(results), "retrain": due, "reason": reason}


# ------------------------------------------------------------------------------- entry points
def changed_locations(settings: Settings) -> list[str]:
    """Registered drop locations that still exist and whose listing differs from the one last built
    (a store: drop has no cheap fingerprint: it is always passed on, and its stage records say it is current)."""
    from radground.buildstate import DropRegistry
    from tasks.discover import DropReader

    registry = DropRegistry(settings)
    changed = []
    for location in sorted({e["location"] for e in registry.entries().values() if e.get("location")}):
        if not DropReader.available(location, settings):
            continue
        reader = DropReader(location, settings)
        if registry.drop_for(location, reader.fingerprint(reader.list_files())) is None:
            changed.append(location)
    return changed


@flow(name="rebuild-nightly", log_prints=False)
@guarded("the rebuild-nightly flow")
def rebuild_nightly() -> dict[str, Any]:
    """Rebuild every registered drop location that changed since it was built; then the retrain policy."""
    from flows.rebuild import run_rebuild

    logger = get_run_logger()
    settings = deployment_settings()
    drops = changed_locations(settings)
    if not drops:
        logger.info("no registered drop changed: nothing to rebuild")
        return {"version": None, "retrain": False, "reason": "no registered drop changed"}
    logger.info("%d changed drop location(s) to rebuild", len(drops))
    return _after_rebuild(settings, run_rebuild(drops, settings), logger)


@flow(name="watch-drops", log_prints=False)
@guarded("the watch-drops flow")
def watch_drops() -> dict[str, Any]:
    """Emit radground.drop.landed once per drop that is complete (marker) and quiet in watch.inbox."""
    from tasks import inbox

    logger = get_run_logger()
    settings = deployment_settings()
    with inbox.state_lock(settings):
        state, to_emit = inbox.scan(settings, time.time())
        events.emit(to_emit)  # first: a failed send leaves the state as it was, so the next scan retries
        inbox.write_state(settings, state)
    watching = sum(1 for entry in state["drops"].values() if not entry["landed"])
    logger.info("%d drop(s) landed, %d still arriving or without marker", len(to_emit), watching)
    return {"landed": len(to_emit), "waiting": watching}


@flow(name="rebuild-on-drop", log_prints=False)
@guarded("the rebuild-on-drop flow")
def rebuild_on_drop(drops: list[str]) -> dict[str, Any]:
    """Rebuild with ``drops`` (folders or store:PREFIX) added; then the retrain policy."""
    from flows.rebuild import run_rebuild

    logger = get_run_logger()
    settings = deployment_settings()
    return _after_rebuild(settings, run_rebuild(drops, settings), logger)


@flow(name="retrain", log_prints=False)
@guarded("the retrain flow")
def retrain(version: str | None = None) -> dict[str, Any]:
    """Train on ``version`` (default: the latest), evaluate the best checkpoint on its test split, register
    it as the challenger with those metrics. Promotion stays a person's call (radground models promote)."""
    from flows.train import run_training
    from models.checkpoints import load_model, resolve_model
    from models.evaluation import evaluate_version
    from models.registry import register

    logger = get_run_logger()
    settings = deployment_settings()
    trained = run_training(version or None, settings)
    digest = trained.version_digest
    source = resolve_model(settings, trained.run_id)
    model, processor = load_model(source)
    info = {**source.describe(), "checkpoint": source.checkpoint_uri or str(source.folder),
            "training_run_id": source.lineage.get("training_run_id"), "step": source.lineage.get("step"),
            "max_new_tokens": settings.model.max_new_tokens}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(settings.data_dir).resolve() / "evaluations" / f"version-test-{stamp}"
    result = evaluate_version(settings, digest, "test", model=(model, processor), model_info=info, out=out)
    registered = register(settings, source, evaluation={"test_set_key": result.test_set_key,
                                                        "metrics": result.metrics,
                                                        "eval_run_id": result.run_id})
    logger.info("trained %s on version %s; registered version %s (challenger)", trained.run_id, digest[:16],
                registered["version"])
    return {"version": digest, "training_run": trained.run_id, "eval_run": result.run_id,
            "model_version": registered["version"], "note": registered["note"]}


@flow(name="retention", log_prints=False)
@guarded("the retention flow")
def retention(dry_run: bool = True) -> dict[str, Any]:
    """Retire dataset versions the retention policy does not keep (tasks/retention.py ``retire``)."""
    from tasks.retention import retire  # lazily: DVC and MLflow behind it, needed by this deployment only

    return retire(deployment_settings(), dry_run=dry_run)

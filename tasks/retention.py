"""Retention of dataset versions (``radground datasets retire``): which versions keep their data.

A version is **kept** (its reason recorded) when it is, in this order:

* ``latest``: the version ``versions/LATEST`` names (what the next rebuild builds on);
* ``pinned``: its digest starts with one of ``retention.pinned``;
* ``model``: a version of the registered model (``model.registry_name``) was trained on it
  (its ``radground.dataset_digest`` tag), and that model version is not tagged
  ``radground.contains_forgotten`` when this version holds a forgotten patient;
* ``newest``: among the ``retention.keep_last`` newest versions (manifest ``created_at``);
* ``young``: younger than ``retention.keep_days`` days.

**Forgotten patients.** A version that still holds a patient on the exclusion list
(``state/forgotten.json``; found through its lineage table, else its splits) goes the same path,
but ``newest`` and ``young`` do not keep it, nor does a model already tagged
``radground.contains_forgotten`` (it may not be promoted anyway). It is kept only as the latest,
when pinned (an operator's explicit decision; the plan says it holds a forgotten patient), or
for a model not tagged so (retiring it would make that model's training data unrecoverable
before anyone decided to). Physical erasure everywhere remains ``radground forget --purge``.

Every other version is **retired**, under the rebuild lock:

* every file of its folder but ``manifest.json`` (shards, splits, the quality report) is removed;
  a ``RETIRED.json`` note (when, which rule set; no PHI) is written beside the manifest;
* the folder (manifest + note) is tracked again, so its ``.dvc`` file references only those two
  files, and pushed; then exactly the DVC objects the retired versions referenced and no
  remaining ``.dvc`` file references are deleted from the local cache and the remote. This is
  ``dvc gc --workspace --cloud`` limited to this data_dir's retired objects: a blanket gc would
  also delete other data_dirs' objects from a shared remote (see tasks/purge.py);
* the MLflow runs whose input was a retired version get ``radground.retired=true`` and
  ``radground.retired_versions`` (digests only).

Manifests are kept forever: the lineage tables (``lineage/<version>.parquet``) stay too, so
``radground lineage`` still answers which patients a retired version held.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from radground.buildstate import forgotten_patients, rebuild_lock
from radground.dvc import DvcRepo
from radground.errors import RadgroundError
from radground.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
RETIRED_FILE = "RETIRED.json"  # beside the manifest of a retired version
RETIRED_TAG = "radground.retired"
RETIRED_VERSIONS_TAG = "radground.retired_versions"
REASONS = ("latest", "pinned", "model", "newest", "young")


class RetentionError(RadgroundError):
    """The retention plan cannot be made or carried out."""


def is_retired(folder: Path) -> bool:
    """Whether a version folder was retired: its manifest is all that is left of its data."""
    return (Path(folder) / RETIRED_FILE).is_file()


@dataclass
class _Version:
    name: str  # folder name = digest[:16]
    digest: str
    created_at: datetime
    folder: Path
    holds_forgotten: bool = False
    files: list[Path] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def _created(text: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RetentionError(f"version {name}: manifest created_at {text!r} is not an ISO 8601 time, so its age "
                             "is unknown. Restore the manifest from the DVC remote.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _holds(settings: Settings, folder: Path, forgotten: set[str]) -> bool:
    """Whether the version's lineage table (else its splits) names a forgotten patient."""
    if not forgotten:
        return False
    lineage = settings.data_dir.resolve() / "lineage" / f"{folder.name}.parquet"
    source = lineage if lineage.is_file() else folder / "splits.parquet"
    if not source.is_file():
        return False
    values = pq.read_table(source, columns=["patient_pseudonym"])["patient_pseudonym"].to_pylist()
    return not forgotten.isdisjoint(values)


def _versions(settings: Settings) -> tuple[list[_Version], list[str]]:
    """The versions under data_dir with data (newest first), and those retired earlier."""
    from tasks.version import read_manifest
    from tasks.version_stage import versions_root

    root = versions_root(settings)
    forgotten = forgotten_patients(settings)
    found, retired = [], []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or not (folder / MANIFEST_FILE).is_file():
            continue
        if is_retired(folder):
            retired.append(folder.name)
            continue
        manifest = read_manifest(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
        found.append(_Version(folder.name, manifest.digest, _created(manifest.created_at, folder.name), folder,
                              _holds(settings, folder, forgotten), files))
    found.sort(key=lambda v: (v.created_at, v.name), reverse=True)
    return found, retired


def _model_uses(settings: Settings, list_versions: Callable[[Settings], list[dict]] | None) -> list[dict]:
    if list_versions is None:
        from models.registry import list_versions
    try:
        return list_versions(settings)
    except RadgroundError as exc:
        raise RetentionError(f"cannot read the model registry ({exc}); without it no version used by a registered "
                             "model can be told apart, so nothing is retired. Start the MLflow server "
                             "(mlflow.tracking_uri) and retry.") from None


def _used_by(version: _Version, models: list[dict]) -> list[dict]:
    used = []
    for model in models:
        tag = (model.get("dataset_digest") or "").strip().lower()
        if len(tag) >= 16 and (version.digest.startswith(tag) or tag.startswith(version.digest)):
            used.append(model)
    return used


def plan(settings: Settings, *, now: datetime | None = None,
         list_versions: Callable[[Settings], list[dict]] | None = None) -> tuple[dict[str, str], list[_Version],
                                                                                 list[str]]:
    """(kept {version: reason}, versions to retire (newest first), versions retired earlier).

    The caller holds the rebuild lock. ``list_versions`` defaults to models.registry.list_versions.
    """
    from tasks.version_stage import latest_version_dir

    retention = settings.retention
    now = now or datetime.now(UTC)
    versions, retired_before = _versions(settings)
    latest = latest_version_dir(settings)
    latest_name = latest.name if latest else None
    models = _model_uses(settings, list_versions) if versions else []
    newest = {v.name for v in versions[:retention.keep_last]}
    kept: dict[str, str] = {}
    retire: list[_Version] = []
    for version in versions:
        forgotten_note = " (holds a forgotten patient: erase with radground forget --purge)"
        pins = [p for p in retention.pinned if version.digest.startswith(p)]
        users = [m for m in _used_by(version, models) if not (version.holds_forgotten and m.get("contains_forgotten"))]
        if version.name == latest_name:
            kept[version.name] = "latest"
        elif pins:
            kept[version.name] = f"pinned ({pins[0]})" + (forgotten_note if version.holds_forgotten else "")
        elif users:
            names = ", ".join(f"{m.get('name', 'model')} v{m.get('version')}" for m in users)
            kept[version.name] = f"model ({names})" + (forgotten_note if version.holds_forgotten else "")
        elif version.holds_forgotten:
            retire.append(version)
        elif version.name in newest:
            kept[version.name] = f"newest (keep_last {retention.keep_last})"
        elif now - version.created_at < timedelta(days=retention.keep_days):
            kept[version.name] = f"young (keep_days {retention.keep_days:g})"
        else:
            retire.append(version)
    return kept, retire, retired_before


def _dvc_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*.dvc") if p.is_file())


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - DVC 3's content address, not a security hash
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dvc_estimate(dvc: DvcRepo, retire: list[_Version]) -> dict[str, int]:
    """The DVC objects an apply would delete: referenced by a retired version only (its manifest aside)."""
    root = dvc.root
    retired = [root / f"{v.name}.dvc" for v in retire if (root / f"{v.name}.dvc").is_file()]
    if not retired:
        return {"dvc_objects": 0, "dvc_cache_bytes": 0}
    others = [p for p in _dvc_files(root) if p not in retired]
    freed = dvc.referenced_hashes(retired) - dvc.referenced_hashes(others)
    freed -= {_md5(v.folder / MANIFEST_FILE) for v in retire}
    cache = root / ".dvc" / "cache" / "files" / "md5"
    size = sum(p.stat().st_size for h in freed if (p := cache / h[:2] / h[2:]).is_file())
    return {"dvc_objects": len(freed), "dvc_cache_bytes": size}


def _retire_folder(version: _Version, rules: dict[str, Any]) -> None:
    for path in version.files:
        path.unlink()
    for folder in sorted((p for p in version.folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                         reverse=True):
        folder.rmdir()
    note = {"retired_at": datetime.now(UTC).isoformat(timespec="seconds"), "digest": version.digest,
            "by": "radground datasets retire", "retention": rules}
    tmp = version.folder / f".{RETIRED_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(note, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, version.folder / RETIRED_FILE)


def retire(settings: Settings, *, dry_run: bool = True, now: datetime | None = None,
           list_versions: Callable[[Settings], list[dict]] | None = None) -> dict[str, Any]:
    """Plan (``dry_run``, the default: nothing changes) or carry out the retention of dataset versions.

    Returns {kept: {version: reason}, retired: [{version, digest, created_at, files, bytes,
    holds_forgotten}], already_retired: [version], versions, files, bytes, dvc: {...},
    mlflow_runs_tagged: [run id], dry_run}. ``files``/``bytes`` are what leaves the version
    folders (shards shared with a kept version are hard links: the disk space freed is the DVC
    cache's part, ``dvc.dvc_cache_bytes``). Versions are named by their folder (digest[:16]).
    Raises RebuildLockedError when another rebuild, forget or purge holds the lock longer than
    ``rebuild_lock_timeout_s``.
    """
    from radground.lineage import runs_using, tag_runs
    from tasks.version_stage import versions_root

    rules = settings.retention.model_dump(mode="json")
    with rebuild_lock(settings, command="retire"):
        kept, retire_, before = plan(settings, now=now, list_versions=list_versions)
        root = versions_root(settings)
        dvc = DvcRepo(root, settings)
        has_dvc = (root / ".dvc").is_dir()
        report: dict[str, Any] = {
            "dry_run": dry_run, "kept": kept,
            "retired": [{"version": v.name, "digest": v.digest, "created_at": v.created_at.isoformat(),
                         "files": len(v.files), "bytes": v.bytes, "holds_forgotten": v.holds_forgotten}
                        for v in retire_],
            "already_retired": before, "versions": len(retire_), "files": sum(len(v.files) for v in retire_),
            "bytes": sum(v.bytes for v in retire_),
            "dvc": _dvc_estimate(dvc, retire_) if has_dvc else {"dvc_objects": 0, "dvc_cache_bytes": 0},
            "mlflow_runs_tagged": []}
        runs = runs_using(settings, [v.digest for v in retire_]) if retire_ else []
        report["mlflow_runs"] = sorted({r["run_id"] for r in runs})
        if dry_run or not retire_:
            return report

        retired_dvc = [root / f"{v.name}.dvc" for v in retire_ if (root / f"{v.name}.dvc").is_file()]
        old_hashes = dvc.referenced_hashes(retired_dvc) if retired_dvc else set()
        for version in retire_:
            _retire_folder(version, rules)
            log.info("retired version %s (%d files)", version.name, len(version.files))
        if retired_dvc:
            for path in retired_dvc:
                dvc.track(root / path.stem)  # the folder now: manifest + RETIRED.json
                dvc.push(path.stem)
            remaining = dvc.referenced_hashes(_dvc_files(root))
            report["dvc"] |= dvc.delete_objects(old_hashes - remaining)

        tags: dict[str, set[str]] = {}
        by_digest = {v.digest: v.name for v in retire_}
        for run in runs:
            name = by_digest.get(run["version_digest"]) or run["version_digest"][:16]
            tags.setdefault(run["run_id"], set()).add(name)
        if tags:
            tag_runs(settings, {run_id: {RETIRED_TAG: "true", RETIRED_VERSIONS_TAG: ",".join(sorted(names))}
                                for run_id, names in tags.items()})
        report["mlflow_runs_tagged"] = sorted(tags)
    return report

"""What one rebuild leaves for the next: stage records, the drop registry, the forgotten patients.

Incremental rebuilds rest on three facts kept here:

* **Stage records.** When a stage finishes a drop it writes ``<stage>/<drop_id>/_stage.json``
  last, after its outputs, holding the stage key it ran under, its summary, and the PHI-free
  hand-off the next stage needs (shard keys, mask keys). The key hashes the drop's content id,
  the upstream stages' keys, the settings of this stage (:meth:`Settings.stage_hash`) and the
  code version, so a setting of one stage invalidates that stage and every stage after it. A
  rebuild killed mid-stage leaves no record, so the next one redoes that stage and no more.
* **The drop registry** (``<data_dir>/state/drops.json``): drop id -> where it was read from
  and a cheap fingerprint of its listing (relative path, size, mtime). A drop whose fingerprint
  is unchanged is not even re-hashed. Locations stay on this machine: never in a version,
  an MLflow run or a log line.
* **Forgotten patients** (``<data_dir>/state/forgotten.json``): pseudonyms only; every later
  version leaves their records out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from filelock import FileLock, Timeout
from pydantic import BaseModel, ConfigDict, ValidationError

from radground import __version__
from radground.errors import ObjectNotFoundError, RadgroundError
from radground.keys import load_key
from radground.settings import Settings
from radground.store import ObjectStore

STAGES = ("ingest", "curate", "segment", "ground")
UPSTREAM = {"ingest": (), "curate": ("ingest",), "segment": ("ingest",), "ground": ("curate", "segment")}
RECORD_FILE = "_stage.json"


class BuildStateError(RadgroundError):
    """The build state under data_dir is damaged or does not fit the request."""


class RebuildLockedError(RadgroundError):
    """Another rebuild (or forget) is running on the same data_dir."""


LOCK_FILE = "rebuild.lock"
LOCK_HOLDER_FILE = "rebuild.lock.json"  # who holds the lock: pid, host, command, start time (no PHI)


class LockHolder(BaseModel):
    """Who holds the rebuild lock, for the one waiting: no path, drop or patient, only these."""

    model_config = ConfigDict(extra="ignore")

    pid: int
    host: str
    command: str  # "rebuild" or "forget"
    started_at: str  # ISO 8601, UTC

    def describe(self) -> str:
        return (f"the {self.command} started at {_local_time(self.started_at)} by pid {self.pid} "
                f"on host {self.host}")


def _local_time(iso: str) -> str:
    """An ISO timestamp as the reader's local time, to the minute (what a person compares with a clock)."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except ValueError:
        return iso


def lock_holder(settings: Settings) -> LockHolder | None:
    """The holder the lock's sidecar names, or None (no sidecar: no holder, or one from before sidecars)."""
    try:
        return LockHolder.model_validate_json((settings.data_dir / LOCK_HOLDER_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


@contextmanager
def rebuild_lock(settings: Settings, command: str = "rebuild") -> Iterator[None]:
    """One writer of versions at a time per data_dir: two at once could interleave the writes of
    one version, so the second waits ``rebuild_lock_timeout_s``, then fails naming the lock.

    The holder writes who it is (pid, host, ``command``, start time) to a sidecar beside the lock,
    so a waiting rebuild can say whom it waits for. The lock itself is the OS's (flock): it is
    released when its holder dies, whatever the sidecar still says.
    """
    from radground.runtime import notify  # the runtime imports the settings only: no cycle

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(settings.data_dir / LOCK_FILE)
    sidecar = settings.data_dir / LOCK_HOLDER_FILE
    timeout = settings.rebuild_lock_timeout_s
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = lock_holder(settings)
        whom = holder.describe() if holder else "another rebuild or forget (it left no note of who it is)"
        notify(f"waiting for {whom} to finish (lock {lock.lock_file}; up to {timeout:g} s, "
               "rebuild_lock_timeout_s)")
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            holder = lock_holder(settings) or holder  # the holder may have changed while we waited
            whom = holder.describe() if holder else "another rebuild or forget"
            raise RebuildLockedError(
                f"{whom} holds {lock.lock_file} (waited {timeout:g} s). Let it finish, or raise "
                "rebuild_lock_timeout_s to wait longer. A holder that no longer runs does not hold the "
                "lock: the operating system releases it when its process ends.") from None
    try:
        _write_json(sidecar, LockHolder(pid=os.getpid(), host=socket.gethostname(), command=command,
                                        started_at=datetime.now(UTC).isoformat(timespec="seconds")).model_dump())
        yield
    finally:
        sidecar.unlink(missing_ok=True)  # still ours: the lock is held until the next line
        lock.release()


class StageRecord(BaseModel):
    """A finished stage of one drop. PHI-free: pseudonymous ids and store keys only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    drop_id: str
    key: str
    summary: dict[str, Any]
    handoff: dict[str, Any] = {}
    finished_at: str = ""  # informational; never part of a key


def content_sha(payload: Any) -> str:
    """sha256 of a JSON-able payload (sorted keys): the one recipe for every key here."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def key_fingerprint(settings: Settings) -> str:
    """A public stand-in for the de-identification key: pseudonyms change with the key, so the
    ingest key must too, and the key itself must never enter a hash that is stored."""
    return hmac.new(load_key(settings), b"radground stage key", hashlib.sha256).hexdigest()[:16]


def stage_keys(drop_id: str, settings: Settings) -> dict[str, str]:
    """The key every stage of ``drop_id`` runs under with these settings and this code."""
    keys: dict[str, str] = {}
    for stage in STAGES:
        keys[stage] = content_sha({
            "stage": stage, "drop_id": drop_id, "code_version": __version__,
            "settings": settings.stage_hash(stage), "upstream": [keys[u] for u in UPSTREAM[stage]],
            "deid_key": key_fingerprint(settings) if stage == "ingest" else "",
        })
    return keys


def record_key(stage: str, drop_id: str) -> str:
    return f"{stage}/{drop_id}/{RECORD_FILE}"


def read_record(store: ObjectStore, stage: str, drop_id: str) -> StageRecord | None:
    try:
        data = store.get(record_key(stage, drop_id))
    except ObjectNotFoundError:
        return None
    try:
        return StageRecord.model_validate_json(data)
    except ValidationError:
        return None  # a damaged record is a missing one: the stage runs again


def write_record(store: ObjectStore, stage: str, drop_id: str, key: str, summary: Mapping[str, Any],
                 handoff: Mapping[str, Any] | None = None) -> StageRecord:
    """Mark ``stage`` of ``drop_id`` done under ``key``; call it after every output is written."""
    record = StageRecord(stage=stage, drop_id=drop_id, key=key, summary=dict(summary), handoff=dict(handoff or {}),
                         finished_at=datetime.now(UTC).isoformat(timespec="seconds"))
    store.put(record_key(stage, drop_id), record.model_dump_json(indent=1).encode())
    return record


def fresh_records(store: ObjectStore, drop_id: str, keys: Mapping[str, str]) -> dict[str, StageRecord]:
    """The stages of ``drop_id`` whose record matches its current key (and all its upstream ones)."""
    fresh: dict[str, StageRecord] = {}
    for stage in STAGES:
        record = read_record(store, stage, drop_id)
        if record is not None and record.key == keys[stage] and all(u in fresh for u in UPSTREAM[stage]):
            fresh[stage] = record
    return fresh


# ------------------------------------------------------------------------------- drop registry
def _state_dir(settings: Settings) -> Path:
    path = settings.data_dir.resolve() / "state"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_json(path: Path, default: Any) -> Any:
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise BuildStateError(f"{path} is not valid JSON (damaged by a crash or an edit?). Restore it from a "
                              "backup, or delete it: the next rebuild then re-hashes every drop.") from None


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def listing_fingerprint(root: Path, relative_paths: Iterable[str]) -> str:
    """sha256 over (path, size, mtime) of a local drop's files: changes when any file does."""
    entries = []
    for rel in relative_paths:
        stat = (root / rel).stat()
        entries.append((rel, stat.st_size, stat.st_mtime_ns))
    return content_sha(entries)


class DropRegistry:
    """drop id -> location and listing fingerprint, under ``<data_dir>/state/drops.json``."""

    def __init__(self, settings: Settings) -> None:
        self.path = _state_dir(settings) / "drops.json"
        self._lock = FileLock(str(self.path) + ".lock")

    def entries(self) -> dict[str, dict[str, str]]:
        return _read_json(self.path, {})

    def drop_for(self, location: str, fingerprint: str | None) -> str | None:
        """The drop id last seen at ``location`` with this exact listing, or None."""
        if fingerprint is None:
            return None
        for drop_id, entry in self.entries().items():
            if entry.get("location") == location and entry.get("fingerprint") == fingerprint:
                return drop_id
        return None

    def location_of(self, drop_id: str) -> str | None:
        return self.entries().get(drop_id, {}).get("location")

    def remember(self, drop_id: str, location: str, fingerprint: str | None) -> None:
        with self._lock:
            entries = self.entries()
            entries[drop_id] = {"location": location, "fingerprint": fingerprint or ""}
            _write_json(self.path, entries)


# ------------------------------------------------------------------------------- forgotten patients
def forgotten_patients(settings: Settings) -> set[str]:
    """Pseudonyms that no later version may contain."""
    return set(_read_json(_state_dir(settings) / "forgotten.json", []))


def forget_patients(settings: Settings, pseudonyms: Sequence[str]) -> set[str]:
    """Add pseudonyms to the exclusion list; returns the whole list."""
    path = _state_dir(settings) / "forgotten.json"
    with FileLock(str(path) + ".lock"):
        patients = set(_read_json(path, [])) | set(pseudonyms)
        _write_json(path, sorted(patients))
    return patients


def clear_stage(store: ObjectStore, stage: str, drop_id: str) -> int:
    """Delete a stage's outputs of one drop before it runs again (record first, so a crash in
    between leaves the stage unfinished, never finished with half its old outputs)."""
    prefix = f"{stage}/{drop_id}/"
    keys = sorted(store.list(prefix), key=lambda k: not k.endswith(RECORD_FILE))
    for key in keys:
        store.delete(key)
    return len(keys)


# ------------------------------------------------------------------------------- series outputs
# A series that an earlier drop already delivered (same files, same settings, same code) is not
# extracted or segmented again: its earlier output is copied, relabelled with this drop's id.
class SeriesOutput(NamedTuple):
    table: bytes  # the earlier Parquet output, verified against the sha256 recorded with it
    extra: dict[str, Any]  # what the stage returned besides the table (counts, quarantine rows)


def series_key(stage: str, content: Any, settings: Settings) -> str:
    """Key of one series' output of ``stage`` ("ingest" or "segment"): what the series is made of
    plus the settings of ingest (and of ``stage``), the de-identification key and the code."""
    stages = ("ingest",) if stage == "ingest" else ("ingest", stage)
    return content_sha({"stage": stage, "content": content, "settings": [settings.stage_hash(s) for s in stages],
                 "code_version": __version__, "deid_key": key_fingerprint(settings)})


def _series_entry(stage: str, key: str) -> str:
    return f"series/{stage}/{key}.json"


def find_series_output(store: ObjectStore, stage: str, key: str) -> SeriesOutput | None:
    """The earlier output of an identical series, or None (never seen, deleted, or rewritten since)."""
    try:
        entry = json.loads(store.get(_series_entry(stage, key)))
        data = store.get(entry["table_key"])
    except (ObjectNotFoundError, json.JSONDecodeError, KeyError):
        return None
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return None  # the drop that wrote it was rebuilt with other settings since
    return SeriesOutput(table=data, extra=entry.get("extra", {}))


def remember_series_output(store: ObjectStore, stage: str, key: str, table_key: str, data: bytes,
                           extra: Mapping[str, Any]) -> None:
    entry = {"table_key": table_key, "sha256": hashlib.sha256(data).hexdigest(), "extra": dict(extra)}
    store.put(_series_entry(stage, key), json.dumps(entry, sort_keys=True, default=str).encode())

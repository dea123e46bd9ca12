"""The version stage: immutable Parquet shards + manifest, patient-level splits, DVC.

A dataset version is a folder (docs/architecture.md, "Dataset version format")::

    <version>/manifest.json                 written last, atomically; its presence = complete
    <version>/<table>/part-<sha16>.parquet  content-addressed shards (sha16 = sha256[:16])
    <version>/splits.parquet                patient_pseudonym -> train | val | test

Shard names come from their bytes, so an unchanged shard of an earlier drop has the same
name and bytes in every later version; it is carried over (hard link, else copy) rather than
rewritten, and DVC's content-addressed cache stores and pushes it once. The digest hashes
the shard hashes, the splits file's hash, the settings hash and the code version: never a
timestamp, never the parent, so the same inputs and settings give the same digest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radground import __version__
from radground.errors import RadgroundError
from radground.settings import VersionSettings
from radground.tables import parquet_bytes

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
SPLITS_FILE = "splits.parquet"
FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
_TMP = ".tmp-"
_HASH_CHUNK = 1024 * 1024

Split = Literal["train", "val", "test"]


# TODO(radground/errors.py): move these two beside the other typed errors.
class VersionError(RadgroundError):
    """A dataset version cannot be written or read as asked (immutable, malformed, mismatched)."""


# --------------------------------------------------------------------------- splits


def split_position(patient: str, key: bytes) -> float:
    """The patient's stable position in [0, 1): HMAC-SHA256(key, "split" NUL pseudonym)."""
    digest = hmac.new(key, b"split\x00" + patient.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64  # 64 bits: uniform enough, exact in float


def assign_splits(patients: Iterable[str], previous: Mapping[str, str], ratios: VersionSettings,
                  key: bytes) -> dict[str, str]:
    """Split of every patient: ``previous`` ones keep theirs; new ones by keyed hash bucket.

    A patient never moves once assigned, even when the ratios change: only new patients
    follow the new ratios. The result holds ``previous`` plus the new patients, sorted.
    """
    bad = {p: s for p, s in previous.items() if s not in SPLIT_NAMES}
    if bad:
        patient, split = next(iter(bad.items()))
        raise VersionError(f"previous splits: {len(bad)} patient(s) have an unknown split, e.g. {patient} -> "
                           f"{split!r}; expected one of {', '.join(SPLIT_NAMES)}. The parent's splits.parquet "
                           "is damaged; restore it from the DVC remote.")
    result = dict(previous)
    train_end, val_end = ratios.train, ratios.train + ratios.val
    for patient in patients:
        if patient in result:
            continue
        x = split_position(patient, key)
        result[patient] = "train" if x < train_end else "val" if x < val_end else "test"
    return dict(sorted(result.items()))


def splits_table(splits: Mapping[str, str]) -> pa.Table:
    items = sorted(splits.items())
    return pa.table({"patient_pseudonym": pa.array([p for p, _ in items], pa.string()),
                     "split": pa.array([s for _, s in items], pa.string())})


def read_splits(version_dir: Path | str) -> dict[str, str]:
    """A version's splits as {patient_pseudonym: split} (empty when it has none)."""
    path = Path(version_dir) / SPLITS_FILE
    if not path.exists():
        return {}
    table = pq.read_table(path)
    return dict(zip(table["patient_pseudonym"].to_pylist(), table["split"].to_pylist(), strict=True))


# --------------------------------------------------------------------------- manifest


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Frozen):
    path: str = Field(description="Relative posix path inside the version folder.")
    sha256: str
    rows: int = Field(ge=0)


class TableEntry(_Frozen):
    rows: int = Field(ge=0)
    shards: list[ShardEntry]


class Manifest(_Frozen):
    """manifest.json of a dataset version."""

    format_version: int = FORMAT_VERSION
    digest: str
    parent_digest: str | None
    drops: list[str]
    code_version: str
    settings_hash: str
    tables: dict[str, TableEntry]
    splits: ShardEntry
    quarantine_counts: dict[str, Any]
    created_by: str
    created_at: str = Field(description="UTC, ISO 8601; informational, not part of the digest.")


def compute_digest(tables: Mapping[str, Iterable[str]], splits_sha256: str, settings_hash: str,
                   code_version: str) -> str:
    """sha256 over the sorted shard hashes per table, the splits hash, settings hash, code version."""
    payload = {
        "format_version": FORMAT_VERSION,
        "tables": {name: sorted(shas) for name, shas in sorted(tables.items())},
        "splits": splits_sha256,
        "settings_hash": settings_hash,
        "code_version": code_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: Path | str) -> Manifest:
    """Read a version's manifest; ``path`` is the version folder or its manifest.json."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VersionError(f"{path} does not exist: the folder is not a complete dataset version (the manifest "
                           "is written last). Rebuild the version, or `radground` pull it from the DVC remote."
                           ) from None
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise VersionError(f"{path}: not a valid version manifest ({exc.error_count()} problem(s), first: "
                           f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}). Restore it from the DVC "
                           "remote.") from None


# --------------------------------------------------------------------------- writing


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{_TMP}{path.name}.{secrets.token_hex(4)}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_name(sha256: str) -> str:
    return f"part-{sha256[:16]}.parquet"


def _chunks(table: pa.Table, target_bytes: int) -> Iterator[pa.Table]:
    # Rows per shard from the measured Parquet size of a sample (about one shard of rows),
    # fitted as fixed cost + rows * per-row cost: the fixed part (footer, schema, min/max
    # statistics, which for a binary pixel column are whole values) matters for small
    # targets. Deterministic in the input, so equal input gives equal shard boundaries.
    if table.num_rows == 0:
        return
    guess = max(2, target_bytes // max(1, table.nbytes // table.num_rows))
    sample = table.slice(0, min(table.num_rows, guess))
    one = len(parquet_bytes(table.slice(0, 1)))
    if sample.num_rows > 1:
        per_row = max(1.0, (len(parquet_bytes(sample)) - one) / (sample.num_rows - 1))
        fixed = max(0.0, one - per_row)
    else:
        per_row, fixed = float(one), 0.0
    rows = max(1, int((target_bytes - fixed) / per_row))
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def _carry_over(source: Path, dest: Path) -> None:
    """Put an existing shard at ``dest`` without writing its bytes again: hard link, else copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return
    try:
        os.link(source, dest)
    except OSError:  # another file system, or no hard links: a copy keeps the bytes (and mtime)
        tmp = dest.with_name(f"{_TMP}{dest.name}.{secrets.token_hex(4)}")
        try:
            shutil.copy2(source, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def write_version(
    tables: Mapping[str, Sequence[pa.Table]],
    *,
    out_dir: Path,
    parent: Manifest | None,
    drops: list[str],
    settings_hash: str,
    code_version: str = __version__,
    quarantine_counts: dict,
    splits: Mapping[str, str] | None = None,
    shard_target_bytes: int = 128 * 2**20,
    reuse: Mapping[str, Sequence[Path | str | ReusedShard]] | None = None,
) -> Manifest:
    """Write a dataset version folder and return its manifest.

    ``tables``: new rows per table, in parts (normally one per drop); each part is cut into
    shards of about ``shard_target_bytes`` on its own, so a drop's shards never depend on the
    other drops. ``reuse``: existing shard files per table carried over untouched: a path
    (hashed to check it) or a :class:`ReusedShard` whose hash is already known. ``splits``: patient -> split, from
    :func:`assign_splits`. Raises VersionError if ``out_dir`` already holds a version.
    """
    out_dir = Path(out_dir)
    reuse = reuse or {}
    manifest_path = out_dir / MANIFEST_FILE
    if manifest_path.exists():
        raise VersionError(f"{out_dir} already holds a complete dataset version ({MANIFEST_FILE} exists); "
                           "versions are immutable. Write the new version into a new folder.")
    if shard_target_bytes <= 0:
        raise VersionError(f"shard_target_bytes = {shard_target_bytes}: expected a positive byte count.")
    for name in [*tables, *reuse]:
        if not name or "/" in name or name.startswith(".") or name in (MANIFEST_FILE, SPLITS_FILE):
            raise VersionError(f"table name {name!r} is not allowed: expected a plain folder name such as 'images'.")

    entries: dict[str, TableEntry] = {}
    for name in sorted(set(tables) | set(reuse)):
        shards: dict[str, ShardEntry] = {}  # by path: a shard listed twice is stored once
        for source in reuse.get(name, ()):
            entry = _reuse_shard(source, out_dir, name)
            shards.setdefault(entry.path, entry)
        parts = list(tables.get(name, ()))
        for part in parts:
            if not part.schema.equals(parts[0].schema):
                raise VersionError(f"table {name!r}: its parts have different schemas. Build every part with "
                                   "radground.tables.to_arrow and the table's one record model.")
            for entry in write_shards(part, out_dir, name, shard_target_bytes):
                shards.setdefault(entry.path, entry)
        ordered = sorted(shards.values(), key=lambda s: s.path)
        entries[name] = TableEntry(rows=sum(s.rows for s in ordered), shards=ordered)

    splits_bytes = parquet_bytes(splits_table(splits or {}))
    _write_atomic(out_dir / SPLITS_FILE, splits_bytes)
    splits_entry = ShardEntry(path=SPLITS_FILE, sha256=hashlib.sha256(splits_bytes).hexdigest(),
                              rows=len(splits or {}))

    expected = {s.path for e in entries.values() for s in e.shards} | {SPLITS_FILE}
    stray = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*")
                   if p.is_file() and p.relative_to(out_dir).as_posix() not in expected)
    if stray:
        raise VersionError(f"{out_dir}: {len(stray)} file(s) that are not part of this version, e.g. {stray[0]} "
                           "(left by an interrupted write?). Delete the folder and write the version again.")

    digest = compute_digest({n: [s.sha256 for s in e.shards] for n, e in entries.items()},
                            splits_entry.sha256, settings_hash, code_version)
    manifest = Manifest(
        digest=digest, parent_digest=parent.digest if parent else None, drops=list(drops),
        code_version=code_version, settings_hash=settings_hash, tables=entries, splits=splits_entry,
        quarantine_counts=dict(quarantine_counts), created_by=f"radground {__version__}",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    # Last and atomic: a folder with a manifest is complete, one without is not a version.
    _write_atomic(manifest_path, (manifest.model_dump_json(indent=2) + "\n").encode())
    log.info("version %s: %s (%d shards, parent %s)", digest[:16],
             ", ".join(f"{n} {e.rows} rows" for n, e in entries.items()),
             sum(len(e.shards) for e in entries.values()), manifest.parent_digest and manifest.parent_digest[:16])
    return manifest


class ReusedShard(NamedTuple):
    """A shard file whose content hash and row count are known (from the cache that wrote it)."""

    path: Path
    sha256: str
    rows: int


def write_shards(table: pa.Table, out_dir: Path, name: str, target_bytes: int) -> list[ShardEntry]:
    """Cut ``table`` into content-addressed shards under ``out_dir/name``; an equal shard already
    there is kept, not rewritten."""
    entries = []
    for chunk in _chunks(table, target_bytes):
        data = parquet_bytes(chunk)
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{name}/{shard_name(sha)}"
        path = out_dir / rel
        if not (path.exists() and _sha256_file(path) == sha):
            _write_atomic(path, data)
        entries.append(ShardEntry(path=rel, sha256=sha, rows=chunk.num_rows))
    return entries


def _reuse_shard(source: Path | str | ReusedShard, out_dir: Path, table: str) -> ShardEntry:
    if isinstance(source, ReusedShard):
        if source.path.name != shard_name(source.sha256) or not source.path.is_file():
            raise VersionError(f"shard to reuse {source.path} (table {table!r}) is missing or not named by its "
                               "hash. Delete the cache folder holding it and rebuild.")
        rel = f"{table}/{source.path.name}"
        _carry_over(source.path, out_dir / rel)
        return ShardEntry(path=rel, sha256=source.sha256, rows=source.rows)
    source = Path(source)
    if not source.is_file():
        raise VersionError(f"shard to reuse {source} (table {table!r}) does not exist. Pull the parent version "
                           "from the DVC remote first.")
    sha = _sha256_file(source)
    if source.name != shard_name(sha):
        raise VersionError(f"shard to reuse {source} (table {table!r}): its content hash {sha[:16]} does not match "
                           "its name; the shard was modified. Restore the parent version from the DVC remote.")
    rel = f"{table}/{source.name}"
    _carry_over(source, out_dir / rel)
    return ShardEntry(path=rel, sha256=sha, rows=pq.ParquetFile(source).metadata.num_rows)


def shard_paths(version_dir: Path | str, manifest: Manifest | None = None) -> dict[str, list[Path]]:
    """Shard files of a version per table: what a child version passes as ``reuse``."""
    version_dir = Path(version_dir)
    manifest = manifest or read_manifest(version_dir)
    return {name: [version_dir / s.path for s in entry.shards] for name, entry in manifest.tables.items()}


# --------------------------------------------------------------------------- DVC

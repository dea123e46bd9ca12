"""Physical erasure of one patient (``radground forget --patient X --purge``), and the byte scan
that proves it.

``forget`` alone writes a new version without the patient; their rows stay in the stage outputs
(what later versions are built from), the quality caches, older versions, DVC's cache and remote.
:func:`purge` rewrites or deletes every object under data_dir (and the object store and DVC
remote it uses) that holds the patient, under the rebuild lock:

* **stage outputs** (``ingest/ curate/ segment/ ground/`` of every drop in the store): each table
  is rewritten without the patient's rows (by pseudonym, and by their image/series/study ids for
  tables without a pseudonym column, quarantine rows by ``ref``); a per-series file of one of
  their series is deleted; stage records keep their key, with the patient's keys and ids taken
  out of their hand-offs, so the next rebuild does not redo the stages. Series-reuse entries
  (``series/``) that point at a rewritten or deleted table are deleted (they only save work).
* **caches**: the quality cache of every drop that held them (recomputed by the next version),
  the overlay PNGs of their images, and the LLM cache's answers for their report sentences.
* **older versions**: rewritten without them (new digest; the parent chain remapped old -> new;
  lineage table and ``.dvc`` file replaced) or removed (``older="remove"``: with their lineage
  tables and ``.dvc`` files; children point at the nearest remaining ancestor).
* **the current version** is then published from the purged stage outputs exactly as the next
  rebuild would (so that rebuild finds nothing to do), with its own MLflow build run.
* **DVC**: exactly the objects the changed versions referenced and no remaining version
  references are deleted from the local cache and the remote; never a blanket ``dvc gc``, since a
  shared remote may hold other data_dirs' objects.
* **MLflow**: runs that used a changed version are listed and tagged (digests only).

The final :func:`scan` reads every byte under data_dir, the store and the DVC remote for the
pseudonym and the image/series/study ids (Parquet decoded too, since its pages are compressed).
By design the pseudonym stays in two files: the exclusion list ``state/forgotten.json`` (so no
later delivery brings the patient back) and this purge's audit record ``state/purges/*.json``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radground.buildstate import STAGES, DropRegistry, forget_patients, rebuild_lock
from radground.dvc import DvcRepo
from radground.errors import RadgroundError
from radground.lineage import runs_using, tag_forgotten_models, tag_runs, training_use
from radground.settings import Settings
from radground.store import ObjectStore, open_store
from radground.tables import arrow_reader, parquet_bytes

log = logging.getLogger(__name__)

ID_COLUMNS = ("patient_pseudonym", "image_id", "series_uid", "study_uid", "ref")
PER_SERIES_FOLDERS = ("images", "masks")  # <stage>/<drop>/<folder>/<series_uid>.parquet
SERIES_PREFIX = "series/"
AUDIT_FOLDER = "purges"  # under <data_dir>/state
FORGOTTEN_FILE = "forgotten.json"
PURGED_VERSIONS_TAG = "radground.purged_patient_versions"
SUPERSEDED_TAG = "radground.superseded_by"
Older = Literal["rewrite", "remove"]


class PurgeError(RadgroundError):
    """A patient cannot be found or purged as asked."""


# ------------------------------------------------------------------------------- where the patient is
@dataclass
class Footprint:
    """Where one patient is: their ids, the drops whose stage outputs hold them, the versions."""

    pseudonym: str
    images: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    drops: set[str] = field(default_factory=set)  # stage outputs in the store hold them
    versions: set[str] = field(default_factory=set)  # version folder names (digest16) holding them

    @property
    def found(self) -> bool:
        return bool(self.drops or self.versions)

    @property
    def ids(self) -> set[str]:
        return self.images | self.series | self.studies

    @property
    def needles(self) -> set[str]:
        return self.ids | {self.pseudonym}

    def add_ids(self, table: pa.Table) -> int:
        """Collect the ids of the patient's rows of ``table`` (its id columns); returns their count."""
        if "patient_pseudonym" not in table.column_names:
            return 0
        mine = table.filter(pc.fill_null(pc.equal(table["patient_pseudonym"], self.pseudonym), False))
        for column, bucket in (("image_id", self.images), ("series_uid", self.series), ("study_uid", self.studies)):
            if column in mine.column_names:
                bucket |= {v for v in mine[column].to_pylist() if v}
        return mine.num_rows

    def rows_of(self, table: pa.Table) -> pa.ChunkedArray | pa.Array:
        """A boolean mask: the rows of ``table`` that belong to the patient."""
        mask = pa.array([False] * table.num_rows, pa.bool_())
        refs = pa.array(sorted(self.ids), pa.string())
        for column in ID_COLUMNS:
            if column not in table.column_names or not pa.types.is_string(table.schema.field(column).type):
                continue
            values = pa.array([self.pseudonym], pa.string()) if column == "patient_pseudonym" else refs
            mask = pc.or_(mask, pc.fill_null(pc.is_in(table[column], value_set=values), False))
        return mask


def _parquet_columns(source: Any) -> list[str]:
    return pq.ParquetFile(source).schema_arrow.names


def _id_table(source: Any) -> pa.Table:
    """Only the id columns of a Parquet file or buffer: never the pixels."""
    names = _parquet_columns(source)
    if hasattr(source, "seek"):
        source.seek(0)
    return pq.read_table(source, columns=[c for c in ID_COLUMNS if c in names])


def _store_tables(store: ObjectStore) -> Iterator[str]:
    for stage in STAGES:
        yield from (key for key in store.list(f"{stage}/") if key.endswith(".parquet"))


def version_folders(settings: Settings) -> list[Path]:
    from tasks.retention import is_retired
    from tasks.version_stage import versions_root

    root = versions_root(settings)
    # A retired version is a manifest only (its shards and splits are gone): nothing of a patient to rewrite
    # there; its lineage table, which still names them, is in Plan.retired_lineage.
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").is_file() and not is_retired(p)) \
        if root.is_dir() else []


def _retired_holding(settings: Settings, names: set[str]) -> list[str]:
    from tasks.retention import is_retired
    from tasks.version_stage import versions_root

    root = versions_root(settings)
    return sorted(name for name in names if is_retired(root / name))


def _version_files(folder: Path) -> list[Path]:
    from tasks.version import read_manifest

    manifest = read_manifest(folder)
    return [folder / s.path for t in manifest.tables.values() for s in t.shards] + [folder / manifest.splits.path]


def in_versions(settings: Settings, pseudonym: str) -> set[str]:
    """Version folders whose lineage table (or, for a version without one, splits) holds the patient."""
    found: set[str] = set()
    lineage = settings.data_dir.resolve() / "lineage"
    for path in sorted(lineage.glob("*.parquet")) if lineage.is_dir() else []:
        table = pq.read_table(path, columns=["patient_pseudonym", "version_digest"],
                              filters=[("patient_pseudonym", "=", pseudonym)])
        found |= {d[:16] for d in table["version_digest"].to_pylist()}
    for folder in version_folders(settings):
        if not (lineage / f"{folder.name}.parquet").exists() and (folder / "splits.parquet").exists():
            splits = pq.read_table(folder / "splits.parquet", columns=["patient_pseudonym"])
            if pseudonym in splits["patient_pseudonym"].to_pylist():
                found.add(folder.name)
    return found


def in_stage_outputs(settings: Settings, pseudonym: str, *, store: ObjectStore | None = None) -> set[str]:
    """Drops whose stage outputs in the store hold the patient (delivered, versioned or not)."""
    return _scan_store(store or open_store(settings), Footprint(pseudonym), stop_at_first=True)


def _scan_store(store: ObjectStore, footprint: Footprint, *, stop_at_first: bool = False) -> set[str]:
    drops: set[str] = set()
    keys = sorted(_store_tables(store), key=lambda k: "/reports.parquet" not in k)  # small tables first
    for key in keys:
        table = _id_table(arrow_reader(store.get(key)))
        if footprint.add_ids(table):
            drops.add(key.split("/")[1])
            if stop_at_first:
                break
    footprint.drops |= drops
    return drops


def find_patient(settings: Settings, pseudonym: str, *, store: ObjectStore | None = None) -> Footprint:
    """Everything known about where a patient is: ids, drops (stage outputs), versions."""
    footprint = Footprint(pseudonym)
    lineage = settings.data_dir.resolve() / "lineage"
    for path in sorted(lineage.glob("*.parquet")) if lineage.is_dir() else []:
        table = pq.read_table(path, filters=[("patient_pseudonym", "=", pseudonym)])
        footprint.add_ids(table)
        footprint.versions |= {d[:16] for d in table["version_digest"].to_pylist()}
    _scan_store(store or open_store(settings), footprint)
    for folder in version_folders(settings):  # every table of every version: reports, vqa, splits too
        for path in _version_files(folder):
            footprint.add_ids(_id_table(path))
    for folder in version_folders(settings):
        if folder.name not in footprint.versions and any(
                pc.any(footprint.rows_of(_id_table(p))).as_py() for p in _version_files(folder)):
            footprint.versions.add(folder.name)
    return footprint


# ------------------------------------------------------------------------------- the byte scan
@dataclass
class ScanResult:
    """Files (or remote keys) in which a needle was found: names only, never the values."""

    scanned: int = 0
    hits: list[str] = field(default_factory=list)
    kept_by_design: list[str] = field(default_factory=list)  # the exclusion list and audit records

    @property
    def clean(self) -> bool:
        return not self.hits


def _needle_pattern(needles: Iterable[str]) -> re.Pattern[bytes]:
    # A UID needle must not match inside a longer UID (2.25.12 in 2.25.123): digits may not follow or precede.
    alternatives = sorted({re.escape(n.encode()) for n in needles if n}, key=len, reverse=True)
    if not alternatives:
        raise PurgeError("scan: no values to search for. Pass the patient's pseudonym and ids.")
    return re.compile(rb"(?<![0-9A-Za-z])(?:" + b"|".join(alternatives) + rb")(?![0-9A-Za-z])")


def _parquet_text(data: bytes | Path) -> Iterator[bytes]:
    """The string values of a Parquet file, as text to search (pages are compressed on disk)."""
    source = pq.ParquetFile(arrow_reader(data) if isinstance(data, bytes) else data)
    names = [f.name for f in source.schema_arrow if not pa.types.is_binary(f.type)
             and not pa.types.is_large_binary(f.type)]
    for index in range(source.num_row_groups):
        table = source.read_row_group(index, columns=names)
        for column in table.columns:
            yield json.dumps(column.to_pylist(), default=str).encode()
    yield json.dumps(source.schema_arrow.metadata or {}, default=str).encode()


def bytes_hold(data: bytes, pattern: re.Pattern[bytes]) -> bool:
    """Whether ``data`` (a file's bytes) holds a needle: raw, and in Parquet's decoded values."""
    if pattern.search(data):
        return True
    if data[:4] == b"PAR1":
        try:
            return any(pattern.search(text) for text in _parquet_text(data))
        except (pa.ArrowException, OSError):
            return False  # a damaged or partial Parquet file: its raw bytes were searched above
    return False


def scan(settings: Settings, needles: Iterable[str], *, kept_by_design: Sequence[Path] = ()) -> ScanResult:
    """Search every file under data_dir (names and bytes), the object store's radground prefixes
    and the DVC remote for ``needles``; a file in ``kept_by_design`` is reported apart."""
    pattern = _needle_pattern(needles)
    result = ScanResult()
    kept = {Path(p).resolve() for p in kept_by_design}
    roots = [settings.data_dir.resolve()]
    if settings.storage.backend == "local" and not _inside(settings.store_root.resolve(), roots[0]):
        roots.append(settings.store_root.resolve())
    remote = DvcRepo(settings.data_dir.resolve() / "versions", settings)
    if settings.storage.backend == "local" and not _inside(Path(remote.remote_url), roots[0]):
        roots.append(Path(remote.remote_url))
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            result.scanned += 1
            name = str(path.relative_to(root)) if root == roots[0] else str(path)
            held = bool(pattern.search(str(path.relative_to(root)).encode())) or bytes_hold(path.read_bytes(), pattern)
            if held:
                (result.kept_by_design if path.resolve() in kept else result.hits).append(name)
    if settings.storage.backend == "s3":
        store = open_store(settings)
        for prefix in (*[f"{s}/" for s in STAGES], SERIES_PREFIX, "dvc/"):
            for key in store.list(prefix):
                result.scanned += 1
                if pattern.search(key.encode()) or bytes_hold(store.get(key), pattern):
                    result.hits.append(f"{store.describe()}/{key}")
    return result


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# ------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What a purge touches (a dry run prints this and stops)."""

    store_rewrite: dict[str, int] = field(default_factory=dict)  # key -> rows removed
    store_delete: list[str] = field(default_factory=list)
    stage_records: list[str] = field(default_factory=list)  # JSON records rewritten (hand-offs)
    series_entries: list[str] = field(default_factory=list)
    quality_caches: list[Path] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    llm_sentences: set[str] = field(default_factory=set)  # sha256 of the patient's report sentences
    versions: list[str] = field(default_factory=list)  # holding the patient, oldest first
    reparent: list[str] = field(default_factory=list)  # not holding them, but their parent changes
    runs: list[dict[str, str]] = field(default_factory=list)
    retired_lineage: list[str] = field(default_factory=list)  # retired versions whose lineage table names them
    raw_drops: dict[str, str] = field(default_factory=dict)  # drop id -> "inside data_dir" / "outside data_dir"


def _scrub_json(value: Any, pattern: re.Pattern[bytes]) -> Any:
    """``value`` without any list item or dict entry whose text holds a needle."""
    def holds(item: Any) -> bool:
        return bool(pattern.search(json.dumps(item).encode()))

    if isinstance(value, dict):
        return {k: _scrub_json(v, pattern) for k, v in value.items() if not holds(k) and not (
            isinstance(v, str) and holds(v))}
    if isinstance(value, list):
        return [_scrub_json(v, pattern) for v in value if not (isinstance(v, (str, int, float)) and holds(v))]
    return value


def _chain(folders: Sequence[Path]) -> list[Path]:
    """Versions oldest first: parents before children (created_at has whole seconds, so it only
    breaks ties between versions at the same depth of the chain)."""
    from tasks.version import read_manifest

    manifests = {f.name: read_manifest(f) for f in folders}
    parents = {name: (m.parent_digest or "")[:16] for name, m in manifests.items()}

    def depth(name: str) -> int:
        seen: set[str] = set()
        while parents.get(name) in parents and name not in seen:  # a parent outside the set ends the chain
            seen.add(name)
            name = parents[name]
        return len(seen)

    return sorted(folders, key=lambda f: (depth(f.name), manifests[f.name].created_at, f.name))


def plan_purge(settings: Settings, footprint: Footprint, store: ObjectStore) -> Plan:
    from tasks.version import read_manifest

    plan = Plan()
    pattern = _needle_pattern(footprint.needles)
    for key in _store_tables(store):
        data = store.get(key)
        mask = footprint.rows_of(_id_table(arrow_reader(data)))
        removed = pc.sum(mask).as_py() or 0
        parts = key.split("/")
        per_series = len(parts) == 4 and parts[2] in PER_SERIES_FOLDERS
        if per_series and parts[3].removesuffix(".parquet") in footprint.series:
            plan.store_delete.append(key)  # one of their series (also a series without rows: an MR has no masks)
            continue
        if not removed:
            continue
        rows = pq.ParquetFile(arrow_reader(data)).metadata.num_rows
        if per_series and removed == rows:
            plan.store_delete.append(key)
        else:
            plan.store_rewrite[key] = removed
        if key.endswith("/reports.parquet") and key.startswith("curate/"):
            reports = pq.read_table(arrow_reader(data), columns=["patient_pseudonym", "sentences"])
            for row in reports.filter(pc.equal(reports["patient_pseudonym"], footprint.pseudonym)).to_pylist():
                plan.llm_sentences |= {s["text"] for s in row["sentences"]} | {
                    s["translation"] for s in row["sentences"] if s.get("translation")}
    changed = set(plan.store_rewrite) | set(plan.store_delete)
    for stage in STAGES:
        for key in store.list(f"{stage}/"):
            if key.endswith(".json") and pattern.search(store.get(key)):
                plan.stage_records.append(key)
    for key in store.list(SERIES_PREFIX):
        data = store.get(key)
        try:
            table_key = json.loads(data).get("table_key")
        except (json.JSONDecodeError, AttributeError):
            table_key = None
        if table_key in changed or pattern.search(data):
            plan.series_entries.append(key)
    cache = settings.data_dir.resolve() / "cache" / "quality"
    for folder in sorted(cache.iterdir()) if cache.is_dir() else []:
        if folder.name in footprint.drops or any(
                pc.any(footprint.rows_of(_id_table(p))).as_py() for p in folder.rglob("*.parquet")):
            plan.quality_caches.append(folder)
    overlays = settings.data_dir.resolve() / "overlays"
    plan.overlays = sorted(p for p in overlays.rglob("*") if p.is_file() and p.stem in footprint.images) \
        if overlays.is_dir() else []
    folders = version_folders(settings)
    holding = _chain([f for f in folders if f.name in footprint.versions])
    plan.versions = [f.name for f in holding]
    digests = {f.name: read_manifest(f).digest for f in folders}
    plan.reparent = [f.name for f in _chain(folders) if f.name not in footprint.versions
                     and (read_manifest(f).parent_digest or "")[:16] in footprint.versions]
    plan.runs = runs_using(settings, [digests[name] for name in plan.versions]) if plan.versions else []
    plan.retired_lineage = _retired_holding(settings, footprint.versions)
    registry = DropRegistry(settings)
    for drop_id in sorted(footprint.drops):
        location = registry.location_of(drop_id)
        inside = location is not None and not location.startswith("store:") and _inside(
            Path(location).resolve(), settings.data_dir.resolve())
        plan.raw_drops[drop_id] = "inside data_dir" if inside else "outside data_dir"
    return plan


# ------------------------------------------------------------------------------- doing it
def _purge_store(store: ObjectStore, footprint: Footprint, plan: Plan) -> None:
    pattern = _needle_pattern(footprint.needles)
    for key in plan.store_rewrite:
        table = pq.read_table(arrow_reader(store.get(key)))
        store.put(key, parquet_bytes(table.filter(pc.invert(footprint.rows_of(table)))))
    for key in plan.store_delete:
        store.delete(key)
    for key in plan.stage_records:
        store.put(key, json.dumps(_scrub_json(json.loads(store.get(key)), pattern), indent=1).encode())
    for key in plan.series_entries:
        store.delete(key)


def _purge_llm_cache(settings: Settings, sentences: set[str]) -> int:
    from tasks.curate.llm_cache import sentence_sha256

    path = settings.data_dir.resolve() / "cache" / "llm.sqlite"
    if not sentences or not path.exists():
        return 0
    hashes = sorted(sentence_sha256(s) for s in sentences)
    with sqlite3.connect(path) as connection:
        tables = {r[0] for r in connection.execute("select name from sqlite_master where type='table'")}
        if "llm_answers" not in tables:
            return 0
        marks = ",".join("?" * len(hashes))
        deleted = connection.execute(f"DELETE FROM llm_answers WHERE sentence_sha256 IN ({marks})", hashes).rowcount
    with sqlite3.connect(path) as connection:
        connection.execute("VACUUM")  # freed pages would keep the answers' bytes
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # and so would a write-ahead log
    return deleted


def _rewrite_version(settings: Settings, folder: Path, footprint: Footprint, parent_digest: str | None) -> Path:
    """A copy of a version without the patient's rows; returns its folder (named by its new digest)."""
    from tasks.version import ReusedShard, read_manifest, read_splits, write_version

    manifest = read_manifest(folder)
    reuse: dict[str, list[ReusedShard]] = {}
    parts: dict[str, list[pa.Table]] = {}
    quarantine_counts: Counter = Counter()
    for name, entry in manifest.tables.items():
        reuse[name], parts[name] = [], []
        for shard in entry.shards:
            table = pq.read_table(folder / shard.path)
            mask = footprint.rows_of(table)
            if name == "quarantine":
                quarantine_counts.update(table.filter(pc.invert(mask))["reason"].to_pylist())
            if not pc.any(mask).as_py():
                reuse[name].append(ReusedShard(folder / shard.path, shard.sha256, shard.rows))
            elif (kept := table.filter(pc.invert(mask))).num_rows:
                parts[name].append(kept)
    splits = {p: s for p, s in read_splits(folder).items() if p != footprint.pseudonym}
    building = folder.parent / f".building-purge-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    parent = manifest.model_copy(update={"digest": parent_digest}) if parent_digest else None
    new = write_version({n: p for n, p in parts.items() if p}, reuse=reuse, out_dir=building, parent=parent,
                        drops=list(manifest.drops), settings_hash=manifest.settings_hash,
                        code_version=manifest.code_version, quarantine_counts=dict(quarantine_counts), splits=splits,
                        shard_target_bytes=int(settings.version.shard_target_mb * 2**20))
    target = folder.parent / new.digest[:16]
    if target.exists():  # the same content as a version already there
        shutil.rmtree(building)
    else:
        building.rename(target)
    return target


def _write_manifest_parent(folder: Path, parent_digest: str | None) -> None:
    from tasks.version import MANIFEST_FILE, _write_atomic, read_manifest

    manifest = read_manifest(folder).model_copy(update={"parent_digest": parent_digest})
    # A new file replaces the old name: the old one may be a hard link into DVC's cache.
    (folder / MANIFEST_FILE).unlink()
    _write_atomic(folder / MANIFEST_FILE, (manifest.model_dump_json(indent=2) + "\n").encode())


def _purge_versions(settings: Settings, footprint: Footprint, plan: Plan, older: Older,
                    dvc: DvcRepo) -> dict[str, str | None]:
    """Rewrite or remove the versions holding the patient; remap parents. Returns old16 -> new16 | None."""
    from tasks.version import read_manifest
    from tasks.version_stage import LATEST, _write_lineage, versions_root

    root = versions_root(settings)
    lineage = settings.data_dir.resolve() / "lineage"
    recorded = settings.data_dir.resolve() / "state" / "recorded"
    latest = root / LATEST
    latest_name = latest.read_text().strip() if latest.exists() else None
    mapping: dict[str, str | None] = {}  # old16 -> new16 (None: removed)
    digest_of: dict[str, str | None] = {}  # old16 -> the full digest now standing in for it (None: none)
    parent_of: dict[str, str | None] = {}  # old16 -> the (remapped) parent it was given
    changed = set(plan.versions) | set(plan.reparent)
    for folder in _chain(version_folders(settings)):
        if folder.name not in changed:
            digest_of[folder.name] = read_manifest(folder).digest
            continue
        manifest = read_manifest(folder)
        parent = manifest.parent_digest
        parent = digest_of.get(parent[:16], parent) if parent else None
        if parent and parent[:16] == folder.name:
            # its parent, rewritten, became this very version (a forget had already left the patient
            # out): the parent is then the one the rewritten parent got
            parent = parent_of.get(manifest.parent_digest[:16])
        parent_of[folder.name] = parent
        if folder.name in plan.reparent:
            _write_manifest_parent(folder, parent)
            dvc.track(folder)
            digest_of[folder.name] = manifest.digest
            continue
        if older == "remove" or folder.name == latest_name:
            # The latest is replaced by the version the caller publishes from the purged stage outputs
            # (what the next rebuild builds, with its quality report and build run), whatever --older says.
            mapping[folder.name], digest_of[folder.name] = None, parent
        else:
            new = _rewrite_version(settings, folder, footprint, parent)
            new_manifest = read_manifest(new)
            _write_lineage(new, new_manifest.digest, settings)
            dvc.track(new)
            mapping[folder.name], digest_of[folder.name] = new.name, new_manifest.digest
        if mapping[folder.name] != folder.name:
            shutil.rmtree(folder)
            (root / f"{folder.name}.dvc").unlink(missing_ok=True)
            (lineage / f"{folder.name}.parquet").unlink(missing_ok=True)
            (recorded / folder.name).unlink(missing_ok=True)
    if latest_name in mapping:
        now = digest_of[latest_name]
        if now:
            latest.write_text(now[:16] + "\n")
        else:
            latest.unlink()
    return mapping


def _audit(settings: Settings, record: dict) -> Path:
    folder = settings.data_dir.resolve() / "state" / AUDIT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"purge-{stamp}-{os.getpid()}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path


def _plan_summary(plan: Plan, settings: Settings) -> dict[str, Any]:
    data_dir = settings.data_dir.resolve()
    return {
        "store": {"rewrite": sorted(plan.store_rewrite), "delete": plan.store_delete,
                  "stage_records": plan.stage_records, "series_reuse_entries": plan.series_entries,
                  "rows_removed": sum(plan.store_rewrite.values())},
        "quality_caches": [str(p.relative_to(data_dir)) for p in plan.quality_caches],
        "overlays": [str(p.relative_to(data_dir)) for p in plan.overlays],
        "llm_cache_sentences": len(plan.llm_sentences),
        "versions": plan.versions,
        "versions_reparented": plan.reparent,
        "retired_versions_lineage": plan.retired_lineage,
        "mlflow_runs": plan.runs,
        "raw_drops": plan.raw_drops,
    }


def purge(settings: Settings, pseudonym: str, *, older: Older = "rewrite", dry_run: bool = False) -> dict[str, Any]:
    """Erase one patient physically from everything under data_dir, the store and the DVC remote.

    Returns a report (pseudonym and pseudonymous keys only). ``dry_run``: the plan, nothing changed.
    Raises PurgeError when the patient is in no version and no stage output.
    """
    from tasks.version import read_manifest
    from tasks.version_stage import latest_version_dir, publish, versions_root

    if older not in ("rewrite", "remove"):
        raise PurgeError(f"--older {older!r}: expected rewrite or remove.")
    with rebuild_lock(settings, command="purge"):
        store = open_store(settings)
        footprint = find_patient(settings, pseudonym, store=store)
        if not footprint.found:
            raise PurgeError(f"no patient with this ID/pseudonym in any version or stage output under "
                             f"{settings.data_dir.resolve()}: nothing to purge, nothing recorded. Check the ID "
                             "(and that deid.key is the key the data was built with).")
        plan = plan_purge(settings, footprint, store)
        report: dict[str, Any] = {"patient_pseudonym": pseudonym, "dry_run": dry_run, "older": older,
                                  "drops_holding_patient": sorted(footprint.drops),
                                  "ids": {"images": len(footprint.images), "series": len(footprint.series),
                                          "studies": len(footprint.studies)}} | _plan_summary(plan, settings)
        used = training_use(settings, pseudonym, sorted({r["version_digest"] for r in plan.runs}), runs=plan.runs)
        report["training_runs"], report["checkpoints"] = used["training_runs"], used["checkpoints"]
        report["models"] = used["models"]
        report["model_registry"] = ("The purge does not change model weights: the checkpoints and registered model "
                                    "versions listed were trained on the patient (a purge, not a dry run, tags those "
                                    "versions radground.contains_forgotten=true, so promotion refuses them); retrain "
                                    "without the patient and delete those checkpoints")
        if dry_run:
            return report
        if used["models"]:  # the registry learns of it first: a promotion racing this purge is refused
            report["models"] = tag_forgotten_models(settings, used["models"])

        forget_patients(settings, [pseudonym])  # first: whatever happens next, no later version has them
        before = latest_version_dir(settings)
        current_drops = read_manifest(before).drops if before else []
        _purge_store(store, footprint, plan)
        for folder in plan.quality_caches:
            shutil.rmtree(folder)
        for path in plan.overlays:
            path.unlink()
        report["llm_cache_answers_deleted"] = _purge_llm_cache(settings, plan.llm_sentences)

        root = versions_root(settings)
        dvc = DvcRepo(root, settings)
        dvc_files = [root / f"{name}.dvc" for name in [*plan.versions, *plan.reparent]]
        old_hashes = dvc.referenced_hashes(p for p in dvc_files if p.exists())
        mapping = _purge_versions(settings, footprint, plan, older, dvc) if (plan.versions or plan.reparent) else {}
        report["versions"] = mapping
        for name in plan.retired_lineage:  # the patient's rows out of a retired version's lineage table
            path = settings.data_dir.resolve() / "lineage" / f"{name}.parquet"
            table = pq.read_table(path)
            pq.write_table(table.filter(pc.invert(footprint.rows_of(table))), path)
        report["retired_lineage_rewritten"] = list(plan.retired_lineage)

        current = None
        if current_drops:  # what the next rebuild builds from the purged stage outputs, published now
            try:
                current = publish(current_drops, settings, {}, {}, reason="purge")
            except RadgroundError as exc:  # e.g. a quality gate without the patient's rows: erase all the same
                report["current_version_error"] = str(exc)
            else:
                report["current_version"] = {k: current.get(k) for k in ("digest", "parent_digest", "version_dir",
                                                                         "rows", "mlflow_run")}
                if before is not None and before.name in mapping:  # the latest was replaced by the current one
                    mapping[before.name] = current["digest"][:16]
        tracked = [p for p in root.glob("*.dvc") if p.is_file()]  # not the .dvc folder itself
        if tracked:  # rewritten and re-parented versions too, not only the current one
            dvc.push()
        remaining = dvc.referenced_hashes(tracked)
        report["dvc"] = dvc.delete_objects(old_hashes - remaining)

        superseded = {}
        for run in plan.runs:
            old16 = run["version_digest"][:16]
            superseded.setdefault(run["run_id"], set()).add(old16)
        if superseded:
            tag_runs(settings, {run_id: {PURGED_VERSIONS_TAG: ",".join(sorted(olds)),
                                         SUPERSEDED_TAG: ",".join(str(mapping.get(o) or "removed")
                                                                  for o in sorted(olds))}
                                for run_id, olds in superseded.items()})
        report["mlflow_runs_tagged"] = sorted(superseded)

        audit = _audit(settings, {
            "patient_pseudonym": pseudonym, "at": datetime.now(UTC).isoformat(timespec="seconds"), "older": older,
            "versions": mapping, "versions_reparented": plan.reparent,
            "current_version": current and current["digest"],
            "counts": {"store_tables_rewritten": len(plan.store_rewrite), "store_objects_deleted":
                       len(plan.store_delete), "stage_records_rewritten": len(plan.stage_records),
                       "rows_removed_from_stage_outputs": sum(plan.store_rewrite.values()),
                       "series_reuse_entries_deleted": len(plan.series_entries),
                       "quality_caches_deleted": len(plan.quality_caches), "overlays_deleted": len(plan.overlays),
                       "llm_cache_answers_deleted": report["llm_cache_answers_deleted"]} | report["dvc"],
            "mlflow_runs_tagged": sorted(superseded), "drops_holding_patient": sorted(footprint.drops)})
        report["audit_record"] = str(audit)
        state = settings.data_dir.resolve() / "state"
        result = scan(settings, footprint.needles, kept_by_design=[state / FORGOTTEN_FILE, audit])
        report["scan"] = {"clean": result.clean, "files_scanned": result.scanned, "files_still_holding": result.hits,
                          "kept_by_design": result.kept_by_design}
    return report

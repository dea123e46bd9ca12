"""The quality + version stage of a rebuild: check, version, track with DVC, record in MLflow.

A version holds every drop of its parent plus the drops of this rebuild, minus forgotten
patients. Each drop is checked once per quality key (its ground key + the quality settings
+ the code version): the passed rows are cut into content-addressed shards under
``<data_dir>/cache/quality/<drop>/<key16>/`` and later versions carry those shards over by hard
link, untouched, so adding a drop writes only that drop's shards ("a new drop adds shards; it
never rewrites the shards of earlier drops"). Only a shard that loses rows after the check (a
forgotten patient, a record an earlier drop already delivered) is rewritten.

A version whose digest is already recorded (DVC pushed and MLflow run written) is current:
a rebuild that changes nothing stops there. Push or record failing leaves it unrecorded, so
the next rebuild retries exactly those steps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radground import __version__
from radground.buildstate import content_sha, forget_patients, forgotten_patients, read_record, rebuild_lock
from radground.dvc import DvcRepo
from radground.errors import RadgroundError
from radground.keys import load_key
from radground.lineage import LineageRecord, record_build, write_lineage
from radground.schemas import GroundingRecord, ImageRecord, QuarantineRecord, ReportRecord, VQARecord, arrow_schema
from radground.settings import Settings
from radground.store import ObjectStore, open_store
from radground.tables import read_table, to_arrow
from tasks.quality import check_gates, check_table
from tasks.quality_report import REPORT_FILE, render_report, write_report
from tasks.version import (
    ReusedShard,
    VersionError,
    assign_splits,
    read_manifest,
    read_splits,
    write_shards,
    write_version,
)

LATEST = "LATEST"  # a file in the versions folder naming the newest version's folder
TABLES = {"images": ImageRecord, "reports": ReportRecord, "grounding": GroundingRecord, "vqa": VQARecord}


def versions_root(settings: Settings) -> Path:
    return (settings.data_dir / "versions").resolve()


def latest_version_dir(settings: Settings) -> Path | None:
    root = versions_root(settings)
    return root / (root / LATEST).read_text().strip() if (root / LATEST).exists() else None


def _concat(store: ObjectStore, keys: Sequence[str], model) -> pa.Table:
    tables = [read_table(store, key).cast(arrow_schema(model)) for key in keys if store.exists(key)]
    return pa.concat_tables(tables) if tables else arrow_schema(model).empty_table()


# A record that two drops both deliver (a re-sent study) is one record: the same key and
# content. Such exact repeats are merged (first drop wins) and counted.
_SAME_RECORD = {
    "images": ("image_id", "source_sha256"),
    "reports": ("study_uid", "language", "text"),
    "grounding": ("image_id", "language", "sentence_index", "keyword_start", "class_id", "bbox"),
    "vqa": ("vqa_id", "answer"),
}


def _record_keys(name: str, table: pa.Table) -> list[tuple]:
    columns = [table.column(c).to_pylist() for c in _SAME_RECORD[name]]
    return [tuple(tuple(v) if isinstance(v, list) else v for v in row) for row in zip(*columns, strict=True)]


def _drop_repeats(name: str, table: pa.Table, seen: set[tuple]) -> tuple[pa.Table, int]:
    """Remove rows already in ``seen`` (or earlier in the table); add the kept ones to ``seen``."""
    keep = []
    for index, key in enumerate(_record_keys(name, table)):
        if key not in seen:
            seen.add(key)
            keep.append(index)
    if len(keep) == table.num_rows:
        return table, 0
    return table.take(pa.array(keep, type=pa.int64())), table.num_rows - len(keep)


# ------------------------------------------------------------------------------- one drop, checked
@dataclass
class CheckedDrop:
    """One drop after its quality checks: shards per table, quarantine rows, per-table stats."""

    drop_id: str
    shards: dict[str, list[ReusedShard]]
    stats: dict[str, dict]
    docs: str | None
    quarantine: pa.Table = field(repr=False)


def quality_key(store: ObjectStore, drop_id: str, settings: Settings) -> str:
    ground = read_record(store, "ground", drop_id)
    if ground is None:
        raise VersionError(f"drop {drop_id} has no finished ground stage, so it cannot be versioned. Rebuild it "
                           "(radground rebuild DROP).")
    return content_sha({"ground": ground.key, "quality": settings.stage_hash("quality"),
                        "version": settings.stage_hash("version"), "code_version": __version__})


def check_drop(store: ObjectStore, drop_id: str, settings: Settings) -> CheckedDrop:
    """The checked shards of one drop: from the cache when its quality key matches, else checked now."""
    key = quality_key(store, drop_id, settings)
    folder = settings.data_dir.resolve() / "cache" / "quality" / drop_id / key[:16]
    result = folder / "result.json"
    if not result.exists():
        _check_into(store, drop_id, settings, folder)
    saved = json.loads(result.read_text(encoding="utf-8"))
    shards = {name: [ReusedShard(folder / s["path"], s["sha256"], s["rows"]) for s in entries]
              for name, entries in saved["shards"].items()}
    return CheckedDrop(drop_id=drop_id, shards=shards, stats=saved["stats"], docs=saved["docs"],
                       quarantine=pq.read_table(folder / "quarantine.parquet"))


def _gather(store: ObjectStore, drop_id: str) -> dict[str, pa.Table]:
    ingest = read_record(store, "ingest", drop_id)
    images = list(ingest.handoff.get("image_keys", [])) if ingest else []
    return {
        "images": _concat(store, images, ImageRecord),
        "reports": _concat(store, [f"curate/{drop_id}/reports.parquet"], ReportRecord),
        "grounding": _concat(store, [f"ground/{drop_id}/grounding.parquet"], GroundingRecord),
        "vqa": _concat(store, [f"{s}/{drop_id}/vqa.parquet" for s in ("curate", "ground")], VQARecord),
    }


def _check_into(store: ObjectStore, drop_id: str, settings: Settings, folder: Path) -> None:
    for stale in folder.parent.glob(".building-*"):  # left by a killed rebuild (the rebuild lock is held)
        shutil.rmtree(stale, ignore_errors=True)
    building = folder.with_name(f".building-{folder.name}-{os.getpid()}")
    building.mkdir(parents=True)  # here, not by the first shard: a drop may have no rows in any table
    target = int(settings.version.shard_target_mb * 2**20)
    stats, shards, rejected, docs = {}, {}, [], None
    for name, table in _gather(store, drop_id).items():
        table, repeats = _drop_repeats(name, table, set())
        result = check_table(name, table, TABLES[name], data_dir=settings.data_dir, drop_id=drop_id)
        stats[name] = result.stats | {"repeats_merged": repeats}
        rejected += result.failed
        shards[name] = [e.model_dump() for e in write_shards(result.passed, building, name, target)]
    stage_quarantine = _concat(store, [f"{s}/{drop_id}/quarantine.parquet" for s in ("ingest", "curate", "segment")],
                               QuarantineRecord)
    quarantine = pa.concat_tables([stage_quarantine, to_arrow(rejected, QuarantineRecord)])
    pq.write_table(quarantine, building / "quarantine.parquet")
    write_report(building / REPORT_FILE, render_report({drop_id: stats}))  # renamed with the folder below
    docs = str(folder / REPORT_FILE)
    (building / "result.json").write_text(json.dumps({"shards": shards, "stats": stats, "docs": docs}, indent=1))
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)  # result.json inside appears with the folder, so a cache entry is whole or absent


# ------------------------------------------------------------------------------- the version
def _key_columns(name: str) -> list[str]:
    # image_id: a VQA item on a conflicting image is quarantined with it (grounding has it in _SAME_RECORD)
    extra = ["patient_pseudonym", "study_uid"] + (["series_uid"] if name == "images" else []) + (
        ["image_id"] if name == "vqa" else [])
    return list(dict.fromkeys([*_SAME_RECORD[name], *extra]))


class _VersionParts:
    """Decides, drop by drop in version order, which rows go into the version.

    Reads only the key columns of a drop's shards (never the pixels) to find the rows to leave
    out: a forgotten patient's; exact repeats of an earlier drop's records (merged, counted); and
    images an earlier drop delivered under the same image_id with other content (the first
    delivery is kept, the conflicting one and the rows grounded on it are quarantined). A shard
    that loses no row is carried over; only a shard that does is rewritten without those rows,
    so forgetting one patient rewrites the few shards holding them, not their whole drop.
    """

    def __init__(self, forgotten: set[str]) -> None:
        self.forgotten = pa.array(sorted(forgotten), pa.string())
        self.reuse: dict[str, list] = {name: [] for name in TABLES}
        self.parts: dict[str, list[pa.Table]] = {name: [] for name in TABLES}
        self.seen: dict[str, set] = {name: set() for name in TABLES}
        self.image_sha: dict[str, str] = {}
        self.merged: Counter = Counter()
        self.quarantine: list[pa.Table] = []
        # of the drop being added:
        self._forgotten_refs: set[str] = set()  # study/series uids of forgotten patients
        self._conflicts: list[QuarantineRecord] = []
        self._conflicting_images: set[str] = set()

    def add(self, drop: CheckedDrop) -> None:
        self._forgotten_refs: set[str] = set()
        self._conflicts: list[QuarantineRecord] = []
        self._conflicting_images: set[str] = set()
        for name in ("images", "reports", "grounding", "vqa"):  # images first: the others follow its conflicts
            for shard in drop.shards.get(name, []):  # shard by shard: only a shard that loses rows is rewritten
                keep, rows = self._keep(drop.drop_id, name, pq.read_table(shard.path, columns=_key_columns(name)))
                if len(keep) == rows:  # untouched since the check: carried over, not rewritten
                    self.reuse[name].append(shard)
                elif keep:
                    self.parts[name].append(pq.read_table(shard.path).take(pa.array(keep, type=pa.int64())))
        forgotten_refs, conflicts = self._forgotten_refs, self._conflicts
        quarantine = drop.quarantine
        if forgotten_refs:
            gone = pc.fill_null(pc.is_in(quarantine.column("ref"), value_set=pa.array(sorted(forgotten_refs))), False)
            quarantine = quarantine.filter(pc.invert(gone))
        self.quarantine += [quarantine.cast(arrow_schema(QuarantineRecord)), to_arrow(conflicts, QuarantineRecord)]

    def _keep(self, drop_id: str, name: str, table: pa.Table) -> tuple[list[int], int]:
        """Indices of the rows of one shard (its key columns) that go into the version."""
        mine = pc.is_in(table.column("patient_pseudonym"), value_set=self.forgotten).to_pylist()
        refs = {c: table.column(c).to_pylist() for c in ("study_uid", "series_uid", "image_id")
                if c in table.column_names}
        keep = []
        for index, key in enumerate(_record_keys(name, table)):
            row = {c: values[index] for c, values in refs.items()}
            if mine[index]:
                self._forgotten_refs |= {v for v in row.values() if v}  # the quality stage refs image ids
            elif name == "images" and self.image_sha.get(row["image_id"], key[1]) != key[1]:
                self._conflicting_images.add(row["image_id"])
                self._conflicts.append(_conflict(drop_id, name, row["image_id"], key[1]))
            elif name in ("grounding", "vqa") and row.get("image_id") in self._conflicting_images:
                self._conflicts.append(_conflict(drop_id, name, row["image_id"], None))
            elif key in self.seen[name]:
                self.merged[name] += 1
            else:
                self.seen[name].add(key)
                if name == "images":
                    self.image_sha[row["image_id"]] = key[1]
                keep.append(index)
        return keep, table.num_rows

    def quarantine_table(self) -> pa.Table:
        return pa.concat_tables(self.quarantine) if self.quarantine else arrow_schema(QuarantineRecord).empty_table()


def _conflict(drop_id: str, table: str, image_id: str, sha: str | None) -> QuarantineRecord:
    what = "its content differs from" if table == "images" else "it is grounded on an image that conflicts with"
    return QuarantineRecord(drop_id=drop_id, stage="version", item="row", reason="conflicting_redelivery",
                            detail=f"table {table}: image_id delivered before by an earlier drop and {what} that "
                            "delivery; the first delivery is kept", source_sha256=sha, ref=image_id)


def _gate_stats(drops: Sequence[CheckedDrop]) -> dict[str, dict]:
    totals: dict[str, dict] = {}
    for drop in drops:
        for name, stats in drop.stats.items():
            t = totals.setdefault(name, {"table": name, "rows": 0, "quarantined": 0, "by_reason": Counter()})
            t["rows"] += stats["rows"]
            t["quarantined"] += stats["quarantined"]
            t["by_reason"].update(stats["by_reason"])
            if "grounded_slices" in stats:
                t["grounded_slices"] = t.get("grounded_slices", 0) + stats["grounded_slices"]
    for t in totals.values():
        t["quarantine_rate"] = t["quarantined"] / t["rows"] if t["rows"] else 0.0
        t["by_reason"] = dict(t["by_reason"])
    return totals


def version_drops(build_drops: Sequence[str], settings: Settings) -> list[str]:
    """The drops the next version holds: the latest version's, then this build's new ones."""
    latest = latest_version_dir(settings)
    earlier = read_manifest(latest).drops if latest else []
    return list(dict.fromkeys([*earlier, *build_drops]))


def publish(build_drops: Sequence[str], settings: Settings, stage_counts: Mapping[str, float],
            stage_seconds: Mapping[str, float], *, reason: str = "rebuild") -> dict:
    """Check, version, track and record a version = the latest one's drops + ``build_drops``,
    without forgotten patients; returns the version summary. The caller holds :func:`rebuild_lock`."""
    store = open_store(settings)
    drops = version_drops(build_drops, settings)
    checked = [check_drop(store, drop_id, settings) for drop_id in drops]
    stats = _gate_stats(checked)
    check_gates(stats, settings.quality)  # QualityGateError names the gate and the numbers
    forgotten = forgotten_patients(settings)
    chosen = _VersionParts(forgotten)
    for drop in checked:
        chosen.add(drop)
    reuse, parts, quarantine, merged = chosen.reuse, chosen.parts, chosen.quarantine_table(), dict(chosen.merged)

    root = versions_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".building-*"):  # left by a killed rebuild (the caller holds the rebuild lock)
        shutil.rmtree(stale, ignore_errors=True)
    parent_dir = latest_version_dir(settings)
    parent = read_manifest(parent_dir) if parent_dir else None
    patients = set()
    for shard in [*reuse["images"], *parts["images"]]:
        table = pq.read_table(shard.path, columns=["patient_pseudonym"]) if isinstance(shard, ReusedShard) else shard
        patients |= set(table.column("patient_pseudonym").to_pylist())
    previous = {p: s for p, s in (read_splits(parent_dir) if parent_dir else {}).items() if p not in forgotten}
    splits = assign_splits(sorted(patients), previous, settings.version, load_key(settings))
    building = root / f".building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    manifest = write_version(
        parts | {"quarantine": [quarantine]}, reuse=reuse, out_dir=building, parent=parent, drops=drops,
        settings_hash=settings.content_hash(), quarantine_counts=dict(Counter(quarantine.column("reason").to_pylist())),
        splits=splits, shard_target_bytes=int(settings.version.shard_target_mb * 2**20))
    version_dir = root / manifest.digest[:16]
    write_report(building / REPORT_FILE, render_report({d.drop_id: d.stats for d in checked}, digest=manifest.digest,
                                                       quarantine_counts=manifest.quarantine_counts))
    if version_dir.exists():  # same inputs and settings: the same version, already there
        shutil.rmtree(building)
        manifest = read_manifest(version_dir)
    else:
        building.rename(version_dir)
    (root / LATEST).write_text(version_dir.name + "\n")
    summary = {"digest": manifest.digest, "parent_digest": manifest.parent_digest, "version_dir": str(version_dir),
               "drops": drops, "rows": {name: entry.rows for name, entry in manifest.tables.items()},
               "objects": sum(len(e.shards) for e in manifest.tables.values()) + 2,
               "quality_quarantined": sum(s["quarantined"] for s in stats.values()),
               "repeats_merged": {name: n for name, n in merged.items() if n},
               "data_docs": str(version_dir / REPORT_FILE) if (version_dir / REPORT_FILE).exists() else None,
               "forgotten": len(forgotten)}
    recorded = settings.data_dir.resolve() / "state" / "recorded" / version_dir.name
    if recorded.exists():  # pushed and recorded by an earlier rebuild: nothing changed
        return summary | json.loads(recorded.read_text()) | {"unchanged": True}

    _write_lineage(version_dir, manifest.digest, settings)
    dvc = DvcRepo(root, settings)
    dvc.init()
    dvc.track(version_dir)
    pushed = dvc.push()
    docs = [Path(summary["data_docs"])] if summary["data_docs"] else []  # the version's quality report
    run_id = record_build(settings, manifest=manifest.model_dump(mode="json"), drops=drops,
                          stage_counts=dict(stage_counts), stage_seconds=dict(stage_seconds),
                          artifacts=[version_dir / "manifest.json", *docs], version_uri=version_dir)
    recorded.parent.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps({"mlflow_run": run_id, "reason": reason}) + "\n")
    return summary | {"mlflow_run": run_id, "dvc_files_pushed": pushed, "unchanged": False}


def _write_lineage(version_dir: Path, digest: str, settings: Settings) -> None:
    manifest = read_manifest(version_dir)
    columns = ["image_id", "drop_id", "source_sha256", "series_uid", "study_uid", "patient_pseudonym"]
    tables = [pq.read_table(version_dir / s.path, columns=columns) for s in manifest.tables["images"].shards]
    images = pa.concat_tables(tables) if tables else arrow_schema(ImageRecord).empty_table().select(columns)
    lineage = [LineageRecord(**row, version_digest=digest) for row in images.to_pylist()]
    write_lineage(lineage, settings.data_dir.resolve() / "lineage" / f"{digest[:16]}.parquet")


def summary_line(summary: dict) -> str:
    rows = ", ".join(f"{n} {name}" for name, n in summary["rows"].items())
    merged = sum(summary["repeats_merged"].values())
    state = "unchanged, " if summary.get("unchanged") else ""
    return (f"version {summary['digest'][:16]} ({state}{len(summary['drops'])} drop(s); {rows}; "
            f"{summary['quality_quarantined']} rows failed quality"
            + (f", {merged} re-delivered rows merged" if merged else "") + ") "
            f"in {summary['version_dir']}; MLflow run {summary['mlflow_run']}; quality report {summary['data_docs']}")


class ForgetError(RadgroundError):
    """A patient cannot be forgotten as asked (found nowhere, and no pre-emptive exclusion asked for)."""


def forget(settings: Settings, pseudonym: str, *, not_yet_delivered: bool = False) -> dict:
    """Put a patient on the exclusion list and write a new version without their rows.

    A patient found in no version and no stage output is an error (nothing recorded: a mistyped
    ID must not look forgotten) unless ``not_yet_delivered``: then the pseudonym only goes on the
    exclusion list, so no later delivery brings them in, and no version is written.

    Returns {patient_pseudonym, version (the new version's summary, or None when there is no
    version yet), rows_removed per table, still_in_versions (earlier versions that hold the
    patient: delete or supersede them, or purge), runs (MLflow runs that used those versions),
    training_runs (the training runs that read the patient's train/val split of one of them, with the
    split), checkpoints (those runs' checkpoints: trained on the patient, not changed by a forget) and
    models (the registered model versions those runs trained, now tagged radground.contains_forgotten=true)}.
    """
    from radground.lineage import lineage_index, tag_forgotten_models
    from tasks.purge import in_stage_outputs, in_versions

    with rebuild_lock(settings, command="forget"):
        found = bool(in_versions(settings, pseudonym)) or bool(in_stage_outputs(settings, pseudonym))
        if not found and not not_yet_delivered:
            raise ForgetError(
                f"no patient with this ID/pseudonym in any version or stage output under {settings.data_dir.resolve()}"
                ": nothing recorded. Check the ID and that deid.key is the key the data was built with; to keep a "
                "patient who is not delivered yet out of every later version, add --not-yet-delivered.")
        forget_patients(settings, [pseudonym])
        if not found:
            return {"patient_pseudonym": pseudonym, "not_yet_delivered": True, "version": None, "rows_removed": {},
                    "still_in_versions": [], "runs": [], "training_runs": [], "checkpoints": [], "models": [],
                    "done": "not in any version or stage output: recorded on the exclusion list "
                            f"({settings.data_dir.resolve() / 'state' / 'forgotten.json'}); no version written. "
                            "Every later version leaves this patient out (a later delivery still reaches the "
                            "stage outputs: erase it there with forget --purge)."}
        before = latest_version_dir(settings)
        if before is None:
            return {"patient_pseudonym": pseudonym, "version": None, "rows_removed": {}, "still_in_versions": [],
                    "runs": [], "training_runs": [], "checkpoints": [], "models": []}
        summary = publish([], settings, {}, {}, reason="forget")
    old_rows = {name: entry.rows for name, entry in read_manifest(before).tables.items()}
    removed = {name: old_rows.get(name, 0) - rows for name, rows in summary["rows"].items()}
    lineage = settings.data_dir.resolve() / "lineage"
    used = lineage_index(lineage, settings=settings).where_used(pseudonym) if any(lineage.glob("*.parquet")) else {}
    # registered model versions trained on the patient: tagged so the promotion gate refuses them
    models = tag_forgotten_models(settings, used["models"]) if used.get("models") else []
    result = {"patient_pseudonym": pseudonym, "version": summary, "rows_removed": removed,
              "still_in_versions": used.get("versions", []), "runs": used.get("runs", []),
              "training_runs": used.get("training_runs", []), "checkpoints": used.get("checkpoints", []),
              "models": models}
    if used.get("evaluated_on"):
        result["evaluated_on"] = used["evaluated_on"]
    return result

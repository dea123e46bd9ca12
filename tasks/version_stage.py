"""The quality + version stage of a rebuild: check, version, track with DVC, record in MLflow.

What this first cut does: the tables of the drops of one rebuild are checked with the
great-expectations suites (failing rows move to quarantine; a crossed gate fails the
build), written as an immutable, content-addressed version (parent = the latest version),
tracked and pushed with DVC, and recorded as an MLflow run with its lineage index.
Not yet: incremental rebuilds that carry earlier drops' shards forward, forgetting a
patient, audit CLIs (see the issue notes).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

from radground.dvc import DvcRepo
from radground.keys import load_key
from radground.lineage import LineageRecord, record_build, write_lineage
from radground.schemas import GroundingRecord, ImageRecord, QuarantineRecord, ReportRecord, VQARecord, arrow_schema
from radground.settings import Settings
from radground.store import ObjectStore, open_store
from radground.tables import read_table, to_arrow
from tasks.quality import check_gates, check_table
from tasks.version import SplitRatios, assign_splits, read_manifest, read_splits, write_version

LATEST = "LATEST"  # a file in the versions folder naming the newest version's folder


def versions_root(settings: Settings) -> Path:
    return (settings.data_dir / "versions").resolve()


def _concat(store: ObjectStore, keys: Sequence[str], model) -> pa.Table:
    tables = [read_table(store, key).cast(arrow_schema(model)) for key in keys if store.exists(key)]
    return pa.concat_tables(tables) if tables else arrow_schema(model).empty_table()


# A record that two drops both deliver (a re-sent study) is one record: the same key and
# content. Such exact repeats are merged (first drop wins) and counted; anything that
# differs under the same id is left for the quality suites to reject.
_SAME_RECORD = {
    "images": ("image_id", "source_sha256"),
    "reports": ("study_uid", "language", "text"),
    "grounding": ("image_id", "language", "sentence_index", "keyword_start", "class_id", "bbox"),
    "vqa": ("vqa_id", "answer"),
}


def _merge_repeats(name: str, table: pa.Table) -> tuple[pa.Table, int]:
    columns = _SAME_RECORD[name]
    seen, keep = set(), []
    for index, row in enumerate(zip(*(table.column(c).to_pylist() for c in columns), strict=True)):
        key = tuple(tuple(v) if isinstance(v, list) else v for v in row)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return table.take(pa.array(keep, type=pa.int64())), table.num_rows - len(keep)


def _gather(store: ObjectStore, drop_ids: Sequence[str]) -> dict[str, tuple[pa.Table, type]]:
    images = [k for d in drop_ids for k in store.list(f"ingest/{d}/images/")]
    return {
        "images": (_concat(store, images, ImageRecord), ImageRecord),
        "reports": (_concat(store, [f"curate/{d}/reports.parquet" for d in drop_ids], ReportRecord), ReportRecord),
        "grounding": (_concat(store, [f"ground/{d}/grounding.parquet" for d in drop_ids], GroundingRecord),
                      GroundingRecord),
        "vqa": (_concat(store, [f"{s}/{d}/vqa.parquet" for d in drop_ids for s in ("curate", "ground")],
                        VQARecord), VQARecord),
    }


def publish(drop_ids: Sequence[str], settings: Settings, stage_counts: Mapping[str, float],
            stage_seconds: Mapping[str, float]) -> dict:
    """Check, version, track and record the rebuild of ``drop_ids``; returns the version summary."""
    store = open_store(settings)
    build_id = drop_ids[0] if len(drop_ids) == 1 else f"{drop_ids[0]}+{len(drop_ids) - 1}"
    checked, stats, rejected, merged = {}, {}, [], {}
    for name, (table, model) in _gather(store, drop_ids).items():
        table, merged[name] = _merge_repeats(name, table)
        result = check_table(name, table, model, data_dir=settings.data_dir, drop_id=build_id)
        checked[name], stats[name] = result.passed, result.stats
        rejected += result.failed
        docs = result.docs_index
    check_gates(stats)  # QualityGateError names the gate and the numbers

    quarantine = _concat(store, [f"{s}/{d}/quarantine.parquet" for d in drop_ids
                                 for s in ("ingest", "curate", "segment")], QuarantineRecord)
    quarantine = pa.concat_tables([quarantine, to_arrow(rejected, QuarantineRecord)])
    root = versions_root(settings)
    root.mkdir(parents=True, exist_ok=True)
    parent_dir = root / (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    parent = read_manifest(parent_dir) if parent_dir else None
    patients = checked["images"].column("patient_pseudonym").to_pylist()
    splits = assign_splits(patients, read_splits(parent_dir) if parent_dir else {}, SplitRatios(),
                           load_key(settings))
    building = root / f".building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    manifest = write_version(
        {name: [table] for name, table in checked.items()} | {"quarantine": [quarantine]},
        out_dir=building, parent=parent, drops=list(drop_ids), settings_hash=settings.settings_hash(),
        quarantine_counts=dict(Counter(quarantine.column("reason").to_pylist())), splits=splits)
    version_dir = root / manifest.digest[:16]
    if version_dir.exists():  # same inputs and settings: the same version, already there
        shutil.rmtree(building)
    else:
        building.rename(version_dir)
    (root / LATEST).write_text(version_dir.name + "\n")

    images = checked["images"]
    lineage = [LineageRecord(image_id=r["image_id"], drop_id=r["drop_id"], source_sha256=r["source_sha256"],
                             series_uid=r["series_uid"], study_uid=r["study_uid"],
                             patient_pseudonym=r["patient_pseudonym"], version_digest=manifest.digest)
               for r in images.select(["image_id", "drop_id", "source_sha256", "series_uid", "study_uid",
                                       "patient_pseudonym"]).to_pylist()]
    write_lineage(lineage, settings.data_dir.resolve() / "lineage" / f"{manifest.digest[:16]}.parquet")

    dvc = DvcRepo(root, settings)
    dvc.init()
    dvc.track(version_dir)
    pushed = dvc.push()
    run_id = record_build(settings, manifest=manifest.model_dump(mode="json"), drops=list(drop_ids),
                          stage_counts=dict(stage_counts), stage_seconds=dict(stage_seconds),
                          artifacts=[version_dir / "manifest.json", Path(docs).parent], version_uri=version_dir)
    return {"digest": manifest.digest, "parent_digest": manifest.parent_digest, "version_dir": str(version_dir),
            "rows": {name: entry.rows for name, entry in manifest.tables.items()}, "dvc_files_pushed": pushed,
            "mlflow_run": run_id, "data_docs": str(docs), "quality_quarantined": len(rejected),
            "repeats_merged": {name: n for name, n in merged.items() if n}}


def summary_line(summary: dict) -> str:
    rows = ", ".join(f"{n} {name}" for name, n in summary["rows"].items())
    merged = sum(summary["repeats_merged"].values())
    return (f"version {summary['digest'][:16]} ({rows}; {summary['quality_quarantined']} rows failed quality"
            + (f", {merged} re-delivered rows merged" if merged else "") + ") "
            f"in {summary['version_dir']}; MLflow run {summary['mlflow_run']}; data docs {summary['data_docs']}")

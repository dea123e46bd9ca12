"""Physical erasure of one patient on small generated data: where they are, what is rewritten or
deleted, the byte scan, versions rewritten without them, and a dry run that changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_version import image

from radground.buildstate import forgotten_patients, read_record, write_record
from radground.schemas import ImageRecord, MaskRecord, QuarantineRecord, ReportRecord
from radground.settings import load_settings
from radground.store import open_store
from radground.tables import parquet_bytes, read_table, to_arrow, write_table
from tasks import purge as purge_module
from tasks.purge import Footprint, PurgeError, find_patient, plan_purge, purge, scan
from tasks.version import read_manifest, read_splits, write_version

KEY = "purge-unit-test-key-0123456789abcdef0"
P1, P2 = "P" + "1A" * 10, "P" + "2B" * 10  # P1 is purged, P2 stays
SERIES = {P1: "2.25.81", P2: "2.25.82"}
STUDY = {P1: "2.25.91", P2: "2.25.92"}


def images(patient: str, first: int, n: int = 3, drop: str = "D") -> list[ImageRecord]:
    return [image(first + i, patient=patient, drop=drop).model_copy(update={
        "image_id": f"2.25.{first + i}", "series_uid": SERIES[patient], "study_uid": STUDY[patient]})
        for i in range(n)]


def report(patient: str, drop: str = "D") -> ReportRecord:
    return ReportRecord(study_uid=STUDY[patient], patient_pseudonym=patient, drop_id=drop, language="de",
                        text="Lunge frei.", redactions=0)


def quarantine(ref: str | None, drop: str = "D") -> QuarantineRecord:
    return QuarantineRecord(drop_id=drop, stage="ingest", item="file", reason="localizer", detail="d",
                            source_sha256="0" * 64, ref=ref)


def mask(row: ImageRecord) -> MaskRecord:
    return MaskRecord(image_id=row.image_id, series_uid=row.series_uid, study_uid=row.study_uid,
                      drop_id=row.drop_id, class_id=1, class_name="spleen", area_px=4, bbox=[0, 0, 2, 2],
                      rle="04", rows=8, cols=8, backend="classical")


@pytest.fixture(params=["local", "s3"])
def world(request, tmp_path, clean_env):
    """A store (local folder, or S3 on a moto server) with one drop D holding P1 (3 slices) and P2
    (3 slices), caches and overlays under data_dir."""
    storage = {}
    if request.param == "s3":
        credentials = request.getfixturevalue("s3_credentials")
        storage = {"backend": "s3", "endpoint": request.getfixturevalue("s3_server"), "bucket": "rg-purge-"
                   + request.node.name.split("[")[0][-20:].replace("_", "-"), **credentials,
                   "max_attempts": 2, "backoff_s": 0.01, "prefix": f"t{id(tmp_path)}/"}
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY}, storage=storage)
    store = open_store(settings)
    mine, theirs = images(P1, 0), images(P2, 100)
    keys = {p: f"ingest/D/images/{SERIES[p]}.parquet" for p in (P1, P2)}
    write_table(store, keys[P1], mine, ImageRecord)
    write_table(store, keys[P2], theirs, ImageRecord)
    write_table(store, "ingest/D/reports.parquet", [report(P1), report(P2)], ReportRecord)
    write_table(store, "ingest/D/quarantine.parquet",
                [quarantine(SERIES[P1]), quarantine(SERIES[P2]), quarantine(None)], QuarantineRecord)
    write_table(store, f"segment/D/masks/{SERIES[P1]}.parquet", [], MaskRecord)  # an MR series: no masks at all
    write_table(store, f"segment/D/masks/{SERIES[P2]}.parquet", [mask(r) for r in theirs], MaskRecord)
    write_record(store, "ingest", "D", "ingest-key", {"slices": 6}, {"image_keys": sorted(keys.values())})
    write_record(store, "segment", "D", "segment-key", {"series": 2}, {
        "mask_keys": [f"segment/D/masks/{s}.parquet" for s in SERIES.values()],
        "study_images": {STUDY[P1]: [r.image_id for r in mine], STUDY[P2]: [r.image_id for r in theirs]}})
    for patient, name in ((P1, "a"), (P2, "b")):
        store.put(f"series/ingest/{name}.json", json.dumps({"table_key": keys[patient], "sha256": "x"}).encode())
    overlays = settings.data_dir / "overlays" / "D"
    overlays.mkdir(parents=True)
    (overlays / f"{mine[0].image_id}.png").write_bytes(b"png")
    (overlays / f"{theirs[0].image_id}.png").write_bytes(b"png")
    cache = settings.data_dir / "cache" / "quality" / "D" / "0123456789abcdef" / "images"
    cache.mkdir(parents=True)
    pq.write_table(to_arrow([*mine, *theirs], ImageRecord), cache / "part-0.parquet")
    return settings, store, mine, theirs


def tree(root: Path) -> dict[str, str]:
    # rebuild.lock: the (empty) lock file a dry run holds while it reads, as every rebuild does
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "rebuild.lock"}


def test_find_patient_collects_their_ids_and_drops(world):
    settings, store, mine, _ = world
    footprint = find_patient(settings, P1, store=store)
    assert footprint.found and footprint.drops == {"D"} and not footprint.versions
    assert footprint.images == {r.image_id for r in mine}
    assert footprint.series == {SERIES[P1]} and footprint.studies == {STUDY[P1]}
    assert not find_patient(settings, "P" + "0" * 20, store=store).found


def test_purge_rewrites_every_object_without_the_patient_and_keeps_the_stage_keys(world):
    settings, store, mine, theirs = world
    report_ = purge(settings, P1, older="rewrite")

    assert report_["scan"]["clean"], report_["scan"]
    assert not store.exists(f"ingest/D/images/{SERIES[P1]}.parquet")
    assert not store.exists(f"segment/D/masks/{SERIES[P1]}.parquet")  # no rows, but named by their series
    assert read_table(store, f"ingest/D/images/{SERIES[P2]}.parquet").num_rows == len(theirs)
    assert read_table(store, f"segment/D/masks/{SERIES[P2]}.parquet").num_rows == len(theirs)
    assert read_table(store, "ingest/D/reports.parquet")["patient_pseudonym"].to_pylist() == [P2]
    assert read_table(store, "ingest/D/quarantine.parquet")["ref"].to_pylist() == [SERIES[P2], None]
    ingest, segment = read_record(store, "ingest", "D"), read_record(store, "segment", "D")
    assert ingest.key == "ingest-key" and segment.key == "segment-key"  # the next rebuild does not redo them
    assert ingest.handoff["image_keys"] == [f"ingest/D/images/{SERIES[P2]}.parquet"]
    assert list(segment.handoff["study_images"]) == [STUDY[P2]]
    assert [k for k in store.list("series/")] == ["series/ingest/b.json"]
    assert not (settings.data_dir / "cache" / "quality" / "D").exists()  # recomputed by the next version
    assert [p.name for p in (settings.data_dir / "overlays" / "D").iterdir()] == [f"{theirs[0].image_id}.png"]
    assert P1 in forgotten_patients(settings)
    audit = Path(report_["audit_record"]).read_text()
    assert P1 in audit and SERIES[P1] not in audit and mine[0].image_id not in audit  # pseudonym only
    assert report_["scan"]["kept_by_design"] == ["state/forgotten.json", str(Path(report_["audit_record"])
                                                                          .relative_to(settings.data_dir))]


def test_a_dry_run_lists_what_it_would_touch_and_changes_nothing(world):
    settings, store, mine, _ = world
    before = tree(settings.data_dir)
    plan = purge(settings, P1, older="remove", dry_run=True)
    assert tree(settings.data_dir) == before
    assert plan["store"]["delete"] == [f"ingest/D/images/{SERIES[P1]}.parquet", f"segment/D/masks/{SERIES[P1]}.parquet"]
    assert set(plan["store"]["rewrite"]) == {"ingest/D/quarantine.parquet", "ingest/D/reports.parquet"}
    assert plan["overlays"] == [f"overlays/D/{mine[0].image_id}.png"]
    assert plan["quality_caches"] == ["cache/quality/D"] and plan["raw_drops"] == {"D": "outside data_dir"}


def test_a_patient_found_nowhere_is_an_error_and_nothing_is_recorded(world):
    settings, *_ = world
    with pytest.raises(PurgeError, match="no patient with this ID/pseudonym"):
        purge(settings, "P" + "0" * 20, older="rewrite")
    assert not forgotten_patients(settings)


def test_the_scan_reads_raw_bytes_compressed_parquet_and_names_but_not_longer_uids(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY})
    root = settings.data_dir
    root.mkdir(parents=True)
    (root / "log.txt").write_text("slice 2.25.1234 done")  # a longer UID: not 2.25.123
    (root / "db.sqlite").write_bytes(b"\x00\x01page P1A1A1A1A1A1A1A1A1A1A\x00")
    # Delta-encoded (prefix + suffix) and compressed: the value is in no raw byte run, only decoded
    table = pa.table({"text": ["2.25.12", "2.25.12-", "2.25.123 of x"]})  # suffixes "2.25.12", "-", "3 of x"
    pq.write_table(table, root / "t.parquet", use_dictionary=False, write_statistics=False,
                   column_encoding={"text": "DELTA_BYTE_ARRAY"}, compression="zstd")
    assert b"2.25.123" not in (root / "t.parquet").read_bytes()
    (root / "overlays").mkdir()
    (root / "overlays" / "2.25.123.png").write_bytes(b"png")
    (root / "kept.json").write_text(P1)
    result = scan(settings, ["2.25.123", P1], kept_by_design=[root / "kept.json"])
    assert sorted(result.hits) == ["db.sqlite", "overlays/2.25.123.png", "t.parquet"]
    assert result.kept_by_design == ["kept.json"] and not result.clean
    assert "2.25.123" not in json.dumps(result.__dict__).replace("2.25.123.png", "")  # names files, not values


def test_a_version_is_rewritten_without_the_patient_with_a_new_digest_and_parent(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY})
    root = tmp_path / "data" / "versions"
    tables = {"images": [to_arrow(images(P1, 0), ImageRecord)], "reports": [to_arrow([report(P2)], ReportRecord)],
              "quarantine": [to_arrow([quarantine(SERIES[P1]), quarantine(SERIES[P2])], QuarantineRecord)]}
    tables["images"].append(to_arrow(images(P2, 100), ImageRecord))
    old = write_version(tables, out_dir=root / "old", parent=None, drops=["D"], settings_hash="s",
                        code_version="0", quarantine_counts={"localizer": 2}, splits={P1: "train", P2: "val"},
                        shard_target_bytes=2**20)
    footprint = Footprint(P1, images={f"2.25.{i}" for i in range(3)}, series={SERIES[P1]}, studies={STUDY[P1]})
    new_dir = purge_module._rewrite_version(settings, root / "old", footprint, "f" * 64)
    new = read_manifest(new_dir)
    assert new.digest != old.digest and new_dir.name == new.digest[:16] and new.parent_digest == "f" * 64
    assert pq.read_table(new_dir / "images")["patient_pseudonym"].to_pylist() == [P2] * 3
    assert read_splits(new_dir) == {P2: "val"} and new.quarantine_counts == {"localizer": 1}
    carried = {s.path for s in old.tables["images"].shards} & {s.path for s in new.tables["images"].shards}
    assert carried and all(os.path.samefile(root / "old" / p, new_dir / p) for p in carried)  # P2's shard: linked


def test_a_purge_plan_names_the_llm_sentences_of_the_patients_curated_reports(world):
    settings, store, *_ = world
    curated = ReportRecord.model_validate(report(P1).model_dump() | {"sentences": [
        {"index": 0, "section": None, "text": "Milz o.B.", "start": 0, "end": 9, "keywords": [],
         "translation": "Spleen normal."}]})
    store.put("curate/D/reports.parquet", parquet_bytes(to_arrow([curated, report(P2)], ReportRecord)))
    plan = plan_purge(settings, find_patient(settings, P1, store=store), store)
    assert plan.llm_sentences == {"Milz o.B.", "Spleen normal."}
    assert pq.read_table(io.BytesIO(store.get("curate/D/reports.parquet"))).num_rows == 2  # a plan changes nothing


def test_dvc_objects_are_deleted_by_hash_only_in_the_cache_and_an_s3_remote(tmp_path, clean_env, s3_server,
                                                                           s3_credentials):
    from radground.dvc import DvcRepo

    settings = load_settings(data_dir=tmp_path / "data", storage={
        "backend": "s3", "endpoint": s3_server, "bucket": "rg-purge-dvc", **s3_credentials,
        "max_attempts": 2, "backoff_s": 0.01})
    store = open_store(settings)
    listing = json.dumps([{"md5": "ab" + "1" * 30, "relpath": "images/a.parquet"},
                          {"md5": "ab" + "2" * 30, "relpath": "manifest.json"}])
    for name, data in (("cd" + "0" * 30 + ".dir", listing), ("ab" + "1" * 30, "a"), ("ab" + "2" * 30, "m"),
                       ("ef" + "9" * 30, "another data_dir's object")):
        store.put(f"dvc/files/md5/{name[:2]}/{name[2:]}", data.encode())
    root = settings.data_dir / "versions"
    (root / ".dvc" / "cache" / "files" / "md5" / "ab").mkdir(parents=True)
    (root / ".dvc" / "cache" / "files" / "md5" / "ab" / ("1" * 30)).write_text("a")
    (root / "v.dvc").write_text("outs:\n- md5: cd" + "0" * 30 + ".dir\n  path: v\n")
    dvc = DvcRepo(root, settings)
    hashes = dvc.referenced_hashes([root / "v.dvc"])  # the listing is read from the remote: not in the cache
    assert hashes == {"cd" + "0" * 30 + ".dir", "ab" + "1" * 30, "ab" + "2" * 30}
    counts = dvc.delete_objects(hashes - {"ab" + "2" * 30})  # still referenced by another version
    assert counts == {"dvc_cache_objects_deleted": 1, "dvc_remote_objects_deleted": 2}
    assert sorted(store.list("dvc/")) == ["dvc/files/md5/ab/" + "2" * 30, "dvc/files/md5/ef/" + "9" * 30]


def test_older_versions_are_rewritten_and_the_parent_chain_remapped(tmp_path, clean_env):
    """v1 (P1, P2) -> v2 (+ P2's second study) -> v3 (a forget of P1: v2 without P1). Purging P1
    rewrites v1 and v2; v2 without P1 *is* v3, so v3 takes v2's place and points at the new v1."""
    from radground.dvc import DvcRepo
    from tasks.version_stage import LATEST, _write_lineage

    settings = load_settings(data_dir=tmp_path / "data", deid={"key": KEY})
    root = settings.data_dir / "versions"
    dvc = DvcRepo(root, settings)
    dvc.init()
    base = [to_arrow(images(P1, 0), ImageRecord), to_arrow(images(P2, 100), ImageRecord)]
    more = to_arrow([r.model_copy(update={"study_uid": "2.25.93", "series_uid": "2.25.83"})
                     for r in images(P2, 200)], ImageRecord)

    def version(name: str, parts, parent):
        manifest = write_version({"images": parts}, out_dir=root / name, parent=parent, drops=["D"],
                                 settings_hash="s", code_version="0", quarantine_counts={},
                                 splits={p: "train" for p in (P1, P2)}, shard_target_bytes=2**20)
        folder = root / name
        folder.rename(root / manifest.digest[:16])
        _write_lineage(root / manifest.digest[:16], manifest.digest, settings)
        dvc.track(root / manifest.digest[:16])
        return manifest

    v1 = version("a", base, None)
    v2 = version("b", [*base, more], v1)
    footprint = Footprint(P1, images={f"2.25.{i}" for i in range(3)}, series={SERIES[P1]}, studies={STUDY[P1]})
    v3_dir = purge_module._rewrite_version(settings, root / v2.digest[:16], footprint, v2.digest)  # = forget
    v3 = read_manifest(v3_dir)
    _write_lineage(v3_dir, v3.digest, settings)
    dvc.track(v3_dir)
    (root / LATEST).write_text(v3_dir.name + "\n")
    dvc.push()

    store = open_store(settings)
    found = find_patient(settings, P1, store=store)
    assert found.versions == {v1.digest[:16], v2.digest[:16]}
    plan = plan_purge(settings, found, store)
    assert plan.versions == [v1.digest[:16], v2.digest[:16]] and plan.reparent == [v3.digest[:16]]
    mapping = purge_module._purge_versions(settings, found, plan, "rewrite", dvc)

    new_v1 = mapping[v1.digest[:16]]
    assert mapping[v2.digest[:16]] == v3.digest[:16] and new_v1 not in (v1.digest[:16], None)
    assert read_manifest(root / new_v1).parent_digest is None
    assert read_manifest(v3_dir).parent_digest[:16] == new_v1  # remapped, never itself
    assert read_manifest(v3_dir).digest == v3.digest  # the parent is not part of the digest
    assert sorted(p.name for p in root.glob("*.dvc") if p.is_file()) == sorted([f"{new_v1}.dvc", f"{v3_dir.name}.dvc"])
    assert sorted(p.stem for p in (settings.data_dir / "lineage").glob("*.parquet")) == sorted([new_v1, v3_dir.name])
    assert (root / LATEST).read_text().strip() == v3_dir.name

    before = {v1.digest[:16], v2.digest[:16]}
    assert not any((root / name).exists() for name in before)

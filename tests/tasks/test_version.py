"""tasks/version.py: shards + manifest + digest, splits, DVC against a local remote and moto S3."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from radground.dvc import DvcError, DvcRepo
from radground.errors import ConfigError, StoreUnreachableError
from radground.schemas import ImageRecord
from radground.settings import VersionSettings, load_settings
from radground.tables import to_arrow
from tasks.version import (
    MANIFEST_FILE,
    VersionError,
    assign_splits,
    read_manifest,
    read_splits,
    shard_paths,
    write_version,
)
from tests.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY

# dvc 3.67's own use of pygtrie; nothing this module can change.
pytestmark = pytest.mark.filterwarnings("ignore:_NoneStep.value:DeprecationWarning")

KEY = b"k" * 32
SETTINGS_HASH = "s" * 64


def image(i: int, *, patient: str = "P1", drop: str = "drop-A", size: int = 8, seed: int = 0) -> ImageRecord:
    pixels = np.random.default_rng(seed * 100_000 + i).integers(-1000, 1000, (size, size), dtype=np.int16)
    return ImageRecord(
        image_id=f"2.25.{i}", patient_pseudonym=patient, study_uid="2.25.9", series_uid="2.25.8",
        drop_id=drop, modality="CT", body_part="CHEST", study_date=date(2020, 1, 2), slice_index=i,
        slice_axis="axial", slice_position_mm=float(i), rows=size, cols=size, row_spacing_mm=0.7,
        col_spacing_mm=0.7, slice_thickness_mm=1.0, image_position=[0.0, 0.0, float(i)],
        image_orientation=[1.0, 0, 0, 0, 1.0, 0], pixel_dtype="int16", pixels=pixels.tobytes(),
        has_report=True, source_sha256=f"{i:064x}",
    )


def images_table(n: int = 4, **kwargs):
    return to_arrow([image(i, **kwargs) for i in range(n)], ImageRecord)


def write(out_dir: Path, tables=None, **kwargs):
    args = dict(parent=None, drops=["drop-A"], settings_hash=SETTINGS_HASH, code_version="0.1.0",
                quarantine_counts={"no_pixel_data": 1}, splits={"P1": "train"})
    args.update(kwargs)
    return write_version(tables if tables is not None else {"images": [images_table()]}, out_dir=out_dir, **args)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


# --------------------------------------------------------------------------- format, digest


def test_same_inputs_give_same_digest_and_identical_shards(tmp_path: Path) -> None:
    a, b = write(tmp_path / "a"), write(tmp_path / "b")
    assert a.digest == b.digest
    assert files(tmp_path / "a") == files(tmp_path / "b")
    shard = a.tables["images"].shards[0]
    data = (tmp_path / "a" / shard.path).read_bytes()
    # Independently: the name and the manifest's hash are the sha256 of the bytes on disk.
    assert shard.sha256 == hashlib.sha256(data).hexdigest()
    assert shard.path == f"images/part-{shard.sha256[:16]}.parquet"
    assert pq.read_table(tmp_path / "a" / shard.path).num_rows == 4 == a.tables["images"].rows


def test_manifest_fields(tmp_path: Path) -> None:
    m = write(tmp_path / "v")
    raw = json.loads((tmp_path / "v" / MANIFEST_FILE).read_text())
    assert raw["digest"] == m.digest and raw["parent_digest"] is None and raw["drops"] == ["drop-A"]
    assert len(m.digest) == 64 and set(m.digest) <= set("0123456789abcdef")  # a sha256 in hex
    assert raw["quarantine_counts"] == {"no_pixel_data": 1} and raw["settings_hash"] == SETTINGS_HASH
    assert raw["tables"]["images"]["rows"] == 4 and raw["created_by"].startswith("radground ")
    # Independently: the splits entry is the sha256 of the splits file's bytes, one row per patient.
    splits_sha = hashlib.sha256((tmp_path / "v" / "splits.parquet").read_bytes()).hexdigest()
    assert raw["splits"] == {"path": "splits.parquet", "sha256": splits_sha, "rows": 1}
    assert read_manifest(tmp_path / "v") == m == read_manifest(tmp_path / "v" / MANIFEST_FILE)


# The digest's documented coverage (tasks/version.py, docs/architecture.md "Dataset version format"):
# the shards' content hashes, the splits file, the settings hash and the code version; never a
# timestamp or the parent. The tests below check that behaviour, not the recipe's lines.
def two_patients() -> dict:
    """Two parts (one per patient) of the images table."""
    return {"images": [images_table(2, patient="P1"),
                       to_arrow([image(i, patient="P2", seed=1) for i in (2, 3)], ImageRecord)]}


def test_same_tables_and_splits_give_the_same_digest_whatever_their_order(tmp_path: Path) -> None:
    a = write(tmp_path / "a", two_patients(), splits={"P1": "train", "P2": "val"})
    # the parts in the other order, the splits given in the other order: the same version
    parts = {"images": list(reversed(two_patients()["images"]))}
    b = write(tmp_path / "b", parts, splits={"P2": "val", "P1": "train"})
    assert a.digest == b.digest and a.tables == b.tables and a.splits == b.splits
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_one_patient_moved_to_another_split_changes_the_digest(tmp_path: Path) -> None:
    before = write(tmp_path / "before", two_patients(), splits={"P1": "train", "P2": "val"})
    after = write(tmp_path / "after", two_patients(), splits={"P1": "train", "P2": "test"})
    assert after.tables == before.tables  # the very same shards: only the splits differ
    assert after.splits.sha256 != before.splits.sha256
    assert after.digest != before.digest
    added = write(tmp_path / "added", two_patients(), splits={"P1": "train", "P2": "val", "P3": "test"})
    assert added.tables == before.tables and added.digest != before.digest  # a patient more in the splits
    assert len({before.digest, after.digest, added.digest}) == 3


def test_a_changed_row_settings_or_code_changes_the_digest(tmp_path: Path) -> None:
    base = write(tmp_path / "base").digest
    rows = [image(i) for i in range(4)]
    rows[2] = rows[2].model_copy(update={"body_part": "ABDOMEN"})
    assert write(tmp_path / "row", {"images": [to_arrow(rows, ImageRecord)]}).digest != base
    assert write(tmp_path / "settings", settings_hash="t" * 64).digest != base
    assert write(tmp_path / "code", code_version="0.2.0").digest != base
    # Not part of the digest (documented): lineage and bookkeeping, the parent and the creation time.
    assert write(tmp_path / "meta", drops=["x"], quarantine_counts={}).digest == base
    child = write(tmp_path / "child", parent=read_manifest(tmp_path / "base"))
    assert child.parent_digest == base and child.digest == base


def test_parent_digest_recorded(tmp_path: Path) -> None:
    parent = write(tmp_path / "v1")
    child = write(tmp_path / "v2", parent=parent)
    assert child.parent_digest == parent.digest
    assert read_manifest(tmp_path / "v2").parent_digest == parent.digest


def test_reused_shards_are_carried_over_not_rewritten(tmp_path: Path) -> None:
    v1 = write(tmp_path / "v1")
    old = shard_paths(tmp_path / "v1", v1)
    new_drop = images_table(3, patient="P2", drop="drop-B", seed=1)
    v2 = write(tmp_path / "v2", {"images": [new_drop]}, parent=v1, drops=["drop-A", "drop-B"], reuse=old,
               splits={"P1": "train", "P2": "test"})
    assert v2.tables["images"].rows == 7 and len(v2.tables["images"].shards) == 2
    for source in old["images"]:
        carried = tmp_path / "v2" / "images" / source.name
        assert carried.stat().st_ino == source.stat().st_ino  # a hard link: no new file was written
        assert carried.read_bytes() == source.read_bytes()
    # The same content written fresh in one go would differ (one shard), but the old shard's hash is kept.
    assert v1.tables["images"].shards[0] in v2.tables["images"].shards


def test_reusing_a_modified_shard_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "v1")
    shard = next((tmp_path / "v1" / "images").glob("*.parquet"))
    tampered = tmp_path / "elsewhere" / shard.name
    tampered.parent.mkdir()
    tampered.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(VersionError, match="does not match its name; the shard was modified"):
        write(tmp_path / "v2", {}, reuse={"images": [tampered]})


def test_a_written_version_is_immutable(tmp_path: Path) -> None:
    write(tmp_path / "v")
    before = files(tmp_path / "v")
    with pytest.raises(VersionError, match=r"already holds a complete dataset version .*immutable"):
        write(tmp_path / "v", {"images": [images_table(2, seed=5)]})
    assert files(tmp_path / "v") == before


def test_stray_files_of_an_interrupted_write_are_refused(tmp_path: Path) -> None:
    (tmp_path / "v" / "images").mkdir(parents=True)
    (tmp_path / "v" / "images" / "part-0000000000000000.parquet").write_bytes(b"junk")
    with pytest.raises(VersionError, match="not part of this version.*Delete the folder"):
        write(tmp_path / "v")
    assert not (tmp_path / "v" / MANIFEST_FILE).exists()


def test_shard_target_splits_a_large_table(tmp_path: Path) -> None:
    table = images_table(200, size=32)  # ~2 KiB of noisy pixels per row; ~15 KiB fixed cost per file
    target = 64 * 1024
    m = write(tmp_path / "v", {"images": [table]}, shard_target_bytes=target)
    shards = m.tables["images"].shards
    assert 5 <= len(shards) <= 12 and sum(s.rows for s in shards) == 200 == m.tables["images"].rows
    assert all(s.rows > 1 for s in shards)
    sizes = [(tmp_path / "v" / s.path).stat().st_size for s in shards]
    full = sorted(sizes)[1:]  # the last shard holds the remainder
    assert max(sizes) <= target * 1.1 and min(full) >= target * 0.7, sizes
    back = pq.ParquetDataset([str(tmp_path / "v" / s.path) for s in shards]).read()
    assert sorted(back["image_id"].to_pylist()) == sorted(table["image_id"].to_pylist())
    assert len(write(tmp_path / "one", {"images": [table]}).tables["images"].shards) == 1


def test_empty_table_has_no_shards(tmp_path: Path) -> None:
    m = write(tmp_path / "v", {"images": [images_table(0)]})
    assert m.tables["images"].rows == 0 and m.tables["images"].shards == []


def test_read_manifest_of_an_incomplete_folder(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    with pytest.raises(VersionError, match="not a complete dataset version"):
        read_manifest(tmp_path / "v")


# --------------------------------------------------------------------------- splits


def expected_split(patient: str, ratios: VersionSettings) -> str:
    digest = hmac.new(KEY, b"split\x00" + patient.encode(), hashlib.sha256).digest()
    x = int.from_bytes(digest[:8], "big") / 2**64
    return "train" if x < ratios.train else "val" if x < ratios.train + ratios.val else "test"


def test_splits_are_deterministic_and_follow_the_keyed_hash() -> None:
    patients = [f"2.25.{i}" for i in range(200)]
    a = assign_splits(patients, {}, VersionSettings(), KEY)
    assert a == assign_splits(reversed(patients), {}, VersionSettings(), KEY)
    assert a == {p: expected_split(p, VersionSettings()) for p in patients}
    assert a != assign_splits(patients, {}, VersionSettings(), b"other-key" * 4)


def test_split_ratios_respected_over_10000_patients() -> None:
    splits = assign_splits((f"2.25.{i}" for i in range(10_000)), {}, VersionSettings(train=0.7, val=0.2, test=0.1), KEY)
    counts = {name: list(splits.values()).count(name) / 10_000 for name in ("train", "val", "test")}
    assert counts == pytest.approx({"train": 0.7, "val": 0.2, "test": 0.1}, abs=0.02)


# Ratios chosen so that the old and the new assignment differ for EVERY position x in [0, 1):
# old 0.5/0.5/0 puts x < 0.5 in train and the rest in val; new 0/0.5/0.5 puts x < 0.5 in val and
# the rest in test. So, whatever the hash, every earlier patient would move if its split were
# recomputed, and every new patient lands where the old ratios could not have put it.
OLD_RATIOS = VersionSettings(train=0.5, val=0.5, test=0.0)
NEW_RATIOS = VersionSettings(train=0.0, val=0.5, test=0.5)


def test_a_patient_never_moves_even_when_ratios_change(tmp_path: Path) -> None:
    first = [f"2.25.{i}" for i in range(50)]
    v1 = assign_splits(first, {}, OLD_RATIOS, KEY)
    assert v1 == {p: expected_split(p, OLD_RATIOS) for p in first}
    write(tmp_path / "v1", splits=v1)
    previous = read_splits(tmp_path / "v1")
    assert previous == v1
    new = [f"2.25.{i}" for i in range(50, 100)]
    v2 = assign_splits(first + new, previous, NEW_RATIOS, KEY)
    assert sorted(v2) == sorted(first + new)
    assert {p: v2[p] for p in first} == v1  # nobody moved ...
    assert all(expected_split(p, NEW_RATIOS) != v1[p] for p in first)  # ... though the new ratios differ for all
    assert {p: v2[p] for p in new} == {p: expected_split(p, NEW_RATIOS) for p in new}  # the new follow the new
    assert all(v2[p] != expected_split(p, OLD_RATIOS) for p in new)
    assert {v2[p] for p in new} == {"val", "test"}  # both of the new ratios' splits are used


def test_bad_ratios_and_bad_previous_splits_are_refused() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        load_settings(version={"train": 0.8, "val": 0.1, "test": 0.2})
    with pytest.raises(VersionError, match="unknown split"):
        assign_splits([], {"P": "holdout"}, VersionSettings(), KEY)


# --------------------------------------------------------------------------- DVC


def dvc_round_trip(tmp_path: Path, settings) -> None:
    repo = DvcRepo(tmp_path / "versions", settings)
    repo.init()
    v1 = write(repo.root / "v1")
    v2 = write(repo.root / "v2", {"images": [images_table(3, patient="P2", seed=1)]}, parent=v1,
               reuse=shard_paths(repo.root / "v1"), splits={"P1": "train", "P2": "val"})
    assert repo.track(repo.root / "v1") == repo.root / "v1.dvc"
    repo.track(repo.root / "v2")
    assert repo.push() > 0
    assert repo.push() == 0  # everything already on the remote

    clone = repo.clone(tmp_path / "clone")
    assert not (clone.root / "v2").exists()
    restored = clone.pull("v2")
    assert read_manifest(restored) == v2
    assert files(restored) == files(repo.root / "v2")
    with pytest.raises(DvcError, match="not tracked"):
        clone.pull("v3")


@pytest.mark.integration
def test_dvc_init_track_push_pull_local_remote(tmp_path: Path, clean_env: None) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    dvc_round_trip(tmp_path, settings)
    config = (tmp_path / "versions" / ".dvc" / "config").read_text()
    assert "no_scm = True" in config and str(tmp_path / "data" / "dvc-remote") in config
    assert any((tmp_path / "data" / "dvc-remote").rglob("*"))


@pytest.mark.integration
def test_dvc_push_pull_against_moto_s3(tmp_path: Path, s3_server: str, make_s3_settings) -> None:
    settings = make_s3_settings(s3_server)
    dvc_round_trip(tmp_path, settings)
    dvc_dir = tmp_path / "versions" / ".dvc"
    # Credentials only in config.local (never shared); the shared config has the endpoint.
    assert FAKE_SECRET_KEY not in (dvc_dir / "config").read_text()
    assert s3_server in (dvc_dir / "config").read_text()
    assert FAKE_SECRET_KEY in (dvc_dir / "config.local").read_text()
    assert (dvc_dir / "config.local").stat().st_mode & 0o077 == 0


@pytest.mark.integration
def test_unreachable_s3_remote_names_the_remote_not_the_secret(tmp_path: Path, free_tcp_port: int,
                                                                make_s3_settings, monkeypatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would take ~40 s here
    endpoint = f"http://127.0.0.1:{free_tcp_port}"
    settings = make_s3_settings(endpoint, create_bucket=False, connect_timeout_s=1.0)
    repo = DvcRepo(tmp_path / "versions", settings)
    repo.init()
    write(repo.root / "v1")
    repo.track(repo.root / "v1")
    # push checks the bucket first, through the object store (dvc-s3 never creates buckets).
    with pytest.raises(StoreUnreachableError, match=f"{endpoint} is unreachable") as pushed:
        repo.push()
    # pull goes straight to DVC's S3 client.
    with pytest.raises(DvcError, match=rf"dvc pull with remote 'radground' \(s3://.*/dvc at {endpoint}\) failed"
                       ) as pulled:
        repo.clone(tmp_path / "clone").pull("v1")
    for error in (pushed.value, pulled.value):
        assert FAKE_SECRET_KEY not in str(error) and FAKE_ACCESS_KEY not in str(error) and "\n" not in str(error)

"""radground.buildstate: stage keys, stage records, the drop registry, series reuse, forgotten patients."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radground import buildstate
from radground.settings import load_settings
from radground.store import open_store
from radground.tables import parquet_bytes, relabelled

KEY = "buildstate-test-key-0123456789abcdef"


@pytest.fixture
def settings(tmp_path, clean_env):
    return load_settings(data_dir=tmp_path / "data", deid={"key": KEY})


def test_a_stage_setting_changes_that_stage_and_the_later_ones_only(settings, tmp_path):
    base = buildstate.stage_keys("site-a-1", settings)
    segmentation = buildstate.stage_keys("site-a-1", load_settings(
        data_dir=tmp_path / "data", deid={"key": KEY}, segmentation={"sam_min_iou": 0.7}))
    llm = buildstate.stage_keys("site-a-1", load_settings(data_dir=tmp_path / "data", deid={"key": KEY},
                                                          llm={"backend": "openai"}))
    other_key = buildstate.stage_keys("site-a-1", load_settings(data_dir=tmp_path / "data", deid={"key": KEY[::-1]}))
    other_drop = buildstate.stage_keys("site-a-2", settings)

    def changed(keys):
        return {stage for stage in buildstate.STAGES if keys[stage] != base[stage]}

    assert changed(segmentation) == {"segment", "ground"}
    assert changed(llm) == {"curate", "ground"}
    assert changed(other_key) == set(buildstate.STAGES)  # pseudonyms change with the key
    assert changed(other_drop) == set(buildstate.STAGES)
    assert KEY not in str(base)


def test_a_stage_is_fresh_only_with_its_key_and_every_upstream_stage(settings):
    store = open_store(settings)
    keys = buildstate.stage_keys("d1", settings)
    for stage in ("ingest", "segment", "ground"):  # curate missing
        buildstate.write_record(store, stage, "d1", keys[stage], {"n": 1})
    assert set(buildstate.fresh_records(store, "d1", keys)) == {"ingest", "segment"}  # ground needs curate
    buildstate.write_record(store, "curate", "d1", "an-old-key", {})
    assert "curate" not in buildstate.fresh_records(store, "d1", keys)
    buildstate.write_record(store, "curate", "d1", keys["curate"], {})
    assert set(buildstate.fresh_records(store, "d1", keys)) == set(buildstate.STAGES)


def test_clearing_a_stage_removes_its_record_and_outputs(settings):
    store = open_store(settings)
    store.put("ingest/d1/images/s1.parquet", b"x")
    buildstate.write_record(store, "ingest", "d1", "k", {})
    assert buildstate.clear_stage(store, "ingest", "d1") == 2
    assert buildstate.read_record(store, "ingest", "d1") is None and not list(store.list("ingest/d1/"))


def test_the_registry_knows_a_drop_by_location_and_listing(settings, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "a.dcm").write_bytes(b"1")
    registry = buildstate.DropRegistry(settings)
    fingerprint = buildstate.listing_fingerprint(drop, ["a.dcm"])
    registry.remember("site-a-1", str(drop), fingerprint)
    assert registry.drop_for(str(drop), fingerprint) == "site-a-1"
    (drop / "a.dcm").write_bytes(b"22")  # changed content: size and mtime move
    os.utime(drop / "a.dcm", ns=(1, 1))
    assert registry.drop_for(str(drop), buildstate.listing_fingerprint(drop, ["a.dcm"])) is None
    assert registry.drop_for(str(drop), None) is None  # store drops have no cheap fingerprint


def test_a_series_output_is_found_only_while_its_bytes_are_unchanged(settings):
    store = open_store(settings)
    data = parquet_bytes(pa.table({"drop_id": ["d1", "d1"], "v": [1, 2]}))
    store.put("ingest/d1/images/s.parquet", data)
    key = buildstate.series_key("ingest", {"files": ["abc"]}, settings)
    buildstate.remember_series_output(store, "ingest", key, "ingest/d1/images/s.parquet", data, {"slices": 2})
    found = buildstate.find_series_output(store, "ingest", key)
    assert found is not None and found.extra == {"slices": 2}
    copied = pq.read_table(io.BytesIO(relabelled(found.table, "d2")))
    assert copied.column("drop_id").to_pylist() == ["d2", "d2"] and copied.column("v").to_pylist() == [1, 2]
    assert buildstate.series_key("segment", {"files": ["abc"]}, settings) != key

    store.put("ingest/d1/images/s.parquet", parquet_bytes(pa.table({"drop_id": ["d1"], "v": [9]})))  # rebuilt
    assert buildstate.find_series_output(store, "ingest", key) is None
    store.delete("ingest/d1/images/s.parquet")
    assert buildstate.find_series_output(store, "ingest", key) is None


def test_forgotten_patients_accumulate(settings):
    assert buildstate.forgotten_patients(settings) == set()
    buildstate.forget_patients(settings, ["P" + "A" * 20])
    assert buildstate.forget_patients(settings, ["P" + "B" * 20]) == {"P" + "A" * 20, "P" + "B" * 20}
    assert buildstate.forgotten_patients(settings) == {"P" + "A" * 20, "P" + "B" * 20}


@pytest.fixture
def lock_waits(monkeypatch) -> list:
    """The waits rebuild_lock asks of its FileLock, recorded instead of waited out (a fake clock): each
    acquire is one try. A lock that did not wait, or waited the wrong time, shows in the list."""
    from filelock import FileLock

    waits: list = []

    class FakeClockLock(FileLock):
        def acquire(self, timeout=None, *args, **kwargs):
            waits.append(timeout)
            return super().acquire(0, *args, **kwargs)

    monkeypatch.setattr(buildstate, "FileLock", FakeClockLock)
    return waits


def test_a_second_writer_waits_then_fails_naming_the_lock(settings, lock_waits):
    from filelock import FileLock

    quick = settings.model_copy(update={"rebuild_lock_timeout_s": 0.2})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(settings.data_dir / "rebuild.lock"), pytest.raises(
            buildstate.RebuildLockedError, match=r"rebuild\.lock \(waited 0\.2 s\)"), buildstate.rebuild_lock(quick):
        pass
    assert lock_waits == [0, 0.2]  # one try, then the configured wait: nothing more, nothing less
    with buildstate.rebuild_lock(quick):  # free: the first try takes it, no wait asked for
        pass
    assert lock_waits == [0, 0.2, 0]


def test_the_lock_holder_names_itself_beside_the_lock_and_nothing_else(settings):
    import json
    import socket

    sidecar = settings.data_dir / buildstate.LOCK_HOLDER_FILE
    with buildstate.rebuild_lock(settings, command="forget"):
        holder = json.loads(sidecar.read_text(encoding="utf-8"))
        # pid, host, command and start time only: no path, drop, patient or argument that could be PHI
        assert set(holder) == {"pid", "host", "command", "started_at"}
        assert (holder["pid"], holder["host"], holder["command"]) == (os.getpid(), socket.gethostname(), "forget")
    assert not sidecar.exists()  # released: nobody holds it


def test_a_waiting_writer_says_whose_lock_it_waits_for_and_the_timeout_names_it_too(settings):
    import re
    import socket

    from radground.runtime import progress_hook

    quick = settings.model_copy(update={"rebuild_lock_timeout_s": 0.2})
    notices: list[str] = []
    host = re.escape(socket.gethostname())
    whom = rf"the forget started at \d{{4}}-\d\d-\d\d \d\d:\d\d \S+ by pid {os.getpid()} on host {host}"
    with (buildstate.rebuild_lock(settings, command="forget"), progress_hook(lambda *_: None, notices.append),
          pytest.raises(buildstate.RebuildLockedError, match=rf"^{whom} holds .*rebuild\.lock \(waited 0\.2 s\)\."),
          buildstate.rebuild_lock(quick)):
        pass
    assert len(notices) == 1 and re.match(rf"waiting for {whom} to finish \(lock .*rebuild\.lock; up to 0\.2 s",
                                          notices[0]), notices


def test_without_a_front_end_the_wait_is_a_warning_record(settings, caplog):
    quick = settings.model_copy(update={"rebuild_lock_timeout_s": 0.1})
    with (buildstate.rebuild_lock(settings), pytest.raises(buildstate.RebuildLockedError),
          buildstate.rebuild_lock(quick)):
        pass
    assert any(r.levelname == "WARNING" and "waiting for the rebuild started at" in r.getMessage()
               for r in caplog.records)

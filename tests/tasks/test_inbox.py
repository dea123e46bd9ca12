"""watch-drops: a drop is announced once, when its marker is there and its listing has been quiet."""

from __future__ import annotations

import os

import pytest

from radground.buildstate import DropRegistry
from radground.settings import load_settings
from radground.store import open_store
from tasks import inbox

HEADER = b"accession_number,patient_id,study_date,language,report_text\n"


def _scan(settings, now):
    """One watch-drops run without Prefect: scan, 'emit' (collect), save the state."""
    state, events = inbox.scan(settings, now)
    inbox.write_state(settings, state)
    return events


@pytest.fixture
def folder_inbox(tmp_path, clean_env):
    box = tmp_path / "inbox"
    box.mkdir()
    settings = load_settings(data_dir=tmp_path / "data", watch={"inbox": str(box), "quiet_s": 60})
    return box, settings


def test_a_drop_lands_once_only_with_its_marker_and_after_a_quiet_period(folder_inbox):
    box, settings = folder_inbox
    drop = box / "site-a-2026-12"
    (drop / "dicom").mkdir(parents=True)
    (drop / "reports.csv").write_bytes(HEADER)
    (drop / "dicom" / "1.dcm").write_bytes(b"x" * 10)
    assert _scan(settings, 0) == []  # first sight
    assert _scan(settings, 1000) == []  # quiet, but no drop.yaml: the sender is not done
    (drop / "drop.yaml").write_text("site: site-a\nreceived_at: 2026-12-03\n")
    assert _scan(settings, 1010) == []  # the marker changed the listing: quiet again from here
    (drop / "dicom" / "2.dcm").write_bytes(b"y" * 10)  # still arriving
    assert _scan(settings, 1050) == []
    assert _scan(settings, 1100) == []  # 50 s quiet < 60 s
    events = _scan(settings, 1111)
    uri = str(drop.resolve())
    assert events == [{"event": "radground.drop.landed", "resource": {"prefect.resource.id": inbox.resource_id(uri)},
                       "payload": {"uri": uri}}]
    assert _scan(settings, 5000) == []  # once only
    (drop / "dicom" / "3.dcm").write_bytes(b"z")  # a change after landing is the nightly rebuild's business
    assert _scan(settings, 6000) == [] and _scan(settings, 9000) == []


def test_a_growing_file_keeps_the_drop_waiting(folder_inbox):
    box, settings = folder_inbox
    drop = box / "d"
    drop.mkdir()
    (drop / "drop.yaml").write_text("site: s\n")
    big = drop / "big.dcm"
    big.write_bytes(b"a")
    os.utime(big, ns=(1, 1))
    assert _scan(settings, 0) == []
    big.write_bytes(b"ab")  # same mtime, another size: still a change
    os.utime(big, ns=(1, 1))
    assert _scan(settings, 100) == []
    assert [e["payload"]["uri"] for e in _scan(settings, 160)] == [str(drop.resolve())]


def test_a_drop_the_registry_knows_is_not_announced_and_loose_or_hidden_entries_are_ignored(folder_inbox):
    box, settings = folder_inbox
    for name in ("known", "new", ".partial"):
        (box / name).mkdir()
        (box / name / "drop.yaml").write_text("site: s\n")
    (box / "loose.txt").write_text("x")
    DropRegistry(settings).remember("s-000000000000", str((box / "known").resolve()), None)
    assert _scan(settings, 0) == []
    events = _scan(settings, 100)
    assert [e["payload"]["uri"] for e in events] == [str((box / "new").resolve())]


def test_the_event_names_no_file_and_no_patient(folder_inbox):
    box, settings = folder_inbox
    drop = box / "d"
    drop.mkdir()
    (drop / "drop.yaml").write_text("site: s\n")
    (drop / "PATIENT-Mueller-1234.dcm").write_bytes(b"x")
    _scan(settings, 0)
    (event,) = _scan(settings, 100)
    assert set(event) == {"event", "resource", "payload"} and event["payload"] == {"uri": str(drop.resolve())}
    assert "Mueller" not in repr(event) and str(drop) not in repr(event["resource"])
    state = inbox.state_path(settings).read_text()
    assert "Mueller" not in state and "drop.yaml" not in state


def test_a_damaged_state_file_or_missing_inbox_says_what_to_do(folder_inbox, tmp_path):
    box, settings = folder_inbox
    inbox.state_path(settings).write_text("{not json")
    with pytest.raises(inbox.BuildStateError, match="Delete it"):
        inbox.scan(settings, 0)
    missing = load_settings(data_dir=tmp_path / "data", watch={"inbox": str(tmp_path / "nope")})
    with pytest.raises(inbox.InboxError, match="no such folder.*RADGROUND_WATCH__INBOX"):
        inbox.scan(missing, 0)
    with pytest.raises(inbox.InboxError, match="watch.inbox is not set"):
        inbox.scan(load_settings(data_dir=tmp_path / "data"), 0)


def test_a_store_prefix_inbox_on_the_local_store(tmp_path, clean_env):
    settings = load_settings(data_dir=tmp_path / "data", watch={"inbox": "store:inbox/", "quiet_s": 10})
    store = open_store(settings)
    store.put("inbox/a/reports.csv", HEADER)
    assert _scan(settings, 0) == []
    store.put("inbox/a/drop.yaml", b"site: s\n")
    assert _scan(settings, 5) == []
    assert [e["payload"]["uri"] for e in _scan(settings, 15)] == ["store:inbox/a"]


@pytest.mark.integration
def test_a_store_prefix_inbox_on_s3(s3_server, make_s3_settings, tmp_path):
    base = make_s3_settings(s3_server, prefix="site-a/")
    settings = load_settings(data_dir=tmp_path / "s3data", storage=base.storage.model_dump(),
                             watch={"inbox": "store:inbox", "quiet_s": 10})
    store = open_store(settings)
    store.put("inbox/a/reports.csv", HEADER)
    store.put("inbox/a/drop.yaml", b"site: s\n")
    store.put("inbox/b/reports.csv", HEADER)  # no marker yet
    assert _scan(settings, 0) == []
    store.put("inbox/a/reports.csv", HEADER + b"1,2,20260101,de,x\n")  # re-uploaded, bigger
    assert _scan(settings, 5) == []
    assert _scan(settings, 12) == []  # 7 s since the re-upload (the names alone did not change)
    events = _scan(settings, 16)
    assert [e["payload"] for e in events] == [{"uri": "store:inbox/a"}]
    # and it is a drop the rebuild can read (the URI is relative to storage.prefix, like every store: drop)
    from tasks.discover import DropReader

    assert DropReader("store:inbox/a", settings).exists("reports.csv")
    assert _scan(settings, 100) == []


def test_observe_is_pure():
    seen = {"/x/a": inbox.Seen("/x/a", "s1", True)}
    state, landed = inbox.observe(seen, {}, [], now=0, quiet_s=0)
    assert landed == [] and state == {"drops": {"/x/a": {"signature": "s1", "since": 0, "landed": False}}}
    again, landed = inbox.observe(seen, state, [], now=0, quiet_s=0)
    assert landed == ["/x/a"] and state["drops"]["/x/a"]["landed"] is False  # the input is not changed
    assert inbox.observe({}, again, [], now=1, quiet_s=0) == (again, [])  # gone: a landed drop stays remembered

"""Incremental rebuilds, forgetting a patient, and a rebuild killed mid-way, through the real flow.

Each test stands alone and runs in any order (issue 15 item 5): a module fixture builds drop A once
(`built`); the tests that only rebuild with nothing changed use that data_dir as it is. A test that
changes a data_dir (adds drop B, changes a setting, forgets a patient) gets one of its own (`own`):
a copy of the built stage outputs and drop registry, as a rebuild stopped before versioning leaves
them, versioned by a rebuild that runs no stage. The killed rebuild has a data_dir of its own too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import psutil
import pyarrow.parquet as pq
import pytest

from flows.rebuild import DropResult, run_rebuild
from radground.buildstate import forgotten_patients, read_record
from radground.settings import Settings, load_settings
from radground.store import open_store
from radground.synth.drop import generate_drop
from tasks.version import read_manifest, read_splits

pytestmark = [pytest.mark.slow, pytest.mark.integration]

KEY = "incremental-test-key-0123456789abcdef"  # the same key in every data_dir: comparable pseudonyms


class Built(NamedTuple):
    settings: Settings
    full: DropResult  # drop A's first rebuild


def _task_runs(settings) -> Counter:
    database = settings.data_dir / "prefect" / "prefect.db"
    if not database.exists():
        return Counter()
    with sqlite3.connect(database) as connection:
        names = [row[0] for row in connection.execute("select name from task_run")]
    return Counter(name.rsplit("-", 1)[0] for name in names)  # Prefect appends "-<n>" to task run names


def _new_runs(before: Counter, after: Counter) -> dict[str, int]:
    return {name: n for name, n in (after - before).items() if n}


def _latest(settings) -> Path:
    root = settings.data_dir / "versions"
    return root / (root / "LATEST").read_text().strip()


@pytest.fixture(scope="module")
def drops(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("incremental-drops")
    return {"a": generate_drop(root / "drop-a", patients=3, seed=51).drop_dir,
            "b": generate_drop(root / "drop-b", patients=1, seed=52).drop_dir}


@pytest.fixture(scope="module")
def built(tmp_path_factory, drops) -> Built:
    """A data_dir with drop A built by a full rebuild. Tests only rebuild it with nothing changed."""
    settings = load_settings(data_dir=tmp_path_factory.mktemp("incremental-built") / "data", deid={"key": KEY})
    (full,) = run_rebuild([str(drops["a"])], settings)
    return Built(settings, full)


@pytest.fixture
def own(tmp_path, drops, built) -> Built:
    """A data_dir of the test's own whose latest version holds drop A: the built stage outputs and
    drop registry copied (no version, MLflow, Prefect or DVC state), then a rebuild that runs no
    stage writes the version, the same one as ``built``'s."""
    source, data_dir = built.settings.data_dir, tmp_path / "data"
    shutil.copytree(source / "store", data_dir / "store")
    (data_dir / "state").mkdir()
    shutil.copy2(source / "state" / "drops.json", data_dir / "state" / "drops.json")
    settings = load_settings(data_dir=data_dir, deid={"key": KEY})
    (first,) = run_rebuild([str(drops["a"])], settings)
    assert first.cached and not first.version["unchanged"]  # no stage ran; versioned, pushed, recorded
    assert first.version["digest"] == built.full.version["digest"]
    return Built(settings, first)


def test_a_rebuild_without_change_runs_nothing_and_keeps_the_digest(built, drops):
    settings, full = built
    before = _task_runs(settings)
    (again,) = run_rebuild([str(drops["a"])], settings)
    assert again.cached and again.version["unchanged"]
    assert again.version["digest"] == full.version["digest"]
    assert _new_runs(before, _task_runs(settings)) == {}  # no task ran: Prefect was not even started


def test_a_rebuild_without_drops_reports_the_current_version(built, tmp_path):
    from radground.buildstate import BuildStateError

    (again,) = run_rebuild([], built.settings)
    assert again.cached and again.version["unchanged"] and again.version["digest"] == built.full.version["digest"]
    with pytest.raises(BuildStateError, match="no drops given and no dataset version"):
        run_rebuild([], load_settings(data_dir=tmp_path / "empty", deid={"key": KEY}))


def test_a_new_drop_runs_only_its_own_stages_and_carries_earlier_shards(own, drops):
    settings, full = own
    before = _task_runs(settings)
    results = run_rebuild([str(drops["b"])], settings)
    new = _new_runs(before, _task_runs(settings))
    assert len(results) == 1 and not results[0].cached
    b = results[0].ingest
    assert new["ingest-shard"] == min(b.series, 4) and new["ingest-reports"] == 1  # drop B only

    version_dir = Path(results[0].version["version_dir"])
    manifest = read_manifest(version_dir)
    first = read_manifest(full.version["version_dir"])
    assert manifest.parent_digest == first.digest and manifest.drops == [*first.drops, b.drop_id]
    assert manifest.tables["images"].rows == first.tables["images"].rows + b.slices
    old_images = {s.path for s in first.tables["images"].shards}
    carried = [s for s in manifest.tables["images"].shards if s.path in old_images]
    assert len(carried) == len(old_images)  # drop A's shards are the same files, not rewritten
    for shard in carried:
        assert os.path.samefile(version_dir / shard.path, Path(full.version["version_dir"]) / shard.path)
    splits_before, splits_after = read_splits(full.version["version_dir"]), read_splits(version_dir)
    assert all(splits_after[p] == s for p, s in splits_before.items())  # nobody changes split
    assert len(splits_after) > len(splits_before)


def test_a_segmentation_setting_reruns_segment_and_ground_only(own, drops):
    settings, first = own
    (with_b,) = run_rebuild([str(drops["b"])], settings)  # drop B in the latest version: it must rerun too
    changed = load_settings(data_dir=settings.data_dir, deid={"key": KEY}, segmentation={"sam_min_iou": 0.6})
    store = open_store(settings)
    drop_ids = {first.ingest.drop_id, with_b.ingest.drop_id}
    kept = {(stage, d): read_record(store, stage, d) for stage in ("ingest", "curate", "segment", "ground")
            for d in drop_ids}
    before = _task_runs(settings)
    results = run_rebuild([str(drops["a"])], changed)  # only A given: B, in the latest version, reruns too
    new = _new_runs(before, _task_runs(settings))
    assert set(new) == {"segment", "ground"}, new
    for drop_id in drop_ids:
        for stage in ("ingest", "curate"):
            assert read_record(store, stage, drop_id) == kept[stage, drop_id]  # untouched
        for stage in ("segment", "ground"):
            assert read_record(store, stage, drop_id).key != kept[stage, drop_id].key
    version = read_manifest(results[0].version["version_dir"])
    assert {r.ingest.drop_id for r in results} == drop_ids == set(version.drops)


def test_forget_removes_exactly_one_patients_rows_and_later_rebuilds_keep_them_out(own, drops):
    settings, _ = own
    current = _latest(settings)
    images = pq.read_table(current / "images").to_pylist()
    patient = sorted({r["patient_pseudonym"] for r in images})[0]
    rows_before = {name: entry.rows for name, entry in read_manifest(current).tables.items()}
    mine = {name: sum(1 for r in pq.read_table(current / name).to_pylist() if r.get("patient_pseudonym") == patient)
            for name in ("images", "reports", "grounding", "vqa")}
    assert mine["images"] and mine["reports"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env |= {"RADGROUND_DATA_DIR": str(settings.data_dir), "RADGROUND_DEID__KEY": KEY}
    done = subprocess.run([sys.executable, "-m", "radground", "forget", "--patient", patient],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["patient_pseudonym"] == patient and patient in forgotten_patients(settings)
    new_dir = Path(answer["version"]["version_dir"])
    assert {name: answer["rows_removed"][name] for name in mine} == mine
    for name in ("images", "reports", "grounding", "vqa"):
        rows = pq.read_table(new_dir / name).to_pylist()
        assert len(rows) == rows_before[name] - mine[name]
        assert all(r["patient_pseudonym"] != patient for r in rows)
    assert patient not in read_splits(new_dir)
    assert read_manifest(current).digest in answer["still_in_versions"]  # the old version still has them
    assert read_manifest(new_dir).digest not in answer["still_in_versions"]

    results = run_rebuild([str(drops["a"])], settings)  # a later rebuild keeps the patient out
    rebuilt = Path(results[0].version["version_dir"])
    assert all(r["patient_pseudonym"] != patient for r in pq.read_table(rebuilt / "images").to_pylist())


def test_a_failed_push_leaves_the_version_unrecorded_and_the_next_rebuild_finishes_it(own, drops, monkeypatch):
    from radground.dvc import DvcError, DvcRepo
    from tasks.version_stage import forget

    settings, _ = own
    patient = sorted({r["patient_pseudonym"] for r in pq.read_table(_latest(settings) / "images").to_pylist()})[-1]

    def remote_down(self, version=None):
        raise DvcError("dvc push with remote 'radground' failed: the endpoint is unreachable")

    monkeypatch.setattr(DvcRepo, "push", remote_down)
    with pytest.raises(DvcError, match="unreachable"):
        forget(settings, patient)
    monkeypatch.undo()
    written = _latest(settings).name
    assert not (settings.data_dir / "state" / "recorded" / written).exists()  # complete, but not pushed

    (result,) = run_rebuild([str(drops["a"])], settings)
    assert result.cached and not result.version["unchanged"]  # nothing rebuilt, but pushed and recorded now
    assert result.version["digest"][:16] == written and result.version["dvc_files_pushed"] > 0
    assert (settings.data_dir / "state" / "recorded" / written).exists()


def _kill_tree(process: subprocess.Popen) -> None:
    parent = psutil.Process(process.pid)
    family = [parent, *parent.children(recursive=True)]  # Prefect server, Ray's processes and workers
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)


def test_a_rebuild_killed_mid_way_restarts_to_the_same_digest(built, drops, tmp_path):
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env |= {"RADGROUND_DATA_DIR": str(data_dir), "RADGROUND_DEID__KEY": KEY}
    process = subprocess.Popen([sys.executable, "-m", "radground", "rebuild", str(drops["a"])], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # a rebuild that never gets there is stopped by pytest-timeout (pyproject: timeout), not by a clock here
        while not list((data_dir / "store" / "segment").glob("*/_stage.json")):  # ingest + curate + segment done
            assert process.poll() is None, "the rebuild ended before it could be killed"
            time.sleep(0.2)
    finally:
        _kill_tree(process)
    assert not (data_dir / "versions" / "LATEST").exists()  # killed before it versioned anything

    settings = load_settings(data_dir=data_dir, deid={"key": KEY})
    (restarted,) = run_rebuild([str(drops["a"])], settings)
    assert restarted.version["digest"] == built.full.version["digest"]

"""rebuild_dataset end to end: Prefect API on loopback, Ray with 2 workers, two drops.

The decisive check: no planted PHI value exists in ANY byte the rebuild wrote under
data_dir (object store, Prefect's SQLite database and server log, secrets).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.rebuild import run_rebuild
from radground.runtime import progress_hook
from radground.settings import load_settings
from radground.store import open_store
from radground.synth.drop import generate_drop
from radground.tables import read_table

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _second_drop_with_a_returning_patient(first: Path, truth: dict, target: Path) -> dict:
    """A later delivery that repeats one reported study of a patient from the first drop."""
    patient = next(p for p in truth["patients"]
                   if any(s["accession"] not in truth["studies_without_report"] for s in p["studies"]))
    study = next(s for s in patient["studies"] if s["accession"] not in truth["studies_without_report"])
    target.mkdir()
    for series in study["series"]:
        for f in series["files"]:
            (target / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(first / f["path"], target / f["path"])
    with (first / "reports.csv").open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["accession_number"] == study["accession"]]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (target / "reports.csv").write_text(out.getvalue(), encoding="utf-8")
    (target / "drop.yaml").write_text(yaml.safe_dump({"site": "site-b", "received_at": "2026-11-20T08:00:00Z"}))
    return {"patient": patient, "study": study}


DEID_KEY = "rebuild-test-key-" + "k" * 40  # fixed: the module's splits must not depend on a random key


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebuild")
    first = generate_drop(root / "drop-a", patients=3, seed=31)
    truth = json.loads(first.truth_path.read_text(encoding="utf-8"))
    returning = _second_drop_with_a_returning_patient(first.drop_dir, truth, root / "drop-b")
    settings = load_settings(data_dir=root / "data", ray={"num_cpus": 2}, deid={"key": DEID_KEY})
    progress.clear()
    with progress_hook(lambda stage, done, total: progress.append((stage, done, total))):
        results = run_rebuild([str(first.drop_dir), str(root / "drop-b")], settings)
    return root, truth, returning, settings, results


progress: list[tuple[str, int, int]] = []  # what the CLI's bar was fed during the module's rebuild


def _images(settings, drop_id: str) -> list[dict]:
    store = open_store(settings)
    return [row for key in store.list(f"ingest/{drop_id}/images/") for row in read_table(store, key).to_pylist()]


def test_counts_reconcile_for_both_drops(rebuilt):
    _, truth, returning, _, results = rebuilt
    summaries = [r.ingest for r in results]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary.files_in == summary.slices + summary.files_quarantined
    a, b = summaries
    assert a.quarantine_reasons["truncated"] == 1 and a.quarantine_reasons["no_pixel_data"] == 1
    assert a.quarantine_reasons["not_dicom"] == 2 and a.quarantine_reasons["orphan_report"] == 1
    expected_b = sum(len(s["files"]) for s in returning["study"]["series"])
    assert b.files_in == expected_b and b.reports == 1


def test_series_an_earlier_drop_delivered_are_copied_not_processed_again(rebuilt):
    _, _, _, settings, results = rebuilt
    a, b = results
    assert a.ingest.series_reused == 0 and a.segment["series_reused"] == 0
    assert b.ingest.series_reused == b.ingest.series > 0  # the re-delivered study: every series copied
    assert b.segment["series_reused"] == b.segment["series_segmented"] == b.ingest.series
    store = open_store(settings)
    for row in _images(settings, b.ingest.drop_id):
        assert row["drop_id"] == b.ingest.drop_id  # relabelled: the records say which drop delivered them
    masks = [k for k in store.list(f"segment/{b.ingest.drop_id}/masks/")]
    assert len(masks) == b.ingest.series
    assert {r["drop_id"] for k in masks for r in read_table(store, k).to_pylist()} == {b.ingest.drop_id}


def _needles(truth: dict) -> set[str]:
    needles = set()
    for value in truth["phi_strings"]:
        needles |= {value, value.replace("^", " "), value.replace("^", ", ")}
        if len(value) == 8 and value.isdigit():  # DICOM dates, also as written in text
            needles |= {f"{value[:4]}-{value[4:6]}-{value[6:]}", f"{value[6:]}.{value[4:6]}.{value[:4]}"}
    return {n.casefold() for n in needles if len(n) >= 4}


def _text_of(path: Path) -> str:
    with path.open("rb") as handle:
        is_parquet = handle.read(4) == b"PAR1"  # also DVC's md5-named copies in its cache and remote
    if is_parquet:
        table = pq.read_table(path)
        # Pixel bytes and RLE counts are encoded numbers, not text: random matches there say nothing.
        table = table.drop([c for c in table.column_names if c in ("pixels", "rle")])
        return json.dumps(table.to_pylist(), default=str) + str(table.schema.metadata)
    data = path.read_bytes()
    return data.decode("utf-8", "ignore") + data.decode("latin-1")


def test_no_planted_phi_in_any_byte_written_under_data_dir(rebuilt):
    root, truth, _, settings, _ = rebuilt
    needles = _needles(truth)
    written = [p for p in settings.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written)
    assert any(p.name.startswith("prefect.db") for p in written)  # Prefect's database is scanned too
    leaks = {}
    for path in written:
        text = _text_of(path).casefold()
        found = sorted(n for n in needles if n in text)
        if found:
            leaks[str(path.relative_to(settings.data_dir))] = found[:5]
    assert not leaks


def test_a_returning_patient_keeps_pseudonym_uids_and_date_shift(rebuilt):
    _, truth, returning, settings, results = rebuilt
    a, b = (r.ingest for r in results)
    first, second = _images(settings, a.drop_id), _images(settings, b.drop_id)
    later = {r["image_id"]: r for r in second}
    same = [r for r in first if r["image_id"] in later]
    assert len(same) == b.slices  # every repeated slice maps to the same de-identified SOP uid
    for row in same:
        other = later[row["image_id"]]
        for column in ("patient_pseudonym", "study_uid", "series_uid", "study_date"):
            assert row[column] == other[column]
    assert len({r["patient_pseudonym"] for r in first}) == len(
        {p["patient_id"] for p in truth["patients"]
         if any(s["accession"] not in truth["studies_without_report"] for s in p["studies"])})


def test_the_flow_ran_as_prefect_tasks_no_more_than_one_per_series_or_batch(rebuilt):
    _, _, _, settings, results = rebuilt
    a, b = (r.ingest for r in results)
    database = next(settings.data_dir.glob("prefect/prefect.db"))
    with sqlite3.connect(database) as connection:
        names = [row[0] for row in connection.execute("select name from task_run")]
        flows = connection.execute("select state_type from flow_run").fetchall()
    assert flows == [("COMPLETED",)]
    def count(prefix: str) -> int:
        return sum(n.startswith(prefix) for n in names)

    # Whole series per task, never a slice: no more shard tasks than series, and about
    # tasks_per_cpu (2) x num_cpus (2) tasks per stage and drop.
    assert count("ingest-shard") == min(a.series, 4) + min(b.series, 4)
    assert count("scan") <= 2 * 4 and count("ingest-reports") == 2 and 2 <= count("curate") <= 2 * 4
    assert count("segment") == count("ingest-shard")  # whole series again: a 3D backend sees each volume once
    assert 2 <= count("ground") <= 2 * 4
    stages = ("ingest-shard", "scan", "ingest-reports", "curate", "segment", "ground")
    assert len(names) == sum(count(stage) for stage in stages)


def test_curate_ran_after_ingest_and_wrote_reports_and_vqa(rebuilt):
    _, _, _, settings, results = rebuilt
    store = open_store(settings)
    for result in results:
        drop_id = result.ingest.drop_id
        reports = read_table(store, f"curate/{drop_id}/reports.parquet").to_pylist()
        assert len(reports) == result.ingest.reports == result.curate["reports"]
        assert all(r["sentences"] and r["keyword_backend"] == "lexicon" for r in reports)
        assert read_table(store, f"curate/{drop_id}/vqa.parquet").num_rows == result.curate["vqa_items"] > 0
        assert result.curate["language_coverage"]["de"] + result.curate["language_coverage"]["en"] > 0


def test_the_flow_curates_with_the_openai_backend_against_a_local_server(tmp_path):
    """Both modes through the real flow: Ray workers reach the OpenAI-compatible server on loopback."""
    from llm_server import StubLLMServer, lexicon_like_responder

    drop = generate_drop(tmp_path / "drop", patients=2, seed=5)
    with StubLLMServer(responder=lexicon_like_responder()) as server:
        settings = load_settings(data_dir=tmp_path / "data", llm={
            "backend": "openai", "base_url": server.url, "model": "stub-model", "backoff_s": 0.01})
        (result,) = run_rebuild([str(drop.drop_dir)], settings)
        assert server.requests > 0
    store = open_store(settings)
    reports = read_table(store, f"curate/{result.ingest.drop_id}/reports.parquet").to_pylist()
    assert reports and all(r["keyword_backend"] == "openai:stub-model" for r in reports)
    statuses = [r["translation_status"] for r in reports]
    assert statuses == ["translated"] * len(reports), result.curate["quarantine_reasons"]
    vqa = read_table(store, f"curate/{result.ingest.drop_id}/vqa.parquet").to_pylist()
    assert {v["generator"] for v in vqa} == {"template", "llm"} and {v["language"] for v in vqa} == {"de", "en"}


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area else 0.0


def test_grounded_boxes_match_the_synthetic_truth_and_sides_never_swap(rebuilt):
    import hashlib

    from radground.masks import decode_rle

    root, truth, _, settings, results = rebuilt
    a = results[0]
    store = open_store(settings)
    drop_a = root / "drop-a"
    sha_to_path = {hashlib.sha256(p.read_bytes()).hexdigest(): p.relative_to(drop_a).as_posix()
                   for p in drop_a.rglob("*") if p.is_file()}
    truth_boxes = {f["path"]: f["boxes"] for p in truth["patients"] for s in p["studies"] for se in s["series"]
                   for f in se["files"] if "boxes" in f}
    images = {r["image_id"]: r for key in store.list(f"ingest/{a.ingest.drop_id}/images/")
              for r in read_table(store, key).to_pylist()}
    masks = {(r["image_id"], r["class_name"]) for key in store.list(f"segment/{a.ingest.drop_id}/masks/")
             for r in read_table(store, key).to_pylist()}
    groundings = read_table(store, f"ground/{a.ingest.drop_id}/grounding.parquet").to_pylist()
    assert groundings and a.ground["grounded_pairs"] == len(groundings)
    ious = []
    for row in groundings:
        assert (row["image_id"], row["class_name"]) in masks  # grounded => present in the slice's mask
        assert decode_rle(row["rle"], row["rows"], row["cols"]).sum() == row["area_px"]
        boxes = truth_boxes[sha_to_path[images[row["image_id"]]["source_sha256"]]]
        c0, r0, c1, r1 = boxes[row["class_name"]]  # the truth uses inclusive pixel boxes
        ious.append(_iou(row["bbox"], [c0, r0, c1 + 1, r1 + 1]))
        if row["class_name"] in ("lung_left", "lung_right"):  # the other side's truth box must not fit
            other = "lung_right" if row["class_name"] == "lung_left" else "lung_left"
            if other in boxes:
                o0, p0, o1, p1 = boxes[other]
                assert _iou(row["bbox"], [o0, p0, o1 + 1, p1 + 1]) < 0.2
    assert min(ious) >= 0.8, sorted(ious)[:5]
    slices = read_table(store, f"ground/{a.ingest.drop_id}/slices.parquet").to_pylist()
    assert {s["image_id"] for s in slices if s["grounded"]} == {g["image_id"] for g in groundings}


def test_the_build_is_checked_versioned_tracked_and_recorded(rebuilt):
    import mlflow

    from tasks.version import read_manifest

    _, _, _, settings, results = rebuilt
    published = results[0].version
    assert published and all(r.version == published for r in results)  # one version for the build
    version_dir = Path(published["version_dir"])
    manifest = read_manifest(version_dir)
    assert manifest.digest == published["digest"] and manifest.drops == [r.ingest.drop_id for r in results]
    # drop B re-delivers a study of drop A: its slices are the same records, merged once
    assert manifest.tables["images"].rows == results[0].ingest.slices
    assert published["repeats_merged"]["images"] == results[1].ingest.slices
    assert (version_dir.parent / f"{version_dir.name}.dvc").is_file() and published["dvc_files_pushed"] > 0
    assert any((settings.data_dir / "dvc-remote").rglob("*"))
    assert Path(published["data_docs"]).is_file()
    database = (settings.data_dir / "mlflow" / "mlflow.db").resolve()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{database}")
    run = client.get_run(published["mlflow_run"])
    assert run.info.status == "FINISHED" and run.data.params["settings_hash"] == settings.settings_hash()


def test_datasets_and_lineage_commands_answer_by_pseudonym_only(rebuilt):
    import json as jsonlib
    import os
    import subprocess
    import sys

    _, truth, returning, settings, results = rebuilt
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    env["RADGROUND_DATA_DIR"] = str(settings.data_dir)
    env["RADGROUND_DEID__KEY"] = DEID_KEY  # the key the data was built with: where-used hashes the source ID

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    digest = results[0].version["digest"]
    assert digest[:16] in cli("datasets", "list")
    assert jsonlib.loads(cli("datasets", "show", digest[:16]))["digest"] == digest
    traced = jsonlib.loads(cli("lineage", "trace", digest[:16]))
    assert sorted(traced["drops"]) == sorted({r.ingest.drop_id for r in results[:1]})
    source_id = returning["patient"]["patient_id"]
    where = cli("lineage", "where-used", "--patient", source_id)
    assert source_id not in where  # the hospital's ID is hashed, never echoed
    assert jsonlib.loads(where)["versions"] == [digest]


def test_a_second_rebuild_on_the_same_data_dir_waits_then_fails_clearly(tmp_path, monkeypatch):
    """The second rebuild tries the lock, says whom it waits for, waits rebuild_lock_timeout_s for it
    (asked of a fake clock: the waits are recorded, not waited out), then fails naming the lock."""
    from filelock import FileLock

    from flows.rebuild import RebuildLockedError
    from radground import buildstate

    waits: list[float | None] = []
    events: list[str] = []

    class FakeClockLock(FileLock):
        def acquire(self, timeout=None, *args, **kwargs):
            if not str(self.lock_file).endswith("rebuild.lock"):
                return super().acquire(timeout, *args, **kwargs)
            waits.append(timeout)
            events.append(f"acquire {timeout}")
            return super().acquire(0, *args, **kwargs)  # one try: the time asked for passes at once

    monkeypatch.setattr(buildstate, "FileLock", FakeClockLock)
    drop = generate_drop(tmp_path / "drop", patients=1, seed=2)
    settings = load_settings(data_dir=tmp_path / "data", rebuild_lock_timeout_s=0.5)
    settings.data_dir.mkdir(parents=True)
    # a rebuild in progress (one that left no note of who it is)
    with (FileLock(settings.data_dir / "rebuild.lock"),
          progress_hook(lambda *_: None, lambda notice: events.append(f"notice {notice}")),
          pytest.raises(RebuildLockedError,
                        match=r"another rebuild or forget holds .*rebuild\.lock \(waited 0\.5 s\)")):
        run_rebuild([str(drop.drop_dir)], settings)
    assert waits == [0, 0.5], events  # a try without waiting, then the configured wait, nothing more
    assert events[0] == "acquire 0" and events[-1] == "acquire 0.5", events
    assert len(events) == 3 and events[1].startswith("notice waiting for another rebuild or forget"), events
    assert not (settings.data_dir / "prefect").exists()  # refused before Prefect or Ray started


def test_every_stage_reports_its_progress_to_the_front_end(rebuilt):
    _, _, _, _, results = rebuilt
    stages = [stage for stage, _, _ in progress]
    for stage in ("scan: files", "ingest: series", "curate: reports", "segment: series", "ground: reports"):
        counted = [(done, total) for name, done, total in progress if name == stage]
        assert len(counted) >= 2 * len(results), (stage, counted)  # per drop: 0 of N, ..., N of N
        assert counted[-1][0] == counted[-1][1] > 0  # the last drop's stage finished all it counted
    assert stages[-1] == "quality + version"  # the last, long step is announced, not a frozen bar
    assert stages.index("starting Prefect + Ray") < stages.index("scan: files")
    ingest_total = sum(total for name, done, total in progress if name == "ingest: series" and done == 0)
    assert ingest_total == sum(r.ingest.series for r in results)


def test_a_rebuild_without_change_says_current_and_draws_the_overlays_asked_for(rebuilt):
    """No stage runs (no Prefect, no Ray), and overlays are asked for
    although the overlay count is no stage setting (the built drops' ground stages stay current)."""
    root, _, _, settings, results = rebuilt
    assert not (settings.data_dir / "overlays").exists()  # the module's rebuild asked for none
    with_overlays = settings.model_copy(update={"grounding": settings.grounding.model_copy(update={"overlays": 2})})
    again = run_rebuild([str(root / "drop-a"), str(root / "drop-b")], with_overlays)
    assert all(r.cached for r in again)
    for result in again:
        lines = result.lines()
        assert len(lines) == 4 and all(": current (built " in line and ", key " in line for line in lines), lines
        assert not any("files in" in line or "grounded pairs" in line for line in lines)  # no old summary
    a = again[0]
    pngs = sorted((settings.data_dir / "overlays" / a.ingest.drop_id).glob("*.png"))
    assert len(pngs) == 2 and [str(p) for p in pngs] == sorted(a.ground["overlays"])
    assert f"2 overlays in {pngs[0].parent}" in a.lines()[-1]



def _vocabulary_text(processor) -> str:
    """Every token of the tokenizer as the text it stands for (byte-level BPE stores 'ü' as 'Ã¼')."""
    tokenizer = processor.tokenizer
    return "\n".join(tokenizer.decode([i]) for i in range(len(tokenizer)))


def test_no_planted_phi_in_the_tiny_tokenizer_trained_on_the_version(rebuilt, tmp_path):
    """The tiny preset's tokenizer is trained on the version's text: no planted PHI may become a token
    or reach its saved files. The control (the same corpus plus a planted name) shows the scan finds one."""
    from models.radgrounder import RadGrounderProcessor
    from models.training import tokenizer_texts
    from tasks.version_stage import latest_version_dir

    _, truth, _, settings, _ = rebuilt
    needles = _needles(truth)
    texts = tokenizer_texts(settings, latest_version_dir(settings).name)
    assert len(texts) > 20  # the version's report sentences, questions and prompts
    processor = RadGrounderProcessor.tiny(texts)
    processor.save_pretrained(str(tmp_path / "tokenizer"))
    saved = "\n".join(_text_of(p) for p in (tmp_path / "tokenizer").rglob("*") if p.is_file())
    searched = (_vocabulary_text(processor) + saved).casefold()
    assert not sorted(n for n in needles if n in searched)

    name = max((n for n in needles if n.isalpha()), key=len)  # control: a planted name, often enough to merge
    leaky = RadGrounderProcessor.tiny(texts + [f"Patient {name} war da."] * 50)
    assert name in _vocabulary_text(leaky).casefold()

"""Deliveries as hospitals make them, through the real flow (Prefect API on loopback, Ray, 2 workers).

1. Drops with nothing usable (every report row invalid; pydicom's corpus with a header-only
   reports.csv; no files at all) end with their counts and either a version of zero rows or
   the quality gate's own message: never a traceback.
2. A failure anywhere (the flow's own process, a Ray worker; a decode error, a pydicom error
   that quotes an element value, a pyarrow error, any other library error) reaches Prefect,
   Ray's logs, the terminal and the caller as radground's message only: the planted patient
   data it quoted is found in no byte under data_dir, in no Ray session log, in no output.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import radground.runtime
from flows.rebuild import run_rebuild
from radground.errors import QualityGateError, RadgroundError, StageError
from radground.settings import load_settings
from radground.synth.drop import generate_drop
from tasks import discover
from tasks.version import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

HEADER = "accession_number,patient_id,study_date,language,report_text\n"


def _rewrite_reports(drop: Path, change) -> None:
    rows = list(csv.DictReader(io.StringIO((drop / "reports.csv").read_text(encoding="utf-8"))))
    for row in rows:
        change(row)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (drop / "reports.csv").write_text(out.getvalue(), encoding="utf-8")


@pytest.fixture(scope="module")
def nothing_usable(tmp_path_factory, pydicom_files_on_disk):
    root = tmp_path_factory.mktemp("hostile")
    invalid = generate_drop(root / "invalid-rows", patients=2, seed=5).drop_dir
    _rewrite_reports(invalid, lambda row: row.update(language="fr"))  # every row invalid: every study an orphan
    corpus = root / "pydicom-corpus"
    corpus.mkdir()
    import pydicom.data

    own = Path(pydicom.data.__file__).parent / "test_files"
    for index, path in enumerate(p for p in pydicom_files_on_disk if own in p.parents):
        shutil.copy(path, corpus / f"{index:03d}{path.suffix}")
    (corpus / "reports.csv").write_text(HEADER, encoding="utf-8")
    empty = root / "empty"
    empty.mkdir()
    (empty / "reports.csv").write_text(HEADER, encoding="utf-8")
    (empty / "drop.yaml").write_text(yaml.safe_dump({"site": "empty", "received_at": "2026-11-20T08:00:00Z"}))
    drops = [str(invalid), str(corpus), str(empty)]
    settings = load_settings(data_dir=root / "data", ray={"num_cpus": 2},
                             quality={"min_grounded_slices": 0, "max_quarantine_rate": 1.0})
    return root, drops, settings, run_rebuild(drops, settings)


def test_every_drop_reports_its_counts_and_they_reconcile(nothing_usable):
    _, _, _, results = nothing_usable
    assert len(results) == 3
    invalid, corpus, empty = (r.ingest for r in results)
    for summary in (invalid, corpus, empty):
        assert summary.files_in == summary.slices + summary.files_quarantined
        assert summary.reports == 0
    assert invalid.reports_in == invalid.reports_quarantined == 2 + 1  # two patients' reports + the orphan row
    assert invalid.quarantine_reasons["invalid_report_row"] == invalid.reports_in
    assert corpus.files_in > 50 and corpus.files_quarantined > 0 and corpus.reports_in == 0
    assert (empty.files_in, empty.slices, empty.reports_in) == (0, 0, 0)
    for result in results:  # every later stage produced nothing, and said so
        assert result.curate["sentences"] == 0 and result.ground["grounded_pairs"] == 0


def test_the_version_holds_zero_rows_of_the_tables_nothing_reached(nothing_usable):
    _, _, settings, results = nothing_usable
    manifest = read_manifest(Path(results[0].version["version_dir"]))
    # Without reports every study is an orphan (quarantined): every table of the version is empty.
    assert {name: entry.rows for name, entry in manifest.tables.items()} == {
        "images": 0, "reports": 0, "grounding": 0, "vqa": 0,
        "quarantine": sum(manifest.quarantine_counts.values())}
    assert sum(r.ingest.slices for r in results) == 0 and manifest.quarantine_counts["orphan_study"] > 0
    assert manifest.quarantine_counts["invalid_report_row"] == 3


def test_with_the_default_gate_the_rebuild_ends_with_the_gates_message(nothing_usable):
    _, drops, settings, _ = nothing_usable
    default_gates = settings.model_copy(update={"quality": type(settings.quality)()})
    with pytest.raises(QualityGateError, match=r"gate (min_grounded_slices: 0 grounded slices|max_quarantine_rate)"
                                               r".*(set quality\.|raise the limit)"):
        run_rebuild(drops, default_gates)


# ----------------------------------------------------------------------------- leaks
SITECUSTOMIZE = '''
"""Test fault injection for Ray workers only (started with RADGROUND_TEST_FAULT set)."""
import os
import sys

_SPEC = os.environ.get("RADGROUND_TEST_FAULT")
if _SPEC and any("default_worker" in arg for arg in sys.argv):
    import importlib

    _MODULE, _ATTR, _KIND, _NEEDLE_FILE = _SPEC.split("|")
    with open(_NEEDLE_FILE, encoding="utf-8") as _handle:  # not in the env: Ray logs its runtime_env
        _NEEDLE = _handle.read()

    def _fault(*args, **kwargs):
        if _KIND == "pydicom":
            from pydicom.errors import InvalidDicomError
            raise InvalidDicomError(f"The value for PatientName (0010,0010) is invalid: '{_NEEDLE}'")
        if _KIND == "pyarrow":
            import pyarrow
            raise pyarrow.ArrowInvalid(f"Could not convert '{_NEEDLE}' with type str: tried to convert to int64")
        raise KeyError(_NEEDLE)

    setattr(importlib.import_module(_MODULE), _ATTR, _fault)
'''


def _planted(drop_dir: Path) -> tuple[str, str]:
    truth = json.loads(drop_dir.with_name(drop_dir.name + ".truth.json").read_text(encoding="utf-8"))
    patient = truth["patients"][0]
    return patient["name"].replace("^", " "), patient["patient_id"]


def _scan(paths: list[Path], needles: list[str]) -> dict[str, list[str]]:
    leaks = {}
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a Ray session file of another test process, gone while we looked
            continue
        text = (data.decode("utf-8", "ignore") + data.decode("latin-1")).casefold()
        found = [n for n in needles if n.casefold() in text]
        if found:
            leaks[str(path)] = found
    return leaks


def _ray_session_files(since: float) -> list[Path]:
    """Every file of the Ray sessions that ran since `since` (default temp dir, or under data_dir)."""
    roots = []
    for p in Path("/tmp/ray").glob("session_*"):
        with contextlib.suppress(FileNotFoundError):  # another test process's session may end meanwhile
            if not p.is_symlink() and p.stat().st_mtime >= since:
                roots.append(p)
    files = []
    for root in roots:
        with contextlib.suppress(FileNotFoundError):
            files += [p for p in root.rglob("*") if p.is_file() and not p.is_socket()]
    return files


def _drop_with_fault(root: Path, case: str) -> tuple[Path, list[str]]:
    drop = generate_drop(root / "drop", patients=1, seed=11).drop_dir
    name, patient_id = _planted(drop)
    if case == "declared-encoding":  # a Windows-1252 export declared as UTF-8: the decode error holds the bytes
        text = (drop / "reports.csv").read_text(encoding="utf-8")
        (drop / "reports.csv").write_bytes(text.replace("\n", " Lunge ü\n", 1).encode("cp1252", "replace"))
        (drop / "drop.yaml").write_text(yaml.safe_dump({"site": "enc", "received_at": "2026-11-20T08:00:00Z",
                                                        "encoding": "utf-8"}))
    return drop, [name, patient_id]


@pytest.mark.parametrize("case", ["declared-encoding", "flow-process", "pydicom-in-worker", "pyarrow-in-worker",
                                  "other-in-worker"])
def test_a_failure_leaves_no_input_bytes_anywhere(case, tmp_path, monkeypatch, capfd):
    started = time.time() - 1
    drop, needles = _drop_with_fault(tmp_path, case)
    needle = needles[0]
    if case == "flow-process":
        def decode_error(reader):
            raise UnicodeDecodeError("utf-8", f"{needles[1]};{needle}".encode(), 0, 1, "invalid start byte")
        monkeypatch.setattr(discover, "read_drop_info", decode_error)
    elif case.endswith("-in-worker"):
        target = {"pydicom-in-worker": "tasks.ingest|deidentify|pydicom",
                  "pyarrow-in-worker": "tasks.ingest|parquet_bytes|pyarrow",
                  "other-in-worker": "tasks.curate.stage|scrub_report|other"}[case]
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE), encoding="utf-8")
        (site / "needle.txt").write_text(needle, encoding="utf-8")
        environment = radground.runtime.prefect_environment
        monkeypatch.setattr(radground.runtime, "prefect_environment", lambda *a, **k: {
            **environment(*a, **k), "PYTHONPATH": str(site), "RADGROUND_TEST_FAULT": f"{target}|{site / 'needle.txt'}"})
    settings = load_settings(data_dir=tmp_path / "data", ray={"num_cpus": 2})

    with pytest.raises(RadgroundError) as err:
        run_rebuild([str(drop)], settings)

    message = str(err.value)
    assert all(n not in message for n in needles)
    if case == "declared-encoding":
        assert isinstance(err.value, discover.DropError) and "is not valid utf-8" in message
    else:
        expected = {"flow-process": "UnicodeDecodeError", "pydicom-in-worker": "InvalidDicomError",
                    "pyarrow-in-worker": "ArrowInvalid", "other-in-worker": "KeyError"}[case]
        assert isinstance(err.value, StageError) and f"failed with {expected} (its text is withheld" in message
    output = capfd.readouterr()
    assert all(n not in output.out + output.err for n in needles)
    written = [p for p in settings.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "prefect.db" for p in written)
    ray_files = _ray_session_files(started)
    assert ray_files or case == "declared-encoding" or any("ray" in str(p) for p in written)
    assert _scan(written + ray_files, needles) == {}

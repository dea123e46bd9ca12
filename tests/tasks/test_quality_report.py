"""The quality report: self-contained HTML from hand-written stats, wired into the version stage,
and opened in headless Chromium with the network blocked."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_quality import DROP, as_table, grounding, image, report

from radground.buildstate import write_record
from radground.schemas import GroundingRecord, ImageRecord, ReportRecord
from radground.settings import ENV_PREFIX, load_settings
from radground.store import open_store
from radground.tables import parquet_bytes
from tasks.quality_report import REPORT_FILE, render_report, total_stats, write_report
from tasks.version_stage import check_drop

URL = re.compile(r"https?://", re.IGNORECASE)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = ("Debian's chromium is not installed (needed to open the report offline); run "
               "scripts/ensure-test-packages.sh as root to install it")


class _Cells(HTMLParser):
    """Every table row as its cells' text; the tags met, with their attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.tags: list[tuple[str, dict]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Cells:
    cells = _Cells()
    cells.feed(page)
    return cells


def assert_self_contained(page: str) -> None:
    assert not URL.search(page), f"an http(s) URL in the report: {URL.search(page)!r}"
    tags = parse(page).tags
    assert not [t for t, _ in tags if t in ("script", "img", "iframe", "object", "embed", "link", "font")]
    assert not [(t, a) for t, a in tags if {"src", "href", "srcset", "action"} & set(a)]
    csp = [a["content"] for t, a in tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and csp[0].startswith("default-src 'none'")


# ----------------------------------------------------------------------------- hand-written stats
def outcome(name: str, success: bool, count: int | None) -> dict:
    return {"name": name, "success": success, "unexpected_count": count}


UNIQUE, BETWEEN, EXISTS = ("expect_column_values_to_be_unique:image_id", "expect_column_values_to_be_between:rows",
                           "expect_column_to_exist:image_id")
DROP_A = {"images": {"table": "images", "rows": 10, "passed": 7, "quarantined": 3, "quarantine_rate": 0.3,
                     "by_reason": {UNIQUE: 2, BETWEEN: 1}, "table_failures": [], "repeats_merged": 0,
                     "expectations": [outcome(EXISTS, True, None), outcome(UNIQUE, False, 2),
                                      outcome(BETWEEN, False, 1)]},
          "<b>evil</b> & co": {"table": "<b>evil</b> & co", "rows": 4, "passed": 4, "quarantined": 0,
                               "quarantine_rate": 0.0, "by_reason": {}, "table_failures": [],
                               "expectations": [outcome("expect_column_to_exist:<x>", True, None)]}}
DROP_B = {"images": {"table": "images", "rows": 5, "passed": 4, "quarantined": 1, "quarantine_rate": 0.2,
                     "by_reason": {BETWEEN: 1}, "table_failures": [], "repeats_merged": 6,
                     "expectations": [outcome(EXISTS, True, None), outcome(UNIQUE, True, 0),
                                      outcome(BETWEEN, False, 1)]}}


def test_drop_report_shows_each_expectation_and_the_reasons():
    page = render_report({"2026-11-A": DROP_A})
    rows = parse(page).rows
    assert [EXISTS, "passed", "—"] in rows  # table-level: GX gives no unexpected count
    assert [UNIQUE, "failed", "2"] in rows and [BETWEEN, "failed", "1"] in rows
    assert [UNIQUE, "2"] in rows and [BETWEEN, "1"] in rows  # quarantined rows by reason
    assert ["images", "10", "7", "3", "30.0%", "0", "2"] in rows  # overview: ..., repeats merged, failed expectations
    assert_self_contained(page)


def test_names_are_escaped():
    page = render_report({"drop <1>": DROP_A})
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt; &amp; co" in page
    assert "expect_column_to_exist:&lt;x&gt;" in page and "drop &lt;1&gt;" in page
    assert ["<b>evil</b> & co", "4", "4", "0", "0.0%", "—", "0"] in parse(page).rows  # text once unescaped


def test_version_report_sums_the_drops():
    # by hand: rows 10+5, passed 7+4, quarantined 3+1; unique failed in A only (2+0); between in both (1+1)
    totals = total_stats({"A": DROP_A, "B": DROP_B})
    assert {k: totals["images"][k] for k in ("rows", "passed", "quarantined", "repeats_merged")} == \
        {"rows": 15, "passed": 11, "quarantined": 4, "repeats_merged": 6}
    assert totals["images"]["by_reason"] == {UNIQUE: 2, BETWEEN: 2}
    assert totals["images"]["expectations"] == [outcome(EXISTS, True, None), outcome(UNIQUE, False, 2),
                                                outcome(BETWEEN, False, 2)]
    page = render_report({"A": DROP_A, "B": DROP_B}, digest="f" * 64, quarantine_counts={"not_dicom": 5})
    version = page[page.index('id="version"'):page.index('id="quarantine"')]
    assert ["images", "15", "11", "4", "26.7%", "6", "2"] in parse(version).rows
    assert [BETWEEN, "failed", "2"] in parse(version).rows and [BETWEEN, "2"] in parse(version).rows
    assert ["not_dicom", "5"] in parse(page).rows and "f" * 64 in page
    assert_self_contained(page)


def test_stats_checked_by_an_earlier_radground_still_render():
    legacy = {"images": {k: v for k, v in DROP_A["images"].items() if k != "expectations"}}
    page = render_report({"A": legacy, "B": DROP_B}, digest="0" * 64)
    assert "not recorded" in page and "expectations" not in total_stats({"A": legacy, "B": DROP_B})["images"]


def test_write_report_is_atomic_and_leaves_nothing_else(tmp_path):
    path = write_report(tmp_path / "sub" / REPORT_FILE, "<p>x</p>")
    assert path.read_text(encoding="utf-8") == "<p>x</p>" and [p.name for p in path.parent.iterdir()] == [REPORT_FILE]


# ----------------------------------------------------------------------------- the real quality step
PHONE = "089 1234-567"  # a PHI pattern in a failing report row: must never reach the report


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """One drop through the real quality step (check_drop -> check_table with GX): its CheckedDrop."""
    with pytest.MonkeyPatch.context() as env:  # clean_env, for the module: no RADGROUND_* from the shell
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            env.delenv(name)
        yield _checked_drop(tmp_path_factory.mktemp("quality-report"))


def _checked_drop(tmp_path: Path):
    settings = load_settings(data_dir=tmp_path / "data", quality={"max_quarantine_rate": 1.0})
    store = open_store(settings)
    images = [image("2.25.10"), image("2.25.11"), image("2.25.12", rows=0),
              image("2.25.11", slice_index=1, source_sha256="cd" * 32)]  # a conflicting second copy
    reports = [report("2.25.1", "Milz vergrößert."), report("2.25.2", f"Rückfragen unter Tel. {PHONE}.")]
    groundings = [grounding("2.25.10"), grounding("2.25.11", area_px=0)]
    # put as built, unvalidated: bad rows are what the quality step is for
    store.put(f"ingest/{DROP}/images.parquet", parquet_bytes(as_table(images, ImageRecord)))
    store.put(f"curate/{DROP}/reports.parquet", parquet_bytes(as_table(reports, ReportRecord)))
    store.put(f"ground/{DROP}/grounding.parquet", parquet_bytes(as_table(groundings, GroundingRecord)))
    write_record(store, "ingest", DROP, "k", {}, handoff={"image_keys": [f"ingest/{DROP}/images.parquet"]})
    write_record(store, "ground", DROP, "k", {})
    return check_drop(store, DROP, settings)


def test_check_drop_writes_the_drop_report(checked):
    page_path = Path(checked.docs)
    assert page_path.name == REPORT_FILE and page_path.is_file()
    assert json.loads((page_path.parent / "result.json").read_text())["docs"] == checked.docs
    page = page_path.read_text(encoding="utf-8")
    rows = parse(page).rows
    # by hand: 2.25.11 twice (both copies fail unique), 2.25.12 has rows=0; one grounding row area 0; one report
    # with a phone number
    assert ["expect_column_values_to_be_unique:image_id", "failed", "2"] in rows
    assert ["expect_column_values_to_be_between:rows", "failed", "1"] in rows
    assert ["expect_column_values_to_be_between:area_px", "failed", "1"] in rows
    assert ["expect_column_values_to_be_in_set:no_phi_pattern", "failed", "1"] in rows
    assert ["images", "4", "1", "3", "75.0%", "0", "—", "2"] in rows
    assert_self_contained(page)
    for value in (PHONE, "2.25.12", "P1", "Milz"):  # row values and ids never appear
        assert value not in page
    assert not (page_path.parents[4] / "quality").exists()  # no GX data docs under data_dir any more


# ----------------------------------------------------------------------------- offline in Chromium
def _page_requests(netlog: Path) -> list[str]:
    """URLs of the non-local requests the page made, from Chromium's net log (the browser's own
    background requests, e.g. component updates, carry the initiator 'not an origin')."""
    text = netlog.read_text(encoding="utf-8")
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short by a crash lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start_job and "url" in e.get("params", {})
            and not re.match(r"(file|data|about|blob|chrome):", e["params"]["url"])
            and e["params"].get("initiator") != "not an origin"]


def open_offline(page: Path, work: Path) -> tuple[str, list[str]]:
    """Load ``page`` in headless Chromium with DNS and the network blocked: its DOM, and the URLs the
    page tried to fetch."""
    work.mkdir(parents=True, exist_ok=True)
    netlog = work / "netlog.json"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",  # no name resolves, no route
               f"--user-data-dir={work / 'profile'}", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
               f"--log-net-log={netlog}", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    assert netlog.is_file(), "chromium wrote no net log; --log-net-log no longer works in this version"
    return done.stdout, _page_requests(netlog)


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_opens_offline_in_chromium_and_fetches_nothing(checked, tmp_path):
    # the control: a page with remote references; the net log must show its requests, or the check is blind
    control = tmp_path / "control.html"
    control.write_text('<!DOCTYPE html><html><head><link rel="stylesheet" href="https://cdn.example.invalid/a.css">'
                       '</head><body><p>control</p><img src="http://img.example.invalid/logo.png"></body></html>')
    _, requested = open_offline(control, tmp_path / "control")
    assert set(requested) >= {"https://cdn.example.invalid/a.css", "http://img.example.invalid/logo.png"}

    dom, requested = open_offline(Path(checked.docs), tmp_path / "report")
    assert requested == []
    rows = parse(dom).rows  # what the browser built, so what the reader sees
    assert ["expect_column_values_to_be_unique:image_id", "failed", "2"] in rows
    assert ["expect_column_values_to_be_between:area_px", "failed", "1"] in rows
    assert ["images", "4", "1", "3", "75.0%", "0", "—", "2"] in rows
    assert_self_contained(dom)

"""The quality report: one self-contained HTML page per checked drop and per dataset version.

Rendered from the stats :func:`tasks.quality.check_table` returns (per table: row counts,
quarantined rows by reason, every expectation's pass/fail and unexpected count). The page is
plain HTML with inline CSS: no script, no font, no image, no URL of any kind, and a
Content-Security-Policy that forbids the browser to load anything, so it opens the same on a
hospital machine without network access. It shows table names, expectation names, counts,
reasons, drop ids and the version digest only: never a row's values or ids. Every piece of text
goes through :func:`html.escape`. No timestamp either: the same stats give the same bytes (the
version's copy lives inside the immutable, DVC-tracked version folder).
"""

from __future__ import annotations

import html
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

REPORT_FILE = "quality.html"  # in a drop's checked folder and in a version folder

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2430; margin: 2em auto;
       max-width: 72em; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 2px solid #d0d5dd; }
h3 { margin: 1.2em 0 .4em; } .meta { color: #596273; margin-top: 0; }
table { border-collapse: collapse; margin: .4em 0 1em; }
th, td { border: 1px solid #d0d5dd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td { background: #fdecec; } .bad { color: #b42318; font-weight: 600; } .ok { color: #067647; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .95em; }
caption { text-align: left; color: #596273; padding-bottom: .2em; }
details { margin: .3em 0 1em; } summary { cursor: pointer; } .note { color: #596273; }
"""
# Nothing may be fetched, whatever ends up in the page; inline <style> is the only resource.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_FAIL = ' class="fail"'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _count(value: object) -> str:
    return "&mdash;" if value is None else _e(value)


# ------------------------------------------------------------------------------- totals
def _sum_expectations(lists: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Per expectation (matched by name and, for a repeated name, by its occurrence): failed in any drop
    -> failed; unexpected counts summed (None when no drop reported one)."""
    totals: dict[tuple[str, int], dict] = {}
    for outcomes in lists:
        seen: Counter = Counter()
        for outcome in outcomes:
            key = (outcome["name"], seen[outcome["name"]])
            seen[outcome["name"]] += 1
            total = totals.setdefault(key, {"name": outcome["name"], "success": True, "unexpected_count": None})
            total["success"] = total["success"] and bool(outcome["success"])
            if outcome.get("unexpected_count") is not None:
                total["unexpected_count"] = (total["unexpected_count"] or 0) + int(outcome["unexpected_count"])
    return list(totals.values())


def total_stats(stats_by_drop: Mapping[str, Mapping[str, Mapping]]) -> dict[str, dict]:
    """Per table, the stats of every drop summed: counts, quarantined rows by reason, expectations."""
    tables: dict[str, list[Mapping]] = {}
    for stats in stats_by_drop.values():
        for name, table in stats.items():
            tables.setdefault(name, []).append(table)
    totals: dict[str, dict] = {}
    for name, parts in tables.items():
        total: dict = {"table": name}
        for key in ("rows", "passed", "quarantined", "repeats_merged", "grounded_slices"):
            if any(key in p for p in parts):
                total[key] = sum(int(p.get(key, 0)) for p in parts)
        total["quarantine_rate"] = total.get("quarantined", 0) / total["rows"] if total.get("rows") else 0.0
        by_reason: Counter = Counter()
        for p in parts:
            by_reason.update(p.get("by_reason", {}))
        total["by_reason"] = dict(by_reason)
        total["table_failures"] = list(dict.fromkeys(f for p in parts for f in p.get("table_failures", [])))
        if all("expectations" in p for p in parts):  # drops checked before they were recorded have none
            total["expectations"] = _sum_expectations([p["expectations"] for p in parts])
        totals[name] = total
    return totals


# ------------------------------------------------------------------------------- rendering
def _overview(stats: Mapping[str, Mapping]) -> str:
    extra = [k for k in ("repeats_merged", "grounded_slices") if any(k in s for s in stats.values())]
    head = "".join(f"<th>{_e(h)}</th>" for h in ["table", "rows", "passed", "quarantined", "quarantine rate",
                                                  *(k.replace("_", " ") for k in extra), "failed expectations"])
    rows = []
    for name, s in stats.items():
        failed = [x for x in s.get("expectations", []) if not x["success"]]
        verdict = (f'<span class="bad">{len(failed)}</span>' if failed
                   else '<span class="ok">0</span>' if "expectations" in s else "&mdash;")
        rate = float(s.get("quarantine_rate", 0.0))
        cells = [f"<td>{_e(name)}</td>", *(f'<td class="n">{_count(s.get(k))}</td>'
                                           for k in ("rows", "passed", "quarantined")),
                 f'<td class="n">{rate:.1%}</td>',
                 *(f'<td class="n">{_count(s.get(k))}</td>' for k in extra), f'<td class="n">{verdict}</td>']
        rows.append(f"<tr{_FAIL if failed else ''}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _outcome_row(outcome: Mapping) -> str:
    result = "passed" if outcome["success"] else '<span class="bad">failed</span>'
    return (f"<tr{'' if outcome['success'] else _FAIL}><td><code>{_e(outcome['name'])}</code></td><td>{result}</td>"
            f'<td class="n">{_count(outcome.get("unexpected_count"))}</td></tr>')


def _table(name: str, s: Mapping) -> str:
    parts = [f"<h3>table {_e(name)}</h3>"]
    reasons = sorted(s.get("by_reason", {}).items(), key=lambda item: (-item[1], item[0]))
    if reasons:
        body = "".join(f'<tr><td><code>{_e(r)}</code></td><td class="n">{_e(n)}</td></tr>' for r, n in reasons)
        parts.append("<table><caption>quarantined rows by reason (a row failing several expectations counts "
                     f"under each)</caption><thead><tr><th>reason</th><th>rows</th></tr></thead><tbody>{body}"
                     "</tbody></table>")
    else:
        parts.append('<p class="note">no row quarantined</p>')
    if s.get("table_failures"):
        parts.append('<p class="bad">table-level failures (every row quarantined): '
                     + ", ".join(f"<code>{_e(f)}</code>" for f in s["table_failures"]) + "</p>")
    outcomes = s.get("expectations")
    if outcomes is None:
        parts.append('<p class="note">per-expectation results were not recorded for this table (checked by an '
                     "earlier radground); delete its entry under cache/quality to check it again.</p>")
        return "".join(parts)
    failed = sum(not x["success"] for x in outcomes)
    rows = "".join(_outcome_row(x) for x in outcomes)
    parts.append(f"<details{' open' if failed else ''}><summary>{len(outcomes)} expectations, {failed} failed"
                 "</summary><table><thead><tr><th>expectation</th><th>result</th><th>unexpected count</th></tr>"
                 f"</thead><tbody>{rows}</tbody></table></details>")
    return "".join(parts)


def _section(anchor: str, heading: str, stats: Mapping[str, Mapping]) -> str:
    if not stats:
        return f'<section id="{_e(anchor)}"><h2>{heading}</h2><p class="note">no table checked</p></section>'
    body = "".join(_table(name, s) for name, s in stats.items())
    return f'<section id="{_e(anchor)}"><h2>{heading}</h2>{_overview(stats)}{body}</section>'


def render_report(stats_by_drop: Mapping[str, Mapping[str, Mapping]], *, digest: str | None = None,
                  quarantine_counts: Mapping[str, int] | None = None) -> str:
    """The quality report as one HTML string: per drop ``{drop_id: {table: check_table stats}}``, and, for
    a version (``digest`` given), the drops summed plus the version's quarantine counts over all stages."""
    drops = list(stats_by_drop)
    what = f"version {digest[:16]}" if digest else f"drop {drops[0]}" if len(drops) == 1 else "drops"
    meta = ([f"version digest <code>{_e(digest)}</code>"] if digest else []) + [
        f"{len(drops)} drop(s): " + ", ".join(f"<code>{_e(d)}</code>" for d in drops)]
    sections = []
    if digest is not None:
        sections.append(_section("version", "version total (the drops summed)", total_stats(stats_by_drop)))
        if quarantine_counts:
            body = "".join(f'<tr><td><code>{_e(r)}</code></td><td class="n">{_e(n)}</td></tr>'
                           for r, n in sorted(quarantine_counts.items(), key=lambda item: (-item[1], item[0])))
            sections.append('<section id="quarantine"><h2>quarantine table of the version, all stages</h2>'
                            "<p class=\"note\">ingest, curate, segment, quality and version rejections; one row per "
                            "rejected item, under its first reason</p><table><thead><tr><th>reason</th>"
                            f"<th>items</th></tr></thead><tbody>{body}</tbody></table></section>")
    sections += [_section(f"drop-{index}", f"drop <code>{_e(drop_id)}</code>", stats)
                 for index, (drop_id, stats) in enumerate(stats_by_drop.items())]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
            '<meta name="referrer" content="no-referrer">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>radground quality report: {_e(what)}</title><style>{_CSS}</style></head>\n<body>"
            f"<h1>radground quality report: {_e(what)}</h1><p class=\"meta\">{'; '.join(meta)}</p>"
            + "\n".join(sections) + "\n</body></html>\n")


def write_report(path: Path | str, report: str) -> Path:
    """Write ``report`` to ``path`` atomically (a reader never sees half a page); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(report, encoding="utf-8")
    os.replace(partial, path)
    return path

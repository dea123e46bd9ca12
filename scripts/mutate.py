"""Mutation testing of the data path's core modules: `make mutate` or `python scripts/mutate.py [MODULE ...]`.

mutmut 3 (config: [tool.mutmut] in pyproject.toml) plants one small bug at a time in a copy of the
code under ./mutants and runs the tests that reach the mutated function; a mutant that no test notices
"survived". One `mutmut run` takes one test selection for all the files it mutates, so a test of
another module would get credit for this one's mutants. This driver therefore runs mutmut once per
module, with only that module mutated (only_mutate) and only its own unit tests selected
(pytest_add_cli_args_test_selection), and collects the verdicts into a Markdown table:
bench/results/mutation-<commit>[-<label>].md (+ a .json beside it, git-ignored).

Each module's run starts from an empty ./mutants (a verdict cached from another test selection
must not count); afterwards ./mutants moves to build/mutate/<module>/ (`cd` there is not needed
to read it: the .md lists every survivor with its diff). Slow and integration tests are never
selected. `--only MODULE:func1,func2` restricts a module to some functions (a long run on 2 cores);
the report says so. Not part of `make test`: a full run takes tens of minutes.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ARCHIVE = ROOT / "build" / "mutate"

# Each module's own fast unit tests (globs, relative to the repository root). A test file of
# another module is left out even when it happens to call this one.
KILLERS = "tests/tasks/test_mutation_killers.py"  # tests written against survivors, one section per module
MODULE_TESTS: dict[str, list[str]] = {
    "deid": ["tests/tasks/test_deid*.py", KILLERS],
    # scrub_report's detectors live in tasks/phi_text.py; test_phi_text.py tests them through scrub.
    "scrub": ["tests/tasks/test_scrub*.py", "tests/tasks/test_phi_text.py", KILLERS],
    "discover": ["tests/tasks/test_discover*.py", "tests/tasks/test_ingest*.py", "tests/tasks/test_reports_csv.py",
                 "tests/tasks/test_quarantine*.py", KILLERS],
    "version": ["tests/tasks/test_version*.py", KILLERS],
    "version_stage": ["tests/tasks/test_version*.py", KILLERS],
}
# Tests that read the source text of tasks/ rather than run it: in ./mutants they would read mutmut's copy,
# which holds every mutant's string literals. Never selected here.
DESELECT = ["tests/tasks/test_quarantine_reasons.py::test_the_code_emits_no_reason_outside_the_declared_set"]
STATUS_COLUMNS = ["killed", "survived", "timeout", "no tests", "other"]
# Module-scoped fixtures that generate (and ingest) a synthetic drop: rebuilt for every mutant, 10-60 s each
# on 2 cores. scripts/mutate_select.py deselects the tests that use them (RADGROUND_MUTATE_SKIP_FIXTURES
# overrides the list; empty = keep every test).
HEAVY_FIXTURES = "deid_drop,synthetic_drops,synthetic"
# --focus: the functions the planted bugs live in (the de-identification actions, the known-PHI
# forms, the quarantine rules, the splits and the digest, the version's parts and forget), for a run that
# has to fit in minutes rather than hours.
FOCUS: dict[str, list[str]] = {
    "deid": ["profile_action", "_operation", "_clean"],
    "scrub": ["_known_spans"],
    "discover": ["slice_axis", "file_problem"],
    "version": ["split_position", "assign_splits", "compute_digest"],
    "version_stage": ["_VersionParts.add", "_VersionParts._keep", "publish"],
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=ROOT).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def test_files(module: str) -> list[str]:
    files = sorted({f for pattern in MODULE_TESTS[module] for f in glob.glob(pattern, root_dir=ROOT)})
    if not files:
        raise SystemExit(f"mutate: no test file matches {MODULE_TESTS[module]} for tasks/{module}.py; "
                         "fix MODULE_TESTS in scripts/mutate.py")
    return files


def mutant_globs(module: str, functions: list[str]) -> list[str]:
    """mutmut's names for the mutants of these functions (x_func__mutmut_N, xǁClassǁmethod__mutmut_N)."""
    out = []
    for func in functions:
        if "." in func:
            cls, meth = func.split(".", 1)
            out.append(f"tasks.{module}.x\u01c1{cls}\u01c1{meth}__mutmut_*")
        else:
            out.append(f"tasks.{module}.x_{func}__mutmut_*")
    return out


# --- inside the child process (one per module): run mutmut, then dump its verdicts -------------------

def _child(module: str, tests: list[str], functions: list[str], max_children: int, out_json: str) -> None:
    from mutmut import configuration

    cfg = configuration.config()
    cfg.only_mutate = [f"tasks/{module}.py"]
    cfg.pytest_add_cli_args_test_selection = tests
    # scripts/ is sys.path[0] here (and in mutmut's forked test processes): the plugin imports as a top-level module.
    cfg.pytest_add_cli_args = [*cfg.pytest_add_cli_args, "-p", "mutate_select",
                               *(arg for node in DESELECT for arg in ("--deselect", node))]
    os.environ.setdefault("RADGROUND_MUTATE_SKIP_FIXTURES", HEAVY_FIXTURES)
    from mutmut.__main__ import cli

    names = mutant_globs(module, functions)
    try:
        cli.main(["run", "--max-children", str(max_children), *names], standalone_mode=False)
    except SystemExit as e:  # mutmut calls exit() on a failed clean run / stats collection
        if e.code not in (0, None):
            raise
    _dump(module, names, out_json)


def _dump(module: str, names: list[str], out_json: str) -> None:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    path = Path(f"tasks/{module}.py")
    data = SourceFileMutationData(path=path)
    data.load()
    source = path.read_text(encoding="utf-8")
    spans = _function_spans(source)
    mutants = []
    for key, code in sorted(data.exit_code_by_key.items()):
        if names and not any(fnmatch.fnmatch(key, n) for n in names):
            continue
        status = status_by_exit_code[code]
        entry = {"name": key, "status": status, "duration_s": data.durations_by_key.get(key)}
        if status != "killed":
            diff = get_diff_for_mutant(key, path=path)
            entry["diff"] = diff
            entry["line"] = _line_of(diff, source, spans, key)
        mutants.append(entry)
    Path(out_json).write_text(json.dumps(mutants, indent=1), encoding="utf-8")


def _function_spans(source: str) -> dict[str, tuple[int, int]]:
    spans: dict[str, tuple[int, int]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            spans[f"x_{node.name}"] = (node.lineno, node.end_lineno or node.lineno)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    spans[f"x\u01c1{node.name}\u01c1{item.name}"] = (item.lineno, item.end_lineno or item.lineno)
    return spans


def _line_of(diff: str, source: str, spans: dict[str, tuple[int, int]], key: str) -> int | None:
    """The line of the original file that the mutant changed (the first '-' line of its diff)."""
    func = key.rpartition(".")[2].rpartition("__mutmut_")[0]
    start, end = spans.get(func, (1, len(source.splitlines())))
    removed = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    if not removed:
        return start
    lines = source.splitlines()
    for number in range(start, end + 1):
        if lines[number - 1].strip() == removed[0].strip():
            return number
    return start


# --- the parent: one child per module, then the table -------------------------------------------------

def run_module(module: str, functions: list[str], max_children: int) -> dict:
    tests = test_files(module)
    mutants_dir = ROOT / "mutants"
    if mutants_dir.exists():
        shutil.rmtree(mutants_dir)
    ARCHIVE.mkdir(parents=True, exist_ok=True)
    out_json = ARCHIVE / f"{module}.json"
    log = ARCHIVE / f"{module}.log"
    print(f"mutate: tasks/{module}.py against {len(tests)} test file(s): {' '.join(tests)}"
          + (f"; only {', '.join(functions)}" if functions else ""), flush=True)
    started = time.strftime("%H:%M UTC", time.gmtime())
    newest = time.strftime("%H:%M UTC", time.gmtime(max((ROOT / t).stat().st_mtime for t in tests)))
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", module, "--max-children", str(max_children),
             "--out-json", str(out_json), "--tests", *tests, "--functions", *functions],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - start
    if proc.returncode != 0 or not out_json.exists():
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"mutate: mutmut failed for tasks/{module}.py (exit {proc.returncode}); "
                         f"its log is {log}; last lines:\n{tail}")
    mutants = json.loads(out_json.read_text(encoding="utf-8"))
    dest = ARCHIVE / module / "mutants"
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(mutants_dir), str(dest))
    counts = _counts(mutants)
    print(f"mutate: tasks/{module}.py {len(mutants)} mutants: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" ({seconds:.0f} s)", flush=True)
    return {"module": module, "tests": tests, "functions": functions, "seconds": round(seconds, 1),
            "started": started, "newest_test_file": newest,
            "counts": counts, "total": len(mutants), "mutants": mutants}


def _counts(mutants: list[dict]) -> dict[str, int]:
    counts = {c: 0 for c in STATUS_COLUMNS}
    for m in mutants:
        counts[m["status"] if m["status"] in counts else "other"] += 1
    return counts


def compare(results: list[dict], before: list[dict]) -> list[str]:
    """Before/after rows over the same functions (the before run's mutants of this run's functions)."""
    by_module = {r["module"]: r for r in before}
    lines = ["## Before / after", "",
             "Before: the --compare run, restricted to the functions mutated here. Killed / survived / timeout "
             "/ no tests / other.", "",
             "| module | mutants before | before | mutants after | after |", "|---|---|---|---|---|"]
    for r in results:
        old = by_module.get(r["module"])
        if old is None:
            continue
        globs = mutant_globs(r["module"], r["functions"]) if r["functions"] else [f"tasks.{r['module']}.*"]
        kept = [m for m in old["mutants"] if any(fnmatch.fnmatch(m["name"], g) for g in globs)]
        b, a = _counts(kept), r["counts"]
        lines.append(f"| tasks/{r['module']}.py | {len(kept)} | " + " / ".join(str(b[c]) for c in STATUS_COLUMNS)
                     + f" | {r['total']} | " + " / ".join(str(a[c]) for c in STATUS_COLUMNS) + " |")
    return [*lines, ""]


def render(results: list[dict], commit: str, label: str, dirty: list[str], heavy: str,
           before: list[dict] | None = None) -> str:
    lines = [f"# Mutation testing (mutmut 3) at {commit}" + (f" ({label})" if label else ""), ""]
    if dirty:
        lines += ["Uncommitted changes in the tree when it ran: " + ", ".join(dirty), ""]
    lines += ["Each module mutated alone, against its own fast unit tests only (`-m \"not slow and not "
              f"integration\"`; tests using the synthetic-drop fixtures `{heavy or 'none'}` deselected). "
              "Score = killed / (killed + survived + timeout + other); mutants of functions no selected test "
              "reaches count as `no tests`.", "",
              "| module | functions | test files | mutants | killed | survived | timeout | no tests | other "
              "| score | run time |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["counts"]
        tested = r["total"] - c["no tests"]
        score = f"{100 * c['killed'] / tested:.0f} %" if tested else "-"
        funcs = ", ".join(r["functions"]) if r["functions"] else "all"
        lines.append(f"| tasks/{r['module']}.py | {funcs} | {len(r['tests'])} | {r['total']} | {c['killed']} "
                     f"| {c['survived']} | {c['timeout']} | {c['no tests']} | {c['other']} | {score} "
                     f"| {r['seconds']:.0f} s |")
    lines += ["", "Test files: " + "; ".join(f"{r['module']}: {' '.join(r['tests'])} (run started {r.get('started')}, "
                                         f"newest test file {r.get('newest_test_file')})" for r in results), ""]
    if before:
        lines += compare(results, before)
    for r in results:
        left = [m for m in r["mutants"] if m["status"] != "killed"]
        if not left:
            continue
        lines += [f"## tasks/{r['module']}.py: {len(left)} not killed", ""]
        for m in left:
            diff = "\n".join(ln for ln in m.get("diff", "").splitlines()
                             if ln[:1] in "+-" and not ln.startswith(("+++", "---")))
            lines += [f"- `{m['name']}` ({m['status']}) tasks/{r['module']}.py:{m.get('line')}", "", "```diff",
                      diff, "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(MODULE_TESTS), help="default: all five")
    parser.add_argument("--only", action="append", default=[], metavar="MODULE:FUNC[,FUNC]",
                        help="mutate only these functions of MODULE (Class.method for a method)")
    parser.add_argument("--focus", action="store_true",
                        help="mutate only the FOCUS functions of each module (minutes instead of hours)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel test processes (default 2)")
    parser.add_argument("--label", default="", help="appended to the result file's name (e.g. before)")
    parser.add_argument("--compare", type=Path, metavar="JSON",
                        help="an earlier run's .json: add a before/after table over the same functions")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tests", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--functions", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--out-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.child:
        _child(args.child, args.tests, args.functions, args.max_children, args.out_json)
        return 0

    unknown = [m for m in args.modules if m not in MODULE_TESTS]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {list(MODULE_TESTS)}")
    only: dict[str, list[str]] = {}
    for spec in args.only:
        module, _, funcs = spec.partition(":")
        if module not in MODULE_TESTS or not funcs:
            parser.error(f"--only {spec!r}: expected MODULE:func1,func2 with MODULE in {list(MODULE_TESTS)}")
        only[module] = funcs.split(",")

    commit = _git("rev-parse", "--short", "HEAD").strip()
    dirty = [ln[3:] for ln in _git("status", "--porcelain", "--", "tasks", "tests").splitlines() if ln]
    if args.focus:
        for module in args.modules:
            only.setdefault(module, FOCUS[module])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"mutation-{commit}" + (f"-{args.label}" if args.label else "")
    heavy = os.environ.get("RADGROUND_MUTATE_SKIP_FIXTURES", HEAVY_FIXTURES)
    before = json.loads(args.compare.read_text(encoding="utf-8")) if args.compare else None
    results = []
    for module in args.modules:  # the table is rewritten after each module: a stopped run keeps what it did
        results.append(run_module(module, only.get(module, []), args.max_children))
        (RESULTS / f"{stem}.md").write_text(render(results, commit, args.label, dirty, heavy, before), encoding="utf-8")
        (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"mutate: wrote {RESULTS / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

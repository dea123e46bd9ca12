"""Benchmark runner: `make bench` or `python bench/run.py [NAME ...]`.

Each benchmark warms up, measures with a fixed seed, and writes
bench/results/<name>-<commit>.json with the machine and git commit. Figures are
reported in issue notes; they are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the benchmark modules beside this runner

from curate import bench_lexicon  # noqa: E402
from failfast import bench_failfast  # noqa: E402
from ingest import bench_ingest  # noqa: E402
from lineage import bench_lineage  # noqa: E402
from llm import bench_llm  # noqa: E402
from rebuild import bench_rebuild  # noqa: E402
from sam import bench_sam  # noqa: E402
from scrub_eval import bench_scrub_eval  # noqa: E402
from segment import bench_classical  # noqa: E402
from synth import bench_synth  # noqa: E402
from train import bench_train  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


BENCHMARKS: dict[str, Callable[[], dict]] = {
    "synth": bench_synth, "ingest": bench_ingest, "lexicon": bench_lexicon, "llm": bench_llm,
    "classical": bench_classical, "sam": bench_sam, "lineage": bench_lineage, "rebuild": bench_rebuild,
    "scrub_eval": bench_scrub_eval, "train": bench_train, "failfast": bench_failfast,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of {sorted(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {sorted(BENCHMARKS)}")
    RESULTS.mkdir(exist_ok=True)
    commit = _git_commit()
    for name in args.names or list(BENCHMARKS):
        figures = BENCHMARKS[name]()
        record = {"benchmark": name, "commit": commit, "machine": _machine(), "figures": figures}
        path = RESULTS / f"{name}-{commit}.json"
        path.write_text(json.dumps(record, indent=2))
        print(f"{name}: {json.dumps(figures)}  -> {path}")


if __name__ == "__main__":
    main()

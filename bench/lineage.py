"""Lineage index query latency: trace / where_used over ~1.2M records in 4 versions."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def _hex(rng: np.random.Generator, n: int, nbytes: int) -> list[str]:
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    return [row.tobytes().hex() for row in raw]


def _median_s(fn, repeats: int = 5) -> float:
    fn()  # warm-up: file metadata, page cache
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_lineage(records: int = 1_200_000, versions: int = 4, patients: int = 20_000, seed: int = 0) -> dict:
    """Version k (1..versions) holds drops 0..k (shards never rewritten): the tables sum to ~records rows."""
    from radground.lineage import LINEAGE_SCHEMA, lineage_index, write_lineage

    rng = np.random.default_rng(seed)
    drops = versions + 1
    per_drop = records // sum(range(2, versions + 2))
    pseudonyms = np.array(["P" + h.upper() for h in _hex(rng, patients, 10)])
    drop_tables = []
    for d in range(drops):
        patient = pseudonyms[rng.integers(0, patients, size=per_drop)]
        drop_tables.append({
            "image_id": [f"2.25.{d}{i:09d}" for i in range(per_drop)],
            "drop_id": [f"2026-{d:02d}-A"] * per_drop,
            "source_sha256": _hex(rng, per_drop, 32),
            "series_uid": [f"2.25.{d}{i // 200:07d}" for i in range(per_drop)],
            "study_uid": [f"2.25.{d}{i // 400:07d}" for i in range(per_drop)],
            "patient_pseudonym": patient.tolist(),
        })
    digests = [f"{k:02d}" + "c0ffee" * 5 for k in range(1, versions + 1)]  # 32 characters
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "versions"
        started = time.perf_counter()
        total = 0
        for k, digest in enumerate(digests, start=1):
            parts = [pa.table({**t, "version_digest": [digest] * per_drop}) for t in drop_tables[: k + 1]]
            table = pa.concat_tables(parts).cast(LINEAGE_SCHEMA)
            total += table.num_rows
            write_lineage(table, root / digest / "lineage.parquet")
        write_s = time.perf_counter() - started

        index = lineage_index(root)
        open_s = _median_s(lambda: lineage_index(root), repeats=5)
        newest, oldest = digests[-1], digests[0]
        patient = str(pseudonyms[0])
        trace_newest = index.trace(newest)
        used = index.where_used(patient)
        assert trace_newest["drops"] == [f"2026-{d:02d}-A" for d in range(drops)]
        assert used["versions"], "the sampled patient should appear in some version"
        figures = {
            "records": total, "versions": versions, "patients": patients,
            "write_s": round(write_s, 2),
            "open_index_s": round(open_s, 4),
            "trace_newest_s": round(_median_s(lambda: index.trace(newest)), 4),
            "trace_oldest_s": round(_median_s(lambda: index.trace(oldest)), 4),
            "where_used_s": round(_median_s(lambda: index.where_used(patient)), 4),
            "where_used_absent_s": round(_median_s(lambda: index.where_used("P" + "0" * 20)), 4),
            "trace_newest_raw_files": len(trace_newest["raw_sha256"]),
            "where_used_versions": len(used["versions"]),
        }
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(bench_lineage(), indent=2))

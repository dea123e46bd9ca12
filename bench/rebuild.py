"""Incremental rebuilds: full vs. a new drop with ~10% new patients vs. no change.

Three rebuilds through run_rebuild, each as a user runs it (the embedded Prefect API and a
local Ray start per rebuild, as `radground rebuild` does):

* full:        drops A (N patients) and B (~N/10 new patients) into an empty data_dir;
* incremental: A already built, then B added (only B's stages run; A's shards carried over);
* no change:   A and B again on the incremental data_dir (nothing runs; same digest);
* re-sent:     B delivered again under another name (every series copied, not processed);
* forget:      one patient forgotten (a new version; only the drops holding them re-sharded).

Targets of the issue: incremental <= 15% and no change <= 5% of the full rebuild. The runtime
start-up (the Prefect server, on a data_dir whose database exists; Ray starts meanwhile) is a
fixed cost per rebuild that does not shrink with the work, so it is reported apart.
Objects per version: shards + manifest + splits; with the default 128 MB shards the count
for 1.2M slices is estimated from the measured bytes per row of each table (one drop; every
further drop adds at most one partly filled shard per table).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path


def bench_rebuild(patients: int = 20, seed: int = 61) -> dict:
    from flows.rebuild import run_rebuild
    from radground.runtime import prefect_api
    from radground.settings import load_settings
    from radground.synth.drop import generate_drop
    from tasks.version import read_manifest, read_splits
    from tasks.version_stage import forget

    new_patients = max(1, round(patients / 10))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        drop_a = generate_drop(root / "drop-a", patients=patients, seed=seed).drop_dir
        drop_b = generate_drop(root / "drop-b", patients=new_patients, seed=seed + 1).drop_dir
        drops = [str(drop_a), str(drop_b)]

        def settings(name: str):
            return load_settings(data_dir=root / name, deid={"key": "r" * 40}, ray={"num_cpus": 2})

        warm = generate_drop(root / "warm", patients=3, seed=seed + 2).drop_dir
        run_rebuild([str(warm)], settings("warm"))  # imports, file cache, first-use key and DB set-up

        started = time.perf_counter()
        full = run_rebuild(drops, settings("full"))
        full_s = time.perf_counter() - started

        started = time.perf_counter()
        with prefect_api(settings("full")):  # its database exists now, as for every later rebuild
            startup_s = time.perf_counter() - started

        incremental_settings = settings("incremental")
        run_rebuild([str(drop_a)], incremental_settings)
        started = time.perf_counter()
        added = run_rebuild([str(drop_b)], incremental_settings)
        incremental_s = time.perf_counter() - started

        started = time.perf_counter()
        unchanged = run_rebuild(drops, incremental_settings)
        unchanged_s = time.perf_counter() - started

        # the hospital sends drop B again under another name: every series is copied, not processed
        drop_c = root / "drop-c"
        shutil.copytree(drop_b, drop_c)
        (drop_c / "drop.yaml").write_text("site: site-resent\nreceived_at: '2026-11-27T08:00:00Z'\n")
        started = time.perf_counter()
        (resent,) = run_rebuild([str(drop_c)], incremental_settings)
        resent_s = time.perf_counter() - started

        patient = sorted(read_splits(resent.version["version_dir"]))[0]
        started = time.perf_counter()
        forgotten = forget(incremental_settings, patient)
        forget_s = time.perf_counter() - started

        version_dir = Path(added[0].version["version_dir"])
        manifest = read_manifest(version_dir)
        image_rows = manifest.tables["images"].rows
        bytes_per_row, objects_1_2m = {}, 2  # + manifest and splits
        for name, entry in manifest.tables.items():
            if entry.rows:
                bytes_per_row[name] = sum((version_dir / s.path).stat().st_size for s in entry.shards) / entry.rows
                scaled_bytes = entry.rows / image_rows * 1_200_000 * bytes_per_row[name]
                objects_1_2m += math.ceil(scaled_bytes / 2**27)
    return {
        "patients_a": patients,
        "patients_b_new": new_patients,
        "slices": full[0].version["rows"]["images"],
        "full_seconds": round(full_s, 1),
        "incremental_seconds": round(incremental_s, 1),
        "no_change_seconds": round(unchanged_s, 2),
        "incremental_vs_full": round(incremental_s / full_s, 3),
        "no_change_vs_full": round(unchanged_s / full_s, 3),
        "runtime_startup_seconds": round(startup_s, 1),
        "incremental_minus_startup_vs_full_minus_startup": round(
            (incremental_s - startup_s) / (full_s - startup_s), 3),
        "same_digest_full_and_incremental": full[0].version["digest"] == added[0].version["digest"],
        "no_change_same_digest": unchanged[0].version["digest"] == added[0].version["digest"],
        "no_change_ran_nothing": all(r.cached for r in unchanged),
        "resent_drop_seconds": round(resent_s, 1),
        "resent_drop_series_copied": f"{resent.ingest.series_reused}/{resent.ingest.series}",
        "forget_one_patient_seconds": round(forget_s, 2),
        "forget_rows_removed": forgotten["rows_removed"],
        "objects_in_version": added[0].version["objects"],
        "bytes_per_row": {name: round(b) for name, b in bytes_per_row.items()},
        "objects_estimated_at_1_2m_slices_128mb_shards": objects_1_2m,
    }

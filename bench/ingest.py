"""Ingest + de-identification throughput: the rebuild flow (Prefect + 2 Ray workers) vs. a bare loop.

The bare loop is the floor any pipeline pays: one process, pydicom read + rescale +
write of every slice, no de-identification, no Prefect, no Ray. The flow does more per
slice (header scan, hashing, PS3.15 de-identification, Parquet), spread over the workers;
"same work in one process" runs the ingest steps without Prefect/Ray, which isolates
what the parallel runtime itself gains or costs. Since curate, segment, ground and
version joined the flow, the flow figure covers the whole rebuild, not ingest alone;
the ingest-only figures of the notes were measured at commit 3d8df46.
Runtime start-up (Prefect server, Ray) is reported apart from the steady-state figure.
"""

from __future__ import annotations

import io
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom


def bare_loop(drop: Path, out: Path) -> int:
    """Read, rescale and write every decodable CT/MR slice; returns the slice count."""
    slices = 0
    for path in sorted(p for p in drop.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
            if ds.get("Modality") not in ("CT", "MR") or "PixelData" not in ds:
                continue
            values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
                ds.get("RescaleIntercept", 0))
        except Exception:  # noqa: BLE001 - the bad inputs of the drop
            continue
        buffer = io.BytesIO()
        np.save(buffer, values.astype(np.int16 if ds.Modality == "CT" else np.uint16))
        (out / f"{slices:06d}.npy").write_bytes(buffer.getvalue())
        slices += 1
    return slices


def same_work_in_one_process(location: str, settings) -> int:
    """The flow's steps without Prefect or Ray: what parallelism is measured against."""
    from tasks import discover, ingest

    reader = discover.DropReader(location, settings)
    scanned = discover.scan_files(reader, discover.image_candidates(reader.list_files(), settings)[0])
    info = discover.read_drop_info(reader)
    drop_id = discover.drop_id_for(info, [s.sha256 for s in scanned])
    plan = discover.plan_drop(drop_id, scanned, discover.read_reports(reader, drop_id, info.encoding if info else None),
                              settings)
    outcomes = ingest.ingest_shard(location, plan.series, settings)
    summary = ingest.finish_ingest(plan, outcomes, ingest.ingest_reports(plan.reports, drop_id, settings), settings)
    return summary.slices


def bench_ingest(patients: int = 20, seed: int = 0) -> dict:
    import ray
    from prefect_ray import RayTaskRunner

    from flows.rebuild import rebuild_dataset
    from radground.runtime import prefect_api, ray_init_kwargs
    from radground.settings import load_settings
    from radground.synth.drop import generate_drop

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        drop = generate_drop(root / "drop", patients=patients, seed=seed).drop_dir
        warmup = generate_drop(root / "warmup", patients=1, seed=seed + 1).drop_dir
        (root / "bare").mkdir()
        bare_loop(warmup, root / "bare")  # warm the file cache and imports
        started = time.perf_counter()
        bare_slices = bare_loop(drop, root / "bare")
        bare_s = time.perf_counter() - started

        local = load_settings(data_dir=root / "local", deid={"key": "b" * 40})
        started = time.perf_counter()
        local_slices = same_work_in_one_process(str(drop), local)
        local_s = time.perf_counter() - started

        settings = load_settings(data_dir=root / "data", ray={"num_cpus": 2}, deid={"key": "b" * 40})
        started = time.perf_counter()
        with prefect_api(settings) as env:
            ray.init(**ray_init_kwargs(settings, env))
            startup_s = time.perf_counter() - started
            try:
                flow = rebuild_dataset.with_options(task_runner=RayTaskRunner())
                flow([str(warmup)], settings)  # workers import everything once
                started = time.perf_counter()
                (result,) = flow([str(drop)], settings)
                summary = result.ingest
                flow_s = time.perf_counter() - started
            finally:
                ray.shutdown()
        with sqlite3.connect(settings.data_dir / "prefect" / "prefect.db") as db:
            tasks = db.execute("select count(*) from task_run where name like 'ingest-shard%'").fetchone()[0]
    return {
        "patients": patients,
        "slices": summary.slices,
        "series": summary.series,
        "bare_slices": bare_slices,
        "bare_seconds": round(bare_s, 2),
        "bare_slices_per_s": round(bare_slices / bare_s, 1),
        "rebuild_all_stages_seconds": round(flow_s, 2),
        "rebuild_all_stages_slices_per_s": round(summary.slices / flow_s, 1),
        "rebuild_vs_bare": round((summary.slices / flow_s) / (bare_slices / bare_s), 2),
        "same_work_one_process_slices_per_s": round(local_slices / local_s, 1),
        "rebuild_vs_ingest_in_one_process": round((summary.slices / flow_s) / (local_slices / local_s), 2),
        "runtime_startup_seconds": round(startup_s, 2),
        "shard_tasks_both_runs": tasks,
    }

"""The rebuild_dataset flow: wires the stage tasks; the work lives in tasks/.

Header scans run in file batches and extraction in shards of whole series (a
series is never split), about ``ingest.tasks_per_cpu`` tasks per CPU each: enough to
balance two workers, few enough that Prefect's ~0.1 s per task stays small. Tasks retry transient
failures only (storage or network hiccups), never bad data: bad data is quarantined
by the task itself. Results are not persisted and inputs are not cached by Prefect,
so no PHI in memory ever reaches Prefect's database.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from filelock import FileLock, Timeout
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner

from radground.errors import RadgroundError, StoreAuthError, StoreError
from radground.runtime import prefect_api, ray_init_kwargs, report_progress
from radground.settings import Settings
from tasks import discover, ingest
from tasks import ground_stage as ground
from tasks import version_stage as version
from tasks.curate import stage as curate
from tasks.segment import stage as segment

_RETRY_DELAYS = [2, 8, 30]


def _transient_only(task_, task_run, state) -> bool:
    """Retry storage/network failures; a bug or bad input fails at once."""
    try:
        state.result(raise_on_failure=True)
    except StoreAuthError:
        return False
    except (StoreError, ConnectionError, TimeoutError):
        return True
    except Exception:  # noqa: BLE001 - everything else is not transient
        return False
    return False


def _stage_task(fn, name: str):
    return task(fn, name=name, retries=len(_RETRY_DELAYS), retry_delay_seconds=_RETRY_DELAYS,
                retry_condition_fn=_transient_only, cache_policy=NO_CACHE, persist_result=False)


@dataclass(frozen=True)
class DropResult:
    """What one drop's rebuild produced: each stage's summary."""

    ingest: ingest.IngestSummary
    curate: dict
    segment: dict
    ground: dict
    version: dict = field(default_factory=dict)  # the build's version (shared by its drops)


scan_task = _stage_task(discover.scan_files, "scan")
curate_task = _stage_task(curate.curate_batch, "curate")
segment_task = _stage_task(segment.segment_series, "segment")
ground_task = _stage_task(ground.ground_batch, "ground")
ingest_shard_task = _stage_task(ingest.ingest_shard, "ingest-shard")
ingest_reports_task = _stage_task(ingest.ingest_reports, "ingest-reports")


@flow(name="rebuild_dataset", validate_parameters=False, log_prints=False)
def rebuild_dataset(drops: list[str], settings: Settings) -> list[DropResult]:
    """Per drop: ingest (scan, plan, extract series, scrub reports), curate the reports, segment the
    series, and ground the report keywords on the slices; then check, version and record the build."""
    logger = get_run_logger()
    summaries = []
    stage_seconds: dict[str, float] = {}
    parts = settings.ray.num_cpus * settings.ingest.tasks_per_cpu
    for location in drops:
        started = drop_started = time.perf_counter()
        reader = discover.DropReader(location, settings)
        paths, mask_files = discover.image_candidates(reader.list_files(), settings)
        batches = discover.split_evenly(paths, parts)
        scanned = [item for future in scan_task.map(reader, batches) for item in future.result()]
        info = discover.read_drop_info(reader)
        drop_id = discover.drop_id_for(info, [s.sha256 for s in scanned])
        reports, bad_reports = discover.read_reports(reader, drop_id)
        plan = discover.plan_drop(drop_id, scanned, reports, bad_reports, settings)
        plan.mask_files = len(mask_files)
        logger.info("discover %s: %d files, %d series planned, %d quarantined so far", drop_id, plan.files_in,
                    len(plan.series), plan.files_quarantined)

        shards = discover.shard_series(plan.series, parts)
        futures = [ingest_shard_task.submit(location, shard, settings) for shard in shards]
        reports_future = ingest_reports_task.submit(plan.reports, drop_id, settings)
        outcomes: list[ingest.SeriesOutcome] = []
        report_progress("ingest", 0, len(plan.series))
        for future in as_completed(futures):
            outcomes.extend(future.result())
            report_progress("ingest", len(outcomes), len(plan.series))
        reports = reports_future.result()
        summary = ingest.finish_ingest(plan, outcomes, reports, settings)
        logger.info("%s, %.1f s", summary.line(), time.perf_counter() - started)

        started = time.perf_counter()
        known = ingest.known_phi_by_study(plan.reports, settings)
        batches = discover.split_evenly(reports, parts)
        curated = [curate_task.submit(batch, {r.study_uid: known[r.study_uid] for r in batch}, settings)
                   for batch in batches]
        curate_outcomes = [f.result() for f in curated]
        curate_summary = curate.finish_curate(drop_id, curate_outcomes, settings)
        logger.info("%s, %.1f s", curate.summary_line(curate_summary), time.perf_counter() - started)

        started = time.perf_counter()
        image_keys = [o.shard_key for o in outcomes if o.shard_key]
        segmented = [segment_task.submit(location, drop_id, keys, settings)
                     for keys in discover.split_evenly(image_keys, parts)]
        series = [o for f in segmented for o in f.result()]
        segment_summary = segment.summarise(drop_id, series, settings)
        logger.info("%s, %.1f s", segment.summary_line(segment_summary), time.perf_counter() - started)

        started = time.perf_counter()
        mask_keys = [o.mask_key for o in series if o.mask_key]
        modalities = {o.study_uid: o.modality for o in series if o.mask_key}
        study_images: dict[str, list[str]] = {}
        for o in series:
            study_images.setdefault(o.study_uid, []).extend(o.image_ids)
        curated_reports = [r for o in curate_outcomes for r in o.reports]
        grounded = [ground_task.submit(batch, mask_keys, modalities, study_images, settings)
                    for batch in discover.split_evenly(curated_reports, parts)]
        ground_summary = ground.finish_ground(drop_id, [f.result() for f in grounded], image_keys, settings)
        logger.info("%s, %.1f s", ground.summary_line(ground_summary), time.perf_counter() - started)
        summaries.append(DropResult(ingest=summary, curate=curate_summary, segment=segment_summary,
                                    ground=ground_summary))
        stage_seconds[drop_id] = time.perf_counter() - drop_started

    started = time.perf_counter()
    counts = {"ingest": sum(r.ingest.files_in for r in summaries),
              "curate": sum(r.curate["sentences"] for r in summaries),
              "ground": sum(r.ground["grounded_pairs"] for r in summaries)}
    published = version.publish([r.ingest.drop_id for r in summaries], settings, counts,
                                {"drops_total": sum(stage_seconds.values())})
    logger.info("%s, %.1f s", version.summary_line(published), time.perf_counter() - started)
    for result in summaries:
        result.version.update(published)
    return summaries


class RebuildLockedError(RadgroundError):
    """Another rebuild is running on the same data_dir."""


def run_rebuild(drops: Sequence[str], settings: Settings) -> list[DropResult]:
    """Run the flow on the configured runtime (embedded Prefect API + local Ray by default).

    One rebuild at a time per data_dir: two at once could interleave the writes of one
    version, so the second waits for the first (``rebuild_lock_timeout_s``) or fails.
    """
    for location in drops:
        discover.DropReader(location, settings)  # reject a missing drop before anything starts
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(settings.data_dir / "rebuild.lock")
    try:
        lock.acquire(timeout=settings.rebuild_lock_timeout_s)
    except Timeout:
        raise RebuildLockedError(
            f"another rebuild holds {lock.lock_file} (waited {settings.rebuild_lock_timeout_s:g} s). Let it "
            "finish, or raise rebuild_lock_timeout_s to wait longer.") from None
    try:
        return _run_locked(drops, settings)
    finally:
        lock.release()


def _run_locked(drops: Sequence[str], settings: Settings) -> list[DropResult]:
    with prefect_api(settings) as env:
        runner = RayTaskRunner(address=settings.ray.address, init_kwargs=ray_init_kwargs(settings, env))
        return rebuild_dataset.with_options(task_runner=runner)(list(drops), settings)

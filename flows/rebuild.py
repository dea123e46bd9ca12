"""The rebuild_dataset flow: wires the stage tasks; the work lives in tasks/.

Header scans run in file batches and extraction in shards of whole series (a
series is never split), about ``ingest.tasks_per_cpu`` tasks per CPU each: enough to
balance two workers, few enough that Prefect's ~0.1 s per task stays small. Tasks retry transient
failures only (storage or network hiccups), never bad data: bad data is quarantined
by the task itself. Results are not persisted and inputs are not cached by Prefect,
so no PHI in memory ever reaches Prefect's database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_ray import RayTaskRunner

from radground import buildstate
from radground.buildstate import RebuildLockedError  # noqa: F401 - raised by run_rebuild
from radground.errors import StageError, StoreAuthError, StoreError, guarded
from radground.runtime import prefect_api, ray_init_kwargs, report_progress
from radground.settings import Settings
from radground.store import open_store
from tasks import discover, ingest
from tasks import ground_stage as ground
from tasks import version_stage as version
from tasks.curate import stage as curate
from tasks.segment import stage as segment

_RETRY_DELAYS = [2, 8, 30]
log = logging.getLogger(__name__)


def _transient_only(task_, task_run, state) -> bool:
    """Retry storage/network failures; a bug or bad input fails at once."""
    try:
        state.result(raise_on_failure=True)
    except StoreAuthError:
        return False
    except StageError as exc:  # a library's ConnectionError/TimeoutError, text withheld
        return exc.transient
    except StoreError:
        return True
    except Exception:  # noqa: BLE001 - everything else is not transient
        return False
    return False


def _stage_task(fn, name: str):
    # The boundary sits inside the task, so what Prefect stores and Ray logs is radground's message.
    return task(guarded(f"{name} task")(fn), name=name, retries=len(_RETRY_DELAYS),
                retry_delay_seconds=_RETRY_DELAYS, retry_condition_fn=_transient_only, cache_policy=NO_CACHE,
                persist_result=False)


@dataclass(frozen=True)
class DropResult:
    """What one drop's rebuild produced: each stage's summary, and which stages were current."""

    ingest: ingest.IngestSummary
    curate: dict
    segment: dict
    ground: dict
    version: dict = field(default_factory=dict)  # the build's version (shared by its drops)
    cached: bool = False  # every stage was current: nothing ran for this drop
    # stage -> {"finished_at", "key"} of its record, for the stages that did not run in this rebuild
    current: dict[str, dict[str, str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """What to print for this drop: a stage that ran, its summary; a current one, that it is
        current and since when (its old summary describes an earlier run, not this one)."""
        drop_id = self.ingest.drop_id
        ran = {"ingest": lambda: self.ingest.lines(), "curate": lambda: [curate.summary_line(self.curate)],
               "segment": lambda: [segment.summary_line(self.segment)],
               "ground": lambda: [ground.summary_line(self.ground)]}
        lines = []
        for stage in buildstate.STAGES:
            record = self.current.get(stage)
            if record is None:
                lines.extend(ran[stage]())
                continue
            line = f"{stage} {drop_id}: current (built {_when(record['finished_at'])}, key {record['key'][:12]}…)"
            if stage == "ground":
                line += ground.overlays_note(self.ground)
            lines.append(line)
        return lines


def _when(finished_at: str) -> str:
    """A record's finish time in local time, to the minute."""
    try:
        return datetime.fromisoformat(finished_at).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    except ValueError:
        return finished_at or "at an unrecorded time"


def _current(records: dict[str, buildstate.StageRecord]) -> dict[str, dict[str, str]]:
    return {stage: {"finished_at": r.finished_at, "key": r.key} for stage, r in records.items()}


scan_task = _stage_task(discover.scan_files, "scan")
curate_task = _stage_task(curate.curate_batch, "curate")
segment_task = _stage_task(segment.segment_series, "segment")
ground_task = _stage_task(ground.ground_batch, "ground")
ingest_shard_task = _stage_task(ingest.ingest_shard, "ingest-shard")
ingest_reports_task = _stage_task(ingest.ingest_reports, "ingest-reports")


@flow(name="rebuild_dataset", validate_parameters=False, log_prints=False)
@guarded("the rebuild_dataset flow")  # its state message and logs live in Prefect's database
def rebuild_dataset(drops: list[str], settings: Settings) -> list[DropResult]:
    """Per drop: ingest (scan, plan, extract series, scrub reports), curate the reports, segment the
    series, and ground the report keywords on the slices, each stage only where its cached output is
    stale; then check, version and record the build (the latest version's drops + these)."""
    logger = get_run_logger()
    registry = buildstate.DropRegistry(settings)
    store = open_store(settings)
    results: dict[str, DropResult] = {}
    stage_seconds: dict[str, float] = {}
    pending, built = list(drops), set()
    while pending or (pending := _stale_version_drops(settings, store, registry, set(results), built)):
        # (after the given drops: the latest version's other drops must be current too)
        location = pending.pop(0)
        started = time.perf_counter()
        result = _build_drop(location, settings, registry, store, logger)
        results.setdefault(result.ingest.drop_id, result)
        built.add(location)
        stage_seconds[result.ingest.drop_id] = time.perf_counter() - started

    started = time.perf_counter()
    summaries = list(results.values())
    counts = {"ingest": sum(r.ingest.files_in for r in summaries),
              "curate": sum(r.curate["sentences"] for r in summaries),
              "ground": sum(r.ground["grounded_pairs"] for r in summaries)}
    report_progress("quality + version", 0, 0)  # one step of unknown length (checks, shards, DVC, MLflow)
    published = version.publish([r.ingest.drop_id for r in summaries], settings, counts,
                                {"drops_total": sum(stage_seconds.values())})
    logger.info("%s, %.1f s", version.summary_line(published), time.perf_counter() - started)
    for result in summaries:
        result.version.update(published)
    return summaries


def _stale_version_drops(settings: Settings, store, registry: buildstate.DropRegistry, done: set[str],
                         built: set[str] = frozenset()) -> list[str]:
    """Locations of the latest version's drops (not built in this run) whose stages are stale."""
    stale = []
    for drop_id in version.version_drops([], settings):
        if drop_id in done:
            continue
        if len(buildstate.fresh_records(store, drop_id, buildstate.stage_keys(drop_id, settings))) == 4:
            continue
        location = registry.location_of(drop_id)
        if location is None or not discover.DropReader.available(location, settings):
            raise buildstate.BuildStateError(
                f"drop {drop_id} of the latest version was built with other settings or code, and its files "
                "are no longer where it was read from. Pass its location to `radground rebuild` (with the new "
                "drops), or restore the settings it was built with.")
        if location in built:  # rebuilt in this run, yet under another id: the files there changed
            raise buildstate.BuildStateError(
                f"drop {drop_id} of the latest version is stale under the current settings, and the files where "
                "it was read from have changed since, so it cannot be rebuilt as it was. Restore that drop's "
                "files, or restore the settings it was built with.")
        stale.append(location)
    return stale


def _known_drop(reader: discover.DropReader, registry: buildstate.DropRegistry, store, settings: Settings
                ) -> tuple[list[str], str | None, str | None, dict[str, buildstate.StageRecord]]:
    """(files, listing fingerprint, drop id if this exact listing was built before, its current stages)."""
    files = reader.list_files()
    fingerprint = reader.fingerprint(files)
    drop_id = registry.drop_for(reader.location, fingerprint)
    fresh = buildstate.fresh_records(store, drop_id, buildstate.stage_keys(drop_id, settings)) if drop_id else {}
    return files, fingerprint, drop_id, fresh


def _build_drop(location: str, settings: Settings, registry: buildstate.DropRegistry, store, logger) -> DropResult:
    parts = settings.ray.num_cpus * settings.ingest.tasks_per_cpu
    reader = discover.DropReader(location, settings)
    files, fingerprint, drop_id, fresh = _known_drop(reader, registry, store, settings)
    paths, mask_files = discover.image_candidates(files, settings)
    if len(fresh) == 4:
        logger.info("drop %s: unchanged, every stage current (cached)", drop_id)
        return _cached_result(fresh)

    started = time.perf_counter()
    plan = None
    if "curate" not in fresh:  # ingest and curate need the drop's headers (curate: the PHI to re-check)
        batches = discover.split_evenly(paths, parts)
        scanned = [item for found in _follow("scan: files", scan_task.map(reader, batches), map(len, batches))
                   for item in found]
        info = discover.read_drop_info(reader)
        drop_id = discover.drop_id_for(info, [s.sha256 for s in scanned])
        registry.remember(drop_id, location, fingerprint)
        reports = discover.read_reports(reader, drop_id, info.encoding if info else None)
        plan = discover.plan_drop(drop_id, scanned, reports, settings)
        plan.mask_files = len(mask_files)
        fresh = buildstate.fresh_records(store, drop_id, buildstate.stage_keys(drop_id, settings))
        logger.info("discover %s: %d files, %d series planned, %d quarantined so far", drop_id, plan.files_in,
                    len(plan.series), plan.files_quarantined)
        if len(fresh) == 4:  # moved or touched, same content
            logger.info("drop %s: same content as before, every stage current (cached)", drop_id)
            return _cached_result(fresh)
    keys = buildstate.stage_keys(drop_id, settings)
    logger.info("drop %s: stages current %s, to run %s", drop_id, sorted(fresh) or "none",
                [s for s in buildstate.STAGES if s not in fresh])

    if "ingest" in fresh:
        summary = ingest.IngestSummary(**fresh["ingest"].summary)
        image_keys = list(fresh["ingest"].handoff["image_keys"])
        reports = None
    else:
        buildstate.clear_stage(store, "ingest", drop_id)
        shards = discover.shard_series(plan.series, parts)
        futures = [ingest_shard_task.submit(location, shard, settings) for shard in shards]
        reports_future = ingest_reports_task.submit(plan.reports, drop_id, settings)
        outcomes: list[ingest.SeriesOutcome] = [
            o for shard in _follow("ingest: series", futures, map(len, shards)) for o in shard]
        reports = reports_future.result()
        summary = ingest.finish_ingest(plan, outcomes, reports, settings)
        image_keys = sorted(o.shard_key for o in outcomes if o.shard_key)
        buildstate.write_record(store, "ingest", drop_id, keys["ingest"], summary.__dict__,
                                {"image_keys": image_keys})
        logger.info("%s, %.1f s", summary.line(), time.perf_counter() - started)

    started = time.perf_counter()
    if "curate" in fresh:
        curate_summary = fresh["curate"].summary
        curated_reports = None
    else:
        buildstate.clear_stage(store, "curate", drop_id)
        if reports is None:
            reports = ingest.read_reports(drop_id, settings)
        known = ingest.known_phi_by_study(plan.reports, settings)
        batches = discover.split_evenly(reports, parts)
        curated = [curate_task.submit(batch, {r.study_uid: known[r.study_uid] for r in batch}, settings)
                   for batch in batches]
        curate_outcomes = _follow("curate: reports", curated, map(len, batches))
        curate_summary = curate.finish_curate(drop_id, curate_outcomes, settings)
        curated_reports = [r for o in curate_outcomes for r in o.reports]
        buildstate.write_record(store, "curate", drop_id, keys["curate"], curate_summary)
        logger.info("%s, %.1f s", curate.summary_line(curate_summary), time.perf_counter() - started)

    started = time.perf_counter()
    if "segment" in fresh:
        segment_summary, handoff = fresh["segment"].summary, fresh["segment"].handoff
    else:
        buildstate.clear_stage(store, "segment", drop_id)
        batches = discover.split_evenly(image_keys, parts)
        segmented = [segment_task.submit(location, drop_id, batch, settings) for batch in batches]
        series = [o for found in _follow("segment: series", segmented, map(len, batches)) for o in found]
        segment_summary = segment.summarise(drop_id, series, settings)
        handoff = segment.handoff(series)
        buildstate.write_record(store, "segment", drop_id, keys["segment"], segment_summary, handoff)
        logger.info("%s, %.1f s", segment.summary_line(segment_summary), time.perf_counter() - started)

    started = time.perf_counter()
    if "ground" in fresh:
        ground_summary = fresh["ground"].summary
    else:
        buildstate.clear_stage(store, "ground", drop_id)
        if curated_reports is None:
            curated_reports = curate.read_curated(drop_id, settings)
        batches = discover.split_evenly(curated_reports, parts)
        grounded = [ground_task.submit(batch, handoff["mask_keys"], handoff["modalities"],
                                       handoff["study_images"], settings)
                    for batch in batches]
        ground_summary = ground.finish_ground(drop_id, _follow("ground: reports", grounded, map(len, batches)),
                                              image_keys, settings)
        buildstate.write_record(store, "ground", drop_id, keys["ground"], ground_summary)
        logger.info("%s, %.1f s", ground.summary_line(ground_summary), time.perf_counter() - started)
    return DropResult(ingest=summary, curate=curate_summary, segment=segment_summary, ground=ground_summary,
                      current=_current(fresh))


def _follow(stage: str, futures, sizes) -> list:
    """The futures' results in submission order, reporting ``stage`` progress as each completes
    (``sizes``: the items each future works on, so the bar counts series or reports, not tasks)."""
    futures, sizes = list(futures), list(sizes)
    total, done = sum(sizes), 0
    size_of = {id(f): n for f, n in zip(futures, sizes, strict=True)}
    report_progress(stage, 0, total)
    for future in as_completed(futures):
        done += size_of[id(future)]
        report_progress(stage, done, total)
    return [f.result() for f in futures]


def _cached_result(records: dict[str, buildstate.StageRecord]) -> DropResult:
    return DropResult(ingest=ingest.IngestSummary(**records["ingest"].summary), curate=records["curate"].summary,
                      segment=records["segment"].summary, ground=records["ground"].summary, cached=True,
                      current=_current(records))


def _all_cached(drops: Sequence[str], settings: Settings) -> list[DropResult] | None:
    """Every stage of every drop (given, and in the latest version) current? Their results; else None."""
    registry = buildstate.DropRegistry(settings)
    store = open_store(settings)
    results: dict[str, DropResult] = {}
    for location in drops:
        _, _, drop_id, fresh = _known_drop(discover.DropReader(location, settings), registry, store, settings)
        if len(fresh) < 4:
            return None
        results.setdefault(drop_id, _cached_result(fresh))
    if _stale_version_drops(settings, store, registry, set(results)):
        return None
    if not drops:  # "bring the latest version up to date": report every drop of it
        for drop_id in version.version_drops([], settings):
            results[drop_id] = _cached_result(
                buildstate.fresh_records(store, drop_id, buildstate.stage_keys(drop_id, settings)))
    return list(results.values())


def run_rebuild(drops: Sequence[str], settings: Settings) -> list[DropResult]:
    """Run the flow on the configured runtime (embedded Prefect API + local Ray by default).

    One rebuild at a time per data_dir (:func:`radground.buildstate.rebuild_lock`).
    """
    drops = list(dict.fromkeys(discover.canonical_location(d) for d in drops))
    # A missing or empty drop, or one without reports.csv, is refused before anything starts.
    discover.check_drops(drops, settings)
    if not drops and version.latest_version_dir(settings) is None:
        raise buildstate.BuildStateError(
            f"no drops given and no dataset version under {settings.data_dir} yet: pass the drop folders to build.")
    with buildstate.rebuild_lock(settings, command="rebuild"):
        results = _run_locked(drops, settings)
        return [_with_overlays(result, settings) for result in results]


def _with_overlays(result: DropResult, settings: Settings) -> DropResult:
    """Overlays asked for (``rebuild --overlays N``) of a drop whose ground stage did not run now.

    The overlay count is no stage setting (it changes no output), so a built drop's ground stage
    stays current and would not draw them: they are drawn here from its stored outputs."""
    count = settings.grounding.overlays
    if not count or "ground" not in result.current:
        return result
    drop_id = result.ingest.drop_id
    record = buildstate.read_record(open_store(settings), "ingest", drop_id)
    image_keys = record.handoff.get("image_keys", []) if record else []
    paths = ground.overlays_from_store(drop_id, image_keys, settings, count)
    return replace(result, ground={**result.ground, "overlays": [str(p) for p in paths], "overlays_requested": count})


def _import_task_modules() -> None:
    import prefect.task_engine  # noqa: F401 - what a Prefect task on a worker imports first

    import tasks.curate.stage  # noqa: F401
    import tasks.ground_stage  # noqa: F401
    import tasks.segment.stage  # noqa: F401


def _run_locked(drops: Sequence[str], settings: Settings) -> list[DropResult]:
    report_progress("checking drops", 0, 0)
    cached = _all_cached(drops, settings)
    if cached is not None:  # nothing to run: no Prefect, no Ray, only the (cheap) version check
        report_progress("version check", 0, 0)
        published = version.publish([r.ingest.drop_id for r in cached], settings, {}, {})
        # (not the version line again: the caller prints it, and with --debug this record shows too)
        log.info("rebuild: every drop current, nothing ran; version %s", published["digest"][:16])
        for result in cached:
            result.version.update(published)
        return cached
    import ray

    def start_local_ray(env: dict[str, str]) -> None:
        # Local Ray starts while the Prefect server boots (each takes seconds); the task runner
        # then uses the running instance, and this function's caller shuts it down.
        if settings.ray.address is None and not ray.is_initialized():
            ray.init(**ray_init_kwargs(settings, env))
            # and its workers import the task modules meanwhile, not on the first real task
            warm = ray.remote(num_cpus=1)(_import_task_modules)
            for _ in range(settings.ray.num_cpus):
                warm.remote()  # fire and forget: a failed warm-up only costs the time it would save

    report_progress("starting Prefect + Ray", 0, 0)
    try:
        with prefect_api(settings, while_starting=start_local_ray) as env:
            runner = RayTaskRunner(address=settings.ray.address, init_kwargs=ray_init_kwargs(settings, env))
            return rebuild_dataset.with_options(task_runner=runner)(list(drops), settings)
    finally:
        if settings.ray.address is None and ray.is_initialized():
            ray.shutdown()

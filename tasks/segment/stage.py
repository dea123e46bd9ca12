"""The segment stage: run the configured backend chain on whole series, write mask records.

Input: the images shards ingest wrote (one per series). Output: one Parquet object of
MaskRecords per series under ``segment/<drop_id>/masks/``. A series that a backend
cannot handle is quarantined with the backend's reason, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from radground import buildstate
from radground.errors import RadgroundError
from radground.imaging import pixels_from_bytes
from radground.schemas import MaskRecord, QuarantineRecord
from radground.settings import SegmentationSettings, Settings
from radground.store import open_store
from radground.tables import parquet_bytes, read_table, relabelled, to_arrow, write_table
from tasks.ground import mask_records
from tasks.segment.base import SegmentationError, SeriesVolume, check_mask

logger = logging.getLogger(__name__)
STAGE = "segment"


@dataclass
class SegmentOutcome:
    """One series' result; PHI-free."""

    series_uid: str
    study_uid: str
    modality: str
    mask_key: str | None
    slices: int
    image_ids: tuple[str, ...] = ()
    classes: Counter = field(default_factory=Counter)  # class name -> slices where present
    quarantine: list[QuarantineRecord] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    reused: bool = False  # copied from an earlier drop that delivered the same series


def backend_for(name: str, settings: SegmentationSettings):
    """The backend (or refiner, for sam) called ``name``."""
    if name == "classical":
        from tasks.segment.classical import ClassicalBackend

        return ClassicalBackend()
    if name == "totalsegmentator":
        from tasks.segment.totalseg import TotalSegmentatorBackend

        return TotalSegmentatorBackend(settings)
    if name == "sam":
        from tasks.segment.sam import SamRefiner

        return SamRefiner(settings)
    raise SegmentationError(f"segmentation backend {name!r} is unknown: choose from classical, totalsegmentator, "
                            "sam, imported in segmentation.backend.")


def load_volume(table) -> tuple[SeriesVolume, str, str]:
    """A series' images table as a SeriesVolume (slices in slice_index order)."""
    rows = sorted(table.to_pylist(), key=lambda r: r["slice_index"])
    first = rows[0]
    values = np.stack([pixels_from_bytes(r["pixels"], r["pixel_dtype"], r["rows"], r["cols"]) for r in rows])
    volume = SeriesVolume(
        image_ids=tuple(r["image_id"] for r in rows), modality=first["modality"], values=values,  # (S, H, W)
        orientation=tuple(first["image_orientation"]),
        positions=np.array([r["image_position"] for r in rows], dtype=np.float64),
        spacing=(first["row_spacing_mm"], first["col_spacing_mm"]),
    )
    return volume, first["series_uid"], first["study_uid"]


def run_chain(volume: SeriesVolume, settings: Settings, location: str, series_uid: str
              ) -> tuple[np.ndarray, str, dict]:
    """Run the backends in order: sam refines, imported overrides what the backends before found."""
    mask: np.ndarray | None = None
    used, stats = [], {}
    for name in settings.segmentation.backend:
        if name == "imported":
            from tasks.segment.imported import ImportedBackend

            imported = ImportedBackend(location, settings)
            mask = (imported.segment(volume, series_uid) if mask is None
                    else imported.override(volume, series_uid, mask))
            used.append(name)
            continue
        backend = backend_for(name, settings.segmentation)
        if name == "sam":
            if mask is None:
                raise SegmentationError("segmentation.backend: sam refines another backend's masks; put it after "
                                        "classical or totalsegmentator, e.g. [classical, sam].")
            mask, stats["sam"] = backend.refine(volume, mask)
        else:
            mask = backend.segment(volume)
        mask = check_mask(volume, mask, name)
        used.append(name)
    return mask, "+".join(used), stats


def segment_series(location: str, drop_id: str, image_keys: Sequence[str], settings: Settings
                   ) -> list[SegmentOutcome]:
    """Segment each series (given by its images shard key) and write its mask records."""
    store = open_store(settings)
    outcomes = []
    for key in image_keys:
        table = read_table(store, key)
        # imported masks come from the drop itself, so only a chain without them is the same
        # for the same images whichever drop delivered them
        content_key = (None if "imported" in settings.segmentation.backend else buildstate.series_key(
            STAGE, sorted(table.column("source_sha256").to_pylist()), settings))
        earlier = buildstate.find_series_output(store, STAGE, content_key) if content_key else None
        if earlier is not None:
            outcomes.append(_copied(earlier, drop_id, store))
            continue
        outcomes.append(_segment_one(table, location, drop_id, settings, store, content_key))
    return outcomes


def _copied(earlier: buildstate.SeriesOutput, drop_id: str, store) -> SegmentOutcome:
    extra = earlier.extra
    mask_key = f"{STAGE}/{drop_id}/masks/{extra['series_uid']}.parquet"
    store.put(mask_key, relabelled(earlier.table, drop_id))
    logger.info("segment series %s: identical to an earlier drop's, masks copied", extra["series_uid"])
    return SegmentOutcome(extra["series_uid"], extra["study_uid"], extra["modality"], mask_key, extra["slices"],
                          image_ids=tuple(extra["image_ids"]), classes=Counter(extra["classes"]),
                          stats=extra["stats"], reused=True)


def _segment_one(table, location: str, drop_id: str, settings: Settings, store, content_key: str | None
                 ) -> SegmentOutcome:
    volume, series_uid, study_uid = load_volume(table)
    outcome = SegmentOutcome(series_uid, study_uid, volume.modality, None, len(volume.image_ids),
                             image_ids=volume.image_ids)
    try:
        labels, backend, outcome.stats = run_chain(volume, settings, location, series_uid)
    except RadgroundError as exc:
        # The quarantine table travels into dataset versions: it gets the backend chain and
        # the error type only, never the message (which may quote file or folder names).
        chain = "+".join(settings.segmentation.backend)
        logger.warning("segment series %s: %s failed: %s", series_uid, chain, exc)
        outcome.quarantine.append(QuarantineRecord(
            drop_id=drop_id, stage=STAGE, item="series", reason="segmentation_failed",
            detail=f"backend chain {chain} raised {type(exc).__name__}; the rebuild log has the reason",
            source_sha256=None, ref=series_uid))
        return outcome
    records = mask_records(labels, image_ids=volume.image_ids, series_uid=series_uid, study_uid=study_uid,
                           drop_id=drop_id, backend=backend, min_area_px=settings.grounding.min_area_px)
    outcome.mask_key = f"{STAGE}/{drop_id}/masks/{series_uid}.parquet"
    data = parquet_bytes(to_arrow(records, MaskRecord))
    store.put(outcome.mask_key, data)
    outcome.classes = Counter(r.class_name for r in records)
    if content_key:  # later drops delivering the same series copy this
        buildstate.remember_series_output(store, STAGE, content_key, outcome.mask_key, data, {
            "series_uid": series_uid, "study_uid": study_uid, "modality": outcome.modality, "slices": outcome.slices,
            "image_ids": list(outcome.image_ids), "classes": dict(outcome.classes), "stats": outcome.stats})
    logger.info("segment series %s: %d slices, %d class masks (%s)", series_uid, outcome.slices,
                len(records), backend)
    return outcome


def summarise(drop_id: str, outcomes: Sequence[SegmentOutcome], settings: Settings) -> dict:
    """Write the stage's quarantine and summary; return the summary."""
    store = open_store(settings)
    quarantine = [q for o in outcomes for q in o.quarantine]
    write_table(store, f"{STAGE}/{drop_id}/quarantine.parquet", quarantine, QuarantineRecord)
    classes: Counter = sum((o.classes for o in outcomes), Counter())
    summary = {
        "drop_id": drop_id,
        "series": len(outcomes),
        "series_segmented": sum(1 for o in outcomes if o.mask_key),
        "series_reused": sum(1 for o in outcomes if o.reused),
        "series_quarantined": len({q.ref for q in quarantine}),
        "slices": sum(o.slices for o in outcomes),
        "backend": "+".join(settings.segmentation.backend),
        "class_slices": dict(classes.most_common()),
        "quarantine_reasons": dict(Counter(q.reason for q in quarantine)),
    }
    store.put(f"{STAGE}/{drop_id}/summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def handoff(outcomes: Sequence[SegmentOutcome]) -> dict:
    """What the ground stage needs from segmentation, as JSON (kept in the stage record)."""
    study_images: dict[str, list[str]] = {}
    for o in outcomes:
        study_images.setdefault(o.study_uid, []).extend(o.image_ids)
    return {"mask_keys": [o.mask_key for o in outcomes if o.mask_key],
            "modalities": {o.study_uid: o.modality for o in outcomes if o.mask_key},
            "study_images": study_images}


def summary_line(summary: dict) -> str:
    top = ", ".join(f"{name} {n}" for name, n in list(summary["class_slices"].items())[:5])
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(summary["quarantine_reasons"].items()))
    return (f"segment {summary['drop_id']}: {summary['series_segmented']}/{summary['series']} series segmented, "
            f"{summary['slices']} slices with {summary['backend']}; class slices: {top or 'none'}"
            + (f"; {summary['series_reused']} series copied from earlier drops" if summary.get("series_reused") else "")
            + (f"; {summary.get('series_quarantined', 0)} series quarantined ({reasons})" if reasons else ""))

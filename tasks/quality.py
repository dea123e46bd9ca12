"""Quality stage: great-expectations suites over every table, failing rows -> quarantine, gates.

Suites are derived from the record models in radground/schemas.py (columns, nullability, types,
Literal sets, pydantic gt/ge bounds) plus a few domain rules per table. GX validates whole
tables; it does not split passing from failing rows, so we run every suite with result_format
COMPLETE and a private row-number column among `unexpected_index_column_names`, collect the
failing rows per expectation and drop them. Row ids (the table's id column) go along as the
quarantine `ref`. Rules that GX cannot express over one or two columns (bbox inside the image,
answer among the choices, no PHI pattern) are derived boolean columns checked for True.

GX runs on in-memory stores and writes nothing: its data docs load scripts and styles from public
CDNs (hospitals run offline) and its stored COMPLETE results would hold row values. Each table's
per-expectation outcome goes into its stats instead; tasks/quality_report.py renders those as one
self-contained HTML page per drop and per version.
"""

from __future__ import annotations

import logging
import types
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import annotated_types
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from radground.errors import QualityGateError
from radground.labels import label_map
from radground.schemas import (
    GroundingRecord,
    ImageRecord,
    MaskRecord,
    QuarantineRecord,
    ReportRecord,
    SliceRecord,
    VQARecord,
)
from radground.settings import QualitySettings
from tasks.scrub import KnownPHI, scrub_report

log = logging.getLogger(__name__)

#: The column that names a row in the quarantine table (`ref`); tables without a unique id use
#: the image the row belongs to.
ID_COLUMN: dict[type[BaseModel], str] = {
    ImageRecord: "image_id", ReportRecord: "study_uid", VQARecord: "vqa_id", GroundingRecord: "image_id",
    MaskRecord: "image_id", SliceRecord: "image_id", QuarantineRecord: "ref"}
UNIQUE_COLUMNS: dict[type[BaseModel], tuple[str, ...]] = {ImageRecord: ("image_id",), VQARecord: ("vqa_id",)}
PHI_CATEGORIES = frozenset({"name", "phone", "email", "id", "address"})  # dates are shifted, not PHI once shifted
_ROW = "__quality_row"  # private row number: GX reports it back for every failing row

# Derived boolean columns (computed by _derive, checked for True by the suite).
BBOX_OK, ANSWER_OK, NO_PHI = "bbox_in_image", "answer_in_choices", "no_phi_pattern"

# pandas dtype names GX reports as observed_value for a column; string/date columns are left
# out: their dtype ("object", "str") says nothing reliable about the values.
_DTYPES = {int: ["int64", "int32", "Int64", "Int32"], float: ["float64", "float32", "Float64", "int64", "Int64"],
           bool: ["bool", "boolean"]}


@dataclass
class QualityResult:
    passed: pa.Table | pd.DataFrame  # same type and columns as the input, failing rows removed
    failed: list[QuarantineRecord]
    stats: dict  # JSON-able; "expectations": [{name, success, unexpected_count}] in suite order


# ------------------------------------------------------------------------------------- suites
def _unwrap(annotation) -> tuple[object, bool]:
    """(inner annotation, optional?) for `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0], True
    return annotation, False


def expectation_name(expectation) -> str:
    """The quarantine reason for an expectation: 'expect_column_values_to_be_between:area_px'."""
    # an Expectation or the ExpectationConfiguration a validation result carries
    config = expectation.configuration if hasattr(expectation, "configuration") else expectation
    kwargs = config.kwargs
    columns = kwargs.get("column") or ",".join(str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs)
    return f"{config.type}:{columns}" if columns else config.type


def suite_for(model: type[BaseModel], table_name: str) -> list:
    """The expectations for one table, derived from its record model plus the table's domain rules."""
    import great_expectations as gx

    E = gx.expectations
    out: list = []
    for name, info in model.model_fields.items():
        inner, optional = _unwrap(info.annotation)
        out.append(E.ExpectColumnToExist(column=name))
        if not optional:
            out.append(E.ExpectColumnValuesToNotBeNull(column=name))
        if typing.get_origin(inner) is typing.Literal:
            out.append(E.ExpectColumnValuesToBeInSet(column=name, value_set=list(typing.get_args(inner))))
        elif inner in _DTYPES and not optional:  # Optional ints arrive as float64 or object
            out.append(E.ExpectColumnValuesToBeInTypeList(column=name, type_list=_DTYPES[inner]))
        for bound in info.metadata:  # pydantic Field(gt=..., ge=...) -> between
            if isinstance(bound, annotated_types.Gt):
                out.append(E.ExpectColumnValuesToBeBetween(column=name, min_value=bound.gt, strict_min=True))
            elif isinstance(bound, annotated_types.Ge):
                out.append(E.ExpectColumnValuesToBeBetween(column=name, min_value=bound.ge))
    for name in UNIQUE_COLUMNS.get(model, ()):
        out.append(E.ExpectColumnValuesToBeUnique(column=name))
    fields = set(model.model_fields)
    if {"class_id", "class_name"} <= fields:
        lm = label_map()
        out.append(E.ExpectColumnValuesToBeInSet(column="class_id", value_set=[c.id for c in lm]))
        out.append(E.ExpectColumnPairValuesToBeInSet(column_A="class_id", column_B="class_name",
                                                     value_pairs_set=[(c.id, c.name) for c in lm]))
    for derived in _derived_columns(model):
        out.append(E.ExpectColumnValuesToBeInSet(column=derived, value_set=[True]))
    return out


def _text_columns(model: type[BaseModel]) -> list[str]:
    """Free-text columns that must not carry PHI patterns."""
    return [c for c in ("text", "sentences", "question", "answer", "sentence") if c in model.model_fields]


def _derived_columns(model: type[BaseModel]) -> list[str]:
    fields = set(model.model_fields)
    out = []
    if {"bbox", "rows", "cols"} <= fields:
        out.append(BBOX_OK)
    if {"answer", "choices", "question_type"} <= fields:
        out.append(ANSWER_OK)
    if _text_columns(model):
        out.append(NO_PHI)
    return out


# ------------------------------------------------------------------------------ derived columns
def _bbox_ok(bbox, rows, cols) -> bool:
    """[x1, y1, x2, y2] in pixels, x = column, x2/y2 exclusive: inside [0, cols] x [0, rows], non-empty."""
    try:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return False
    return 0 <= x1 < x2 <= cols and 0 <= y1 < y2 <= rows


def _answer_ok(answer, choices, question_type) -> bool:
    return question_type != "multiple" or (choices is not None and answer in list(choices))


def _texts(value) -> list[str]:
    """Every string in a text cell: a str, or curate's sentences (dicts or SentenceItems)."""
    if value is None or isinstance(value, float):  # NaN from pandas
        return []
    if isinstance(value, str):
        return [value]
    texts = []
    for sentence in value:
        item = sentence if isinstance(sentence, dict) else sentence.model_dump()
        texts += [t for t in (item.get("text"), item.get("translation")) if t]
    return texts


def has_phi_pattern(text: str, language: str) -> bool:
    """True when the scrubber would redact a name, phone, e-mail or ID-like number in `text`."""
    language = language if language in ("de", "en") else "en"
    result = scrub_report(text, KnownPHI(), date_offset_days=None, language=language)
    return any(r.category in PHI_CATEGORIES for r in result.redactions)


def _derive(df: pd.DataFrame, model: type[BaseModel]) -> pd.DataFrame:
    derived = _derived_columns(model)
    if BBOX_OK in derived:
        df[BBOX_OK] = [_bbox_ok(b, r, c) for b, r, c in zip(df["bbox"], df["rows"], df["cols"], strict=True)]
    if ANSWER_OK in derived:
        df[ANSWER_OK] = [_answer_ok(a, c, q)
                         for a, c, q in zip(df["answer"], df["choices"], df["question_type"], strict=True)]
    if NO_PHI in derived:
        languages = df["language"] if "language" in df else ["en"] * len(df)
        columns = [df[c] for c in _text_columns(model)]
        df[NO_PHI] = [not any(has_phi_pattern(t, lang) for cell in cells for t in _texts(cell))
                      for lang, *cells in zip(languages, *columns, strict=True)]
    return df


# -------------------------------------------------------------------------------------- GX
def _context():
    """A GX context with no analytics, no progress bars, in-memory stores and no data docs sites."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    config = DataContextConfig(
        # in memory: a stored COMPLETE result would put row values (PHI) on disk
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,  # set on this context only; no GX_ANALYTICS_ENABLED env change leaks out
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={})  # GX's docs pull bootstrap/jQuery/vega from CDNs: tasks/quality_report.py instead
    return gx.get_context(mode="ephemeral", project_config=config)


def _validate(df: pd.DataFrame, expectations: list, table_name: str, id_column: str):
    """Run the suite on `df` through a Checkpoint (COMPLETE results, no actions); its validation result."""
    import great_expectations as gx

    ctx = _context()
    source = ctx.data_sources.add_or_update_pandas(name="radground")
    asset = (next((a for a in source.assets if a.name == table_name), None)
             or source.add_dataframe_asset(name=table_name))
    batch = next((b for b in asset.batch_definitions if b.name == "whole"), None) \
        or asset.add_batch_definition_whole_dataframe("whole")
    suite = gx.ExpectationSuite(name=table_name, expectations=expectations)
    suite = ctx.suites.add_or_update(suite)
    definition = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=table_name, data=batch, suite=suite))
    checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=f"quality_{table_name}", validation_definitions=[definition], actions=[],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW, id_column]}))
    result = checkpoint.run(batch_parameters={"dataframe": df})
    return next(iter(result.run_results.values()))


# --------------------------------------------------------------------------------- the stage
def check_table(name: str, table: pa.Table | pd.DataFrame, model: type[BaseModel], *,
                data_dir: Path | str | None = None, drop_id: str) -> QualityResult:
    """Validate one table against its suite; failing rows become QuarantineRecords, the rest pass.

    Writes nothing: ``data_dir`` is accepted for existing callers and unused (GX's data docs used to
    go there). The stats carry every expectation's outcome for tasks/quality_report.py.
    """
    id_column = ID_COLUMN.get(model, next(iter(model.model_fields)))
    df = table.to_pandas() if isinstance(table, pa.Table) else table.copy()
    df = df.reset_index(drop=True)
    n = len(df)
    present = set(df.columns)
    df = _derive(df, model) if set(model.model_fields) <= present else df  # derivations need their inputs
    df[_ROW] = range(n)
    if id_column not in df:
        df[id_column] = None

    suite = suite_for(model, name)
    order = {expectation_name(e): k for k, e in enumerate(suite)}  # GX reorders results; reasons follow the suite
    validation = _validate(df, suite, name, id_column)
    reasons: dict[int, list[str]] = {}
    table_failures: list[str] = []
    outcomes: list[dict] = []
    for r in validation.results:
        reason = expectation_name(r.expectation_config)
        count = (r.result or {}).get("unexpected_count")  # None for table-level expectations and errors
        outcomes.append({"name": reason, "success": bool(r.success), "unexpected_count": None if count is None
                         else int(count)})
        if r.success:
            continue
        rows = (r.result or {}).get("unexpected_index_list")
        if rows is None:  # a table-level failure (missing column, wrong dtype, error): every row fails
            table_failures.append(reason)
            rows = [{_ROW: i} for i in range(n)]
        for row in rows:
            reasons.setdefault(int(row[_ROW]), []).append(reason)

    for why in reasons.values():
        why.sort(key=lambda reason: order.get(reason, len(order)))
    table_failures.sort(key=lambda reason: order.get(reason, len(order)))
    outcomes.sort(key=lambda outcome: order.get(outcome["name"], len(order)))
    ids = df[id_column].tolist()
    failed = [QuarantineRecord(
        drop_id=drop_id, stage="quality", item="row", reason=why[0], source_sha256=None,
        ref=None if pd.isna(ids[i]) else str(ids[i]),
        detail=f"table {name}, row {i}: failed {', '.join(why)}") for i, why in sorted(reasons.items())]
    keep = [i for i in range(n) if i not in reasons]
    passed = table.take(pa.array(keep, pa.int64())) if isinstance(table, pa.Table) else table.iloc[keep]

    stats = {"table": name, "rows": n, "passed": len(keep), "quarantined": len(failed),
             "quarantine_rate": len(failed) / n if n else 0.0,
             "by_reason": dict(Counter(reason for why in reasons.values() for reason in why)),
             "table_failures": table_failures, "expectations": outcomes}
    if model is GroundingRecord:
        stats["grounded_slices"] = len({ids[i] for i in keep})
    elif model is SliceRecord and "grounded" in df:
        stats["grounded_slices"] = int(sum(bool(df["grounded"][i]) for i in keep))
    log.info("quality %s: %d/%d rows passed, %d quarantined %s", name, len(keep), n, len(failed), stats["by_reason"])
    return QualityResult(passed=passed, failed=failed, stats=stats)


def check_gates(stats_by_table: dict[str, dict], gates: QualitySettings | None = None) -> None:
    """Raise QualityGateError when a table-level gate is crossed; the message names gate and numbers."""
    gates = gates or QualitySettings()
    for name, stats in stats_by_table.items():
        rate = stats["quarantine_rate"]
        if rate > gates.max_quarantine_rate:
            raise QualityGateError(
                f"gate max_quarantine_rate: {rate:.1%} of {stats['rows']} rows quarantined in table {name} "
                f"(limit {gates.max_quarantine_rate:.1%}); reasons {stats.get('by_reason', {})}. "
                f"See the quarantine table and the quality report, fix the input, or raise the limit.")
    grounded = [s["grounded_slices"] for s in stats_by_table.values() if "grounded_slices" in s]
    count = max(grounded, default=0)
    if count < gates.min_grounded_slices:
        rows = {name: f"{s.get('passed', '?')}/{s['rows']}" for name, s in sorted(stats_by_table.items())}
        raise QualityGateError(
            f"gate min_grounded_slices: {count} grounded slices after quality checks (need >= "
            f"{gates.min_grounded_slices}); rows passed per table {rows}. A slice is grounded when its study has a "
            "report that names a structure segmentation found on it: check the drop's ingest summary for "
            "quarantined reports (orphan_report, invalid_report_row) and its segment summary, fix the input, or set "
            "quality.min_grounded_slices=0 to version the drop without grounding.")

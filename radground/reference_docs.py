"""Reference pages generated from the code, so they cannot drift from it.

* ``docs/settings.md``: every setting of :class:`radground.settings.Settings` with its
  environment variable, type (and allowed range), default and description.
* The table reference in ``docs/data-path.md`` (between the ``GENERATED`` markers): every
  column of the record models in :mod:`radground.schemas` with its Arrow type.

``make docs`` (``python -m radground.reference_docs``) rewrites them; ``--check`` only says
whether they are current (tests/test_docs.py fails when they are not).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from datetime import date, datetime
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from radground import schemas
from radground.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, Settings, _Group

ROOT = Path(__file__).resolve().parents[1]
SETTINGS_DOC = Path("docs/settings.md")
DATA_PATH_DOC = Path("docs/data-path.md")
COMMAND = "make docs"  # = .venv/bin/python -m radground.reference_docs
BEGIN = "<!-- GENERATED: tables (make docs) -->"
END = "<!-- END GENERATED: tables -->"

#: The tables of the data path, in the order data flows through them: (model, where it lives).
TABLES: tuple[tuple[type[BaseModel], str], ...] = (
    (schemas.DropReportRow, "a drop's `reports.csv` (input)"),
    (schemas.DropInfo, "a drop's optional `drop.yaml` (input)"),
    (schemas.ImageRecord, "`ingest/<drop_id>/images/<series>.parquet`; version table `images`"),
    (schemas.ReportRecord, "`ingest/<drop_id>/reports.parquet` (scrubbed), "
                           "`curate/<drop_id>/reports.parquet` (sentences); version table `reports`"),
    (schemas.VQARecord, "`curate/<drop_id>/vqa.parquet` (study level), "
                        "`ground/<drop_id>/vqa.parquet` (slice level); version table `vqa`"),
    (schemas.MaskRecord, "`segment/<drop_id>/masks/<series>.parquet`"),
    (schemas.GroundingRecord, "`ground/<drop_id>/grounding.parquet`; version table `grounding`"),
    (schemas.SliceRecord, "`ground/<drop_id>/slices.parquet`"),
    (schemas.QuarantineRecord, "`<stage>/<drop_id>/quarantine.parquet`; version table `quarantine`"),
    (schemas.KeywordItem, "nested: `SentenceItem.keywords`, `SentenceItem.translation_keywords`"),
    (schemas.SentenceItem, "nested: `ReportRecord.sentences`"),
)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, ``|`` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _docstring(obj: object) -> str:
    return _prose(obj.__doc__ or "")


def _prose(text: str) -> str:
    """A description as Markdown prose: ``<data_dir>`` would be read as an HTML tag and vanish."""
    parts = _cell(text).split("`")  # odd parts are code spans, where a backslash would show
    return "`".join(part if i % 2 else part.replace("<", "\\<") for i, part in enumerate(parts))


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in inner)
        return f"{name} or null" if len(inner) < len(args) else name
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    names = {str: "text", int: "integer", float: "number", bool: "boolean", Path: "path", SecretStr: "secret",
             bytes: "bytes", date: "date", datetime: "date-time"}
    if annotation in names:
        return names[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"list of {annotation.__name__}" if origin is list else annotation.__name__
    return str(annotation)


def _bounds(info: FieldInfo) -> str:
    words = []
    for item in info.metadata:
        for kind, attribute, sign in ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"),
                                      (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<")):
            if isinstance(item, kind):
                words.append(f"{sign} {getattr(item, attribute)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            words.append(f"length ≥ {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            words.append(f"length ≤ {item.max_length}")
    return ", ".join(words)


def _default(info: FieldInfo) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{value}`"


def _description(info: FieldInfo) -> str:
    return _prose(info.description or "")


def settings_fields() -> list[tuple[str, FieldInfo, type[_Group] | None]]:
    """Every leaf setting as (dotted name, field, its group's model or None for top-level fields)."""
    fields = []
    for name, info in Settings.model_fields.items():
        group = info.annotation
        if isinstance(group, type) and issubclass(group, _Group):
            fields.extend((f"{name}.{sub}", sub_info, group) for sub, sub_info in group.model_fields.items())
        else:
            fields.append((name, info, None))
    return fields


def env_variable(dotted: str) -> str:
    return ENV_PREFIX + dotted.replace(".", ENV_NESTED_DELIMITER).upper()


def settings_markdown() -> str:
    """docs/settings.md: one table per settings group."""
    lines = [
        "# Settings reference",
        "",
        f"<!-- GENERATED from radground/settings.py by `{COMMAND}`; edit the model, not this page. -->",
        "",
        "Every setting of radground, generated from the settings model (`radground/settings.py`). Sources, "
        "strongest first: environment variables, a YAML file given with `--config FILE` (or `RADGROUND_CONFIG`), "
        "then the defaults below, which are the embedded set-up (no servers, no weights). "
        "`radground config show` prints the effective settings with secrets masked.",
        "",
        "- **Environment**: `RADGROUND_<NAME>` for a top-level setting, `RADGROUND_<GROUP>__<FIELD>` (two "
        "underscores) for a setting in a group, e.g. `RADGROUND_STORAGE__BACKEND=s3`. Lists are JSON: "
        "`RADGROUND_SEGMENTATION__BACKEND='[\"classical\", \"sam\"]'`.",
        "- **YAML file**: the group is a mapping, e.g. `storage:` then `  backend: s3` beneath it.",
        "- Secrets (type *secret*) belong in the environment, never in a file you commit; they print as "
        "`**********`.",
        "- An invalid value is rejected before any work starts, naming the setting, the value and what is allowed.",
        "- Two `RADGROUND_` variables are not settings: `RADGROUND_CONFIG` (the `--config` file) and "
        "`RADGROUND_VENV_CACHE` (where `make` keeps the installed dependencies).",
        "",
    ]
    current: str | None = "-"
    for dotted, info, model in settings_fields():
        group = dotted.partition(".")[0] if "." in dotted else None
        if group != current:
            current = group
            title = f"`{group}`" if group else "Top level"
            lines += [f"## {title}", ""]
            if model is not None:
                lines += [_docstring(model), ""]
            lines += ["| setting | environment variable | type | default | description |",
                      "| --- | --- | --- | --- | --- |"]
        kind = _type_name(info.annotation)
        bounds = _bounds(info)
        kind = f"{kind} ({bounds})" if bounds else kind
        lines.append(f"| `{dotted}` | `{env_variable(dotted)}` | {_cell(kind)} | {_cell(_default(info))} | "
                     f"{_description(info)} |")
    # a blank line after each table: the group headings above start the next one
    out, previous = [], ""
    for line in lines:
        if line.startswith("## ") and previous.startswith("|"):
            out.append("")
        out.append(line)
        previous = line
    return "\n".join(out).rstrip() + "\n"


def tables_markdown() -> str:
    """The generated table reference inside docs/data-path.md (without the markers)."""
    lines = []
    for model, where in TABLES:
        lines += [f"### `{model.__name__}`", "", f"{_docstring(model)} Where: {where}.", "",
                  "| column | type | description |", "| --- | --- | --- |"]
        for name, info in model.model_fields.items():
            kind = _type_name(info.annotation)
            bounds = _bounds(info)
            kind = f"{kind} ({bounds})" if bounds else kind
            lines.append(f"| `{name}` | {_cell(kind)} | {_description(info)} |")
        lines.append("")
    return "\n".join(lines)


def with_tables(page: str) -> str:
    """``page`` (docs/data-path.md) with its generated block replaced by the current one."""
    if BEGIN not in page or END not in page:
        raise ValueError(f"{DATA_PATH_DOC} lacks the markers {BEGIN!r} ... {END!r} around the table reference")
    head, _, rest = page.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n\n{tables_markdown()}\n{END}{tail}"


def expected_pages(root: Path = ROOT) -> dict[Path, str]:
    """What each generated page should contain now, by path relative to ``root``."""
    return {SETTINGS_DOC: settings_markdown(),
            DATA_PATH_DOC: with_tables((root / DATA_PATH_DOC).read_text(encoding="utf-8"))}


def stale_pages(root: Path = ROOT) -> list[Path]:
    """The generated pages that differ from what the code generates now."""
    stale = []
    for relative, text in expected_pages(root).items():
        path = root / relative
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(relative)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m radground.reference_docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report stale pages (exit 1), write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages(args.root)
        for relative in stale:
            print(f"{relative} is out of date with the code: run `{COMMAND}`", file=sys.stderr)
        return 1 if stale else 0
    for relative, text in expected_pages(args.root).items():
        path = args.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {relative}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The README and docs/ are the user's only map: complete, current, and every link leads somewhere.

- docs/settings.md and the table reference in docs/data-path.md are generated from the code
  (radground/reference_docs.py) and must match it; every setting has a description.
- No link leaves the repository for ../shared (a clone does not have it), and every relative
  link (and #anchor) in README.md and docs/ resolves.
- Tables render as one table (a blank line inside one splits it), the README's settings
  example is valid settings, and `make help` and the README say how long the slow targets take.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from radground import reference_docs
from radground.settings import ENV_PREFIX, Settings, _Group, load_settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images
FENCE = re.compile(r"^(```|~~~)")


def _prose(page: Path) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation removed, spaces to hyphens."""
    anchors = set()
    for _, line in _prose(page):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_the_docs_folder_has_the_pages_the_readme_promises() -> None:
    names = {p.name for p in PAGES}
    assert {"architecture.md", "data-path.md", "drop-format.md", "settings.md", "method.md"} <= names


def test_the_settings_reference_is_generated_from_the_current_model() -> None:
    stale = reference_docs.stale_pages(ROOT)
    assert not stale, (f"{', '.join(map(str, stale))} out of date with radground/settings.py or radground/schemas.py: "
                       f"run `{reference_docs.COMMAND}` (.venv/bin/python -m radground.reference_docs) and commit "
                       "the result")


def test_every_setting_and_group_has_a_description_and_appears_in_the_reference() -> None:
    page = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    missing = [name for name, info, _ in reference_docs.settings_fields() if not (info.description or "").strip()]
    assert not missing, f"settings without description=... in radground/settings.py: {missing}"
    groups = [f.annotation for f in Settings.model_fields.values()
              if isinstance(f.annotation, type) and issubclass(f.annotation, _Group)]
    assert all((g.__doc__ or "").strip() for g in groups), "every settings group needs a docstring"
    for name, _, _ in reference_docs.settings_fields():
        variable = ENV_PREFIX + name.replace(".", "__").upper()
        assert f"`{variable}`" in page and f"`{name}`" in page, name


def test_the_generator_notices_a_stale_page(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    data_path = (ROOT / "docs" / "data-path.md").read_text(encoding="utf-8")
    (tmp_path / "docs" / "data-path.md").write_text(data_path.replace("| `image_id` |", "| `imageid` |", 1))
    (tmp_path / "docs" / "settings.md").write_text("# Settings reference\n")
    assert reference_docs.main(["--check", "--root", str(tmp_path)]) == 1
    assert reference_docs.main(["--root", str(tmp_path)]) == 0  # rewrites both
    assert reference_docs.stale_pages(tmp_path) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_points_at_files_a_clone_does_not_have(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for gone in ("../shared", "shared/ARCHITECTURE.md", "shared/DOMAIN.md"):
        assert gone not in text, f"{page.name} refers to {gone}, which is not in the repository"
    assert not re.search(r"(?<![\w/])(ARCHITECTURE|DOMAIN)\.md", text), f"{page.name} names a file outside the repo"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_to_a_file_and_heading_in_the_repository(page: Path) -> None:
    broken = []
    prose = dict(_prose(page))
    # Whole text (code blocks blanked), so a link whose text wraps onto the next line is seen too.
    text = "\n".join(prose.get(n, "") for n in range(1, max(prose, default=0) + 1))
    for match in LINK.finditer(text):
        target, number = match.group(1), text.count("\n", 0, match.start()) + 1
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            broken.append(f"line {number}: {target} (no such file in the repository)")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {resolved.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_tables_are_not_split_by_blank_lines(page: Path) -> None:
    # A table row after a blank line starts a new table: that is only right when a header
    # separator (| --- |) follows it. Otherwise Markdown renders the row as text.
    lines = _prose(page)
    split = [number for (number, line), (_, previous), (_, following) in zip(lines[1:], lines, lines[2:], strict=False)
             if line.lstrip().startswith("|") and not previous.strip() and not re.match(r"\s*\|\s*-", following)]
    assert not split, f"{page.name}: table rows at lines {split} follow a blank line inside a table"


def test_the_readme_stage_table_is_one_table() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| stage | output |")
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    stages = [row.split("|")[1].strip() for row in table[2:]]
    assert stages[0] == "synth" and stages[-4:] == ["train", "evaluate", "register + promote", "predict"], stages
    rebuild = ("ingest", "curate", "segment", "ground", "quality + version")
    assert {f"rebuild: {stage}" for stage in rebuild} <= set(stages)


def test_the_readme_settings_example_is_valid_settings(tmp_path: Path, clean_env) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Settings"):text.index("## Object store")]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    config = tmp_path / "settings.yaml"
    config.write_text(example)
    settings = load_settings(config)  # raises ConfigError naming the bad key if the example drifts
    assert settings.storage.backend == yaml.safe_load(example)["storage"]["backend"]


def test_make_help_and_the_readme_say_how_long_the_slow_targets_take() -> None:
    done = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in ("test", "test-fast", "bench"):
        assert re.search(r"~\d+(-\d+)? min", lines[target]), f"make help: {lines[target]!r} states no duration"
        row = next(line for line in readme.splitlines() if f"`make {target}`" in line and "min" in line)
        assert re.search(r"~\d+(–\d+)? min", row), row

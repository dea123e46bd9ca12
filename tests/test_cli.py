"""The radground command line, run as a user runs it: a real subprocess."""

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RADGROUND_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "radground", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("synth", "version", "demo", "config"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["synth", "version", "demo", "config", "rebuild"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_version_prints_radground_version():
    from radground import __version__

    result = run_cli("version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_error_is_one_line_with_exit_code_and_debug_shows_traceback(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    result = run_cli("synth", str(busy), "--patients", "1")
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one message, soft-wrapped at most
    debug = run_cli("--debug", "synth", str(busy), "--patients", "1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_invalid_setting_is_reported_without_traceback(tmp_path):
    result = run_cli("config", "show", env={"RADGROUND_STORAGE__BACKEND": "ftp"})
    assert result.returncode == 2
    assert "storage.backend = 'ftp'" in result.stderr and "Traceback" not in result.stderr


def test_config_show_masks_secrets(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("storage:\n  backend: s3\n  bucket: site-a\n", encoding="utf-8")
    result = run_cli("--config", str(config), "config", "show",
                     env={"RADGROUND_STORAGE__SECRET_KEY": "very-secret-value"})
    assert result.returncode == 0, result.stderr
    assert "site-a" in result.stdout
    assert "very-secret-value" not in result.stdout + result.stderr


def test_synth_writes_a_drop_and_summary(tmp_path):
    out = tmp_path / "drop"
    result = run_cli("synth", str(out), "--patients", "1", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (out / "reports.csv").is_file() and (tmp_path / "drop.truth.json").is_file()
    assert "DICOM files" in result.stdout


# ----------------------------------------------------------------------------- where am I (data_dir), env typos


def _write_versions(data_dir, tags=("a", "b", "c")) -> list[str]:
    """Fabricated versions (manifest + lineage table each, the last one LATEST); their digests, oldest first.

    Small and fast: the CLI only reads manifests, LATEST and lineage tables; a real build is tested in
    tests/flows/test_rebuild.py.
    """
    import hashlib

    from radground.lineage import LineageRecord, write_lineage
    from tasks.version import Manifest, ShardEntry, TableEntry

    root = data_dir / "versions"
    root.mkdir(parents=True, exist_ok=True)
    digests, parent = [], None
    for i, tag in enumerate(tags):
        digest = hashlib.sha256(tag.encode()).hexdigest()
        manifest = Manifest(digest=digest, parent_digest=parent, drops=[f"site-{tag}"], code_version="t",
                            settings_hash="s", tables={"images": TableEntry(rows=3 + i, shards=[])},
                            splits=ShardEntry(path="splits.parquet", sha256="0" * 64, rows=1), quarantine_counts={},
                            created_by="test", created_at=f"2026-01-0{i + 1}T00:00:00+00:00")
        (root / digest[:16]).mkdir()
        (root / digest[:16] / "manifest.json").write_text(manifest.model_dump_json(), encoding="utf-8")
        write_lineage([LineageRecord(image_id=f"2.25.{i}", drop_id=f"site-{tag}", source_sha256="1" * 64,
                                     series_uid="2.25.9", study_uid="2.25.8", patient_pseudonym="P" + "A" * 20,
                                     version_digest=digest)], data_dir / "lineage" / f"{digest[:16]}.parquet")
        digests.append(digest)
        parent = digest
    (root / "LATEST").write_text(parent[:16], encoding="utf-8")
    return digests


def test_reading_commands_in_an_empty_data_dir_name_it_and_say_how_to_point_at_another(tmp_path):
    somewhere = tmp_path / "elsewhere"
    somewhere.mkdir()
    default = f"data_dir: {somewhere / '.radground'} (default ./.radground"
    listed = run_cli("datasets", "list", cwd=somewhere)
    assert listed.returncode == 0 and default in listed.stderr
    assert "holds no dataset versions" in listed.stderr
    assert "RADGROUND_DATA_DIR" in listed.stderr and "--config" in listed.stderr
    for command in (["datasets", "show", "ca978112ca1bbdca"], ["lineage", "trace", "ca978112ca1bbdca"],
                    ["datasets", "pull", "ca978112ca1bbdca"], ["show", "2.25.1"]):
        result = run_cli(*command, cwd=somewhere)
        flat = " ".join(result.stderr.split())
        assert result.returncode == 2, (command, result.stderr)
        assert default in flat and "RADGROUND_DATA_DIR" in flat and "--config" in flat, command
        assert "lineage index" not in flat and "Traceback" not in flat
    assert not (somewhere / ".radground").exists()  # reading created nothing there


def test_reading_commands_say_where_their_data_dir_comes_from(tmp_path):
    data = tmp_path / "data"
    _write_versions(data)
    from_env = run_cli("datasets", "list", env={"RADGROUND_DATA_DIR": str(data)}, cwd=tmp_path)
    assert from_env.returncode == 0 and f"data_dir: {data} (from RADGROUND_DATA_DIR)" in from_env.stderr
    assert "holds no dataset versions" not in from_env.stderr
    config = tmp_path / "site.yaml"
    config.write_text("data_dir: data\n", encoding="utf-8")  # relative: to the current directory
    from_file = run_cli("config", "show", "--config", str(config), cwd=tmp_path)
    assert from_file.returncode == 0 and f"data_dir: {data} (from config file {config})" in from_file.stderr


def test_misspelt_radground_variables_warn_with_the_closest_setting_and_never_the_value(tmp_path):
    secret = "s3cr3t-value-do-not-print"
    env = {"RADGROUND_STORAGE_BACKEND": "s3", "RADGROUND_DEID_KEY": secret, "RADGROUND_DATA_DIR": str(tmp_path),
           "RADGROUND_CONFIG": "", "RADGROUND_VENV_CACHE": str(tmp_path), "RADGROUND_TEST_FAULT": "x"}
    result = run_cli("config", "show", env=env)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    flat = " ".join(result.stderr.split())
    assert "RADGROUND_STORAGE_BACKEND matches no setting" in flat and "RADGROUND_STORAGE__BACKEND" in flat
    assert "RADGROUND_DEID_KEY matches no setting" in flat and "RADGROUND_DEID__KEY (deid.key)" in flat
    assert len(warnings) == 2  # the project's own variables (config file, venv cache, tests) are known
    assert secret not in result.stdout + result.stderr
    assert '"backend": "local"' in result.stdout  # the misspelt variable really was ignored


# ----------------------------------------------------------------------------- --config before or after


@pytest.mark.parametrize("command", [["config", "show"], ["datasets", "list"], ["datasets", "list", "--json"],
                                     ["datasets", "show", "{v}"], ["lineage", "trace", "{v}"]])
def test_config_works_before_and_after_the_command(tmp_path, command):
    data = tmp_path / "data"
    digest = _write_versions(data)[-1]
    config = tmp_path / "site.yaml"
    config.write_text(f"data_dir: {data}\n", encoding="utf-8")
    args = [arg.format(v=digest[:16]) for arg in command]
    after = "-c" if command == ["config", "show"] else "--config"  # the short form too, once
    for argv in (["--config", str(config), *args], [*args, after, str(config)]):
        result = run_cli(*argv, cwd=tmp_path)
        assert result.returncode == 0, (argv, result.stderr)
        assert f"data_dir: {data} (from config file {config})" in result.stderr, argv
        if command[0] != "config":
            assert digest[:16] in result.stdout, argv


def test_config_given_twice_or_without_a_file_is_a_usage_error(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("data_dir: data\n", encoding="utf-8")
    twice = run_cli("--config", str(config), "config", "show", "--config", str(config))
    assert twice.returncode == 2 and "more than once" in twice.stderr
    bare = run_cli("config", "show", "--config")
    assert bare.returncode == 2 and "needs a YAML settings file" in bare.stderr


def test_config_option_first_leaves_positionals_after_double_dash_alone():
    from radground.cli import config_option_first

    assert config_option_first(["datasets", "list", "--config", "a.yaml", "--json"]) == [
        "--config", "a.yaml", "datasets", "list", "--json"]
    assert config_option_first(["--debug", "config", "show", "--config=a.yaml"]) == [
        "--config=a.yaml", "--debug", "config", "show"]
    assert config_option_first(["keywords", "--", "--config"]) == ["keywords", "--", "--config"]


# ----------------------------------------------------------------------------- help text


COMMANDS = [[], ["version"], ["synth"], ["rebuild"], ["keywords"], ["show"], ["demo"], ["forget"], ["config"],
            ["config", "show"], ["datasets"], ["datasets", "list"], ["datasets", "show"], ["datasets", "pull"],
            ["lineage"], ["lineage", "trace"], ["lineage", "where-used"]]


# The commands whose options this module's owner keeps: their values are named (N, de|en, PNG), not typed.
NAMED_VALUES = (["synth"], ["keywords"], ["show"], ["datasets", "show"], ["datasets", "pull"], ["lineage", "trace"])


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "radground")
def test_help_shows_no_value_after_a_flag(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout  # flags take no value
    assert "-h, --help  " in result.stdout or "-h, --help\n" in result.stdout
    if command in NAMED_VALUES:
        options = result.stdout.split("Options:")[1]
        assert "<int range>" not in options and "<str>" not in options and "<path>" not in options


# ----------------------------------------------------------------------------- digests


def test_datasets_list_prints_whole_ids_and_json_with_full_digests(tmp_path):
    import json

    data = tmp_path / "data"
    digests = _write_versions(data)
    env = {"RADGROUND_DATA_DIR": str(data), "COLUMNS": "60"}  # a narrow terminal must not cut an id
    table = run_cli("datasets", "list", env=env)
    assert table.returncode == 0, table.stderr
    for digest in digests:
        assert digest[:16] in table.stdout
    assert "…" not in table.stdout.split("┃")[0]
    listed = json.loads(run_cli("datasets", "list", "--json", env=env).stdout)
    assert [v["digest"] for v in listed] == digests[::-1]  # newest first, whole digests
    assert [v["latest"] for v in listed] == [True, False, False]
    assert listed[0]["parent_digest"] == digests[1] and listed[0]["version"] == digests[2][:16]
    assert listed[0]["rows"] == {"images": 5}


def test_every_printed_or_documented_digest_form_works_with_show_and_trace(tmp_path, monkeypatch):
    import json

    from radground import cli
    from radground.errors import ConfigError
    from radground.settings import load_settings

    data = tmp_path / "data"
    digests = _write_versions(data)
    env = {"RADGROUND_DATA_DIR": str(data)}
    listed = json.loads(run_cli("datasets", "list", "--json", env=env).stdout)
    target = digests[1]
    printed = listed[1]["version"]
    shown = run_cli("datasets", "show", printed, env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["digest"] == target, shown.stderr
    traced = run_cli("lineage", "trace", printed, env=env)
    assert traced.returncode == 0 and json.loads(traced.stdout)["version_digest"] == target, traced.stderr
    # The other forms the help names, in process (the same function every command resolves with).
    monkeypatch.setattr(cli, "state", cli._State(_settings=load_settings(data_dir=data)))
    for form in (target, target[:cli.MIN_DIGEST_PREFIX], target[:12].upper(), f" {printed} "):
        assert cli._version_dir(form).name == printed, form
    with pytest.raises(ConfigError, match="8 to 64 hex characters"):
        cli._version_dir(target[:cli.MIN_DIGEST_PREFIX - 1])
    with pytest.raises(ConfigError, match="does not start with it"):
        cli._version_dir(target[:16] + "0" * 48)
    with pytest.raises(ConfigError, match="no dataset version in .* starts with it"):
        cli._version_dir("0" * 16)
    with pytest.raises(ConfigError, match="2 versions in .* start with it"):
        cli._resolve_version("abcdef01", ["abcdef0123456789", "abcdef01ffffffff"], data, "no versions")


@pytest.mark.integration
def test_datasets_pull_takes_the_printed_id_and_a_short_prefix(tmp_path):
    import shutil

    from radground.dvc import DvcRepo
    from radground.settings import load_settings

    data = tmp_path / "data"
    digests = _write_versions(data, tags=("a", "b"))
    repo = DvcRepo(data / "versions", load_settings(data_dir=data))
    repo.init()
    for digest in digests:
        repo.track(data / "versions" / digest[:16])
    repo.push()
    env = {"RADGROUND_DATA_DIR": str(data)}
    for form in (digests[0][:16], digests[0][:8]):
        shutil.rmtree(data / "versions" / digests[0][:16])
        pulled = run_cli("datasets", "pull", form, env=env)
        assert pulled.returncode == 0, (form, pulled.stderr)
        assert (data / "versions" / digests[0][:16] / "manifest.json").is_file()
    missing = run_cli("datasets", "pull", "0" * 16, env=env)
    # rich wraps the message at a width that depends on the tmp path's length: compare it unwrapped
    assert missing.returncode == 2 and "no dataset version in" in " ".join(missing.stderr.split())


# ----------------------------------------------------------------------------- show --lang


def _one_grounded_slice(data_dir, language: str) -> str:
    """One 8x8 CT slice with a liver mask grounded by a keyword in ``language``; returns its image_id."""
    import numpy as np

    from radground.masks import encode_rle
    from radground.schemas import GroundingRecord, ImageRecord
    from radground.settings import load_settings
    from radground.store import open_store
    from radground.tables import write_table

    store = open_store(load_settings(data_dir=data_dir))
    image_id = "2.25.424242"
    pixels = np.full((8, 8), 40, dtype="<i2")
    write_table(store, "ingest/site-x/images/s.parquet", [ImageRecord(
        image_id=image_id, patient_pseudonym="P" + "A" * 20, study_uid="2.25.1", series_uid="2.25.2",
        drop_id="site-x", modality="CT", body_part=None, study_date=None, slice_index=0, slice_axis="axial",
        slice_position_mm=0.0, rows=8, cols=8, row_spacing_mm=1.0, col_spacing_mm=1.0, slice_thickness_mm=None,
        image_position=[0.0, 0.0, 0.0], image_orientation=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], pixel_dtype="int16",
        pixels=pixels.tobytes(), has_report=True, source_sha256="1" * 64)], ImageRecord)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    write_table(store, "ground/site-x/grounding.parquet", [GroundingRecord(
        image_id=image_id, study_uid="2.25.1", patient_pseudonym="P" + "A" * 20, drop_id="site-x",
        language=language, sentence_index=0, sentence="Leber o.B.", keyword="Leber", keyword_start=0,
        keyword_end=5, negated=False, class_id=5, class_name="liver", bbox=[2.0, 2.0, 6.0, 6.0],
        rle=encode_rle(mask), area_px=16, rows=8, cols=8)], GroundingRecord)
    return image_id


def test_show_in_a_language_the_report_lacks_says_why_nothing_is_labelled(tmp_path):
    data = tmp_path / "data"
    image_id = _one_grounded_slice(data, "de")
    env = {"RADGROUND_DATA_DIR": str(data)}
    german = run_cli("show", image_id, "--lang", "de", "--out", str(tmp_path / "de.png"), env=env)
    assert german.returncode == 0, german.stderr
    assert "1 grounded keyword(s) labelled (German)" in german.stderr
    english = run_cli("show", image_id, "--lang", "en", "--out", str(tmp_path / "en.png"), env=env)
    assert english.returncode == 0, english.stderr
    assert (tmp_path / "en.png").is_file()  # the masks are still drawn
    flat = " ".join(english.stderr.split())
    assert "this slice's report is German; no English keywords" in flat
    assert "Use --lang de" in flat and "translation" in flat


def test_rebuild_refuses_an_empty_drop_or_one_without_reports_before_anything_starts(tmp_path):
    data_dir = tmp_path / "data"
    empty = tmp_path / "delivery"
    empty.mkdir()
    result = run_cli("rebuild", str(empty), env={"RADGROUND_DATA_DIR": str(data_dir)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"drop {empty}: the folder is empty" in " ".join(result.stderr.split())
    (empty / "scan.dcm").write_bytes(b"DICM")
    result = run_cli("rebuild", str(empty), env={"RADGROUND_DATA_DIR": str(data_dir)})
    assert result.returncode == 2 and "no reports.csv at its top" in " ".join(result.stderr.split())
    assert len(result.stderr.strip().splitlines()) <= 4  # one message (soft-wrapped), nothing before it
    # refused before Prefect, Ray or the de-identification key: nothing was written under data_dir
    assert not data_dir.exists()


def test_config_reference_prints_the_generated_settings_reference():
    from radground.reference_docs import settings_markdown

    result = run_cli("config", "reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout == settings_markdown()  # the very text of docs/settings.md: it cannot drift
    assert "| `retention.keep_last` | `RADGROUND_RETENTION__KEEP_LAST` |" in result.stdout

"""Settings: defaults, environment, YAML file, precedence, validation messages, secrets."""

from pathlib import Path

import pytest

from radground.errors import ConfigError
from radground.settings import load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # A developer's own RADGROUND_* variables must not leak into these tests.
    import os

    for name in list(os.environ):
        if name.startswith("RADGROUND_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_embedded_setup():
    settings = load_settings()
    assert settings.data_dir == Path(".radground")
    assert settings.storage.backend == "local"
    assert settings.store_root == Path(".radground") / "store"


def test_environment_sets_nested_groups(monkeypatch, tmp_path):
    monkeypatch.setenv("RADGROUND_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RADGROUND_STORAGE__BACKEND", "s3")
    monkeypatch.setenv("RADGROUND_STORAGE__ENDPOINT", "https://minio.example.org:9000")
    monkeypatch.setenv("RADGROUND_STORAGE__SECRET_KEY", "s3cr3t-value")
    settings = load_settings()
    assert settings.data_dir == tmp_path
    assert settings.storage.backend == "s3"
    assert settings.storage.endpoint == "https://minio.example.org:9000"
    assert settings.storage.secret_key.get_secret_value() == "s3cr3t-value"


def test_yaml_file_and_env_precedence(monkeypatch, tmp_path):
    config = tmp_path / "radground.yaml"
    config.write_text(
        "data_dir: /srv/radground\nstorage:\n  backend: s3\n  bucket: from-yaml\n  region: eu-central-1\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("RADGROUND_STORAGE__BUCKET", "from-env")
    settings = load_settings(config)
    assert settings.data_dir == Path("/srv/radground")
    assert settings.storage.region == "eu-central-1"  # from the file
    assert settings.storage.bucket == "from-env"  # the environment wins over the file
    # A later load without the file is unaffected by the earlier one.
    assert load_settings().storage.region == "us-east-1"


def test_invalid_value_names_setting_value_and_allowed(monkeypatch):
    monkeypatch.setenv("RADGROUND_STORAGE__BACKEND", "gcs")
    with pytest.raises(ConfigError, match=r"storage\.backend = 'gcs'.*'local' or 's3'.*RADGROUND_STORAGE__BACKEND"):
        load_settings()


def test_invalid_endpoint_says_what_is_expected():
    with pytest.raises(ConfigError, match=r"storage\.endpoint = 'minio:9000'.*expected a URL"):
        load_settings(storage={"endpoint": "minio:9000"})


def test_unknown_setting_in_yaml_is_rejected(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("storage:\n  bakend: s3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"storage\.bakend is not a known setting"):
        load_settings(config)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_settings(tmp_path / "nope.yaml")


def test_secrets_never_appear_in_public_dict_hash_or_errors(monkeypatch):
    secret = "hunter2-do-not-print"
    settings = load_settings(storage={"secret_key": secret, "access_key": "AKIAEXAMPLE"})
    assert secret not in repr(settings)
    assert secret not in str(settings.public_dict())
    assert settings.public_dict()["storage"]["secret_key"] == "**********"
    # Same public settings, different secret: the hash must not depend on the secret.
    other = load_settings(storage={"secret_key": "another", "access_key": "AKIAEXAMPLE"})
    assert settings.settings_hash() == other.settings_hash()
    monkeypatch.setenv("RADGROUND_STORAGE__SECRET_KEY", secret)
    monkeypatch.setenv("RADGROUND_STORAGE__MAX_ATTEMPTS", "zero")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert secret not in str(info.value)


def test_settings_hash_changes_with_a_setting():
    assert load_settings().settings_hash() != load_settings(storage={"bucket": "other-bucket"}).settings_hash()


def test_stage_hash_follows_only_the_settings_a_stage_reads(tmp_path):
    from radground.settings import STAGE_GROUPS

    base = load_settings()
    changed = {
        "segmentation": load_settings(segmentation={"backend": ["classical", "sam"]}),
        "min_area": load_settings(grounding={"min_area_px": 10}),
        "llm": load_settings(llm={"backend": "openai"}),
        "operational": load_settings(ingest={"tasks_per_cpu": 8}, llm={"max_concurrency": 64},
                                     grounding={"overlays": 3}, data_dir=tmp_path, ray={"num_cpus": 8}),
    }

    def moved(settings):
        return {stage for stage in STAGE_GROUPS if settings.stage_hash(stage) != base.stage_hash(stage)}

    assert moved(changed["segmentation"]) == {"segment"}
    assert moved(changed["min_area"]) == {"segment", "ground"}  # segment drops masks below it, ground too
    assert moved(changed["llm"]) == {"curate"}
    assert moved(changed["operational"]) == set()  # speed and paths never invalidate outputs
    assert changed["operational"].content_hash() == base.content_hash()
    assert changed["llm"].content_hash() != base.content_hash()


def test_split_shares_must_sum_to_one():
    with pytest.raises(ConfigError, match=r"version = .*sum to 1 \(they sum to 1.1\)"):
        load_settings(version={"train": 0.8, "val": 0.2, "test": 0.1})


def test_a_broken_yaml_file_is_named_with_line_and_column_but_not_quoted(tmp_path):
    # PyYAML's own message quotes the lines around the error, which here hold the key.
    config = tmp_path / "radground.yaml"
    config.write_text('deid:\n  key: "k3y-SECRET-4711\n  date_shift_max_days: [\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cannot be read as YAML settings \(\w+Error at line \d+, column \d+\)"
                                          r"\. Fix the YAML syntax there\.") as err:
        load_settings(config)
    assert "SECRET" not in str(err.value)


def test_misspelt_environment_variables_are_named_with_the_closest_setting():
    from radground.settings import unknown_env_warnings

    environ = {"RADGROUND_STORAGE_BACKEND": "s3", "RADGROUND_DATADIR": "/x", "RADGROUND_LLM__MODEL": "m",
               "RADGROUND_STORAGE__BAKEND": "s3", "RADGROUND_CONFIG": "a.yaml", "RADGROUND_VENV_CACHE": "/c",
               "RADGROUND_TEST_FAULT": "x", "RADGROUND_NOTHING_LIKE_IT": "hunter2-secret", "HOME": "/root"}
    warnings = unknown_env_warnings(environ)
    assert len(warnings) == 3, warnings  # a known group's unknown field is load_settings' error, not a warning
    datadir, nothing, backend = warnings  # sorted by name
    assert backend.startswith("environment variable RADGROUND_STORAGE_BACKEND matches no setting")
    assert "RADGROUND_STORAGE__BACKEND (storage.backend)" in backend and "two underscores" in backend
    assert "RADGROUND_DATA_DIR (data_dir)" in datadir
    assert "RADGROUND_NOTHING_LIKE_IT" in nothing and "radground config show" in nothing
    assert not any(value in " ".join(warnings) for value in ("s3", "/x", "hunter2-secret"))


def test_unknown_setting_names_the_closest_known_one(tmp_path, monkeypatch):
    config = tmp_path / "bad.yaml"
    config.write_text("data_dri: /srv\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data_dri is not a known setting .*did you mean data_dir\?"):
        load_settings(config)
    monkeypatch.setenv("RADGROUND_STORAGE__BAKEND", "s3")
    with pytest.raises(ConfigError, match=r"storage\.bakend is not a known setting .*did you mean storage\.backend\?"):
        load_settings()


def test_data_dir_origin_follows_the_settings_priority(tmp_path):
    from radground.settings import data_dir_origin

    with_dir = tmp_path / "with.yaml"
    with_dir.write_text("data_dir: /srv/radground\n", encoding="utf-8")
    without = tmp_path / "without.yaml"
    without.write_text("log_level: DEBUG\n", encoding="utf-8")
    assert data_dir_origin(None, {}) == "default ./.radground, relative to the current directory"
    assert data_dir_origin(without, {}).startswith("default")
    assert data_dir_origin(with_dir, {}) == f"from config file {with_dir}"
    assert data_dir_origin(with_dir, {"RADGROUND_DATA_DIR": "/x"}) == "from RADGROUND_DATA_DIR"  # env wins

"""The de-identification key: from settings, or generated once under data_dir; never logged."""

import logging
import re
import stat

import pytest

from radground.errors import DeidError
from radground.keys import load_key
from radground.settings import load_settings
from tasks.deid import patient_pseudonym


def test_load_key_prefers_the_setting(tmp_path, clean_env, caplog):
    secret = "s" * 20 + "-configured-deid-key"
    settings = load_settings(data_dir=tmp_path, deid={"key": secret})
    with caplog.at_level(logging.DEBUG):
        assert load_key(settings) == secret.encode()
    assert not (tmp_path / "secrets").exists()
    assert secret not in caplog.text


def test_load_key_creates_a_private_key_file_once(tmp_path, clean_env, caplog):
    settings = load_settings(data_dir=tmp_path)
    with caplog.at_level(logging.DEBUG):
        first = load_key(settings)
        second = load_key(settings)
    path = tmp_path / "secrets" / "deid.key"
    assert first == second == path.read_text().strip().encode()
    assert re.fullmatch(rb"[0-9a-f]{64}", first)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(path.parent.glob("*.tmp"))
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and str(path) in warnings_[0].getMessage()
    key_text = first.decode()
    assert key_text not in caplog.text
    assert all(key_text not in r.getMessage() and key_text not in repr(r.args) for r in caplog.records)
    # The file's text is the key: setting it explicitly gives the same pseudonyms.
    explicit = load_key(load_settings(data_dir=tmp_path / "other", deid={"key": key_text}))
    assert patient_pseudonym(explicit, "123") == patient_pseudonym(first, "123")


def test_load_key_refuses_a_damaged_key_file(tmp_path, clean_env):
    path = tmp_path / "secrets" / "deid.key"
    path.parent.mkdir()
    path.write_text("too-short\n")
    path.chmod(0o600)
    with pytest.raises(DeidError, match="expected 64 hex characters") as info:
        load_key(load_settings(data_dir=tmp_path))
    assert "too-short" not in str(info.value)
    assert path.read_text() == "too-short\n"  # never silently replaced: that would break linkage

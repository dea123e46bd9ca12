"""The de-identification key: the one secret that links pseudonyms across drops.

Whoever holds it can re-link pseudonyms to patients, so it lives apart from the data
(``<data_dir>/secrets/``, mode 0600, or ``deid.key`` from the environment) and is never
logged, hashed into settings or written to an artifact.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from radground.errors import DeidError
from radground.settings import Settings

logger = logging.getLogger(__name__)

KEY_FILE = Path("secrets") / "deid.key"
MIN_KEY_BYTES = 32


def load_key(settings: Settings) -> bytes:
    """The HMAC key: ``settings.deid.key`` if set, else <data_dir>/secrets/deid.key.

    The file is created on first use (32 random bytes as 64 hex characters, mode 0600) and
    a WARNING says so, once. Its text is the key, exactly as if it were set as
    RADGROUND_DEID__KEY, so the two are interchangeable. The key itself is never logged.
    """
    if settings.deid.key is not None:
        return settings.deid.key.get_secret_value().encode("utf-8")
    path = settings.data_dir / KEY_FILE
    if not path.exists():
        _create_key_file(path)
    return _read_key_file(path)


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = (secrets.token_bytes(32).hex() + "\n").encode("ascii")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits; make the mode exact
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # A hard link publishes the complete file atomically and fails if a concurrent
        # process won the race, so two workers can never end up with two keys.
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError:  # file systems without hard links
        created = _create_exclusive(path, text)
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        logger.warning(
            "deid: generated a new de-identification key at %s (mode 0600). Back it up and keep "
            "it apart from the data: later drops get the same pseudonyms only with this key, and "
            "whoever holds it can re-link them. Set deid.key (RADGROUND_DEID__KEY) to manage it "
            "yourself.",
            path,
        )


def _create_exclusive(path: Path, text: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read_key_file(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "deid: key file %s has mode %o; others can read it. Run `chmod 600 %s`.", path, mode, path
        )
    text = path.read_text(encoding="utf-8").strip()
    if len(text) < MIN_KEY_BYTES:
        raise DeidError(
            f"de-identification key file {path} holds {len(text)} characters; expected 64 hex "
            "characters. Restore it from your backup (a new key would break the link to earlier "
            "drops), or set deid.key (RADGROUND_DEID__KEY)."
        )
    return text.encode("utf-8")

"""Names in data_dir's layout that every layer uses: how a dataset version folder is named and referred to.

A version folder (and its ``versions/<name>.dvc``) is named by the first 16 hex characters of the version
digest, which `radground datasets list` prints; a command takes any prefix of 8 (32 bits: rarely two
versions, and when they are, the command says so) up to all 64.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

FOLDER_DIGEST_LENGTH = 16
MIN_DIGEST_PREFIX = 8


def match_version(version: str, names: Sequence[str], where: Path, *, error: type[Exception]) -> str:
    """The one of ``names`` (version folder names) that the digest prefix ``version`` names, else ``error``
    saying what was wrong: not hex, no match, or more than one. (More than 16 characters: the caller checks
    them against the manifest's full digest.)"""
    wanted = version.strip().lower()
    if not (MIN_DIGEST_PREFIX <= len(wanted) <= 64 and all(c in "0123456789abcdef" for c in wanted)):
        raise error(f"version {version!r}: expected {MIN_DIGEST_PREFIX} to 64 hex characters of a version digest "
                    f"(the {FOLDER_DIGEST_LENGTH} `radground datasets list` prints will do).")
    matches = sorted(name for name in names if name.startswith(wanted[:FOLDER_DIGEST_LENGTH]))
    if not matches:
        raise error(f"version {wanted}: no dataset version in {where} starts with it. Run `radground datasets "
                    "list` for the digests, or `radground rebuild` first.")
    if len(matches) > 1:
        raise error(f"version {wanted}: {len(matches)} versions in {where} start with it ({', '.join(matches)}); "
                    "give more of the digest.")
    return matches[0]

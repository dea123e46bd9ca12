"""watch-drops: which drops in the inbox have landed (complete, quiet, not seen before).

The inbox (``watch.inbox``) is a folder, or ``store:PREFIX`` in the object store, whose
sub-folders (sub-prefixes) are drops. A drop has *landed* when

* its completion marker (``watch.marker``, default ``drop.yaml``, written last by the sender)
  is at its top,
* its listing (relative path, size, modification time or ETag of every file) has not changed
  for ``watch.quiet_s`` seconds, seen on two scans at least that far apart, and
* the drop registry does not know its location yet, and no earlier scan accepted it.

:func:`observe` is the pure decision (listing + remembered state + clock -> new state and the
drops that landed); :func:`landed_events` turns those into the Prefect events to emit, so both
are testable without a server. What a scan saw is remembered in ``<data_dir>/state/inbox.json``:
locations and listing hashes only, never a file name or content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from radground.buildstate import BuildStateError, DropRegistry
from radground.errors import RadgroundError
from radground.settings import Settings
from radground.store import StoreError, open_store
from tasks.discover import STORE_SCHEME, canonical_location

LANDED_EVENT = "radground.drop.landed"
STATE_FILE = "inbox.json"


class InboxError(RadgroundError):
    """The inbox cannot be watched as configured."""


@dataclass(frozen=True)
class Seen:
    """One drop in the inbox listing: its canonical URI, a hash of its listing, and whether the marker is there."""

    uri: str
    signature: str
    has_marker: bool


def _signature(entries: Iterable[tuple[str, int, str]]) -> str:
    blob = json.dumps(sorted(entries), separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- listing (I/O)
def list_inbox(settings: Settings) -> dict[str, Seen]:
    """The drops under ``watch.inbox`` right now, by canonical URI."""
    inbox = settings.watch.inbox
    if not inbox:
        raise InboxError("watch.inbox is not set, so watch-drops has nothing to watch. Set it (env "
                         "RADGROUND_WATCH__INBOX) to the folder, or store:PREFIX, where drops are delivered.")
    if inbox.startswith(STORE_SCHEME):
        files = _store_files(settings, inbox[len(STORE_SCHEME):].strip("/"))
        base = STORE_SCHEME + inbox[len(STORE_SCHEME):].strip("/")
    else:
        root = Path(inbox).expanduser()
        if not root.is_dir():
            raise InboxError(f"watch.inbox {inbox}: no such folder. Create it, or point watch.inbox "
                             "(env RADGROUND_WATCH__INBOX) at the folder where drops are delivered.")
        files = _folder_files(root)
        base = str(root.resolve())
    by_drop: dict[str, list[tuple[str, int, str]]] = {}
    for relative, size, stamp in files:
        name, sep, rest = relative.partition("/")
        if not sep or name.startswith("."):  # a loose file at the inbox top, or a hidden upload folder
            continue
        by_drop.setdefault(name, []).append((rest, size, stamp))
    seen = {}
    for name, entries in by_drop.items():
        uri = canonical_location(f"{base}/{name}")
        seen[uri] = Seen(uri=uri, signature=_signature(entries),
                         has_marker=any(rest == settings.watch.marker for rest, _, _ in entries))
    return seen


def _folder_files(root: Path) -> list[tuple[str, int, str]]:
    files = []
    for path in root.rglob("*"):
        try:
            if not path.is_file():
                continue
            stat = path.stat()
        except FileNotFoundError:  # moved away while listing: the next scan sees the change
            continue
        files.append((path.relative_to(root).as_posix(), stat.st_size, str(stat.st_mtime_ns)))
    return files


def _store_files(settings: Settings, prefix: str) -> list[tuple[str, int, str]]:
    """(path below prefix, size, ETag or mtime) of every object under ``prefix`` of the object store:
    sizes and stamps, not names only, show an upload still in progress."""
    below = prefix + "/" if prefix else ""
    try:
        objects = open_store(settings).list_stat(below)
    except StoreError as exc:
        raise InboxError(f"watch.inbox {STORE_SCHEME}{prefix}: {exc} Or use a folder inbox.") from None
    return [(key[len(below):], size, stamp) for key, size, stamp in objects]


# ----------------------------------------------------------------------------- the decision (pure)
def observe(seen: Mapping[str, Seen], state: Mapping[str, Any], registered: Iterable[str], now: float,
            quiet_s: float) -> tuple[dict[str, Any], list[str]]:
    """(new state, URIs that landed now). ``state`` is what the last scan returned (``{}`` at first);
    ``registered``: locations the drop registry already knows; ``now``: seconds (any fixed epoch)."""
    known = set(registered)
    before = dict(state.get("drops", {}))
    after: dict[str, Any] = {}
    landed = []
    for uri in sorted(seen):
        item, prev = seen[uri], before.get(uri)
        if uri in known or (prev is not None and prev.get("landed")):
            after[uri] = {"signature": item.signature, "since": prev["since"] if prev else now, "landed": True}
            continue
        if prev is None or prev.get("signature") != item.signature:
            after[uri] = {"signature": item.signature, "since": now, "landed": False}  # new, or still changing
            continue
        quiet = now - float(prev["since"]) >= quiet_s
        accepted = quiet and item.has_marker
        after[uri] = {"signature": item.signature, "since": prev["since"], "landed": accepted}
        if accepted:
            landed.append(uri)
    for uri, prev in before.items():  # gone from the inbox: forget it, unless it landed (once only)
        if uri not in after and prev.get("landed"):
            after[uri] = prev
    return {"drops": after}, landed


def resource_id(uri: str) -> str:
    """The event's resource: a hash of the location, so an event names no folder (the payload carries it)."""
    return "radground.drop." + hashlib.sha256(uri.encode()).hexdigest()[:16]


def landed_events(uris: Iterable[str]) -> list[dict[str, Any]]:
    """Keyword arguments of :func:`prefect.events.emit_event`, one per landed drop."""
    return [{"event": LANDED_EVENT, "resource": {"prefect.resource.id": resource_id(uri)},
             "payload": {"uri": uri}} for uri in uris]


# ----------------------------------------------------------------------------- state (I/O)
def state_path(settings: Settings) -> Path:
    path = settings.data_dir.resolve() / "state" / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def read_state(settings: Settings) -> dict[str, Any]:
    path = state_path(settings)
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise BuildStateError(f"{path} is not valid JSON (damaged by a crash or an edit?). Delete it: the next "
                              "watch-drops scan then starts over (drops the registry knows are not re-announced; "
                              "others are, once quiet again).") from None


def write_state(settings: Settings, state: Mapping[str, Any]) -> None:
    path = state_path(settings)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def state_lock(settings: Settings) -> FileLock:
    return FileLock(str(state_path(settings)) + ".lock", timeout=60)


def scan(settings: Settings, now: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One watch: (state to save once the events are out, events to emit). Call under :func:`state_lock`."""
    registered = {entry.get("location") for entry in DropRegistry(settings).entries().values()}
    state, landed = observe(list_inbox(settings), read_state(settings), registered, now, settings.watch.quiet_s)
    return state, landed_events(landed)

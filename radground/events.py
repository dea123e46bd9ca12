"""Prefect events radground emits (the triggers of prefect.yaml listen for them).

Events carry no PHI: a drop's canonical location (radground.drop.landed) or a version digest
(radground.retrain.requested), and a resource id that is a hash, never a path or a patient.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from radground.errors import RadgroundError

DROP_LANDED = "radground.drop.landed"
RETRAIN_REQUESTED = "radground.retrain.requested"

log = logging.getLogger(__name__)


class EventError(RadgroundError):
    """An event could not be handed to Prefect."""


def retrain_requested(digest: str) -> dict[str, Any]:
    """emit_event keyword arguments asking for a retrain on version ``digest``."""
    return {"event": RETRAIN_REQUESTED, "resource": {"prefect.resource.id": f"radground.version.{digest[:16]}"},
            "payload": {"version": digest}}


def emit(events: Iterable[Mapping[str, Any]]) -> int:
    """Send each event (emit_event keyword arguments) to Prefect's API; returns how many were sent.

    Raises EventError when Prefect has no events client here (no API configured): an event that
    silently vanished would leave a drop that never gets built.
    """
    from prefect.events import emit_event

    sent = 0
    for event in events:
        if emit_event(**event) is None:
            raise EventError(f"event {event['event']} was not sent: Prefect has no events client in this process. "
                             "Run it inside a flow run on a Prefect server (PREFECT_API_URL set).")
        log.info("emitted %s (%s)", event["event"], event["resource"]["prefect.resource.id"])
        sent += 1
    return sent

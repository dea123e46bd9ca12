"""Typed errors raised by radground library code.

Only the CLI turns these into exit codes. Every message names the input, what was
found, what was expected and what to do — and never carries PHI or secrets.
"""


class RadgroundError(Exception):
    """Base class for every error radground raises on purpose."""


class ConfigError(RadgroundError):
    """A setting is missing, malformed or not allowed."""


class StoreError(RadgroundError):
    """The object store failed in a way that is not one of the specific cases below."""


class StoreUnreachableError(StoreError):
    """The object store's endpoint could not be reached after the configured retries."""


class StoreAuthError(StoreError):
    """The object store rejected the credentials or denied access."""


class ObjectNotFoundError(StoreError, KeyError):
    """The requested key does not exist in the object store."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class InvalidKeyError(StoreError, ValueError):
    """An object key is empty, absolute, or escapes the store (``..``)."""


class SynthError(RadgroundError):
    """The synthetic drop generator was asked for something it cannot produce."""


class DeidError(RadgroundError):
    """De-identification cannot proceed safely; messages never carry the PHI values involved."""


class TokenDecodeError(RadgroundError):
    """Model output with grounding tokens is malformed; the message names the problem and its position."""


class SegmentationError(RadgroundError):
    """A segmentation backend cannot run (missing package, weights, or an unusable volume)."""


class QualityGateError(RadgroundError):
    """A table-level quality gate was crossed (too many rows quarantined, nothing grounded)."""

"""Typed errors raised by radground library code.

Only the CLI turns these into exit codes. Every message names the input, what was
found, what was expected and what to do — and never carries PHI or secrets.
"""

import functools


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


class StageError(RadgroundError):
    """A unit of work failed on an error radground did not anticipate.

    Its message is radground's own: what failed, on which unit (by pseudonym, drop id or path
    hash), the library error's type, and what to do. The library's text is withheld because it
    can quote the input (a decode error holds the raw bytes), and every message may end up in
    Prefect's database, Ray's logs or MLflow. ``original`` keeps the library error in this
    process only, for ``--debug`` on the terminal; it is never pickled, so it never crosses to
    another process or a store.
    """

    def __init__(self, message: str, *, original: BaseException | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.original = original
        self.transient = transient  # a storage or network hiccup: worth a retry

    def __reduce__(self):
        return (_stage_error, (str(self), self.transient))


def _stage_error(message: str, transient: bool) -> StageError:
    return StageError(message, transient=transient)


_TRANSIENT = (ConnectionError, TimeoutError)


def withheld(what: str, exc: BaseException) -> StageError:
    """The safe stand-in for a library error raised while doing ``what``."""
    return StageError(
        f"{what} failed with {type(exc).__name__} (its text is withheld: library errors can quote patient "
        "data). Re-run with --debug to see it on this terminal, or report the error type and the unit named "
        "here.", original=exc, transient=isinstance(exc, _TRANSIENT))


class failure_boundary:  # noqa: N801 - used like a function: `with failure_boundary("..."):`
    """Re-raise any non-radground exception inside the block as a :class:`StageError` about ``what``.

    Errors radground raised on purpose pass unchanged: their messages are written to be safe.
    The original is suppressed from the chain, so tracebacks (Prefect's, Ray's, logging's) show
    only the safe message.
    """

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, RadgroundError) or not isinstance(exc, Exception):
            return False  # KeyboardInterrupt / SystemExit pass too
        error = withheld(self.what, exc)
        error.__cause__ = None
        error.__suppress_context__ = True
        raise error


def guarded(what: str):
    """Decorator form of :class:`failure_boundary` for a task or flow function."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with failure_boundary(what):
                return fn(*args, **kwargs)

        return run

    return wrap


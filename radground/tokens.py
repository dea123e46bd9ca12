"""Grounding tokens: the one place that turns boxes/spans into model text and back (docs/method.md).

Detection:     ``<p bbox=<locX1><locY1><locX2><locY2> id=<segCCC>>keyword</p>``
Segmentation:  ``<seg>keyword</seg>``, the i-th ``</seg>`` paired with the i-th mask in text order.

Format decisions (pinned by tests/test_tokens.py):
- Coordinates are x1, y1, x2, y2 (``COORD_ORDER``), normalised by the image width/height and
  quantised to ``LOC_BINS`` bins; decoding returns bin centres, so a round trip moves a
  coordinate by at most half a bin.
- One keyword grounded to several classes (``"Lunge beidseits"`` -> lung_left AND lung_right,
  the case the reference code loses) is ONE wrapper with one ``bbox=… id=…`` group per class,
  groups separated by a space and sorted by class id:
  ``<p bbox=<l><l><l><l> id=<seg118> bbox=<l><l><l><l> id=<seg119>>Lunge beidseits</p>``.
  Repeating the wrapper would repeat the keyword (ambiguous with a sentence that really
  repeats it) and nesting would be indistinguishable from a broken ``<p``, so neither is used.
- Text a radiologist typed is escaped, not rejected: a ``<`` that starts a reserved prefix
  (``<p``, ``</p``, ``<seg``, ``</seg``, ``<loc``) becomes ``&lt;``, and a ``&`` that starts
  ``&lt;`` or ``&amp;`` becomes ``&amp;``. Every other character, including ``< 5 mm``, is
  left alone, so ordinary text keeps its ordinary tokens and the tokenizer never sees a
  special token that was not put there on purpose. Decoding undoes exactly this.
- Encoding bad input (overlap, box outside the image, unknown class) is a caller bug:
  ``ValueError``. Decoding bad model output is ``TokenDecodeError`` naming the character
  position in the model output: a malformed prediction is dropped, never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeVar

from radground.errors import TokenDecodeError
from radground.labels import CLASS_TOKENS, NUM_CLASSES

LOC_BINS = 512
COORD_ORDER = "xy"  # the only place the order is decided: "xy" = x1,y1,x2,y2 as docs/method.md writes it
P_OPEN = "<p bbox="
P_CLOSE = "</p>"
SEG_OPEN = "<seg>"
SEG_CLOSE = "</seg>"
_ID_FIELD = " id="
_GROUP_SEP = " bbox="  # before the 2nd, 3rd, ... bbox/id group of one keyword
_HEAD_END = ">"

_LOC_RE = re.compile(r"<loc([0-9]{4})>")  # [0-9], not \d: \d also matches Arabic-Indic digits
_CLASS_RE = re.compile(r"<seg([0-9]{3})>")
# Anything the decoders treat as markup; plain text never contains these after escaping.
_RESERVED_RE = re.compile(r"<(?=/?p|/?seg|loc)")
_ESCAPE_RE = re.compile(r"&(?=lt;|amp;)|" + _RESERVED_RE.pattern)  # lookaheads: only the one char is replaced
_UNESCAPE_RE = re.compile(r"&(lt|amp);")

assert COORD_ORDER in ("xy", "yx")


def loc_token(bin_: int) -> str:
    """The token for one coordinate bin, ``<loc0000>`` … ``<loc0511>``."""
    return f"<loc{bin_:04d}>"


def class_token(class_id: int) -> str:
    """The token for one class id, ``<seg000>`` … ``<seg127>``."""
    return f"<seg{class_id:03d}>"


def special_tokens() -> list[str]:
    """Every token the model tokenizer must add, in a fixed order: loc bins, class ids, markup."""
    return (
        [loc_token(b) for b in range(LOC_BINS)]
        + [class_token(c) for c in range(CLASS_TOKENS)]
        + [P_OPEN, P_CLOSE, SEG_OPEN, SEG_CLOSE]
    )


def quantize(value: float) -> int:
    """A normalised coordinate in [0, 1] -> its bin 0..LOC_BINS-1 (1.0 falls in the last bin)."""
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"coordinate {value!r} is outside [0, 1]; normalise pixels by the image size first")
    # Multiplying by a power of two is exact, so floor() is monotonic; 1.0 would be bin 512.
    return min(int(value * LOC_BINS), LOC_BINS - 1)


def dequantize(bin_: int) -> float:
    """A bin -> the normalised coordinate of its centre."""
    if not 0 <= bin_ < LOC_BINS:
        raise ValueError(f"bin {bin_!r} is outside 0..{LOC_BINS - 1}")
    return (bin_ + 0.5) / LOC_BINS


def escape_text(text: str) -> str:
    """Plain text -> text that cannot be mistaken for markup (see the module docstring)."""
    return _ESCAPE_RE.sub(lambda m: "&amp;" if m[0] == "&" else "&lt;", text)


def unescape_text(text: str) -> str:
    """Inverse of ``escape_text``."""
    return _UNESCAPE_RE.sub(lambda m: "<" if m[1] == "lt" else "&", text)


@dataclass(frozen=True)
class GroundedSpan:
    start: int  # offsets into the plain sentence, end exclusive
    end: int
    keyword: str  # == sentence[start:end]
    class_id: int  # 1..NUM_CLASSES
    box: tuple[float, float, float, float] | None  # (x1, y1, x2, y2) in pixels of an image of size (width, height)


# ---------------------------------------------------------------------------- encoding


def _check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")


def _check_offsets(sentence: str, start: int, end: int) -> None:
    if not 0 <= start < end <= len(sentence):
        raise ValueError(
            f"span ({start}, {end}) is empty or outside the sentence of length {len(sentence)}; "
            "spans need 0 <= start < end <= len(sentence)"
        )


def _box_bins(span: GroundedSpan, width: int, height: int) -> tuple[int, int, int, int]:
    if span.box is None:
        raise ValueError(f"span {span.keyword!r} (class {span.class_id}) has no box; detection needs one")
    x1, y1, x2, y2 = span.box
    if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
        raise ValueError(
            f"box {span.box} of {span.keyword!r} is not (x1 <= x2, y1 <= y2) inside the "
            f"{width}x{height} image; clip it or fix the mask it came from"
        )
    return quantize(x1 / width), quantize(y1 / height), quantize(x2 / width), quantize(y2 / height)


def _bbox_tokens(bins: tuple[int, int, int, int]) -> str:
    x1, y1, x2, y2 = bins
    ordered = (x1, y1, x2, y2) if COORD_ORDER == "xy" else (y1, x1, y2, x2)
    return "".join(loc_token(b) for b in ordered)


def encode_detection(sentence: str, spans: Sequence[GroundedSpan], width: int, height: int) -> str:
    """Wrap each keyword span of the sentence in ``<p bbox=… id=…>keyword</p>``; spans in any order."""
    _check_size(width, height)
    # Sorting is safe here (unlike segmentation) because each span carries its own box and class.
    ordered = sorted(spans, key=lambda s: (s.start, s.end, s.class_id))
    groups: list[list[GroundedSpan]] = []  # identical (start, end) spans share one wrapper
    for span in ordered:
        _check_offsets(sentence, span.start, span.end)
        if sentence[span.start : span.end] != span.keyword:
            raise ValueError(
                f"span ({span.start}, {span.end}) covers {sentence[span.start : span.end]!r}, "
                f"not its keyword {span.keyword!r}; keywords must be verbatim spans of the sentence"
            )
        if not 1 <= span.class_id <= NUM_CLASSES:
            raise ValueError(f"class id {span.class_id} of {span.keyword!r} is not in 1..{NUM_CLASSES}")
        if groups and (groups[-1][0].start, groups[-1][0].end) == (span.start, span.end):
            if groups[-1][-1].class_id == span.class_id:
                raise ValueError(f"span {span.keyword!r} is grounded to class {span.class_id} twice")
            groups[-1].append(span)
            continue
        if groups and groups[-1][0].end > span.start:
            prev = groups[-1][0]
            raise ValueError(
                f"spans ({prev.start}, {prev.end}) {prev.keyword!r} and ({span.start}, {span.end}) "
                f"{span.keyword!r} overlap; only identical spans may share a keyword"
            )
        groups.append([span])

    out: list[str] = []
    pos = 0
    for group in groups:
        start, end = group[0].start, group[0].end
        heads = [_bbox_tokens(_box_bins(s, width, height)) + _ID_FIELD + class_token(s.class_id) for s in group]
        out += [escape_text(sentence[pos:start]), P_OPEN, _GROUP_SEP.join(heads), _HEAD_END]
        out += [escape_text(sentence[start:end]), P_CLOSE]
        pos = end
    out.append(escape_text(sentence[pos:]))
    return "".join(out)


def encode_segmentation(sentence: str, spans: Sequence[tuple[int, int]]) -> str:
    """Wrap each (start, end) span in ``<seg>…</seg>``; spans must already be in text order."""
    out: list[str] = []
    pos = 0
    for start, end in spans:
        _check_offsets(sentence, start, end)
        if start < pos:
            # No silent sort: the caller's masks are paired with spans by position, and
            # reordering here is exactly how the reference code mismatched masks and keywords.
            raise ValueError(
                f"segmentation span ({start}, {end}) starts before the previous one ends ({pos}); "
                "give non-overlapping spans in text order, with their masks in the same order"
            )
        out += [escape_text(sentence[pos:start]), SEG_OPEN, escape_text(sentence[start:end]), SEG_CLOSE]
        pos = end
    out.append(escape_text(sentence[pos:]))
    return "".join(out)


# ---------------------------------------------------------------------------- PaliGemma

#: PaliGemma's tokenizer has 1024 location tokens ``<loc0000>`` … ``<loc1023>``; this module quantises
#: to ``LOC_BINS`` = 512. The two meet ONLY in the two functions below (the model's processor calls
#: them on every text it encodes and every text the model generates).
PALIGEMMA_LOC_TOKENS = 1024
_PG_PER_BIN = PALIGEMMA_LOC_TOKENS // LOC_BINS  # 2
assert _PG_PER_BIN * LOC_BINS == PALIGEMMA_LOC_TOKENS

#: Markup strings exactly as the encoders above write them; a model tokenizer adds each as one token so
#: that grounding text never splits them (``" id="`` and ``" bbox="`` include their leading space).
MODEL_MARKUP = (P_OPEN, _GROUP_SEP, _ID_FIELD, P_CLOSE, SEG_OPEN, SEG_CLOSE)


def to_paligemma_locs(text: str) -> str:
    """Grounding text of this module (512 bins) -> the same text in PaliGemma's 1024 loc tokens.

    Mapping: bin ``b`` covers ``[b/512, (b+1)/512)``, which is exactly PaliGemma's cells ``2b`` and
    ``2b+1`` (cell ``k`` covers ``[k/1024, (k+1)/1024)``); it is written as ``<loc{2b}>``.
    :func:`from_paligemma_locs` maps cell ``k`` back to bin ``k // 2``, so the round trip is exact
    and a model that emits the odd cell lands in the same bin. Only markup is rewritten: a ``<loc``
    in typed text was escaped to ``&lt;loc`` by the encoders.
    """

    def one(m: re.Match[str]) -> str:
        bin_ = int(m[1])
        if bin_ >= LOC_BINS:
            raise ValueError(f"{m[0]} is not a {LOC_BINS}-bin location token; encode the text with this module")
        return f"<loc{bin_ * _PG_PER_BIN:04d}>"

    return _LOC_RE.sub(one, text)


def from_paligemma_locs(text: str) -> str:
    """Model text in PaliGemma's 1024 loc tokens -> this module's 512 bins (inverse of :func:`to_paligemma_locs`)."""

    def one(m: re.Match[str]) -> str:
        cell = int(m[1])
        if cell >= PALIGEMMA_LOC_TOKENS:
            raise _fail("model", text, m.start(), f"location token {cell} is outside 0..{PALIGEMMA_LOC_TOKENS - 1}")
        return loc_token(cell // _PG_PER_BIN)

    return _LOC_RE.sub(one, text)


# ---------------------------------------------------------------------------- decoding


def _fail(kind: str, text: str, pos: int, problem: str) -> TokenDecodeError:
    found = repr(text[pos : pos + 16]) if pos < len(text) else "end of text"
    return TokenDecodeError(
        f"{kind} output, char {pos}: {problem} (found {found}). "
        "The prediction is malformed; drop it rather than guess its spans."
    )


def _parse_token(kind: str, text: str, pos: int, pattern: re.Pattern[str], what: str) -> tuple[int, int]:
    m = pattern.match(text, pos)
    if m is None:
        raise _fail(kind, text, pos, f"expected a {what} token")
    return int(m[1]), m.end()


def _parse_head(text: str, pos: int, width: int, height: int) -> tuple[list[tuple[int, tuple]], int]:
    """Parse ``<loc>×4 id=<segCCC>`` groups after ``<p bbox=`` up to ``>``; returns (class, box) pairs."""
    kind = "detection"
    groups: list[tuple[int, tuple]] = []
    while True:
        group_pos = pos
        bins = []
        for _ in range(4):
            b, nxt = _parse_token(kind, text, pos, _LOC_RE, "<locNNNN>")
            if b >= LOC_BINS:
                raise _fail(kind, text, pos, f"bin {b} is out of range 0..{LOC_BINS - 1}")
            bins.append(b)
            pos = nxt
        x1, y1, x2, y2 = bins if COORD_ORDER == "xy" else (bins[1], bins[0], bins[3], bins[2])
        if x2 < x1 or y2 < y1:
            raise _fail(kind, text, group_pos, f"box bins x1={x1} y1={y1} x2={x2} y2={y2} have x2 < x1 or y2 < y1")
        if not text.startswith(_ID_FIELD, pos):
            raise _fail(kind, text, pos, f"expected {_ID_FIELD!r} after the four <loc> tokens")
        pos += len(_ID_FIELD)
        class_id, nxt = _parse_token(kind, text, pos, _CLASS_RE, "<segCCC> class")
        if not 1 <= class_id <= NUM_CLASSES:
            raise _fail(kind, text, pos, f"class id {class_id} is not in 1..{NUM_CLASSES}")
        if any(c == class_id for c, _ in groups):
            raise _fail(kind, text, pos, f"class id {class_id} appears twice for one keyword")
        box = (dequantize(x1) * width, dequantize(y1) * height, dequantize(x2) * width, dequantize(y2) * height)
        groups.append((class_id, box))
        pos = nxt
        if text.startswith(_HEAD_END, pos):
            return groups, pos + len(_HEAD_END)
        if not text.startswith(_GROUP_SEP, pos):
            raise _fail(kind, text, pos, f"expected {_HEAD_END!r} or another {_GROUP_SEP!r} group")
        pos += len(_GROUP_SEP)


def _decode(kind: str, text: str, opener: str, closer: str, parse_head) -> tuple[str, list]:
    """Shared scanner: plain text between ``opener…closer`` wrappers; keyword text has no markup."""
    plain: list[str] = []
    length = 0  # length of the plain sentence so far, for offsets
    found: list = []
    pos = 0
    while (m := _RESERVED_RE.search(text, pos)) is not None:
        at = m.start()
        if text.startswith(closer, at):
            raise _fail(kind, text, at, f"{closer!r} without an opening {opener!r}")
        if not text.startswith(opener, at):
            raise _fail(kind, text, at, f"unexpected markup outside a {opener!r}…{closer!r} span")
        piece = unescape_text(text[pos:at])
        plain.append(piece)
        length += len(piece)
        head, body_start = parse_head(text, at + len(opener))
        inner = _RESERVED_RE.search(text, body_start)
        if inner is None:
            raise _fail(kind, text, len(text), f"{opener!r} opened at char {at} is never closed by {closer!r}")
        if not text.startswith(closer, inner.start()):
            what = "nested" if text.startswith(opener, inner.start()) else "unexpected markup"
            raise _fail(kind, text, inner.start(), f"{what} inside the {opener!r} opened at char {at}")
        keyword = unescape_text(text[body_start : inner.start()])
        if not keyword:
            raise _fail(kind, text, body_start, f"empty keyword in the {opener!r} opened at char {at}")
        found.append((length, length + len(keyword), keyword, head))
        plain.append(keyword)
        length += len(keyword)
        pos = inner.start() + len(closer)
    plain.append(unescape_text(text[pos:]))
    return "".join(plain), found


def decode_detection(text: str, width: int, height: int) -> tuple[str, list[GroundedSpan]]:
    """Model output -> (plain sentence, spans in text order; one span per class of a keyword)."""
    _check_size(width, height)
    plain, found = _decode("detection", text, P_OPEN, P_CLOSE, lambda t, p: _parse_head(t, p, width, height))
    spans = [
        GroundedSpan(start, end, keyword, class_id, box)
        for start, end, keyword, groups in found
        for class_id, box in groups
    ]
    return plain, spans


def decode_segmentation(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Model output -> (plain sentence, (start, end) spans IN TEXT ORDER, one per ``</seg>``)."""
    plain, found = _decode("segmentation", text, SEG_OPEN, SEG_CLOSE, lambda t, p: (None, p))
    return plain, [(start, end) for start, end, _, _ in found]


M = TypeVar("M")


def pair_masks(spans: Sequence[tuple[int, int]], masks: Sequence[M]) -> list[tuple[tuple[int, int], M]]:
    """Pair the i-th span with the i-th mask, both in text order (not keyword-length order)."""
    if len(spans) != len(masks):
        raise TokenDecodeError(
            f"{len(spans)} <seg> spans but {len(masks)} masks; the mask decoder must emit one mask "
            "per '</seg>' — drop this prediction"
        )
    if any(a[0] >= b[0] for a, b in pairwise(spans)):
        raise ValueError(f"spans {list(spans)} are not in text order; pass them as decode_segmentation returns them")
    return list(zip(spans, masks, strict=True))

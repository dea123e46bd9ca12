"""Round trips and failure modes of radground/tokens.py (the grounding-token format)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radground.errors import TokenDecodeError
from radground.tokens import (
    LOC_BINS,
    GroundedSpan,
    decode_detection,
    decode_segmentation,
    dequantize,
    encode_detection,
    encode_segmentation,
    pair_masks,
    quantize,
    special_tokens,
)

# Fragments that collide with the markup or with its escaping, mixed into random text.
TRICKY = [
    "<",
    ">",
    "/",
    "&",
    ";",
    "<p",
    "</p>",
    "<p bbox=",
    "<seg>",
    "</seg>",
    "<seg005>",
    "<loc0001>",
    "&lt;",
    "&amp;",
    "&amp;lt;",
    " id=",
    "bbox=",
    "ä",
    "Ö",
    "ß",
    "µ",
    "°",
    "2.2 cm",
]
sentences = st.lists(
    st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8"), st.sampled_from("0123456789 ")),
    max_size=40,
).map("".join)


@st.composite
def sentence_with_intervals(draw) -> tuple[str, list[tuple[int, int]]]:
    """A sentence and non-overlapping, non-empty (start, end) intervals in text order."""
    sentence = draw(sentences)
    cuts = sorted(draw(st.sets(st.integers(0, len(sentence)), max_size=10)))
    cuts = cuts[: len(cuts) // 2 * 2]
    return sentence, list(zip(cuts[::2], cuts[1::2], strict=True))


@st.composite
def detection_case(draw):
    sentence, intervals = draw(sentence_with_intervals())
    width, height = draw(st.integers(1, 4096)), draw(st.integers(1, 4096))
    spans = []
    for start, end in intervals:
        # 1 or 2 classes per keyword: "Lunge beidseits" -> lung_left AND lung_right
        for class_id in draw(st.sets(st.integers(1, 121), min_size=1, max_size=2)):
            xs = sorted(draw(st.floats(0, width)) for _ in range(2))
            ys = sorted(draw(st.floats(0, height)) for _ in range(2))
            spans.append(GroundedSpan(start, end, sentence[start:end], class_id, (xs[0], ys[0], xs[1], ys[1])))
    shuffled = draw(st.permutations(spans))
    return sentence, spans, shuffled, width, height


@settings(max_examples=300, deadline=None)
@given(detection_case())
def test_detection_round_trip(case):
    sentence, spans, shuffled, width, height = case
    plain, decoded = decode_detection(encode_detection(sentence, shuffled, width, height), width, height)
    assert plain == sentence
    expected = sorted(spans, key=lambda s: (s.start, s.class_id))  # text order, then class id
    assert [(s.start, s.end, s.keyword, s.class_id) for s in decoded] == [
        (s.start, s.end, s.keyword, s.class_id) for s in expected
    ]
    bin_w, bin_h = width / 512, height / 512  # one bin in pixels, computed independently
    for got, want in zip(decoded, expected, strict=True):
        for g, w, tol in zip(got.box, want.box, (bin_w, bin_h, bin_w, bin_h), strict=True):
            assert abs(g - w) <= tol + 1e-9


@settings(max_examples=300, deadline=None)
@given(sentence_with_intervals())
def test_segmentation_round_trip_keeps_text_order(case):
    sentence, intervals = case
    plain, spans = decode_segmentation(encode_segmentation(sentence, intervals))
    assert plain == sentence
    assert spans == intervals


def test_identical_spans_with_two_classes_share_one_wrapper():
    s = "Lunge beidseits frei."
    spans = [
        GroundedSpan(0, 15, "Lunge beidseits", 119, (120.0, 40.0, 200.0, 180.0)),
        GroundedSpan(0, 15, "Lunge beidseits", 118, (20.0, 40.0, 100.0, 180.0)),
    ]
    text = encode_detection(s, spans, 224, 224)
    # 20/224*512 = 45.7 -> 45; 40 -> 91.4 -> 91; 100 -> 228.6 -> 228; 180 -> 411.4 -> 411
    assert text == (
        "<p bbox=<loc0045><loc0091><loc0228><loc0411> id=<seg118>"
        " bbox=<loc0274><loc0091><loc0457><loc0411> id=<seg119>>Lunge beidseits</p> frei."
    )
    plain, decoded = decode_detection(text, 224, 224)
    assert plain == s and [d.class_id for d in decoded] == [118, 119]


def test_pairing_keeps_text_order_not_keyword_length_order():
    # Keyword lengths 16, 4, 5: sorting by length (the reference bug) would give Milz, Aorta, Lungen...
    text = encode_segmentation("Lungenoberlappen frei, Milz und Aorta normal.", [(0, 16), (23, 27), (32, 37)])
    plain, spans = decode_segmentation(text)
    pairs = pair_masks(spans, ["mask_lung", "mask_spleen", "mask_aorta"])
    assert [(plain[a:b], m) for (a, b), m in pairs] == [
        ("Lungenoberlappen", "mask_lung"),
        ("Milz", "mask_spleen"),
        ("Aorta", "mask_aorta"),
    ]


@given(sentence_with_intervals())
def test_pairing_property(case):
    sentence, intervals = case
    _, spans = decode_segmentation(encode_segmentation(sentence, intervals))
    masks = [object() for _ in spans]
    assert pair_masks(spans, masks) == list(zip(intervals, masks, strict=True))


def test_pairing_rejects_count_mismatch():
    with pytest.raises(TokenDecodeError, match="2 <seg> spans but 1 masks"):
        pair_masks([(0, 1), (2, 3)], ["m"])


@given(st.floats(0, 1), st.floats(0, 1))
def test_quantize_is_monotonic_and_never_512(a, b):
    lo, hi = min(a, b), max(a, b)
    assert 0 <= quantize(lo) <= quantize(hi) <= 511


def test_quantize_edges_and_bin_centres():
    assert quantize(0.0) == 0 and quantize(1.0) == 511 and quantize(0.5) == 256
    assert quantize(1 / 512 - 1e-12) == 0 and quantize(511 / 512) == 511
    for b in range(LOC_BINS):
        assert dequantize(b) == pytest.approx((b + 0.5) / 512)
        assert quantize(dequantize(b)) == b
    for bad in (-0.001, 1.0001, float("nan")):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            quantize(bad)
    with pytest.raises(ValueError, match="bin 512"):
        dequantize(512)


def test_special_tokens():
    tokens = special_tokens()
    assert len(tokens) == 512 + 128 + 4 and len(set(tokens)) == len(tokens)
    assert tokens[0] == "<loc0000>" and tokens[511] == "<loc0511>" and "<loc0512>" not in tokens
    assert tokens[512] == "<seg000>" and tokens[639] == "<seg127>"
    assert tokens[640:] == ["<p bbox=", "</p>", "<seg>", "</seg>"]
    assert all(re.fullmatch(r"<loc[0-9]{4}>", t) for t in tokens[:512])
    # the fixed order, written out (the same list twice in one process says nothing about its order)
    assert tokens[:512] == [f"<loc{b:04d}>" for b in range(512)]
    assert tokens[512:640] == [f"<seg{c:03d}>" for c in range(128)]


def test_literal_markup_typed_by_a_radiologist_is_escaped():
    s = "Befund <p bbox=x </p> <seg>Leber</seg> &lt; <pT2 < 5 mm & Milz"
    spans = [GroundedSpan(s.index("Milz"), len(s), "Milz", 1, (10.0, 10.0, 20.0, 20.0))]
    text = encode_detection(s, spans, 100, 100)
    # Only the real wrapper carries markup; ordinary "<" and "&" stay as they are.
    assert text.count("<p bbox=") == 1 and text.count("</p>") == 1 and "<seg>" not in text
    assert "&lt;p bbox=x &lt;/p> &lt;seg>Leber&lt;/seg> &amp;lt; &lt;pT2 < 5 mm & " in text
    plain, decoded = decode_detection(text, 100, 100)
    assert plain == s and [(d.start, d.end, d.keyword) for d in decoded] == [(len(s) - 4, len(s), "Milz")]
    seg = encode_segmentation(s, [(len(s) - 4, len(s))])
    assert seg.count("<seg>") == 1 and decode_segmentation(seg) == (s, [(len(s) - 4, len(s))])


L = "<loc0010><loc0020><loc0030><loc0040>"
MALFORMED_DETECTION = [
    (f"a <p bbox={L} id=<seg005>>Leber", r"char 64: '<p bbox=' opened at char 2 is never closed"),
    (f"a <p bbox={L} id=<seg005>", r"char 58: expected '>' or another ' bbox=' group"),
    ("a <p bbox=<loc0010><loc0020>", r"char 28: expected a <locNNNN> token \(found end of text\)"),
    ("<p bbox=<loc0512><loc0020><loc0030><loc0040> id=<seg005>>x</p>", r"char 8: bin 512 is out of range"),
    (f"<p bbox={L} id=<seg122>>x</p>", r"char 48: class id 122 is not in 1..121"),
    (f"<p bbox={L} id=<seg000>>x</p>", r"class id 0 is not in 1..121"),
    ("<p bbox=<loc0030><loc0020><loc0010><loc0040> id=<seg005>>x</p>", r"char 8: box bins .* x2 < x1"),
    ("<p bbox=<loc0010><loc0040><loc0030><loc0020> id=<seg005>>x</p>", r"y2 < y1"),
    (f"<p bbox={L} id=<seg005>>a <p bbox={L} id=<seg006>>b</p></p>", r"char 59: nested inside .* at char 0"),
    ("Leber</p> normal", r"char 5: '</p>' without an opening '<p bbox='"),
    ("<p bbox=<loc00x0><loc0020><loc0030><loc0040> id=<seg005>>x</p>", r"char 8: expected a <locNNNN> token"),
    ("<p bbox=12,34,56,78 id=<seg005>>x</p>", r"char 8: expected a <locNNNN> token"),
    (f"<p bbox={L}<seg005>>x</p>", r"char 44: expected ' id='"),
    (f"<p bbox={L} id=5>x</p>", r"char 48: expected a <segCCC> class token"),
    (f"<p bbox={L} id=<seg005>></p>", r"empty keyword"),
    (f"<p bbox={L} id=<seg005> bbox={L} id=<seg005>>x</p>", r"class id 5 appears twice"),
    (f"<p bbox={L} id=<seg005>>Le<seg>ber</p>", r"unexpected markup inside"),
    ("stray <loc0001> token", r"char 6: unexpected markup outside"),
    ("Leber <seg>x</seg>", r"char 6: unexpected markup outside"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED_DETECTION)
def test_malformed_detection_output_raises(text, message):
    with pytest.raises(TokenDecodeError, match=message) as info:
        decode_detection(text, 224, 224)
    assert "drop it rather than guess" in str(info.value)


MODEL_NOISE = ["<p bbox=", "</p>", "<seg>", "</seg>", "<loc0010>", "<loc0511>", "<loc0512>", " id=", "<seg005>"]
MODEL_NOISE += ["<seg122>", ">", " bbox=", "&lt;", "<", "&", "x", ""]


@st.composite
def corrupted_model_output(draw) -> tuple[str, int, int]:
    """A valid detection or segmentation encoding with one slice replaced by a markup fragment."""
    sentence, spans, _, width, height = draw(detection_case())
    if draw(st.booleans()):
        text = encode_detection(sentence, spans, width, height)
    else:
        text = encode_segmentation(sentence, sorted({(s.start, s.end) for s in spans}))
    a = draw(st.integers(0, len(text)))
    b = draw(st.integers(a, min(len(text), a + 12)))
    return text[:a] + draw(st.sampled_from(MODEL_NOISE)) + text[b:], width, height


@settings(max_examples=400, deadline=None)
@given(corrupted_model_output())
def test_decoders_never_return_garbage(case):
    """Corrupted model output either raises TokenDecodeError or decodes to consistent, re-encodable spans."""
    text, width, height = case
    try:
        plain, spans = decode_detection(text, width, height)
    except TokenDecodeError:
        pass
    else:
        for s in spans:
            x1, y1, x2, y2 = s.box
            assert plain[s.start : s.end] == s.keyword != "" and 1 <= s.class_id <= 121
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
        assert decode_detection(encode_detection(plain, spans, width, height), width, height) == (plain, spans)
    try:
        plain, seg_spans = decode_segmentation(text)
    except TokenDecodeError:
        pass
    else:
        assert all(plain[a:b] for a, b in seg_spans)
        assert decode_segmentation(encode_segmentation(plain, seg_spans)) == (plain, seg_spans)


MALFORMED_SEGMENTATION = [
    ("a <seg>Leber", r"char 12: '<seg>' opened at char 2 is never closed by '</seg>'"),
    ("Leber</seg>", r"char 5: '</seg>' without an opening '<seg>'"),
    ("<seg>a <seg>b</seg></seg>", r"char 7: nested inside the '<seg>' opened at char 0"),
    ("<seg></seg>", r"char 5: empty keyword"),
    ("<seg>Leber</p>", r"char 10: unexpected markup inside"),
    ("<p bbox=<loc0001>", r"char 0: unexpected markup outside"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED_SEGMENTATION)
def test_malformed_segmentation_output_raises(text, message):
    with pytest.raises(TokenDecodeError, match=message):
        decode_segmentation(text)


ENCODE_ERRORS = [
    ([GroundedSpan(0, 5, "Leber", 5, (0, 0, 1, 1)), GroundedSpan(3, 8, "er un", 2, (0, 0, 1, 1))], "overlap"),
    ([GroundedSpan(0, 5, "Milz!", 5, (0, 0, 1, 1))], "not its keyword 'Milz!'"),
    ([GroundedSpan(0, 5, "Leber", 122, (0, 0, 1, 1))], "class id 122"),
    ([GroundedSpan(0, 5, "Leber", 5, None)], "has no box"),
    ([GroundedSpan(0, 5, "Leber", 5, (0, 0, 300, 1))], "inside the 224x224 image"),
    ([GroundedSpan(0, 5, "Leber", 5, (9, 0, 3, 1))], r"x1 <= x2"),
    ([GroundedSpan(2, 2, "", 5, (0, 0, 1, 1))], "empty or outside"),
    ([GroundedSpan(0, 5, "Leber", 5, (0, 0, 1, 1))] * 2, "class 5 twice"),
]


@pytest.mark.parametrize(("spans", "message"), ENCODE_ERRORS)
def test_encode_detection_rejects_bad_spans(spans, message):
    with pytest.raises(ValueError, match=message):
        encode_detection("Leber und Milz", spans, 224, 224)


def test_encode_segmentation_refuses_to_reorder():
    with pytest.raises(ValueError, match="in text order"):
        encode_segmentation("Leber und Milz", [(10, 14), (0, 5)])


def test_coordinate_order_is_decided_by_one_constant(monkeypatch):
    import radground.tokens as tokens

    span = GroundedSpan(0, 5, "Leber", 5, (0.0, 100.0, 10.0, 200.0))  # x bins 0, 25; y bins 256, 511
    assert encode_detection("Leber", [span], 200, 200).startswith("<p bbox=<loc0000><loc0256><loc0025><loc0511>")
    monkeypatch.setattr(tokens, "COORD_ORDER", "yx")
    text = encode_detection("Leber", [span], 200, 200)
    assert text.startswith("<p bbox=<loc0256><loc0000><loc0511><loc0025>")
    _, (decoded,) = decode_detection(text, 200, 200)
    assert all(abs(g - w) <= 200 / 512 for g, w in zip(decoded.box, span.box, strict=True))

"""RadGrounder's tokenizer and processor: tokens kept whole, loc mapping, labels, truncation, mask order."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from models.radgrounder import RadGrounderProcessor
from radground.errors import TokenDecodeError
from radground.tokens import (
    LOC_BINS,
    MODEL_MARKUP,
    PALIGEMMA_LOC_TOKENS,
    GroundedSpan,
    decode_detection,
    encode_detection,
    encode_segmentation,
    from_paligemma_locs,
    loc_token,
    to_paligemma_locs,
)

SENTENCE = "Milz und Leberlappen ohne Befund."
# Text order: "Milz" (4 chars) first, then "Leberlappen" (11 chars): keyword-length order is the reverse,
# which is how the reference code mispaired masks.
SEG_SPANS = [(0, 4), (9, 20)]


def _masks():
    milz = np.zeros((224, 224), dtype=bool)
    milz[10:40, 10:60] = True
    leber = np.zeros((224, 224), dtype=bool)
    leber[100:200, 120:220] = True
    return milz, leber


def _detection_text():
    spans = [
        GroundedSpan(0, 4, "Milz", 1, (10.0, 20.0, 60.0, 90.0)),
        GroundedSpan(9, 20, "Leberlappen", 5, (0.0, 0.0, 224.0, 224.0)),
    ]
    return encode_detection(SENTENCE, spans, 224, 224), spans


# ---------------------------------------------------------------------------- loc tokens


def test_paligemma_loc_mapping_round_trips_every_bin_and_maps_both_cells_back():
    for b in range(LOC_BINS):
        pg = to_paligemma_locs(loc_token(b))
        assert pg == f"<loc{2 * b:04d}>"
        assert from_paligemma_locs(pg) == loc_token(b)
        assert from_paligemma_locs(f"<loc{2 * b + 1:04d}>") == loc_token(b)  # the odd cell lands in the same bin
    text, _ = _detection_text()
    assert from_paligemma_locs(to_paligemma_locs(text)) == text
    assert to_paligemma_locs("&lt;loc0700> typed") == "&lt;loc0700> typed"  # escaped typed text is not markup
    with pytest.raises(TokenDecodeError, match="outside 0..1023"):
        from_paligemma_locs(f"<loc{PALIGEMMA_LOC_TOKENS:04d}>")
    with pytest.raises(ValueError, match="not a 512-bin"):
        to_paligemma_locs("<loc0512>")


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_keeps_special_and_markup_tokens_whole(tiny_processor):
    tok = tiny_processor.tokenizer
    det, _ = _detection_text()
    seg = encode_segmentation(SENTENCE, SEG_SPANS)
    multi = encode_detection(
        "Lunge beidseits frei.",
        [GroundedSpan(0, 15, "Lunge beidseits", 118, (1.0, 2.0, 100.0, 200.0)),
         GroundedSpan(0, 15, "Lunge beidseits", 119, (110.0, 2.0, 220.0, 200.0))],
        224, 224,
    )
    for text in (det, seg, multi):
        pg = to_paligemma_locs(text)
        pieces = tok.convert_ids_to_tokens(tok(pg, add_special_tokens=False)["input_ids"])
        # every markup string and <locNNNN>/<segNNN> of the text is exactly one token, in the same order
        whole = re.compile("|".join([*(re.escape(m) for m in sorted(MODEL_MARKUP, key=len, reverse=True)),
                                     r"<loc[0-9]{4}>", r"<seg[0-9]{3}>"]))
        assert [p for p in pieces if whole.fullmatch(p)] == whole.findall(pg)
        assert len(whole.findall(pg)) >= 4
        # encode -> decode is lossless and comes back in tokens.py's 512 bins
        assert tiny_processor.decode(tok(pg, add_special_tokens=False)["input_ids"]) == text
    ids = tok.convert_tokens_to_ids(["<image>", "<loc0000>", "<loc1023>", "<seg000>", "<seg127>", *MODEL_MARKUP])
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids
    # typed text that only looks like markup stays ordinary text
    assert "<seg>" not in tok.convert_ids_to_tokens(tok("&lt;seg> x < 5 mm", add_special_tokens=False)["input_ids"])


def test_planted_phi_is_absent_from_tokenizer_files_unless_trained_on(tmp_path, train_texts):
    planted = "Quaxelhuberova"
    clean = RadGrounderProcessor.tiny(train_texts)
    clean.save_pretrained(tmp_path / "clean")
    blobs = [p.read_bytes() for p in (tmp_path / "clean").rglob("*") if p.is_file()]
    assert blobs and not any(planted.encode() in b for b in blobs)
    # positive control: the same scan finds the string when the training text carried it
    leaky = RadGrounderProcessor.tiny([*train_texts, *[f"Pat. {planted} kam." for _ in range(20)]])
    leaky.save_pretrained(tmp_path / "leaky")
    assert any(planted.encode() in p.read_bytes() for p in (tmp_path / "leaky").rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- processor


def test_labels_are_suffix_only_and_token_type_ids_are_returned(tiny_processor, image):
    det, _ = _detection_text()
    prefixes = ["Caption this image and detect keywords:", "Answer:"]
    suffixes = [det, "ja"]
    batch = tiny_processor(images=[image, image], prefixes=prefixes, suffixes=suffixes)
    tok = tiny_processor.tokenizer
    ids, labels, tt, am = batch["input_ids"], batch["labels"], batch["token_type_ids"], batch["attention_mask"]
    assert ids.shape == labels.shape == tt.shape == am.shape and batch["pixel_values"].shape == (2, 3, 224, 224)
    for i, suffix in enumerate(suffixes):
        want = tok(to_paligemma_locs(suffix), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_prompt = int(((tt[i] == 0) & (am[i] == 1)).sum())
        # image tokens, <bos>, prompt and '\n' form the prefix; then exactly the suffix + <eos>
        assert int((ids[i] == tiny_processor.image_token_id).sum()) == 256
        assert (labels[i, :n_prompt] == -100).all()
        assert labels[i, n_prompt : n_prompt + len(want)].tolist() == want
        assert ids[i, n_prompt : n_prompt + len(want)].tolist() == want
        assert (labels[i, n_prompt + len(want) :] == -100).all()  # padding
        assert (am[i, n_prompt + len(want) :] == 0).all()
        assert (tt[i, n_prompt : n_prompt + len(want)] == 1).all()
    assert torch.equal(batch["pixel_values"][0], image)  # windowed pixels pass untouched (no rescale/normalise)


def test_truncation_cuts_the_suffix_never_the_image_tokens(tiny_processor, image):
    seg = encode_segmentation(SENTENCE, SEG_SPANS)
    long_suffix = seg + " Die Leber ist normal groß und homogen." * 20
    batch = tiny_processor(images=[image], prefixes=["Caption this image:"], suffixes=[long_suffix],
                           masks=[list(_masks())], max_length=275)
    assert batch["input_ids"].shape[1] == 275
    assert int((batch["input_ids"][0] == tiny_processor.image_token_id).sum()) == 256
    assert batch["mask_counts"].tolist() == [int((batch["input_ids"][0] == tiny_processor.seg_close_token_id).sum())]
    assert batch["mask_labels"].shape[0] == batch["mask_counts"].sum()
    with pytest.raises(ValueError, match="max_length"):
        tiny_processor(images=[image], prefixes=["Caption this image: " + "Leber " * 40], suffixes=["x"],
                       max_length=270)


def test_ith_seg_close_pairs_with_ith_mask_in_text_order(tiny_processor, image):
    milz, leber = _masks()
    seg = encode_segmentation(SENTENCE, SEG_SPANS)
    assert seg.index("Milz") < seg.index("Leberlappen")
    one = encode_segmentation("Die Leber ist normal groß und homogen.", [(4, 9)])
    batch = tiny_processor(
        images=[image, image, image], prefixes=["Caption this image and segment keywords:"] * 3,
        suffixes=[seg, "Lunge beidseits frei belüftet.", one], masks=[[milz, leber], [], [leber]],
    )
    assert batch["mask_counts"].tolist() == [2, 0, 1]
    got = batch["mask_labels"].bool().numpy()
    assert (got[0] == milz).all() and (got[1] == leber).all() and (got[2] == leber).all()
    # the first </seg> of sample 0 closes "Milz": the tokens between <seg> and </seg> decode to it
    ids = batch["input_ids"][0].tolist()
    close = [k for k, t in enumerate(ids) if t == tiny_processor.seg_close_token_id]
    opened = [k for k, t in enumerate(ids) if t == tiny_processor.tokenizer.convert_tokens_to_ids("<seg>")]
    keywords = [tiny_processor.decode(ids[o + 1 : c]) for o, c in zip(opened, close, strict=True)]
    assert keywords == ["Milz", "Leberlappen"]
    with pytest.raises(ValueError, match="2 '</seg>' but 1 masks"):
        tiny_processor(images=[image], prefixes=["x"], suffixes=[seg], masks=[[milz]])


def test_collate_takes_dataset_samples_and_resizes_other_sizes(tiny_processor):
    milz, leber = _masks()
    seg = encode_segmentation(SENTENCE, SEG_SPANS)
    samples = [
        {"pixel_values": np.zeros((3, 224, 224), np.float32), "prefix": "Caption this image and segment keywords:",
         "suffix": seg, "masks": [milz, leber], "language": "de", "task": "segmentation"},
        {"pixel_values": np.full((3, 448, 448), 0.5, np.float32), "prefix": "Answer:", "suffix": "ja",
         "masks": [], "language": "en", "task": "vqa"},
        {"pixel_values": np.zeros((3, 224, 224), np.float32), "prefix": "Antwort:", "suffix": "nein",
         "language": "de", "task": "vqa"},  # no masks key at all
    ]
    batch = tiny_processor.collate(samples)
    assert batch["pixel_values"].shape == (3, 3, 224, 224)
    assert torch.allclose(batch["pixel_values"][1], torch.full((3, 224, 224), 0.5))
    assert batch["mask_counts"].tolist() == [2, 0, 0] and batch["mask_labels"].shape == (2, 224, 224)
    with pytest.raises(ValueError, match=r"windowed to \[-1, 1\]"):
        tiny_processor.collate([{**samples[1], "pixel_values": np.full((3, 224, 224), 255.0, np.float32)}])
    with pytest.raises(ValueError, match="escape_text"):
        tiny_processor(images=[samples[0]["pixel_values"]], prefixes=["Question: <seg>?"], suffixes=["x"])
    for typed in ("<image>", "<eos>"):  # a special token's text in a report would become that token
        with pytest.raises(ValueError, match=r"suffix 0 contains the tokenizer's special token text"):
            tiny_processor(images=[samples[0]["pixel_values"]], prefixes=["Answer:"], suffixes=[f"a {typed} b"])


def test_decoded_detection_gives_boxes_within_half_a_bin(tiny_processor):
    det, spans = _detection_text()
    ids = tiny_processor.tokenizer(to_paligemma_locs(det), add_special_tokens=False)["input_ids"]
    text = tiny_processor.decode(ids)
    plain, got = tiny_processor.parse_detection(text)
    assert plain == SENTENCE and [s.class_id for s in got] == [1, 5]
    for want, have in zip(spans, got, strict=True):
        assert max(abs(a - b) for a, b in zip(want.box, have.box, strict=True)) <= 224 / LOC_BINS / 2 + 1e-9
    assert decode_detection(text, 224, 224) == (plain, got)

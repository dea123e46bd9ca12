"""Evaluation metrics (models/metrics.py) against values computed by hand; the arithmetic is in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.metrics import (
    GroundingSample,
    MetricInputError,
    box_iou,
    dice,
    grounding_scores,
    mask_iou,
    normalize,
    text_scores,
    vqa_scores,
)
from radground.errors import RadgroundError


def approx(x: float):
    """pycocoevalcap's BLEU adds 1e-15 to matches and 1e-9 to guesses: its values are ~1e-9 off the hand ones."""
    return pytest.approx(x, rel=1e-6, abs=1e-9)


def one(prediction: str, reference: str) -> dict:
    (scores,) = text_scores([prediction], [reference]).per_sample
    return scores


# ---------------------------------------------------------------------------- normalisation, token metrics


def test_normalize_lowercases_and_splits_on_non_alphanumerics() -> None:
    assert normalize("2.2 cm") == "2 2 cm"  # the decimal point is a separator, not part of a number
    assert normalize("  Yes.\n") == "yes"
    assert normalize("Left-sided   pleural\teffusion!") == "left sided pleural effusion"
    assert normalize("a_b") == "a b"  # '_' is a word character for regex \w, but not alphanumeric


def test_normalize_keeps_umlauts_and_sharp_s_inside_words() -> None:
    # ä, ö, ü, ß are letters: "Größe" stays one token; an ASCII-only rule would give "gr e".
    assert normalize("Größe der Läsion: 2,5 cm") == "größe der läsion 2 5 cm"
    assert normalize("ÜBER") == "über"
    # "o" + U+0308 COMBINING DIAERESIS (a decomposed ö) is composed first, so it is not split off.
    assert normalize("Gro\u0308ße") == "größe"


def test_accuracy_is_exact_match_of_normalised_strings() -> None:
    assert one("Yes.", "yes")["accuracy"] == 1.0
    assert one("Größe der Läsion", "größe der läsion")["accuracy"] == 1.0
    assert one("Läsion der Größe", "Größe der Läsion")["accuracy"] == 0.0


def test_token_f1_and_recall_by_hand() -> None:
    # pred tokens [nodule, in, the, left, lung] (5), ref [left, lung, nodule] (3); overlap 3
    # precision 3/5, recall 3/3 = 1, F1 = 2 * 0.6 * 1 / 1.6 = 0.75
    s = one("Nodule in the left lung", "left lung nodule")
    assert s["f1"] == approx(0.75) and s["recall"] == approx(1.0) and s["accuracy"] == 0.0
    # bags, not sets: pred {lung: 2, nodule: 1}, ref {lung: 2, liver: 1} -> overlap min(2, 2) = 2
    # (a set would count "lung" once); precision 2/3, recall 2/3, F1 = 2/3
    s = one("lung lung nodule", "lung lung liver")
    assert s["f1"] == approx(2 / 3) and s["recall"] == approx(2 / 3)
    # ... and clipped: pred {lung: 3} vs ref {lung: 1}: overlap 1 -> P 1/3, R 1, F1 = (2/3) / (4/3) = 0.5
    assert one("lung lung lung", "lung")["f1"] == approx(0.5)
    # German, same words in another order: overlap 3 of 3 on both sides -> F1 1, exact match 0
    s = one("Läsion der Größe", "Größe der Läsion")
    assert (s["f1"], s["recall"], s["accuracy"]) == (approx(1.0), approx(1.0), 0.0)
    # "größe" must be one token: pred [größe] vs ref [größe, der, läsion]: overlap 1,
    # precision 1, recall 1/3, F1 = 2 * 1 * 1/3 / (4/3) = 0.5 (split umlauts would add tokens)
    s = one("Größe", "Größe der Läsion")
    assert s["f1"] == approx(0.5) and s["recall"] == approx(1 / 3)


# ---------------------------------------------------------------------------- BLEU, ROUGE-L


def test_bleu_one_sample_with_brevity_penalty_by_hand() -> None:
    # pred [left, lung] (2 words) vs ref [small, nodule, left, lung] (4 words)
    # unigram precision: 2 matched / 2 = 1; bigram "left lung" 1/1 = 1; no 3-/4-grams in the
    # prediction: pycocoevalcap's guard makes each factor (0 + 1e-15) / (0 + 1e-9) = 1e-6.
    # brevity penalty BP = exp(1 - ref_len / pred_len) = exp(1 - 4 / 2) = exp(-1) = 0.367879
    # BLEU-1 = 1 * BP = 0.367879; BLEU-4 = (1 * 1 * 1e-6 * 1e-6) ** (1 / 4) * BP = 1e-3 * BP
    s = one("left lung", "small nodule left lung")
    assert s["bleu1"] == approx(math.exp(-1))
    assert s["bleu4"] == approx(1e-3 * math.exp(-1))
    summary = text_scores(["left lung"], ["small nodule left lung"]).summary
    assert summary["bleu1"] == approx(math.exp(-1))  # one sample: corpus BLEU == its BLEU


def test_bleu_clips_repeated_words() -> None:
    # pred [lung, lung, lung] vs ref [lung, lung]: "lung" counts at most 2 times -> unigram 2/3;
    # pred longer than ref -> no brevity penalty; BLEU-1 = 2/3
    assert one("lung lung lung", "lung lung")["bleu1"] == approx(2 / 3)


def test_summary_bleu_is_corpus_bleu_not_the_mean_of_samples() -> None:
    # item 0: "yes" vs "yes": 1 of 1 unigram, lengths 1/1 -> BLEU-1 = 1
    # item 1: "no" vs "left lung": 0 of 1 unigram -> BLEU-1 ~ 1e-15 (pycocoevalcap's guard)
    # mean of per-sample = 0.5. Corpus (what COCO reports): matches 1 + 0 = 1, guesses 1 + 1 = 2
    # -> precision 1/2; lengths pred 2, ref 1 + 2 = 3 -> BP = exp(1 - 3/2) = exp(-0.5) = 0.606531
    # corpus BLEU-1 = 0.5 * 0.606531 = 0.303265
    s = text_scores(["yes", "no"], ["yes", "left lung"])
    assert [x["bleu1"] for x in s.per_sample] == [approx(1.0), approx(0.0)]
    assert s.summary["bleu1"] == approx(0.5 * math.exp(-0.5))


def test_bleu_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    text_scores(["a b c", "d"], ["a b", "d e"])
    assert capsys.readouterr().out == ""  # Bleu.compute_score prints its totals unless verbose=0


def test_rouge_l_by_longest_common_subsequence() -> None:
    # pred [small, nodule, in, left, lung] (5), ref [nodule, left, upper, lung] (4)
    # LCS = [nodule, left, lung] = 3 -> P = 3/5 = 0.6, R = 3/4 = 0.75; beta = 1.2, beta^2 = 1.44
    # F = (1 + 1.44) * 0.6 * 0.75 / (0.75 + 1.44 * 0.6) = 1.098 / 1.614 = 0.680297
    s = one("Small nodule in left lung.", "nodule left upper lung")
    assert s["rouge_l"] == approx(1.098 / 1.614)
    # summary = mean of per-sample ROUGE-L: (1 + 0.680297) / 2
    summary = text_scores(["yes", "small nodule in left lung"], ["yes", "nodule left upper lung"]).summary
    assert summary["rouge_l"] == approx((1 + 1.098 / 1.614) / 2)


# ---------------------------------------------------------------------------- CIDEr


def test_cider_over_a_set_of_three_by_hand() -> None:
    preds = ["left lung", "lung", "heart heart"]
    refs = ["left lung", "right lung", "heart"]
    # CIDEr-D (pycocoevalcap/cider/cider_scorer.py), n = 1..4, one reference per item, N = 3:
    #   document frequency over the 3 references: left 1, lung 2, right 1, heart 1,
    #   "left lung" 1, "right lung" 1. idf(g) = log(N) - log(max(1, df(g))):
    #   idf(lung) = log 3 - log 2 = log 1.5; every other n-gram (also unseen ones) log 3.
    #   vector of a text per n: tf * idf; sim_n = sum_g min(h_g, r_g) * r_g / (|h| |r|) (clipping),
    #   0 when either vector is empty; times the length penalty exp(-delta^2 / (2 * 6^2)),
    #   delta = bigram count(pred) - bigram count(ref) (the scorer counts "length" on the n == 1
    #   index = bigrams; for non-empty texts that is the word-count difference).
    #   CIDEr = 10 * mean(sim_1..sim_4) / (number of references = 1).
    l3, l15 = math.log(3), math.log(1.5)
    pen = math.exp(-1 / 72)  # delta = +-1: exp(-1 / (2 * 36))
    # item 0, identical: sim_1 = sim_2 = 1, no 3-/4-grams -> 0; delta 0 -> 10 * (1 + 1) / 4 = 5
    c0 = 10 * (1 + 1 + 0 + 0) / 4
    # item 1, "lung" vs "right lung": h = {lung: l15}, r = {right: l3, lung: l15}
    #   sim_1 = l15 * l15 / (l15 * sqrt(l3^2 + l15^2)) = l15 / sqrt(l3^2 + l15^2) = 0.346242
    #   no bigram in the prediction -> sim_2 = 0; delta = 0 - 1 -> pen; 10 * 0.346242 * pen / 4
    c1 = 10 * (l15 / math.sqrt(l3**2 + l15**2)) * pen / 4
    # item 2, "heart heart" vs "heart": h = {heart: 2 * l3}, r = {heart: l3}
    #   clipped: min(2 l3, l3) * l3 / (2 l3 * l3) = 1/2 (unclipped it would be 1)
    #   bigram "heart heart" vs no reference bigram -> 0; delta = 1 - 0 -> pen
    c2 = 10 * 0.5 * pen / 4
    s = text_scores(preds, refs)
    assert [x["cider"] for x in s.per_sample] == [approx(c0), approx(c1), approx(c2)]
    assert (c0, round(c1, 6), round(c2, 6)) == (5.0, 0.853665, 1.232759)
    assert s.summary["cider"] == approx((c0 + c1 + c2) / 3)  # 2.362141


def test_cider_is_corpus_level() -> None:
    # The same item alone: N = 1, idf = log 1 - log 1 = 0 for every n-gram -> CIDEr 0.
    assert one("lung", "right lung")["cider"] == 0.0
    assert one("left lung", "left lung")["cider"] == 0.0
    # With a second document, "left lung" gets idf log 2 > 0: identical text -> 10 * (1 + 1) / 4 = 5
    s = text_scores(["left lung", "heart"], ["left lung", "liver"])
    assert s.per_sample[0]["cider"] == approx(5.0) and s.per_sample[1]["cider"] == 0.0
    assert s.summary["cider"] == approx(2.5)


# ---------------------------------------------------------------------------- empty text, shapes, errors


def test_empty_prediction_scores_zero_on_every_metric() -> None:
    s = text_scores(["", "?!", "heart"], ["left lung", "yes", "heart"])
    for empty in s.per_sample[:2]:  # "?!" normalises to "" too
        assert empty == dict.fromkeys(("accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider"), 0.0)
    # the empty predictions still count: accuracy 1/3; corpus BLEU-1: matches 1, guesses 1,
    # lengths pred 1 vs ref 2 + 1 + 1 = 4 -> BP = exp(1 - 4/1) = exp(-3)
    assert s.summary["accuracy"] == approx(1 / 3)
    assert s.summary["bleu1"] == approx(math.exp(-3))


def test_empty_reference_does_not_crash_and_follows_the_policy() -> None:
    s = text_scores(["", "left lung", "left lung"], ["", "", "left lung"])
    both_empty, ref_empty, scored = s.per_sample
    # both empty: exact match and SQuAD's F1 convention say 1; n-gram metrics have nothing to overlap
    assert both_empty == {"accuracy": 1.0, "f1": 1.0, "recall": 1.0, "bleu1": 0.0, "bleu4": 0.0, "rouge_l": 0.0,
                          "cider": 0.0}
    assert all(v == 0.0 for v in ref_empty.values())
    # empty references are no CIDEr documents: N = 1 here -> idf 0 -> CIDEr 0 even for the match
    assert scored["accuracy"] == 1.0 and scored["cider"] == 0.0
    # only empty references: the CIDEr scorer would fail on max() of no document frequency
    assert text_scores(["x"], [""]).summary["cider"] == 0.0


def test_shapes_and_empty_set() -> None:
    s = text_scores(["a", "b"], ["a", "c"])
    assert set(s.summary) == {"n", "accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider"}
    assert s.summary["n"] == 2 and isinstance(s.summary["n"], int)
    assert all(type(v) is float for k, v in s.summary.items() if k != "n")  # JSON / MLflow ready
    assert [set(x) for x in s.per_sample] == [{"accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider"}] * 2
    assert text_scores([], []).summary == {"n": 0, **dict.fromkeys(
        ("accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider"))}


def test_text_input_errors_name_the_problem() -> None:
    with pytest.raises(MetricInputError, match="2 predictions but 1 references"):
        text_scores(["a", "b"], ["a"])
    with pytest.raises(MetricInputError, match="prediction 1 is a NoneType"):
        text_scores(["a", None], ["a", "b"])  # type: ignore[list-item]
    assert issubclass(MetricInputError, RadgroundError) and issubclass(MetricInputError, ValueError)


# ---------------------------------------------------------------------------- VQA closed / open


def test_vqa_scores_split_closed_open_all_each_its_own_corpus() -> None:
    rows = [("CLOSED", "Yes", "yes"), ("OPEN", "left lung", "left lung"), ("OPEN", "heart", "liver"),
            ("closed", "no", "yes")]
    out = vqa_scores(rows)
    assert (out["closed"]["n"], out["open"]["n"], out["all"]["n"]) == (2, 2, 4)
    # closed: yes/yes 1, no/yes 0 -> 1/2; open: 1 + 0 -> 1/2; all: 2/4
    assert (out["closed"]["accuracy"], out["open"]["accuracy"], out["all"]["accuracy"]) == (0.5, 0.5, 0.5)
    # CIDEr of closed over closed only: references "yes", "yes" -> df(yes) = 2 = N -> idf 0 -> 0.
    # In "all" (N = 4, df(yes) = 2) idf(yes) = log 2 > 0: "yes" vs "yes" = 10 * (1 + 0 + 0 + 0) / 4 = 2.5;
    # "left lung" vs itself 5.0; the other two 0 -> mean (2.5 + 5 + 0 + 0) / 4 = 1.875
    assert out["closed"]["cider"] == 0.0
    assert out["all"]["cider"] == approx(1.875)
    # open: N = 2 -> "left lung" = 5.0, heart/liver 0 -> 2.5
    assert out["open"]["cider"] == approx(2.5)


def test_vqa_scores_empty_group_and_bad_answer_type() -> None:
    out = vqa_scores([("OPEN", "liver", "liver")])
    assert out["closed"] == {"n": 0, "accuracy": None, "f1": None, "recall": None, "bleu1": None, "bleu4": None,
                             "rouge_l": None, "cider": None}
    assert out["open"]["n"] == out["all"]["n"] == 1 and out["open"]["accuracy"] == 1.0
    with pytest.raises(MetricInputError, match="row 0 has answer_type 'YESNO'"):
        vqa_scores([("YESNO", "a", "a")])


# ---------------------------------------------------------------------------- IoU, Dice


def test_box_iou_by_hand_with_half_open_edges() -> None:
    # (0,0,10,10) and (5,5,15,15): intersection 5 * 5 = 25, union 100 + 100 - 25 = 175 -> 1/7
    assert box_iou((0, 0, 10, 10), (5, 5, 15, 15)) == approx(25 / 175)
    # boxes that share only the edge x = 10 share no pixel: 0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    # (0,0,10,10) vs (0,0,10,4): 40 / 100 = 0.4
    assert box_iou([0, 0, 10, 10], np.array([0, 0, 10, 4])) == approx(0.4)
    assert box_iou((0, 0, 0, 5), (3, 3, 3, 3)) == 1.0  # two empty pixel sets (documented)
    assert box_iou((0, 0, 0, 5), (0, 0, 1, 1)) == 0.0
    with pytest.raises(MetricInputError, match="x1 < x0"):
        box_iou((5, 0, 1, 1), (0, 0, 1, 1))


def test_mask_iou_and_dice_by_hand() -> None:
    a = np.zeros((4, 4), bool)
    a[:2, :] = True  # rows 0-1: 8 pixels
    b = np.zeros((4, 4), bool)
    b[:, :2] = True  # cols 0-1: 8 pixels
    # intersection = rows 0-1 x cols 0-1 = 4; union 8 + 8 - 4 = 12 -> 1/3; Dice 2 * 4 / 16 = 0.5
    assert mask_iou(a, b) == approx(1 / 3)
    assert dice(a, b) == approx(0.5)
    empty = np.zeros((4, 4), bool)
    assert mask_iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0  # both empty: agree (documented)
    assert mask_iou(a, empty) == 0.0 and dice(empty, a) == 0.0
    assert mask_iou(a.astype(np.uint8), b.astype(np.float32)) == approx(1 / 3)  # 0/1 masks of other dtypes
    with pytest.raises(MetricInputError, match="same pixel grid"):
        mask_iou(a, np.zeros((4, 5), bool))
    with pytest.raises(MetricInputError, match="threshold probabilities"):
        mask_iou(a, np.full((4, 4), 0.7))


def test_box_and_mask_agree_on_pixel_edges() -> None:
    # box (1, 1, 3, 4) covers x = 1, 2 and y = 1, 2, 3 (half-open): the mask [1:4, 1:3]
    mask = np.zeros((6, 6), bool)
    mask[1:4, 1:3] = True
    other = np.zeros((6, 6), bool)
    other[2:5, 2:5] = True  # box (2, 2, 5, 5)
    assert box_iou((1, 1, 3, 4), (2, 2, 5, 5)) == approx(mask_iou(mask, other))
    # intersection x = 2, y = 2..3 -> 2 px; areas 6 and 9 -> IoU 2 / 13, Dice 4 / 15
    assert mask_iou(mask, other) == approx(2 / 13)
    assert dice((1, 1, 3, 4), (2, 2, 5, 5)) == approx(4 / 15) == dice(mask, other)


# ---------------------------------------------------------------------------- grounding


def test_grounding_two_instances_unmatched_keywords_and_iou50() -> None:
    image1 = GroundingSample(
        # two "lesion" instances, listed in the opposite order of the references: pairing by
        # order would give IoU 1/3 twice; the IoU-maximising assignment pairs the identical boxes.
        predicted=[("Lesion", (5, 0, 15, 10)), ("lesion", (0, 0, 10, 10)), ("Heart", (0, 0, 5, 5))],
        reference=[("lesion", (0, 0, 10, 10)), ("lesion,", (5, 0, 15, 10)), ("liver", (0, 0, 5, 5))],
    )
    image2 = GroundingSample(
        predicted=[("nodule", (0, 0, 10, 10))],
        reference=[("Nodule", (0, 0, 10, 4)), ("nodule", (50, 50, 60, 60))],  # IoU 0.4 and 0
    )
    out = grounding_scores([image1, image2])
    # predictions 3 + 1 = 4, references 3 + 2 = 5
    # keyword matches: lesion 2 (IoU 1, 1), nodule 1 (IoU 0.4: the better of 0.4 and 0);
    # heart (predicted only) and liver, the 2nd nodule (referenced only) stay unmatched -> 3
    # precision 3/4, recall 3/5, F1 = 2 * 3 / (4 + 5) = 2/3
    # IoU >= 0.5: only the two lesion pairs -> P 2/4, R 2/5, F1 = 4/9
    # mean IoU (1 + 1 + 0.4) / 3 = 0.8; Dice: 1, 1, 2 * 40 / (100 + 40) = 4/7 -> (2 + 4/7) / 3 = 6/7
    assert out == {"n_images": 2, "n_predicted": 4, "n_reference": 5,
                   "precision": approx(3 / 4), "recall": approx(3 / 5), "f1": approx(2 / 3),
                   "precision_iou50": approx(2 / 4), "recall_iou50": approx(2 / 5), "f1_iou50": approx(4 / 9),
                   "mean_iou": approx(0.8), "dice": approx(6 / 7)}


def test_iou50_matching_maximises_pairs_above_the_threshold() -> None:
    # 1-pixel-high strips: A (4..14), B (12..21) predicted; X (0..10), Y (6..16) referenced
    # IoU(A,X) = 6/14 = 0.4286, IoU(A,Y) = 8/12 = 0.6667, IoU(B,X) = 0, IoU(B,Y) = 4/15 = 0.2667
    # max IoU sum: A-X + B-Y = 0.6952 > A-Y + B-X = 0.6667, so the keyword matching is A-X, B-Y:
    # mean IoU (6/14 + 4/15) / 2 = 0.347619; Dice (12/20 + 8/19) / 2 = 0.510526.
    # At IoU >= 0.5 only A-Y is allowed and it matches: 1 pair, P = R = F1 = 1/2 (the IoU-sum
    # matching alone would give 0 pairs >= 0.5).
    sample = GroundingSample(predicted=[("x", (4, 0, 14, 1)), ("x", (12, 0, 21, 1))],
                             reference=[("x", (0, 0, 10, 1)), ("x", (6, 0, 16, 1))])
    out = grounding_scores([sample])
    assert (out["precision"], out["recall"], out["f1"]) == (1.0, 1.0, 1.0)
    assert (out["precision_iou50"], out["recall_iou50"], out["f1_iou50"]) == (0.5, 0.5, 0.5)
    assert out["mean_iou"] == approx((6 / 14 + 4 / 15) / 2)
    assert out["dice"] == approx((12 / 20 + 8 / 19) / 2)


def test_grounding_with_masks() -> None:
    a = np.zeros((4, 4), bool)
    a[:2, :] = True
    b = np.zeros((4, 4), bool)
    b[:, :2] = True
    # one keyword match with IoU 1/3 (< 0.5), Dice 0.5 (see test_mask_iou_and_dice_by_hand)
    out = grounding_scores([GroundingSample(predicted=[("Lunge", a)], reference=[("lunge", b)])])
    assert (out["precision"], out["recall"], out["f1"]) == (1.0, 1.0, 1.0)
    assert (out["precision_iou50"], out["recall_iou50"], out["f1_iou50"]) == (0.0, 0.0, 0.0)
    assert out["mean_iou"] == approx(1 / 3) and out["dice"] == approx(0.5)


def test_grounding_without_predictions_or_matches() -> None:
    out = grounding_scores([GroundingSample(predicted=[], reference=[("liver", (0, 0, 5, 5))])])
    # no prediction: precision undefined (None), recall 0/1, F1 = 2 * 0 / (0 + 1) = 0, no matched pair
    assert (out["precision"], out["recall"], out["f1"], out["mean_iou"], out["dice"]) == (None, 0.0, 0.0, None, None)
    assert grounding_scores([])["n_images"] == 0 and grounding_scores([])["f1"] is None


def test_grounding_refuses_boxes_against_masks() -> None:
    mask = np.ones((4, 4), bool)
    with pytest.raises(MetricInputError, match="boxes with masks"):
        grounding_scores([GroundingSample(predicted=[("liver", (0, 0, 2, 2))], reference=[("Liver", mask)])])
    with pytest.raises(MetricInputError, match="sample 0 prediction 0: a box must be 4 finite numbers"):
        grounding_scores([GroundingSample(predicted=[("liver", None)], reference=[])])

"""Evaluation metrics: VQA / report text against references, and grounding (boxes, masks) against reference keywords.

Text (DOMAIN.md "Evaluation"; every definition is pinned by tests/models/test_metrics.py with values
computed by hand):

- ``normalize``: lower-case, every character that is not alphanumeric (Unicode-aware: ä, ö, ü, ß
  are letters and stay) becomes a space, whitespace collapses, ends are stripped. Text is put in
  NFC first so a decomposed umlaut (``a`` + combining diaeresis, as some keyboards produce) stays
  one letter. Unlike SQuAD's normaliser, articles are kept: "a"/"the" are English-only and
  removing them would treat German answers differently.
- ``accuracy``: 1 when the normalised strings are equal, else 0.
- ``f1``: SQuAD token F1 over the bags (multisets) of normalised tokens; ``recall``: overlapping
  tokens / reference tokens. When either side has no token, both are 1.0 if both are empty and
  0.0 otherwise (SQuAD's convention).
- ``bleu1``, ``bleu4``, ``rouge_l``, ``cider``: pycocoevalcap 1.2's scorers (``Bleu(4)``, ``Rouge()``,
  ``Cider()`` = CIDEr-D) fed the normalised text split on spaces; never its PTBTokenizer (Java,
  and it would re-tokenise differently from every other metric here).

  * BLEU: the summary is pycocoevalcap's **corpus** BLEU, the number COCO reports: clipped n-gram
    matches and candidate n-grams are summed over the whole set before the geometric mean, and
    the brevity penalty uses the summed lengths. It is not the mean of the per-sample BLEU (a
    short wrong answer weighs less in the corpus score than in a mean). Per-sample values are
    the scorer's per-item BLEU. pycocoevalcap guards zero counts with 1e-15 / 1e-9, so BLEU-4 of
    an answer shorter than four words is tiny but not 0 (e.g. a correct one-word answer scores
    BLEU-4 (1e-6)^(3/4) = 3.2e-5); these are the published values and are kept.
  * ROUGE-L: per-sample LCS F-measure with beta = 1.2; the summary is their mean (as pycocoevalcap).
  * CIDEr: corpus-level. Document frequencies come from the references of the set given to
    ``text_scores`` (one scorer pass); a per-sample CIDEr is that pass's score for the item, so it
    changes with the set. A set of one item scores 0 (idf = log(1/1) = 0). The summary is the
    mean of the per-sample values.

  **Empty text** (after normalisation): an empty prediction against a non-empty reference scores
  0 on every metric. An item with an empty reference is no document for CIDEr (it has no n-gram)
  and scores 0 on BLEU, ROUGE-L and CIDEr whatever the prediction (nothing to overlap, as in
  sacrebleu and rouge-score); its accuracy/f1/recall follow the rule above (1 only if the
  prediction is empty too). Empty predictions still count in the corpus BLEU (their reference
  length enters the brevity penalty).

- ``vqa_scores``: CLOSED, OPEN and all questions, each scored as its own set (CIDEr of "closed"
  over the closed items only). An empty group is ``{"n": 0, <metric>: None, …}``.

Grounding (boxes ``(x0, y0, x1, y1)`` in pixels with half-open pixel edges — a box covers the pixels
``x0 <= x < x1``, ``y0 <= y < y1``, area ``(x1 - x0) * (y1 - y0)`` — or 2-D bool masks):

- ``box_iou``, ``mask_iou``, ``dice``: intersection over union, and 2|A∩B| / (|A| + |B|). Two
  empty pixel sets (two all-False masks, two zero-area boxes) agree perfectly: 1.0. One empty
  against a non-empty one: 0.0.
- ``grounding_scores``: per image, predictions and references are grouped by normalised keyword;
  within a keyword the instances are matched one-to-one maximising the summed IoU
  (``scipy.optimize.linear_sum_assignment``); every matched pair is a keyword match.
  precision = matched predictions / predictions, recall = matched references / references,
  f1 = their harmonic mean = 2 matched / (predictions + references). The ``*_iou50`` variants
  only let pairs with IoU >= 0.5 match and take, per keyword, the one-to-one matching with the
  most such pairs (its own assignment: the IoU-sum-maximising one can pair two 0.45 overlaps and
  miss a 0.6 one). ``mean_iou`` / ``dice``: means over the keyword-matched pairs. A ratio whose
  denominator is 0 (no predictions, no references, no matched pair) is None.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from scipy.optimize import linear_sum_assignment

from radground.errors import RadgroundError

TEXT_METRICS = ("accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider")
GROUNDING_KEYS = ("n_images", "n_predicted", "n_reference", "precision", "recall", "f1", "precision_iou50",
                  "recall_iou50", "f1_iou50", "mean_iou", "dice")
ANSWER_TYPES = {"closed": "CLOSED", "open": "OPEN"}
# The scored sections of an evaluation's metrics.json, in display order (the rest of it describes the run).
SCORED_SECTIONS = ("closed", "open", "all", "report", "grounding")
IOU_THRESHOLD = 0.5


class MetricInputError(RadgroundError, ValueError):
    """Predictions / references that cannot be scored (lengths differ, wrong type, box or mask malformed)."""


# ---------------------------------------------------------------------------- text


def normalize(text: str) -> str:
    """Lower-case; every non-alphanumeric character (Unicode-aware) to a space; collapse whitespace; strip."""
    text = unicodedata.normalize("NFC", text).lower()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def _token_scores(prediction: list[str], reference: list[str]) -> tuple[float, float]:
    """SQuAD token F1 and token recall of two token lists (bags: a token counts as often as it occurs on both sides)."""
    if not prediction or not reference:
        same = float(prediction == reference)
        return same, same
    overlap = sum((Counter(prediction) & Counter(reference)).values())
    if overlap == 0:
        return 0.0, 0.0
    precision, recall = overlap / len(prediction), overlap / len(reference)
    return 2 * precision * recall / (precision + recall), recall


@dataclass(frozen=True)
class TextScores:
    """``summary``: n plus each metric over the set; ``per_sample``: each item's metrics, in input order."""

    summary: dict[str, Any]
    per_sample: list[dict[str, float]] = field(default_factory=list)


def _empty_summary() -> dict[str, Any]:
    return {"n": 0, **dict.fromkeys(TEXT_METRICS)}


def _check_texts(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise MetricInputError(f"text_scores: {len(predictions)} predictions but {len(references)} references; "
                               "pass one prediction per reference, in the same order (an unanswered item is '')")
    for name, values in (("prediction", predictions), ("reference", references)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise MetricInputError(f"text_scores: {name} {i} is a {type(value).__name__}, not a str; pass text "
                                       "(an unanswered item is '')")


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> TextScores:
    """Every text metric of ``predictions`` against ``references`` (one reference each), as one corpus."""
    _check_texts(predictions, references)
    n = len(predictions)
    if n == 0:
        return TextScores(_empty_summary(), [])
    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    per_sample: list[dict[str, float]] = []
    for p, r in zip(preds, refs, strict=True):
        f1, recall = _token_scores(p.split(), r.split())
        per_sample.append({"accuracy": float(p == r), "f1": f1, "recall": recall})

    # BLEU over every item: an empty prediction's reference length belongs in the corpus brevity
    # penalty, an empty reference's prediction in the candidate n-gram count. verbose=0: the
    # scorer prints its totals otherwise.
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    bleu_corpus, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)

    # CIDEr's documents are the non-empty references (the scorer fails when no reference has an
    # n-gram, and an empty one would only inflate N in idf = log(N / df)).
    documents = [i for i in range(n) if refs[i]]
    cider = dict.fromkeys(range(n), 0.0)
    if documents:
        _, cider_items = Cider().compute_score({i: gts[i] for i in documents}, {i: res[i] for i in documents})
        cider.update(zip(documents, (float(v) for v in cider_items), strict=True))

    rouge = Rouge()
    for i, (p, r) in enumerate(zip(preds, refs, strict=True)):
        scored = bool(p and r)  # the policy for empty text (module docstring); the scorers' own values differ
        per_sample[i].update({
            "bleu1": float(bleu_items[0][i]) if scored else 0.0,
            "bleu4": float(bleu_items[3][i]) if scored else 0.0,
            "rouge_l": float(rouge.calc_score([p], [r])) if scored else 0.0,
            "cider": cider[i] if scored else 0.0,
        })

    summary: dict[str, Any] = {"n": n}
    for name in ("accuracy", "f1", "recall"):
        summary[name] = math.fsum(s[name] for s in per_sample) / n
    summary["bleu1"], summary["bleu4"] = float(bleu_corpus[0]), float(bleu_corpus[3])
    summary["rouge_l"] = math.fsum(s["rouge_l"] for s in per_sample) / n
    summary["cider"] = math.fsum(s["cider"] for s in per_sample) / n
    return TextScores(summary, per_sample)


def vqa_scores(rows: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """rows = (answer_type "OPEN" | "CLOSED", prediction, reference) -> {"closed", "open", "all"} summaries."""
    groups: dict[str, list[tuple[str, str]]] = {"closed": [], "open": []}
    for i, row in enumerate(rows):
        if len(row) != 3:
            raise MetricInputError(f"vqa_scores: row {i} has {len(row)} fields; pass (answer_type, prediction, "
                                   "reference)")
        answer_type, prediction, reference = row
        kind = answer_type.strip().upper() if isinstance(answer_type, str) else answer_type
        if kind not in ANSWER_TYPES.values():
            raise MetricInputError(f"vqa_scores: row {i} has answer_type {answer_type!r}; expected 'OPEN' or 'CLOSED' "
                                   "(SLAKE / VQA-RAD's answer_type field)")
        groups["closed" if kind == "CLOSED" else "open"].append((prediction, reference))
    groups_all = groups["closed"] + groups["open"]
    out = {}
    for name, pairs in (("closed", groups["closed"]), ("open", groups["open"]), ("all", groups_all)):
        out[name] = text_scores([p for p, _ in pairs], [r for _, r in pairs]).summary if pairs else _empty_summary()
    return out


# ---------------------------------------------------------------------------- grounding


def _box(value: object, what: str) -> tuple[float, float, float, float]:
    try:
        coords = tuple(float(v) for v in np.asarray(value, dtype=float).reshape(-1))
    except (TypeError, ValueError):
        coords = ()
    if np.ndim(value) != 1 or len(coords) != 4 or not all(math.isfinite(c) for c in coords):
        raise MetricInputError(f"{what}: a box must be 4 finite numbers (x0, y0, x1, y1) in pixels")
    x0, y0, x1, y1 = coords
    if x1 < x0 or y1 < y0:
        raise MetricInputError(f"{what}: box has x1 < x0 or y1 < y0; boxes are (x0, y0, x1, y1) with x0 <= x1, "
                               "y0 <= y1")
    return x0, y0, x1, y1


def _mask(value: object, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 2:
        raise MetricInputError(f"{what}: a mask must be a 2-D array (rows, cols); got {array.ndim} dimension(s)")
    if array.dtype == bool:
        return array
    # 0/1 integer or float masks (e.g. a tensor's .numpy()) are masks; anything else is a probability map.
    if array.dtype.kind in "iuf" and np.isin(array, (0, 1)).all():
        return array.astype(bool)
    raise MetricInputError(f"{what}: mask has values other than 0/1 (dtype {array.dtype}); threshold probabilities "
                           "first (GroundedPrediction.masks are already bool)")


def _box_inter_areas(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float]:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter, (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])


def _mask_inter_areas(a: np.ndarray, b: np.ndarray, what: str) -> tuple[float, float, float]:
    if a.shape != b.shape:
        raise MetricInputError(f"{what}: masks of shapes {a.shape} and {b.shape}; compare masks on the same pixel "
                               "grid (resize the prediction to the reference's grid first)")
    return float(np.logical_and(a, b).sum()), float(a.sum()), float(b.sum())


def _iou(inter: float, area_a: float, area_b: float) -> float:
    union = area_a + area_b - inter
    return 1.0 if union == 0 else inter / union  # two empty pixel sets agree perfectly


def _dice(inter: float, area_a: float, area_b: float) -> float:
    total = area_a + area_b
    return 1.0 if total == 0 else 2.0 * inter / total


def box_iou(a: object, b: object) -> float:
    """IoU of two boxes (x0, y0, x1, y1), half-open pixel edges: area = (x1 - x0) * (y1 - y0)."""
    return _iou(*_box_inter_areas(_box(a, "box_iou: first box"), _box(b, "box_iou: second box")))


def mask_iou(a: object, b: object) -> float:
    """IoU of two bool masks of one shape; 1.0 when both are empty."""
    return _iou(*_mask_inter_areas(_mask(a, "mask_iou: first mask"), _mask(b, "mask_iou: second mask"), "mask_iou"))


def dice(a: object, b: object) -> float:
    """Dice 2|A∩B| / (|A| + |B|) of two bool masks of one shape (1.0 when both are empty), or of two boxes."""
    if np.ndim(a) == 1 and np.ndim(b) == 1:
        return _dice(*_box_inter_areas(_box(a, "dice: first box"), _box(b, "dice: second box")))
    return _dice(*_mask_inter_areas(_mask(a, "dice: first mask"), _mask(b, "dice: second mask"), "dice"))


@dataclass(frozen=True)
class GroundingSample:
    """One image's grounding: (keyword, box (x0, y0, x1, y1) in pixels | 2-D bool mask) predicted and referenced."""

    predicted: list[tuple[str, object]]
    reference: list[tuple[str, object]]


def _regions(pairs: Sequence[tuple[str, object]], what: str) -> dict[str, list[tuple[str, object]]]:
    """Keyword -> [(kind, region)]; keywords compared normalised ("Lunge," == "lunge")."""
    by_keyword: dict[str, list[tuple[str, object]]] = defaultdict(list)
    for j, pair in enumerate(pairs):
        label = f"{what} {j}"
        if not isinstance(pair, tuple | list) or len(pair) != 2 or not isinstance(pair[0], str):
            raise MetricInputError(f"grounding_scores: {label} is not a (keyword, box | mask) pair")
        keyword, region = pair
        if np.ndim(region) == 2:
            by_keyword[normalize(keyword)].append(("mask", _mask(region, label)))
        else:
            by_keyword[normalize(keyword)].append(("box", _box(region, label)))
    return by_keyword


def _ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def grounding_scores(samples: Sequence[GroundingSample]) -> dict[str, Any]:
    """Keyword matching then IoU over images (see the module docstring); counts are ints, ratios float | None."""
    n_pred = n_ref = matched = matched50 = 0
    ious: list[float] = []
    dices: list[float] = []
    for i, sample in enumerate(samples):
        predicted = _regions(sample.predicted, f"sample {i} prediction")
        reference = _regions(sample.reference, f"sample {i} reference")
        n_pred += sum(len(v) for v in predicted.values())
        n_ref += sum(len(v) for v in reference.values())
        for keyword in predicted.keys() & reference.keys():
            preds, refs = predicted[keyword], reference[keyword]
            kinds = {k for k, _ in preds} | {k for k, _ in refs}
            if len(kinds) > 1:
                raise MetricInputError(f"grounding_scores: sample {i} compares boxes with masks for one keyword; "
                                       "score detection (boxes) and segmentation (masks) separately")
            if kinds == {"box"}:
                areas = [[_box_inter_areas(p, r) for _, r in refs] for _, p in preds]
            else:
                what = f"grounding_scores: sample {i}"
                areas = [[_mask_inter_areas(p, r, what) for _, r in refs] for _, p in preds]
            iou = np.array([[_iou(*x) for x in row] for row in areas])
            rows, cols = linear_sum_assignment(iou, maximize=True)
            matched += len(rows)
            ious += [float(iou[r, c]) for r, c in zip(rows, cols, strict=True)]
            dices += [_dice(*areas[r][c]) for r, c in zip(rows, cols, strict=True)]
            # At IoU >= 0.5 only allowed pairs may match: maximise their number first (the weight
            # big exceeds any count of pairs, so one more pair always wins), IoU only breaks ties.
            allowed = iou >= IOU_THRESHOLD
            if allowed.any():
                big = min(iou.shape) + 1
                rows, cols = linear_sum_assignment(np.where(allowed, big + iou, 0.0), maximize=True)
                matched50 += int(allowed[rows, cols].sum())

    def prf(m: int) -> tuple[float | None, float | None, float | None]:
        return _ratio(m, n_pred), _ratio(m, n_ref), _ratio(2 * m, n_pred + n_ref)

    precision, recall, f1 = prf(matched)
    precision50, recall50, f150 = prf(matched50)
    return {"n_images": len(samples), "n_predicted": n_pred, "n_reference": n_ref,
            "precision": precision, "recall": recall, "f1": f1,
            "precision_iou50": precision50, "recall_iou50": recall50, "f1_iou50": f150,
            "mean_iou": _ratio(math.fsum(ious), len(ious)), "dice": _ratio(math.fsum(dices), len(dices))}

"""Grounded inference on one DICOM slice (``radground predict``): read, normalise, generate, map back.

The input goes through ingest's own rules, not a second copy of them: tasks/discover.py reads each
header and applies the file rules (not DICOM, not an image, localizer, derived or secondary capture,
burned-in annotation, no pixels, missing geometry, an orientation outside ``ingest.slice_axes``) and
orders a series along its slice normal; tasks/ingest.py decodes the pixels (compressed transfer
syntaxes included), refuses truncated, multi-frame and colour images and applies the modality rescale
(CT -> Hounsfield units); models/data.py ``model_pixels`` windows CT / min-max scales MR and resizes to
224 x 224, as in training. Two file rules are skipped: a missing PatientID or Study/Series UID stops
ingest from assigning a pseudonym, which a prediction does not need.

Output coordinates are the DICOM's own pixel grid (x = column, y = row, x2/y2 exclusive as in
radground/masks.py). Boxes decoded on the model's 224 x 224 grid are scaled by cols/224 and rows/224
(:func:`box_to_dicom`). Masks are mapped back by resizing the mask decoder's PROBABILITIES bilinearly
to rows x cols and thresholding them at the model's ``mask_threshold`` (:func:`mask_to_dicom`), rather
than by nearest-neighbour upsampling of the 224 mask, so mask edges do not turn into steps of
rows/224 pixels.

``task="ground"`` follows ``train.grounding``: ``detection`` asks for boxes (``<p bbox=…>``; mask
null); ``segmentation`` and ``mixed`` ask for ``<seg>`` spans with masks, whose box is the box of the
mapped mask (a mixed-trained model answers both prompts; the mask is the richer answer).

No PHI leaves this module: nothing read from the header is returned, logged or written; errors name
the problem, never the input's path or values; the overlay's file name is the first 16 hex digits of
the slice file's sha256, and the PNG is written without text chunks.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from PIL import Image, ImageDraw

from models.data import IMAGE_SIZE, PROMPTS, model_pixels, vqa_prompt
from radground import overlay
from radground.errors import RadgroundError
from radground.labels import label_map
from radground.masks import bbox_of, encode_rle
from radground.schemas import GroundingRecord
from radground.tokens import GroundedSpan
from tasks.discover import FileHeader, Rejection, file_problem, plan_series, quiet_dicom, read_dataset, scan_one
from tasks.ingest import is_truncated, modality_values

log = logging.getLogger(__name__)

PredictTask = Literal["report", "vqa", "ground"]
PREDICT_TASKS: tuple[str, ...] = ("report", "vqa", "ground")
LANGUAGES: tuple[str, ...] = ("en", "de")
PREDICTIONS_FOLDER = "predictions"  # under data_dir: the default overlay folder
#: ingest's file rules that are about identity (pseudonyms), not about the image: not applied here.
IDENTITY_REASONS = frozenset({"missing_patient_id", "missing_uid"})
OVERLAY_SCALE = 2  # as `radground show`


class PredictError(RadgroundError):
    """The input of ``predict`` cannot be used as asked. Messages never quote the input path or header."""


@dataclass(frozen=True)
class DicomSlice:
    """One decoded slice, PHI-free: pixel values and the facts the output reports, nothing from the header
    that could identify anyone."""

    values: np.ndarray  # (rows, cols): CT in HU (int16), MR raw (uint16), as the images table holds them
    modality: str  # "CT" | "MR"
    rows: int
    cols: int
    slice_index: int  # in position order along the slice normal
    slices_in_series: int
    sha256: str  # of the slice file's bytes
    files_skipped: dict[str, int] = field(default_factory=dict)  # ingest reason -> files of the folder left out

    def info(self) -> dict[str, Any]:
        return {"rows": self.rows, "cols": self.cols, "modality": self.modality, "slice_index": self.slice_index,
                "slices_in_series": self.slices_in_series, "sha256": self.sha256,
                "files_skipped": dict(sorted(self.files_skipped.items()))}


# ------------------------------------------------------------------------------------ reading


def _input_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise PredictError("predict: the input folder holds no files. Pass a DICOM file, or a folder with "
                               "the DICOM files of one series.")
        return files
    raise PredictError("predict: the input is neither a file nor a folder (it does not exist, or cannot be "
                       "read). Pass a DICOM file, or a folder with the DICOM files of one series.")


def _unusable(reason: str, detail: str, what: str = "the input file") -> PredictError:
    return PredictError(f"predict: {what} cannot be used: {detail} (ingest reason {reason}). Pass a single-frame "
                        "grey CT or MR image slice: an original image in a plane that ingest.slice_axes keeps.")


def read_slice(settings: Any, path: Path | str, slice_index: int | None = None) -> DicomSlice:
    """The slice ``predict`` runs on: a DICOM file, or slice ``slice_index`` (default: the middle one, in
    position order) of the one series in a folder. Files of a folder that ingest would quarantine are left
    out (counted by reason in ``files_skipped``); a lone file that ingest would quarantine is an error."""
    path = Path(path)
    files = _input_files(path)
    single = path.is_file()
    headers: list[FileHeader] = []
    skipped: Counter[str] = Counter()
    first_problem: dict[str, str] = {}
    studies_seen: set[str] = set()  # shared: discover decodes person names once per study, and they go unused
    with quiet_dicom():
        for number, file in enumerate(files):
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise PredictError(f"predict: an input file cannot be read ({type(exc).__name__}); check its "
                                   "permissions.") from None
            # The label stands in for the path inside the header object: nothing there may carry a file name.
            scanned = scan_one(str(number), data, studies_seen)
            problem = ((scanned.reason, scanned.detail) if isinstance(scanned, Rejection)
                       else file_problem(scanned, settings))
            if problem is not None and problem[0] in IDENTITY_REASONS:
                problem = None
            if problem is not None:
                if single:
                    raise _unusable(*problem)
                skipped[problem[0]] += 1
                first_problem.setdefault(*problem)
                continue
            headers.append(scanned)  # type: ignore[arg-type]
    if not headers:
        reasons = "; ".join(f"{n} x {reason} ({first_problem[reason]})" for reason, n in sorted(skipped.items()))
        raise PredictError(f"predict: no file of the input folder is a usable image slice: {reasons}. Pass a folder "
                           "with the original CT or MR slices of one series.")

    by_series: dict[tuple[str, str], list[FileHeader]] = defaultdict(list)
    for header in headers:
        by_series[(header.study_uid, header.series_uid)].append(header)
    if len(by_series) > 1:
        described = ", ".join(f"{len(h)} {h[0].modality} slice(s) {h[0].rows}x{h[0].cols}"
                              for h in sorted(by_series.values(), key=len, reverse=True))
        raise PredictError(f"predict: the input folder holds {len(by_series)} series ({described}); predict reads "
                           "one. Pass a folder with the files of one series only, or one file of the series "
                           "you want.")
    series_files = next(iter(by_series.values()))
    plan, rejected = plan_series("predict", series_files, False, settings)
    if plan is None:
        reason, detail = rejected[0][1], rejected[0][2]
        raise _unusable(reason, detail, "the input folder's series")
    skipped.update(reason for _, reason, _ in rejected)

    count = len(plan.files)
    index = count // 2 if slice_index is None else slice_index
    if not 0 <= index < count:
        raise PredictError(f"predict: slice {slice_index} is not in the series, which has {count} usable slice(s); "
                           f"pass a slice index from 0 to {count - 1} (position order along the slice normal), "
                           "or leave it out for the middle slice.")
    number, sha = plan.files[index]
    values = _decode(files[int(number)].read_bytes(), sha,
                     "the input file" if single else f"slice {index} of the input folder's series")
    rows, cols = values.shape
    return DicomSlice(values=values, modality=plan.modality, rows=int(rows), cols=int(cols), slice_index=index,
                      slices_in_series=count, sha256=sha, files_skipped=dict(skipped))


def _decode(data: bytes, sha: str, what: str) -> np.ndarray:
    """Pixels as ingest's ``_extract_slice`` gets them, with its reasons as errors."""
    if hashlib.sha256(data).hexdigest() != sha:
        raise _unusable("source_changed", "the file changed while it was read; run predict again", what)
    ds = None
    with quiet_dicom():
        try:
            ds, cut_short = read_dataset(data)
            if cut_short or is_truncated(ds):
                raise _unusable("truncated", "the file ends inside the pixel data; re-export it", what)
            values = modality_values(ds)
        except PredictError:
            raise
        except NotImplementedError:
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            raise _unusable("no_decoder", f"no installed decoder for transfer syntax "
                            f"{ts.name if ts else 'unknown'}", what) from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure; its text may quote the file
            raise _unusable("undecodable", f"its pixel data cannot be decoded ({type(exc).__name__})", what) from None
    if values is None:
        raise _unusable("unsupported_pixels", "multi-frame or colour image; only single-frame grey slices are used",
                        what)
    return values


# ------------------------------------------------------------------------------------ prompts


def prompt_for(settings: Any, task: str, language: str, question: str | None = None) -> tuple[str, str]:
    """(prompt, model task) for a predict task: report -> ``PROMPTS["report"]``, vqa -> ``vqa_prompt``,
    ground -> the detection or segmentation prompt that ``train.grounding`` names (mixed -> segmentation)."""
    if language not in LANGUAGES:
        raise PredictError(f"predict: language {language!r} is not supported; use en or de.")
    if task == "report":
        return PROMPTS["report"][language], "text"
    if task == "vqa":
        if question is None or not question.strip():
            raise PredictError("predict: the vqa task needs a question; pass --question TEXT.")
        return vqa_prompt(question, language), "text"
    if task == "ground":
        model_task = "detection" if settings.train.grounding == "detection" else "segmentation"
        return PROMPTS[model_task][language], model_task
    raise PredictError(f"predict: task {task!r} is not one of {', '.join(PREDICT_TASKS)}.")


# ------------------------------------------------------------------------------------ coordinates


def box_to_dicom(box: Sequence[float], rows: int, cols: int, size: int = IMAGE_SIZE) -> list[float]:
    """[x1, y1, x2, y2] on the model's size x size grid -> the same box in the DICOM's pixels (x = column),
    clipped to [0, cols] x [0, rows]."""
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = cols / size, rows / size
    return [min(max(x1 * sx, 0.0), cols), min(max(y1 * sy, 0.0), rows),
            min(max(x2 * sx, 0.0), cols), min(max(y2 * sy, 0.0), rows)]


def mask_to_dicom(probabilities: np.ndarray, rows: int, cols: int, threshold: float = 0.5) -> np.ndarray:
    """(224, 224) mask probabilities -> (rows, cols) bool: bilinear resize (pixel centres, as the image was
    resized; antialiased when shrinking), then ``>= threshold``."""
    t = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    if t.ndim != 2:
        raise ValueError(f"mask probabilities must be (H, W); got shape {tuple(t.shape)}")
    resized = F.interpolate(t[None, None], size=(rows, cols), mode="bilinear", align_corners=False,
                            antialias=rows < t.shape[0] or cols < t.shape[1])[0, 0]
    return (resized >= threshold).numpy()


def groundings(prediction: Any, rows: int, cols: int, threshold: float = 0.5) -> list[dict[str, Any]]:
    """A GroundedPrediction's spans on the DICOM grid: detection spans keep their class (mask null);
    segmentation spans get their mask (RLE of rows x cols), its pixel count and its box (null if empty)."""
    out: list[dict[str, Any]] = []
    plain = prediction.plain or ""
    names = label_map()
    for i, span in enumerate(prediction.spans):
        if isinstance(span, GroundedSpan):
            out.append({"keyword": span.keyword, "start": span.start, "end": span.end,
                        "box": box_to_dicom(span.box, rows, cols), "mask": None, "area_px": None,
                        "class_id": span.class_id, "class_name": names.by_id(span.class_id).name})
            continue
        start, end = span
        mask = mask_to_dicom(prediction.mask_probs[i], rows, cols, threshold)
        out.append({"keyword": plain[start:end], "start": start, "end": end, "box": bbox_of(mask),
                    "mask": encode_rle(mask), "area_px": int(mask.sum()), "class_id": None, "class_name": None})
    return out


# ------------------------------------------------------------------------------------ overlay


def render_prediction(image: DicomSlice, found: Sequence[dict[str, Any]], plain: str, language: str,
                      scale: int = OVERLAY_SCALE) -> Image.Image:
    """The slice as ``radground show`` draws it, with the predicted groundings: detection boxes through
    radground/overlay.py's renderer ("keyword: class" labels); segmentation masks, which carry no class,
    blended translucent in overlay.py's colours, outlined by their box and labelled with the keyword."""
    records = [_box_record(g, plain, image, language) for g in found if g["class_id"] is not None]
    picture = overlay.render_overlay(image.values, image.modality, [], records, language=language, scale=scale)
    masks = [g for g in found if g["mask"] is not None]
    if not masks:
        return picture
    from radground.masks import decode_rle

    rgb = np.asarray(picture, dtype=np.float32).copy()
    colours = [overlay.class_colour(i + 1) for i in range(len(masks))]  # one colour per span, in text order
    for g, colour in zip(masks, colours, strict=True):
        region = decode_rle(g["mask"], image.rows, image.cols).repeat(scale, 0).repeat(scale, 1)
        rgb[region] = (1.0 - overlay.MASK_ALPHA) * rgb[region] + overlay.MASK_ALPHA * np.asarray(colour)
    base = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    font = overlay.label_font(scale)
    taken: list[tuple[float, float, float, float]] = []
    for g, colour in zip(masks, colours, strict=True):
        if g["box"] is None:
            continue
        x1, y1, x2, y2 = (v * scale for v in g["box"])
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour + (255,), width=max(1, scale))
        text_h = draw.textbbox((0, 0), g["keyword"], font=font)[3] + 4
        overlay.text_box(draw, (x1, y1 - text_h if y1 >= text_h else y2), g["keyword"], font, colour, base.size,
                          taken)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def _box_record(g: dict[str, Any], plain: str, image: DicomSlice, language: str) -> GroundingRecord:
    """A predicted box as the ground stage's record, which is what overlay.py draws. The box is widened to at
    least one pixel for drawing (a box inside one location bin has zero width); ids are placeholders."""
    x1, y1, x2, y2 = g["box"]
    x2, y2 = min(max(x2, x1 + 1.0), image.cols), min(max(y2, y1 + 1.0), image.rows)
    x1, y1 = min(x1, x2 - 1.0), min(y1, y2 - 1.0)
    region = np.zeros((image.rows, image.cols), dtype=bool)
    region[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
    return GroundingRecord(
        image_id="prediction", study_uid="prediction", patient_pseudonym="", drop_id="predict",
        language=language, sentence_index=0, sentence=plain, keyword=g["keyword"], keyword_start=g["start"],
        keyword_end=g["end"], negated=False, class_id=g["class_id"], class_name=g["class_name"],
        bbox=[x1, y1, x2, y2], rle=encode_rle(region), area_px=int(region.sum()), rows=image.rows, cols=image.cols)


def save_png(picture: Image.Image, target: Path) -> Path:
    """Write the PNG with no text chunks (Pillow adds none unless given ``pnginfo``; nothing is passed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target, format="PNG")
    return target


# ------------------------------------------------------------------------------------ predict


def predict_dicom(
    settings: Any,
    path: Path | str,
    model: Any,
    processor: Any,
    *,
    task: PredictTask,
    question: str | None = None,
    language: str = "en",
    slice_index: int | None = None,
    overlay: Path | str | None = None,
) -> dict[str, Any]:
    """Run the model on one DICOM slice; returns the JSON-serialisable result ``radground predict`` prints:

    ``{"task", "language", "prompt", "text" (plain; null when grounding markup was malformed), "raw"
    (tokens.py form), "groundings": [{"keyword", "start", "end", "box", "mask", "area_px", "class_id",
    "class_name"}], "image": {"rows", "cols", "modality", "slice_index", "slices_in_series", "sha256",
    "files_skipped"}, "overlay", "error"}``. The overlay PNG goes to ``overlay`` or
    ``<data_dir>/predictions/<sha256[:16]>-<task>.png``."""
    prompt, model_task = prompt_for(settings, task, language, question)  # before reading: a bad call fails fast
    image = read_slice(settings, path, slice_index)
    pixels = model_pixels(image.values, image.modality)
    with torch.no_grad():
        prediction = model.predict(processor, pixels, prompt, model_task,
                                   max_new_tokens=settings.model.max_new_tokens)
    threshold = float(getattr(model.config, "mask_threshold", 0.5))
    found = groundings(prediction, image.rows, image.cols, threshold)
    target = Path(overlay) if overlay is not None else (
        Path(settings.data_dir) / PREDICTIONS_FOLDER / f"{image.sha256[:16]}-{task}.png")
    save_png(render_prediction(image, found, prediction.plain or "", language), target)
    log.info("predict %s: %s %dx%d slice %d of %d, %d grounding(s)%s; overlay %s", task, image.modality,
             image.rows, image.cols, image.slice_index, image.slices_in_series, len(found),
             " (malformed output dropped)" if prediction.error else "", target.name)
    return {
        "task": task,
        "language": language,
        "prompt": prompt,
        "text": prediction.plain,
        "raw": prediction.text,
        "groundings": found,
        "image": image.info(),
        "overlay": str(target),
        "error": prediction.error,
    }

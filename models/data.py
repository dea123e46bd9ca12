"""Training data for RadGrounder: a dataset version as a torch Dataset, the task mixture of
docs/method.md, and the training mixture (version + VQA-RAD train + SLAKE train).

One sample is a dict (``models/radgrounder/processing.py`` collates a list of them)::

    pixel_values       float32 tensor [3, 224, 224] in [-1, 1]. CT: one channel per window
                       (lung 2250/-100, soft tissue 350/40, brain 80/40) after clipping at
                       -1000 HU; MR: per-image min-max, repeated to 3 channels; PNG/JPG
                       benchmarks: grayscale / 255 to [-1, 1], repeated. Windowed at full
                       resolution, then resized (bilinear, antialiased) to 224 x 224.
    prefix             str, the prompt (PROMPTS): "Caption this image:", "Question: … Answer:", …
    suffix             str, the target; the loss covers these tokens only (the processor's job)
    masks              list of bool tensors [224, 224], one per "</seg>" of ``suffix`` IN TEXT
                       ORDER (empty unless task == "segmentation"); resized with nearest-exact
    language           "en" | "de"
    task               "detection" | "segmentation" | "report" | "vqa"
    image_id           str (the version's pseudonymous image id; "slake/…", "vqa-rad/…")
    patient_pseudonym  str, for lineage only; never printed or logged ("" for benchmarks)

Task mixture on a version (docs/method.md): a slice with grounded keywords becomes grounded
captioning (detection markup ``<p bbox=… id=…>keyword</p>`` or ``<seg>keyword</seg>`` spans,
rendered by radground/tokens.py only); any other slice becomes report generation or VQA,
50/50 where both exist. The language is drawn 50/50 among the languages the item exists in
(the report's own, and its translation where every sentence has one). Every draw comes from
``random.Random(f"{seed}:{epoch}:{index}")``, so a sample is a function of (seed, epoch,
index) alone, whatever the worker or the order items are read in.

Reading order: pixels sit in large Parquet row groups that are read whole, so train with
:class:`BlockShuffleSampler` (shuffled row groups, items shuffled within a small window of
them, dealt to DDP ranks) rather than a uniformly random order.

Which slices: the version keeps every slice of a series in its images table, but only the
"kept" slices carry labels: the grounded ones and the ground stage's seeded sample of
ungrounded ones, which is what has slice-level VQA items. ``slices="kept"`` (default) uses
those; ``slices="all"`` uses every slice whose study has a report or VQA items.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from torch.utils.data import ConcatDataset, Dataset, Sampler

from radground import imaging, tokens
from radground.errors import RadgroundError
from radground.masks import decode_rle

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
Task = Literal["detection", "segmentation", "report", "vqa"]
Language = Literal["en", "de"]
GroundingMode = Literal["detection", "segmentation", "mixed"]
TASKS: tuple[str, ...] = ("detection", "segmentation", "report", "vqa")
LANGUAGES: tuple[str, ...] = ("de", "en")

#: Every prompt, per task and language. docs/method.md gives the English ones and the German
#: report/VQA prompts; the German grounded-captioning prompts are radground's own choice.
PROMPTS: dict[str, dict[str, str]] = {
    "report": {"en": "Caption this image:", "de": "Beschreibe dieses Bild:"},
    "detection": {"en": "Caption this image and detect keywords:",
                  "de": "Beschreibe dieses Bild und erkenne Schlüsselwörter:"},
    "segmentation": {"en": "Caption this image and segment keywords:",
                     "de": "Beschreibe dieses Bild und segmentiere Schlüsselwörter:"},
    "vqa": {"en": "Answer:", "de": "Antwort:"},
}
QUESTION_PREFIX = {"en": "Question:", "de": "Frage:"}
OPTIONS_PREFIX = {"en": "Options:", "de": "Optionen:"}
_OTHER = {"de": "en", "en": "de"}


class DataError(RadgroundError):
    """Training data cannot be read as asked: a missing file, a damaged version, a refused split."""


class Sample(TypedDict):
    pixel_values: torch.Tensor
    prefix: str
    suffix: str
    masks: list[torch.Tensor]
    language: str
    task: str
    image_id: str
    patient_pseudonym: str


# ------------------------------------------------------------------------------------ prompts


def vqa_prompt(question: str, language: str, choices: Sequence[str] = ()) -> str:
    """``Question: <q> [Options: a, b, c] Answer:`` (German: ``Frage: … Optionen: … Antwort:``)."""
    parts = [QUESTION_PREFIX[language], tokens.escape_text(question.strip())]
    if choices:
        parts += [OPTIONS_PREFIX[language], ", ".join(tokens.escape_text(c) for c in choices)]
    parts.append(PROMPTS["vqa"][language])
    return " ".join(parts)


# ------------------------------------------------------------------------------------ images


def resize_pixels(channels: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(3, H, W) values in [-1, 1] -> float32 [3, size, size]: bilinear, antialiased when shrinking."""
    t = torch.as_tensor(np.ascontiguousarray(channels, dtype=np.float32))
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"pixels must be (3, H, W); got shape {tuple(t.shape)}")
    if tuple(t.shape[1:]) == (size, size):
        return t.clone()
    out = F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(-1.0, 1.0)  # antialiasing weights are non-negative; this only removes float noise


def resize_mask(mask: np.ndarray | torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(H, W) bool mask -> bool [size, size], nearest-exact (pixel centres, like the bilinear resize)."""
    t = torch.as_tensor(np.ascontiguousarray(mask, dtype=bool))
    if t.ndim != 2:
        raise ValueError(f"mask must be (H, W); got shape {tuple(t.shape)}")
    if tuple(t.shape) == (size, size):
        return t.clone()
    return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0] > 0.5


def scale_box(box: Sequence[float], width: int, height: int, size: int = IMAGE_SIZE) -> tuple[float, ...]:
    """[x1, y1, x2, y2] in pixels of a width x height image -> the same box on the size x size grid."""
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = size / width, size / height
    return (min(x1 * sx, size), min(y1 * sy, size), min(x2 * sx, size), min(y2 * sy, size))


def model_pixels(values: np.ndarray, modality: str) -> torch.Tensor:
    """(H, W) HU (CT) or raw (MR) -> float32 [3, 224, 224]: windows / min-max (radground.imaging), then resize."""
    return resize_pixels(imaging.normalize(values, modality))


# ------------------------------------------------------------------------------------ versions



def resolve_version(settings: Any, version: str, *, pull: bool = True) -> Path:
    """The folder of the version ``version`` names (8..64 hex characters of its digest, one version only).

    A version tracked by DVC (``versions/<digest16>.dvc``) but not on this machine is pulled
    through :class:`radground.dvc.DvcRepo` when ``pull`` is set.
    """
    from radground.layout import match_version
    from tasks.version import read_manifest
    from tasks.version_stage import versions_root

    root = versions_root(settings)
    wanted = version.strip().lower()
    present = list(root.iterdir()) if root.is_dir() else []
    local = {p.name for p in present if p.is_dir() and (p / "manifest.json").is_file()}
    tracked = {p.stem for p in present if p.suffix == ".dvc" and p.is_file()}
    name = match_version(version, sorted(local | tracked), root, error=DataError)
    folder = root / name
    if name not in local:
        if not pull:
            raise DataError(f"version {name} is tracked in {root} but not on this machine; pull it with "
                            f"`radground datasets pull {name}` (or pass pull=True).")
        from radground.dvc import DvcRepo

        folder = DvcRepo(root, settings).pull(name)
    digest = read_manifest(folder).digest
    if not digest.startswith(wanted):
        raise DataError(f"version {wanted}: version {name} has digest {digest}, which does not start with it. "
                        "Run `radground datasets list --json` for the full digests.")
    from tasks.retention import RETIRED_FILE, is_retired

    if is_retired(folder):
        raise DataError(f"version {name} was retired ({folder / RETIRED_FILE}): only its manifest and lineage are "
                        "kept, its data is gone. Use a version that is kept (`radground datasets list` marks "
                        "retired ones), or rebuild.")
    return folder


@dataclass(frozen=True)
class _Entry:
    shard: int
    row_group: int
    offset: int
    image_id: str
    patient: str
    study_uid: str
    modality: str
    grounded: bool


_GROUNDING_COLUMNS = ["image_id", "patient_pseudonym", "language", "sentence_index", "sentence", "keyword",
                      "keyword_start", "keyword_end", "class_id", "bbox", "rle", "rows", "cols"]
_IMAGE_KEY_COLUMNS = ["image_id", "patient_pseudonym", "study_uid", "modality", "has_report"]
_PIXEL_COLUMNS = ["image_id", "modality", "pixel_dtype", "rows", "cols", "pixels"]


def read_version_table(version_dir: Path, manifest: Any, name: str, columns: list[str] | None,
                patients: pa.Array) -> pa.Table | None:
    """One table of the version, filtered to the split's patients; None when the version has no such table."""
    entry = manifest.tables.get(name)
    if entry is None:
        return None
    parts = []
    for shard in entry.shards:
        path = version_dir / shard.path
        if not path.is_file():
            raise DataError(f"version {version_dir.name}: shard {shard.path} of table {name!r} is missing. Pull the "
                            f"version again (`radground datasets pull {version_dir.name}`).")
        table = pq.read_table(path, columns=columns)
        parts.append(table.filter(pc.is_in(table.column("patient_pseudonym"), value_set=patients)))
    return pa.concat_tables(parts) if parts else None


def _index(values: list, rows: Sequence[int] | None = None) -> dict[Any, list[int]]:
    out: dict[Any, list[int]] = defaultdict(list)
    for i, v in enumerate(values):
        out[v].append(i if rows is None else rows[i])
    return dict(out)


class VersionDataset(Dataset):
    """The RefRad2D task mixture over one split of a dataset version; see the module docstring.

    The index (which slice is in which shard, row group and row; which grounding, report and
    VQA rows belong to it) is built from the label tables and the images table's key columns;
    pixels are read and decoded per item, one row group at a time, the last
    ``cache_row_groups`` row groups kept per process.
    """

    def __init__(self, version_dir: Path | str, split: str = "train", *, allow_test: bool = False, seed: int = 0,
                 epoch: int = 0, grounding: GroundingMode = "mixed", slices: Literal["kept", "all"] = "kept",
                 cache_row_groups: int = 2) -> None:
        from tasks.version import SPLIT_NAMES, read_manifest, read_splits

        self.version_dir = Path(version_dir)
        if split not in SPLIT_NAMES:
            raise DataError(f"split {split!r}: expected one of {', '.join(SPLIT_NAMES)}.")
        if split == "test" and not allow_test:
            raise DataError("split 'test' is for evaluation only: train on 'train' and select checkpoints on 'val'. "
                            "An evaluation passes allow_test=True.")
        if grounding not in ("detection", "segmentation", "mixed"):
            raise DataError(f"grounding {grounding!r}: expected detection, segmentation or mixed.")
        if slices not in ("kept", "all"):
            raise DataError(f"slices {slices!r}: expected kept or all.")
        self.split, self.seed, self.epoch, self.grounding = split, int(seed), int(epoch), grounding
        self.cache_row_groups = max(1, int(cache_row_groups))
        self.manifest = read_manifest(self.version_dir)
        self.digest = self.manifest.digest
        splits = read_splits(self.version_dir)
        self.patients = frozenset(p for p, s in splits.items() if s == split)
        wanted = pa.array(sorted(self.patients), pa.string())

        self._grounding = read_version_table(self.version_dir, self.manifest, "grounding", _GROUNDING_COLUMNS, wanted)
        self._reports = read_version_table(self.version_dir, self.manifest, "reports",
                                    ["study_uid", "patient_pseudonym", "language", "text", "sentences"], wanted)
        self._vqa = read_version_table(self.version_dir, self.manifest, "vqa", ["study_uid", "image_id",
                                "patient_pseudonym", "language", "question", "answer", "choices"], wanted)
        self._grounding_rows = {} if self._grounding is None else _index(self._grounding.column("image_id").to_pylist())
        self._report_rows = {} if self._reports is None else _index(self._reports.column("study_uid").to_pylist())
        self._vqa_by_image: dict[Any, list[int]] = {}
        self._vqa_by_study: dict[Any, list[int]] = {}
        if self._vqa is not None:
            image_ids = self._vqa.column("image_id").to_pylist()
            studies = self._vqa.column("study_uid").to_pylist()
            self._vqa_by_image = _index([i for i in image_ids if i is not None],
                                        [n for n, i in enumerate(image_ids) if i is not None])
            self._vqa_by_study = _index([s for s, i in zip(studies, image_ids, strict=True) if i is None],
                                        [n for n, i in enumerate(image_ids) if i is None])

        images = self.manifest.tables.get("images")
        if images is None:
            raise DataError(f"version {self.version_dir.name} has no images table; it is not a dataset version "
                            "radground wrote. Rebuild it.")
        self._shards = [self.version_dir / s.path for s in images.shards]
        self._entries: list[_Entry] = []
        seen_patients: set[str] = set()
        for n, path in enumerate(self._shards):
            if not path.is_file():
                raise DataError(f"version {self.version_dir.name}: shard {path.name} of table 'images' is missing. "
                                f"Pull the version again (`radground datasets pull {self.version_dir.name}`).")
            meta = pq.ParquetFile(path).metadata
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]).tolist()
            keys = pq.read_table(path, columns=_IMAGE_KEY_COLUMNS).to_pydict()
            for row, (image_id, patient, study, modality, has_report) in enumerate(zip(*keys.values(), strict=True)):
                if patient not in splits:
                    raise DataError(f"version {self.version_dir.name}: an image's patient has no split in "
                                    "splits.parquet; the version is damaged. Pull it again or rebuild it.")
                if patient not in self.patients:
                    continue
                seen_patients.add(patient)
                grounded = image_id in self._grounding_rows
                labelled = grounded or image_id in self._vqa_by_image or (slices == "all" and (
                    (has_report and study in self._report_rows) or study in self._vqa_by_study))
                if not labelled:
                    continue
                group = bisect.bisect_right(starts, row) - 1
                self._entries.append(_Entry(n, group, row - starts[group], image_id, patient, study, modality,
                                            grounded))
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], dict[str, list]] = OrderedDict()
        log.info("version %s split %s: %d items (%d grounded) from %d patients", self.digest[:16], split,
                 len(self._entries), sum(e.grounded for e in self._entries), len(seen_patients))

    @classmethod
    def from_settings(cls, settings: Any, version: str, split: str = "train", **kwargs: Any) -> VersionDataset:
        """Resolve ``version`` (pulled through DVC when absent) and take seed and grounding from settings.train."""
        kwargs.setdefault("seed", settings.train.seed)
        kwargs.setdefault("grounding", settings.train.grounding)
        return cls(resolve_version(settings, version), split, **kwargs)

    # -- torch Dataset
    def __len__(self) -> int:
        return len(self._entries)

    def set_epoch(self, epoch: int) -> None:
        """Draw tasks and languages for ``epoch`` (call in each worker, or before workers are started)."""
        self.epoch = int(epoch)

    def __getstate__(self) -> dict:  # DataLoader workers and Ray get no open files or cached pixels
        state = self.__dict__.copy()
        state["_handles"], state["_cache"] = {}, OrderedDict()
        return state

    @property
    def counts(self) -> dict[str, int]:
        """For lineage: items (one per slice), grounded items, and patients with at least one item."""
        return {"items": len(self._entries), "grounded_items": sum(e.grounded for e in self._entries),
                "patients": len({e.patient for e in self._entries})}

    def image_ids(self) -> list[str]:
        return [e.image_id for e in self._entries]

    # -- what evaluation reads (models/evaluation.py): the same index and label rows training uses
    @property
    def entries(self) -> list[_Entry]:
        """The items, in index order (one per labelled slice of the split)."""
        return list(self._entries)

    @property
    def report_studies(self) -> list[str]:
        """Study UIDs of the split with a report row, in table order."""
        return list(self._report_rows)

    def grounding_rows(self, image_id: str) -> list[dict]:
        """The grounding rows of one slice (every language), as dicts of the grounding columns read."""
        rows = self._grounding_rows.get(image_id)
        return [] if not rows else self._grounding.take(pa.array(rows, pa.int64())).to_pylist()

    def blocks(self) -> list[list[int]]:
        """Item indices grouped by the pixel row group they are read from (see :class:`BlockShuffleSampler`)."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, e in enumerate(self._entries):
            groups[(e.shard, e.row_group)].append(i)
        return list(groups.values())

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} items")
        index %= len(self)
        entry = self._entries[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        values, modality = self.pixels(entry)
        if entry.grounded:
            task = self.grounding if self.grounding != "mixed" else rng.choice(("detection", "segmentation"))
            prefix, suffix, masks, language = self._grounded(entry, task, rng)
        else:
            reports = self.report_languages(entry)
            questions = self._vqa_items(entry)
            options = [t for t, ok in (("report", bool(reports)), ("vqa", bool(questions))) if ok]
            task = rng.choice(options)
            masks = []
            if task == "report":
                language = rng.choice(sorted(reports))
                prefix, suffix = PROMPTS["report"][language], tokens.escape_text(reports[language])
            else:
                language = rng.choice(sorted(questions))
                item = questions[language][rng.randrange(len(questions[language]))]
                prefix = vqa_prompt(item["question"], language, item["choices"] or ())
                suffix = tokens.escape_text(item["answer"].strip())
        return Sample(pixel_values=model_pixels(values, modality), prefix=prefix, suffix=suffix, masks=masks,
                      language=language, task=task, image_id=entry.image_id, patient_pseudonym=entry.patient)

    # -- pixels
    def pixels(self, entry: _Entry) -> tuple[np.ndarray, str]:
        """An item's stored pixels (HU for CT, raw MR values) and modality, before windowing."""
        key = (entry.shard, entry.row_group)
        group = self._cache.get(key)
        if group is None:
            handle = self._handles.get(entry.shard)
            if handle is None:
                handle = self._handles[entry.shard] = pq.ParquetFile(self._shards[entry.shard])
            group = handle.read_row_group(entry.row_group, columns=_PIXEL_COLUMNS).to_pydict()
            self._cache[key] = group
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        i = entry.offset
        if group["image_id"][i] != entry.image_id:
            raise DataError(f"version {self.version_dir.name}: shard {self._shards[entry.shard].name} changed since "
                            "the dataset was indexed (versions are immutable). Pull the version again.")
        values = imaging.pixels_from_bytes(group["pixels"][i], group["pixel_dtype"][i], group["rows"][i],
                                           group["cols"][i])
        return values, group["modality"][i]

    # -- grounded captioning
    def _grounded(self, entry: _Entry, task: str, rng: random.Random
                  ) -> tuple[str, str, list[torch.Tensor], str]:
        rows = self.grounding_rows(entry.image_id)
        language = rng.choice(sorted({r["language"] for r in rows}))
        by_sentence: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            if r["language"] == language:
                by_sentence[r["sentence_index"]].append(r)
        pieces: list[str] = []
        masks: list[torch.Tensor] = []
        for index in sorted(by_sentence):
            group = by_sentence[index]
            sentence = group[0]["sentence"]
            spans = spans_in_text_order(group)
            if task == "detection":
                pieces.append(tokens.encode_detection(sentence, detection_spans(spans), IMAGE_SIZE, IMAGE_SIZE))
            else:
                pieces.append(tokens.encode_segmentation(sentence, [(s, e) for (s, e), _ in spans]))
                masks += [span_mask(span_rows) for _, span_rows in spans]
        return PROMPTS[task][language], " ".join(pieces), masks, language

    # -- report and VQA
    def report_languages(self, entry: _Entry) -> dict[str, str]:
        """language -> report text, for the study's report and, where every sentence has one, its translation."""
        out: dict[str, str] = {}
        for n in self._report_rows.get(entry.study_uid, []):
            r = self._reports.slice(n, 1).to_pylist()[0]
            sentences = r["sentences"] or []
            own = " ".join(s["text"].strip() for s in sentences) if sentences else r["text"].strip()
            if own:
                out.setdefault(r["language"], own)
            if sentences and all(s.get("translation") for s in sentences):
                out.setdefault(_OTHER[r["language"]], " ".join(s["translation"].strip() for s in sentences))
        return out

    def _vqa_items(self, entry: _Entry) -> dict[str, list[dict]]:
        rows = self._vqa_by_image.get(entry.image_id, []) + self._vqa_by_study.get(entry.study_uid, [])
        out: dict[str, list[dict]] = defaultdict(list)
        if rows:
            for r in self._vqa.take(pa.array(rows, pa.int64())).to_pylist():
                out[r["language"]].append(r)
        return dict(out)


def spans_in_text_order(rows: list[dict]) -> list[tuple[tuple[int, int], list[dict]]]:
    """Grounding rows of one sentence -> ((start, end), rows) per keyword span, in text order.

    A span overlapping an earlier (or longer, same-start) one is left out: the token format
    wraps each piece of text at most once.
    """
    spans: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for r in rows:
        spans[(r["keyword_start"], r["keyword_end"])].append(r)
    kept: list[tuple[tuple[int, int], list[dict]]] = []
    end = 0
    for (s, e) in sorted(spans, key=lambda se: (se[0], -se[1])):
        if s >= end:
            kept.append(((s, e), sorted(spans[(s, e)], key=lambda r: r["class_id"])))
            end = e
    return kept


def detection_spans(spans: list[tuple[tuple[int, int], list[dict]]]) -> list[tokens.GroundedSpan]:
    """One GroundedSpan per (span, class) on the 224 grid; a class's components become their union box."""
    out = []
    for (start, end), rows in spans:
        by_class: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            by_class[r["class_id"]].append(r)
        for class_id, parts in sorted(by_class.items()):
            boxes = [scale_box(p["bbox"], p["cols"], p["rows"]) for p in parts]
            box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                   max(b[3] for b in boxes))
            out.append(tokens.GroundedSpan(start, end, parts[0]["keyword"], class_id, box))
    return out


def span_mask(rows: list[dict]) -> torch.Tensor:
    """The union of every class mask (and component) grounded to one span, resized to 224."""
    union = None
    for r in rows:
        mask = decode_rle(r["rle"], r["rows"], r["cols"])
        union = mask if union is None else union | mask
    return resize_mask(union)


# ------------------------------------------------------------------------------------ mixture


class TrainingMixture(ConcatDataset):
    """Datasets concatenated, with ``set_epoch`` passed on and a name per part (for lineage counts)."""

    def __init__(self, parts: Sequence[tuple[str, Dataset]]) -> None:
        parts = [(name, ds) for name, ds in parts if len(ds) > 0]
        if not parts:
            raise DataError("the training mixture is empty: the version's split has no labelled slices and no "
                            "benchmark is configured (train.slake_dir, train.vqa_rad_dir).")
        super().__init__([ds for _, ds in parts])
        self.names = [name for name, _ in parts]

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(ds) for name, ds in zip(self.names, self.datasets, strict=True)}

    def blocks(self) -> list[list[int]]:
        out: list[list[int]] = []
        for start, ds in zip([0, *self.cumulative_sizes[:-1]], self.datasets, strict=True):
            out += [[start + i for i in block] for block in dataset_blocks(ds)]
        return out


def dataset_blocks(dataset: Dataset, size: int = 64) -> list[list[int]]:
    """A dataset's ``blocks()`` (items read together), or consecutive runs of ``size`` items."""
    if hasattr(dataset, "blocks"):
        return dataset.blocks()
    n = len(dataset)
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


class BlockShuffleSampler(Sampler[int]):
    """A shuffled order in which each pixel row group is read about once per epoch, per worker.

    A version's images shards hold their pixels in large Parquet row groups (one per 128 MB
    shard by default), and a row group is read whole: a uniformly random order reads one per
    item (seconds each). This sampler shuffles the blocks (``dataset.blocks()``: row groups
    for a version, runs of items otherwise), deals them to the ``num_replicas`` ranks (each to
    the rank with the fewest items so far), and shuffles items within each run of ``window``
    consecutive blocks. Every rank yields the same number of items (shorter ranks repeat their
    own first items), as DDP needs. Give the dataset ``cache_row_groups >= window``.
    Deterministic in (seed, epoch, rank, num_replicas).
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 window: int = 2) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.blocks = [b for b in dataset_blocks(dataset) if b]
        self.seed, self.num_replicas, self.rank, self.window, self.epoch = seed, num_replicas, rank, max(1, window), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _deal(self) -> tuple[list[list[int]], int]:
        rng = random.Random(f"{self.seed}:{self.epoch}:blocks")
        order = self.blocks[:]
        rng.shuffle(order)
        ranks: list[list[list[int]]] = [[] for _ in range(self.num_replicas)]
        sizes = [0] * self.num_replicas
        for block in order:
            r = min(range(self.num_replicas), key=lambda k: (sizes[k], k))
            ranks[r].append(block)
            sizes[r] += len(block)
        return ranks[self.rank], max(sizes)

    def __iter__(self):
        mine, target = self._deal()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:items")
        out: list[int] = []
        for i in range(0, len(mine), self.window):
            run = [index for block in mine[i:i + self.window] for index in block]
            rng.shuffle(run)
            out += run
        if len(out) < target:  # a rank with fewer items (or none: fewer blocks than ranks) repeats some
            pool = out or [index for block in self.blocks for index in block]
            out += [pool[k % len(pool)] for k in range(target - len(out))]
        return iter(out)

    def __len__(self) -> int:
        return self._deal()[1]


def build_mixture(settings: Any, version: str, split: str = "train", **version_kwargs: Any) -> TrainingMixture:
    """docs/method.md's mixture: the version's ``split`` + VQA-RAD train + SLAKE train (English).

    ``split="val"`` (checkpoint selection) gives the version's val split plus SLAKE's validation
    split when configured; VQA-RAD has no validation split and its test split is never used here.
    """
    from models.benchmarks import load_slake, load_vqa_rad

    if split == "test":
        raise DataError("build_mixture builds training and validation data; the test split is for evaluation "
                        "only (VersionDataset(..., 'test', allow_test=True)).")
    parts: list[tuple[str, Dataset]] = [("refrad2d", VersionDataset.from_settings(settings, version, split,
                                                                                 **version_kwargs))]
    train = settings.train
    if split == "train" and train.vqa_rad_dir is not None:
        parts.append(("vqa-rad", load_vqa_rad(train.vqa_rad_dir, "train", split_file=train.vqa_rad_split_file)))
    if train.slake_dir is not None:
        parts.append(("slake", load_slake(train.slake_dir, split)))
    return TrainingMixture(parts)

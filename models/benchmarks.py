"""SLAKE and VQA-RAD from local folders in their published formats, as the sample dicts of models/data.py.

SLAKE: ``imgs/<img_name>`` plus ``train.json``, ``validate.json`` (some copies:
``validation.json``) and ``test.json``, each a JSON list of items with ``img_id, img_name,
question, answer, q_lang, answer_type (OPEN|CLOSED), qid, …``; English items only
(``q_lang == "en"``).

VQA-RAD: one JSON list with ``qid, image_name, question, answer (may be a number),
answer_type, phrase_type, qid_linked_id, …`` and a folder of its images. The published split
is ``phrase_type`` starting with ``test``; its train part shares images with the test part,
so train keeps only items whose image is in no test item, and never an item linked by
``qid_linked_id`` (a paraphrase) to a test item. A split file (JSON ``{"train": [qid, …],
"test": [qid, …]}``, e.g. the Wu et al. 2025 re-split) replaces the published split; it is
checked to share no image and no paraphrase pair between its sides. VQA-RAD has no
validation split: select checkpoints on the version's val split (or SLAKE's), never on test.

Every item becomes ``prefix = "Question: <q> Answer:"``, ``suffix = <answer>``, task "vqa",
language "en", ``patient_pseudonym = ""``; ``dataset.items[i]`` keeps ``qid`` and
``answer_type`` for evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from models.data import DataError, Sample, resize_pixels, vqa_prompt
from radground import tokens

SLAKE_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
SLAKE_FIELDS = ("img_name", "question", "answer", "q_lang", "answer_type", "qid")
VQA_RAD_FIELDS = ("qid", "image_name", "question", "answer", "answer_type", "phrase_type")
VQA_RAD_IMAGE_DIRS = ("VQA_RAD Image Folder", "images", "imgs", ".")


@dataclass(frozen=True)
class VQAItem:
    """One benchmark question: what a sample is built from, and what evaluation scores by."""

    qid: str
    image: Path
    image_id: str
    question: str
    answer: str
    answer_type: str  # "OPEN" | "CLOSED"


def answer_text(value: object) -> str:
    """An answer as text: VQA-RAD stores some as JSON numbers (2 -> "2", 2.0 -> "2", 1.5 -> "1.5")."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def benchmark_pixels(path: Path):
    """PNG/JPG -> grayscale -> float32 [3, 224, 224] in [-1, 1] (value / 255 * 2 - 1)."""
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError):
        raise DataError(f"{path}: not a readable PNG/JPG image. Replace the file from the benchmark's "
                        "download.") from None
    scaled = gray / 255.0 * 2.0 - 1.0
    return resize_pixels(np.repeat(scaled[None], 3, axis=0))


class BenchmarkVQA(Dataset):
    """A benchmark's split as sample dicts; no randomness (``set_epoch`` is accepted and ignored)."""

    def __init__(self, name: str, split: str, items: Sequence[VQAItem]) -> None:
        self.name, self.split, self.items = name, split, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        return Sample(pixel_values=benchmark_pixels(item.image), prefix=vqa_prompt(item.question, "en"),
                      suffix=tokens.escape_text(item.answer), masks=[], language="en", task="vqa",
                      image_id=item.image_id, patient_pseudonym="")


def _load_json_list(path: Path, what: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{what} file {path}: cannot be read as JSON ({type(exc).__name__}). Replace it from the "
                        "benchmark's download.") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{what} file {path}: expected a JSON list of objects (the published format).")
    return data


def _require(item: dict, fields: Sequence[str], path: Path, n: int) -> None:
    missing = [f for f in fields if item.get(f) is None]
    if missing:
        raise DataError(f"{path}: item {n} lacks {', '.join(missing)}; expected the published fields "
                        f"({', '.join(fields)}).")


def _check_images(items: Sequence[VQAItem], where: Path, what: str) -> None:
    missing = sorted({str(i.image) for i in items if not i.image.is_file()})
    if missing:
        raise DataError(f"{what}: {len(missing)} image(s) named in the JSON are not in {where}, e.g. {missing[0]}. "
                        "Copy the benchmark's whole image folder there.")


# ------------------------------------------------------------------------------------ SLAKE


def load_slake(root: Path | str, split: str = "train") -> BenchmarkVQA:
    """SLAKE's ``split`` (train | val | test), English items only."""
    root = Path(root)
    if split not in SLAKE_FILES:
        raise DataError(f"SLAKE split {split!r}: expected train, val or test.")
    if not root.is_dir():
        raise DataError(f"SLAKE folder {root} does not exist; set train.slake_dir to the folder holding imgs/ and "
                        "train.json, validate.json, test.json.")
    candidates = [root / name for name in SLAKE_FILES[split]]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"SLAKE folder {root}: no {' or '.join(p.name for p in candidates)} for split {split!r}. "
                        "Copy the benchmark's JSON files there.")
    images = root / "imgs"
    if not images.is_dir():
        raise DataError(f"SLAKE folder {root}: no imgs/ folder. Copy the benchmark's imgs/ there.")
    items = []
    for n, raw in enumerate(_load_json_list(path, "SLAKE")):
        _require(raw, SLAKE_FIELDS, path, n)
        if raw["q_lang"] != "en":
            continue
        items.append(VQAItem(qid=str(raw["qid"]), image=images / raw["img_name"], image_id=f"slake/{raw['img_name']}",
                             question=str(raw["question"]), answer=answer_text(raw["answer"]),
                             answer_type=str(raw["answer_type"]).strip().upper()))
    _check_images(items, images, f"SLAKE {path.name}")
    return BenchmarkVQA("slake", split, items)


# ------------------------------------------------------------------------------------ VQA-RAD


def _vqa_rad_json(root: Path, json_file: Path | str | None) -> Path:
    if json_file is not None:
        path = Path(json_file)
        path = path if path.is_absolute() or path.is_file() else root / path
        if not path.is_file():
            raise DataError(f"VQA-RAD JSON file {path} does not exist.")
        return path
    found = sorted(p for p in root.glob("*.json") if p.is_file())
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataError(f"VQA-RAD folder {root}: expected exactly one JSON list (e.g. 'VQA_RAD Dataset Public.json'), "
                        f"found {names}. Pass json_file= to choose one.")
    return found[0]


def _vqa_rad_images(root: Path, image_dir: Path | str | None, names: Sequence[str]) -> Path:
    if image_dir is not None:
        return Path(image_dir)
    for sub in VQA_RAD_IMAGE_DIRS:
        folder = root / sub
        if folder.is_dir() and any((folder / n).is_file() for n in names):
            return folder
    return root / VQA_RAD_IMAGE_DIRS[0]


def _paraphrase_groups(raw: Sequence[dict]) -> list[int]:
    """Group number per item: items sharing a ``qid_linked_id``, or linked to each other's ``qid``, are one group."""
    parent = list(range(len(raw)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    by_key: dict[str, int] = {}
    for i, item in enumerate(raw):
        keys = [f"qid:{item['qid']}"]
        link = item.get("qid_linked_id")
        if link not in (None, "", "NULL", "null"):
            keys += [f"link:{link}", f"qid:{link}"]
        for key in keys:
            if key in by_key:
                parent[find(i)] = find(by_key[key])
            else:
                by_key[key] = i
    return [find(i) for i in range(len(raw))]


def vqa_rad_split(raw: Sequence[dict], split_file: Path | str | None = None) -> dict[str, list[int]]:
    """Item indices per side ("train", "test"): the published split cleaned of shared images and paraphrases,
    or the split file's."""
    groups = _paraphrase_groups(raw)
    if split_file is None:
        test = [i for i, r in enumerate(raw) if str(r["phrase_type"]).strip().lower().startswith("test")]
        in_test, test_images, test_groups = set(test), {raw[i]["image_name"] for i in test}, {groups[i] for i in test}
        train = [i for i, r in enumerate(raw) if i not in in_test and r["image_name"] not in test_images
                 and groups[i] not in test_groups]
        return {"train": train, "test": test}
    path = Path(split_file)
    try:
        chosen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"VQA-RAD split file {path}: cannot be read as JSON ({type(exc).__name__}).") from None
    if not (isinstance(chosen, dict) and all(isinstance(chosen.get(side), list) for side in ("train", "test"))):
        raise DataError(f"VQA-RAD split file {path}: expected {{\"train\": [qid, …], \"test\": [qid, …]}}.")
    by_qid = {str(r["qid"]): i for i, r in enumerate(raw)}
    sides: dict[str, list[int]] = {}
    for side in ("train", "test"):
        unknown = [q for q in chosen[side] if str(q) not in by_qid]
        if unknown:
            raise DataError(f"VQA-RAD split file {path}: {len(unknown)} {side} qid(s) are not in the JSON list, e.g. "
                            f"{unknown[0]!r}. The split file belongs to another copy of VQA-RAD.")
        sides[side] = sorted({by_qid[str(q)] for q in chosen[side]})
    both = set(sides["train"]) & set(sides["test"])
    shared_images = {raw[i]["image_name"] for i in sides["train"]} & {raw[i]["image_name"] for i in sides["test"]}
    shared_groups = {groups[i] for i in sides["train"]} & {groups[i] for i in sides["test"]}
    if both or shared_images or shared_groups:
        raise DataError(f"VQA-RAD split file {path}: its sides share {len(both)} question(s), {len(shared_images)} "
                        f"image(s) and {len(shared_groups)} paraphrase group(s); a split must keep each on one side.")
    return sides


def load_vqa_rad(root: Path | str, split: str = "train", *, split_file: Path | str | None = None,
                 json_file: Path | str | None = None, image_dir: Path | str | None = None) -> BenchmarkVQA:
    """VQA-RAD's ``split`` (train | test); see the module docstring for how the sides are cleaned."""
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"VQA-RAD split {split!r}: expected train or test (VQA-RAD has no validation split; select "
                        "checkpoints on the version's val split).")
    if not root.is_dir():
        raise DataError(f"VQA-RAD folder {root} does not exist; set train.vqa_rad_dir to the folder holding the JSON "
                        "list and its images.")
    path = _vqa_rad_json(root, json_file)
    raw = _load_json_list(path, "VQA-RAD")
    for n, item in enumerate(raw):
        _require(item, VQA_RAD_FIELDS, path, n)
    sides = vqa_rad_split(raw, split_file)
    images = _vqa_rad_images(root, image_dir, [raw[i]["image_name"] for i in sides[split]])
    items = [VQAItem(qid=str(raw[i]["qid"]), image=images / raw[i]["image_name"],
                     image_id=f"vqa-rad/{raw[i]['image_name']}", question=str(raw[i]["question"]),
                     answer=answer_text(raw[i]["answer"]), answer_type=str(raw[i]["answer_type"]).strip().upper())
             for i in sides[split]]
    _check_images(items, images, f"VQA-RAD {path.name}")
    return BenchmarkVQA("vqa-rad", split, items)

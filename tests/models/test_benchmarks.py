"""SLAKE and VQA-RAD loaders (models/benchmarks.py) on tiny folders in their published formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.benchmarks import answer_text, load_slake, load_vqa_rad, vqa_rad_split
from models.data import DataError


def png(path: Path, value: int, size=(10, 6), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0]), value, np.uint8)
    img = Image.fromarray(array)
    (img.convert("RGB") if mode == "RGB" else img).save(path)


def slake_item(qid: int, img: str, lang: str = "en", answer="Yes", answer_type: str = "CLOSED") -> dict:
    return {"img_id": qid, "img_name": img, "question": f"Question {qid}?", "answer": answer, "q_lang": lang,
            "location": "Lung", "modality": "CT", "answer_type": answer_type, "base_type": "vqa", "content_type": "x",
            "triple": ["vhead", "_", "_"], "qid": qid}


@pytest.fixture
def slake(tmp_path: Path) -> Path:
    root = tmp_path / "Slake1.0"
    png(root / "imgs" / "xmlab0" / "source.jpg", 255, mode="RGB")
    png(root / "imgs" / "xmlab1" / "source.jpg", 0)
    (root / "train.json").write_text(json.dumps([
        slake_item(1, "xmlab0/source.jpg"), slake_item(2, "xmlab0/source.jpg", lang="zh", answer="是"),
        slake_item(3, "xmlab1/source.jpg", answer="Liver", answer_type="OPEN")]), encoding="utf-8")
    (root / "validation.json").write_text(json.dumps([slake_item(4, "xmlab1/source.jpg")]))
    (root / "test.json").write_text(json.dumps([slake_item(5, "xmlab0/source.jpg")]))
    return root


def test_slake_english_only_with_prompt_and_pixels(slake: Path) -> None:
    train = load_slake(slake, "train")
    assert [i.qid for i in train.items] == ["1", "3"]  # the zh item is left out
    assert [i.answer_type for i in train.items] == ["CLOSED", "OPEN"]
    s = train[1]
    assert set(s) == {"pixel_values", "prefix", "suffix", "masks", "language", "task", "image_id",
                      "patient_pseudonym"}
    assert (s["prefix"], s["suffix"], s["task"], s["language"]) == ("Question: Question 3? Answer:", "Liver", "vqa",
                                                                   "en")
    assert s["image_id"] == "slake/xmlab1/source.jpg" and s["patient_pseudonym"] == "" and s["masks"] == []
    assert s["pixel_values"].dtype == torch.float32 and s["pixel_values"].shape == (3, 224, 224)
    torch.testing.assert_close(s["pixel_values"], torch.full((3, 224, 224), -1.0))  # black -> -1
    torch.testing.assert_close(train[0]["pixel_values"], torch.ones(3, 224, 224))  # white RGB -> gray -> 1


def test_slake_validation_json_alias_and_validate_json(slake: Path) -> None:
    assert [i.qid for i in load_slake(slake, "val").items] == ["4"]
    (slake / "validate.json").write_text(json.dumps([slake_item(6, "xmlab1/source.jpg")]))
    assert [i.qid for i in load_slake(slake, "val").items] == ["6"]  # the published name wins
    assert [i.qid for i in load_slake(slake, "test").items] == ["5"]


def test_slake_errors_name_the_folder_and_what_is_missing(slake: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"SLAKE folder .*nowhere does not exist"):
        load_slake(tmp_path / "nowhere")
    (slake / "test.json").unlink()
    with pytest.raises(DataError, match=r"no test\.json for split 'test'"):
        load_slake(slake, "test")
    (slake / "train.json").write_text(json.dumps([slake_item(1, "xmlab9/source.jpg")]))
    with pytest.raises(DataError, match=r"1 image\(s\) named in the JSON are not in .*imgs.*xmlab9"):
        load_slake(slake, "train")
    bad = slake_item(1, "xmlab0/source.jpg")
    del bad["q_lang"]
    (slake / "train.json").write_text(json.dumps([bad]))
    with pytest.raises(DataError, match=r"train\.json: item 0 lacks q_lang"):
        load_slake(slake, "train")
    (slake / "train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train\.json: cannot be read as JSON"):
        load_slake(slake, "train")
    import shutil

    shutil.rmtree(slake / "imgs")
    with pytest.raises(DataError, match="no imgs/ folder"):
        load_slake(slake, "val")


# ------------------------------------------------------------------------------------ VQA-RAD


def rad_item(qid: int, image: str, phrase: str, link: str, answer="yes", answer_type: str = "CLOSED") -> dict:
    return {"qid": qid, "image_name": image, "image_case_url": "https://example/" + image, "image_organ": "CHEST",
            "answer": answer, "answer_type": answer_type, "question_type": "PRES", "question": f"Question {qid}?",
            "phrase_type": phrase, "qid_linked_id": link, "evaluation": "not evaluated"}


RAD_ITEMS = [
    rad_item(1, "synpic1.jpg", "freeform", "L1", answer=2, answer_type="OPEN"),  # numeric answer
    rad_item(2, "synpic1.jpg", "para", "L1", answer=2.0, answer_type="OPEN"),  # its paraphrase, same side
    rad_item(3, "synpic2.jpg", "freeform", "L2"),  # image also in test: dropped from train
    rad_item(4, "synpic2.jpg", "test_freeform", "L3"),
    rad_item(5, "synpic3.jpg", "freeform", "L4"),  # paraphrase of a test item on another image: dropped
    rad_item(6, "synpic4.jpg", "test_para", "L4"),
    rad_item(7, "synpic5.jpg", "freeform", "L5", answer=1.5, answer_type="open "),
]


@pytest.fixture
def vqa_rad(tmp_path: Path) -> Path:
    root = tmp_path / "VQA_RAD"
    for n in range(1, 6):
        png(root / "VQA_RAD Image Folder" / f"synpic{n}.jpg", 40 * n)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(RAD_ITEMS))
    return root


def test_vqa_rad_published_split_cleaned(vqa_rad: Path) -> None:
    train, test = load_vqa_rad(vqa_rad, "train"), load_vqa_rad(vqa_rad, "test")
    assert [i.qid for i in test.items] == ["4", "6"]  # phrase_type test_*
    assert [i.qid for i in train.items] == ["1", "2", "7"]
    assert not {i.image_id for i in train.items} & {i.image_id for i in test.items}  # no shared image
    # Paraphrase pairs (qid_linked_id) on one side: 1 and 2 both train; 5 (linked to test item 6) left out.
    assert {"1", "2"} <= {i.qid for i in train.items} and "5" not in {i.qid for i in train.items}


def test_vqa_rad_numeric_answers_are_text(vqa_rad: Path) -> None:
    train = load_vqa_rad(vqa_rad, "train")
    assert [i.answer for i in train.items] == ["2", "2", "1.5"]
    assert [train[i]["suffix"] for i in range(3)] == ["2", "2", "1.5"]
    assert train.items[2].answer_type == "OPEN"
    assert train[0]["prefix"] == "Question: Question 1? Answer:" and train[0]["image_id"] == "vqa-rad/synpic1.jpg"
    assert answer_text(3) == "3" and answer_text(" yes ") == "yes" and answer_text(True) == "yes"


def test_vqa_rad_split_file_overrides(vqa_rad: Path, tmp_path: Path) -> None:
    split = tmp_path / "wu_split.json"
    split.write_text(json.dumps({"train": [3, 4, 7], "test": ["1", "2"]}))
    assert [i.qid for i in load_vqa_rad(vqa_rad, "train", split_file=split).items] == ["3", "4", "7"]
    assert [i.qid for i in load_vqa_rad(vqa_rad, "test", split_file=split).items] == ["1", "2"]
    split.write_text(json.dumps({"train": [1], "test": [2]}))  # a paraphrase pair split apart (and one image)
    with pytest.raises(DataError, match=r"share 0 question\(s\), 1 image\(s\) and 1 paraphrase group"):
        load_vqa_rad(vqa_rad, "train", split_file=split)
    split.write_text(json.dumps({"train": [99], "test": []}))
    with pytest.raises(DataError, match=r"1 train qid\(s\) are not in the JSON list, e.g. 99"):
        load_vqa_rad(vqa_rad, "train", split_file=split)
    split.write_text(json.dumps(["not", "a", "split"]))
    with pytest.raises(DataError, match="expected"):
        load_vqa_rad(vqa_rad, "train", split_file=split)


def test_vqa_rad_errors(vqa_rad: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no validation split"):
        load_vqa_rad(vqa_rad, "val")
    with pytest.raises(DataError, match=r"VQA-RAD folder .*missing does not exist"):
        load_vqa_rad(tmp_path / "missing")
    (vqa_rad / "VQA_RAD Image Folder" / "synpic5.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) named in the JSON are not in .*VQA_RAD Image Folder"):
        load_vqa_rad(vqa_rad, "train")
    (vqa_rad / "other.json").write_text("[]")
    with pytest.raises(DataError, match="expected exactly one JSON list .* found VQA_RAD Dataset Public.json, "
                                        "other.json"):
        load_vqa_rad(vqa_rad, "test")
    (vqa_rad / "other.json").unlink()
    broken = [dict(RAD_ITEMS[0])]
    del broken[0]["phrase_type"]
    (vqa_rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(broken))
    with pytest.raises(DataError, match="item 0 lacks phrase_type"):
        load_vqa_rad(vqa_rad, "test")


def test_unreadable_image_is_named(vqa_rad: Path) -> None:
    (vqa_rad / "VQA_RAD Image Folder" / "synpic1.jpg").write_bytes(b"not an image")
    train = load_vqa_rad(vqa_rad, "train")
    with pytest.raises(DataError, match=r"synpic1\.jpg: not a readable PNG/JPG image"):
        train[0]


def test_paraphrases_linked_by_qid_also_stay_together() -> None:
    raw = [rad_item(1, "a.jpg", "freeform", ""), rad_item(2, "b.jpg", "test_para", "1")]  # 2 names 1's qid
    assert vqa_rad_split(raw) == {"train": [], "test": [1]}

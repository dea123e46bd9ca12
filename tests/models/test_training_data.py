"""models/data.py on a tiny hand-built dataset version: windows, resize, prompts, masks in text
order, split filtering, determinism, version resolution (and a DVC pull), the training mixture."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import (
    IMAGE_SIZE,
    PROMPTS,
    BlockShuffleSampler,
    DataError,
    TrainingMixture,
    VersionDataset,
    build_mixture,
    resize_mask,
    resolve_version,
    scale_box,
)
from radground import tokens
from radground.masks import bbox_of, encode_rle
from radground.schemas import (
    GroundingRecord,
    ImageRecord,
    KeywordItem,
    ReportRecord,
    SentenceItem,
    VQARecord,
)
from radground.settings import load_settings
from radground.tables import to_arrow
from tasks.version import write_version

TRAIN, VAL, TEST = "PAT-TRAIN", "PAT-VAL", "PAT-TEST"
CT_ROWS, CT_COLS = 112, 56  # y scale 2, x scale 4 to 224: boxes and masks scale exactly

# German sentence whose LONGER keyword comes first: text order != keyword-length order.
DE = "Die rechte Niere und die Leber sind unauffällig. Lunge beidseits belüftet."
DE_1, DE_2 = "Die rechte Niere und die Leber sind unauffällig.", "Lunge beidseits belüftet."
EN_1, EN_2 = "The right kidney and the liver are unremarkable.", "Both lungs aerated."

# Masks on the 112 x 56 CT grid: (row0, row1, col0, col1), end exclusive.
KIDNEY = (10, 30, 4, 12)
LIVER = (40, 70, 20, 50)
LUNG_L = (80, 100, 2, 20)
LUNG_R = (80, 100, 30, 50)


def box_mask(region, rows=CT_ROWS, cols=CT_COLS) -> np.ndarray:
    r0, r1, c0, c1 = region
    mask = np.zeros((rows, cols), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def image(image_id: str, patient: str, study: str, pixels: np.ndarray, modality: str = "CT") -> ImageRecord:
    rows, cols = pixels.shape
    dtype = "int16" if modality == "CT" else "uint16"
    return ImageRecord(
        image_id=image_id, patient_pseudonym=patient, study_uid=study, series_uid=study + ".1", drop_id="drop-A",
        modality=modality, body_part="CHEST", study_date=date(2020, 1, 2), slice_index=0, slice_axis="axial",
        slice_position_mm=0.0, rows=rows, cols=cols, row_spacing_mm=0.7, col_spacing_mm=0.7,
        slice_thickness_mm=1.0, image_position=[0.0, 0.0, 0.0], image_orientation=[1.0, 0, 0, 0, 1.0, 0],
        pixel_dtype=dtype, pixels=pixels.astype(dtype).astype(f"<{'i2' if modality == 'CT' else 'u2'}").tobytes(),
        has_report=True, source_sha256="0" * 64)


def keyword(sentence: str, word: str, class_name: str, class_id: int) -> KeywordItem:
    start = sentence.index(word)
    return KeywordItem(keyword=word, class_name=class_name, class_id=class_id, start=start, end=start + len(word))


def grounding(image_id: str, patient: str, study: str, language: str, index: int, sentence: str, word: str,
              class_id: int, class_name: str, region) -> GroundingRecord:
    start = sentence.index(word)
    mask = box_mask(region)
    return GroundingRecord(
        image_id=image_id, study_uid=study, patient_pseudonym=patient, drop_id="drop-A", language=language,
        sentence_index=index, sentence=sentence, keyword=word, keyword_start=start, keyword_end=start + len(word),
        negated=False, class_id=class_id, class_name=class_name, bbox=bbox_of(mask), rle=encode_rle(mask),
        area_px=int(mask.sum()), rows=CT_ROWS, cols=CT_COLS)


def vqa(image_id: str | None, patient: str, study: str, language: str, question: str, answer: str,
        choices=()) -> VQARecord:
    return VQARecord(
        vqa_id=f"{study}-{image_id}-{language}-{question}", study_uid=study, image_id=image_id,
        patient_pseudonym=patient, drop_id="drop-A", language=language, question=question, answer=answer,
        question_type="multiple" if choices else "closed", choices=list(choices), source_sentence=None,
        source_keyword=None, class_name=None, generator="template")


def ct_slice() -> np.ndarray:
    return np.full((CT_ROWS, CT_COLS), 80, dtype=np.int16)  # constant 80 HU: windows known after any resize


def hand_ct() -> np.ndarray:
    """A 224 x 224 HU slice (no resize): -100 HU, 40 HU and -2000 HU (clipped to -1000) in known places."""
    hu = np.full((IMAGE_SIZE, IMAGE_SIZE), 40, dtype=np.int16)
    hu[0, 0] = -100
    hu[0, 1] = -2000
    hu[0, 2] = 1025
    return hu


def hand_mr() -> np.ndarray:
    mr = np.full((IMAGE_SIZE, IMAGE_SIZE), 300, dtype=np.uint16)
    mr[0, 0], mr[0, 1] = 100, 500
    return mr


def build_tables() -> dict:
    study_ct, study_mr, study_en = "2.25.100", "2.25.200", "2.25.300"
    images = [
        image("2.25.1", TRAIN, study_ct, ct_slice()),          # grounded
        image("2.25.2", TRAIN, study_mr, hand_mr(), "MR"),      # slice VQA (de+en), report de + full translation
        image("2.25.3", TRAIN, study_mr, hand_mr(), "MR"),      # no labels: not a kept slice
        image("2.25.4", TRAIN, study_en, hand_ct()),           # slice VQA en only, report en, no translation
        image("2.25.10", VAL, "2.25.110", ct_slice()),
        image("2.25.20", TEST, "2.25.120", ct_slice()),
    ]
    g = []
    for patient, image_id, study in ((TRAIN, "2.25.1", study_ct), (VAL, "2.25.10", "2.25.110")):
        g += [
            grounding(image_id, patient, study, "de", 0, DE_1, "rechte Niere", 2, "kidney_right", KIDNEY),
            grounding(image_id, patient, study, "de", 0, DE_1, "Leber", 5, "liver", LIVER),
            grounding(image_id, patient, study, "de", 1, DE_2, "Lunge beidseits", 118, "lung_left", LUNG_L),
            grounding(image_id, patient, study, "de", 1, DE_2, "Lunge beidseits", 119, "lung_right", LUNG_R),
            grounding(image_id, patient, study, "en", 0, EN_1, "right kidney", 2, "kidney_right", KIDNEY),
            grounding(image_id, patient, study, "en", 0, EN_1, "liver", 5, "liver", LIVER),
        ]
    reports = [
        ReportRecord(study_uid=study_mr, patient_pseudonym=TRAIN, drop_id="drop-A", language="de", text="x",
                     redactions=0, translation_status="translated", sentences=[
                         SentenceItem(index=0, section=None, text="Kein Erguss.", start=0, end=12, keywords=[],
                                      translation="No effusion."),
                         SentenceItem(index=1, section=None, text="Leber normal.", start=13, end=26,
                                      keywords=[keyword("Leber normal.", "Leber", "liver", 5)],
                                      translation="Liver normal.")]),
        ReportRecord(study_uid=study_en, patient_pseudonym=TRAIN, drop_id="drop-A", language="en",
                     text="Heart normal size.", redactions=0, sentences=[
                         SentenceItem(index=0, section=None, text="Heart normal size.", start=0, end=18,
                                      keywords=[])]),
        ReportRecord(study_uid=study_ct, patient_pseudonym=TRAIN, drop_id="drop-A", language="de", text=DE,
                     redactions=0, sentences=[]),
    ]
    questions = [
        vqa("2.25.2", TRAIN, study_mr, "de", "Ist die Leber in diesem Bild sichtbar?", "ja"),
        vqa("2.25.2", TRAIN, study_mr, "en", "Is the liver visible in this image?", "yes"),
        vqa("2.25.4", TRAIN, study_en, "en", "Which of these organs is visible in this image?", "heart",
            choices=["heart", "liver", "spleen"]),
        vqa("2.25.20", TEST, "2.25.120", "en", "Is the heart visible in this image?", "no"),
    ]
    return {"images": [to_arrow(images, ImageRecord)], "grounding": [to_arrow(g, GroundingRecord)],
            "reports": [to_arrow(reports, ReportRecord)], "vqa": [to_arrow(questions, VQARecord)]}


def write_tiny_version(root: Path, **kwargs) -> Path:
    building = root / ".building"
    manifest = write_version(build_tables(), out_dir=building, parent=None, drops=["drop-A"], settings_hash="s" * 64,
                             code_version="0.1.0", quarantine_counts={},
                             splits={TRAIN: "train", VAL: "val", TEST: "test"}, **kwargs)
    folder = root / manifest.digest[:16]
    building.rename(folder)
    return folder


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    return write_tiny_version(tmp_path_factory.mktemp("data") / "versions")


def item(ds: VersionDataset, image_id: str, epoch: int = 0):
    ds.set_epoch(epoch)
    return ds[ds.image_ids().index(image_id)]


def draws(ds: VersionDataset, image_id: str, epochs: int = 200) -> Counter:
    index = ds.image_ids().index(image_id)
    out = Counter()
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        s = ds[index]
        out[(s["task"], s["language"])] += 1
    return out


# ------------------------------------------------------------------------------------ images


def test_ct_windows_on_a_hand_built_hu_slice(version: Path) -> None:
    px = item(VersionDataset(version), "2.25.4")["pixel_values"]
    assert px.dtype == torch.float32 and px.shape == (3, 224, 224)
    # lung (HU + 1225) / 2250 * 2 - 1; soft (HU + 135) / 350 * 2 - 1; brain HU / 80 * 2 - 1, each clipped.
    torch.testing.assert_close(px[:, 0, 0], torch.tensor([0.0, -0.8, -1.0]))  # -100 HU
    torch.testing.assert_close(px[:, 0, 1], torch.tensor([-0.8, -1.0, -1.0]))  # -2000 HU: clipped to -1000 first
    torch.testing.assert_close(px[:, 0, 2], torch.tensor([1.0, 1.0, 1.0]))  # 1025 HU: lung top
    torch.testing.assert_close(px[:, 5, 5], torch.tensor([1265 / 2250 * 2 - 1, 0.0, 0.0]))  # 40 HU


def test_resized_ct_keeps_window_values(version: Path) -> None:
    px = item(VersionDataset(version), "2.25.1")["pixel_values"]  # 112 x 56 slice of 80 HU, resized
    assert px.shape == (3, 224, 224)
    for channel, value in enumerate((1305 / 2250 * 2 - 1, 215 / 350 * 2 - 1, 1.0)):
        torch.testing.assert_close(px[channel], torch.full((224, 224), value), atol=1e-5, rtol=0)


def test_mr_min_max_repeated_to_three_channels(version: Path) -> None:
    px = item(VersionDataset(version), "2.25.2")["pixel_values"]
    torch.testing.assert_close(px[:, 0, 0], torch.tensor([-1.0, -1.0, -1.0]))  # min 100
    torch.testing.assert_close(px[:, 0, 1], torch.tensor([1.0, 1.0, 1.0]))  # max 500
    torch.testing.assert_close(px[:, 9, 9], torch.tensor([0.0, 0.0, 0.0]))  # 300: the middle
    assert torch.equal(px[0], px[2])


def test_resize_of_box_and_mask_agree() -> None:
    mask = box_mask(KIDNEY)  # rows 10..30, cols 4..12 of a 112 x 56 image
    resized = resize_mask(mask)
    assert resized.dtype == torch.bool and resized.shape == (224, 224)
    box = scale_box(bbox_of(mask), CT_COLS, CT_ROWS)
    assert box == (16.0, 20.0, 48.0, 60.0)  # x * 4, y * 2
    assert bbox_of(resized.numpy()) == list(box)
    # Shrinking (448 -> 224, odd edges): the mask's box stays within a pixel of the scaled box.
    big = np.zeros((448, 448), dtype=bool)
    big[33:101, 7:203] = True
    small_box = bbox_of(resize_mask(big).numpy())
    np.testing.assert_allclose(small_box, scale_box(bbox_of(big), 448, 448), atol=1.0)


# ------------------------------------------------------------------------------------ tasks and prompts


def test_detection_prompt_and_markup(version: Path) -> None:
    ds = VersionDataset(version, grounding="detection")
    seen = set()
    for epoch in range(20):
        s = item(ds, "2.25.1", epoch)
        assert s["task"] == "detection" and s["masks"] == []
        assert s["prefix"] == PROMPTS["detection"][s["language"]]
        seen.add(s["language"])
        plain, spans = tokens.decode_detection(s["suffix"], IMAGE_SIZE, IMAGE_SIZE)
        if s["language"] == "de":
            assert plain == f"{DE_1} {DE_2}"
            assert [(sp.keyword, sp.class_id) for sp in spans] == [
                ("rechte Niere", 2), ("Leber", 5), ("Lunge beidseits", 118), ("Lunge beidseits", 119)]
            # "Lunge beidseits": ONE wrapper with a box per lung, not one of them lost.
            assert s["suffix"].count("Lunge beidseits</p>") == 1
        else:
            assert plain == EN_1  # only the sentence with grounded keywords
            assert [sp.keyword for sp in spans] == ["right kidney", "liver"]
        kidney = next(sp for sp in spans if sp.class_id == 2)
        # Boxes on the 224 grid: the scaled box, within half a 512-bin (0.22 px).
        np.testing.assert_allclose(kidney.box, (16, 20, 48, 60), atol=224 / 512 / 2 + 1e-9)
    assert seen == {"de", "en"}
    assert item(ds, "2.25.1", 0)["prefix"] in ("Caption this image and detect keywords:",
                                               "Beschreibe dieses Bild und erkenne Schlüsselwörter:")


def test_segmentation_masks_in_text_order(version: Path) -> None:
    ds = VersionDataset(version, grounding="segmentation")
    for epoch in range(10):
        s = item(ds, "2.25.1", epoch)
        assert s["task"] == "segmentation"
        assert s["prefix"] == PROMPTS["segmentation"][s["language"]]
        plain, spans = tokens.decode_segmentation(s["suffix"])
        assert "<p bbox=" not in s["suffix"]
        assert len(s["masks"]) == len(spans) == s["suffix"].count("</seg>")
        keywords = [plain[a:b] for a, b in spans]
        kidney, liver = resize_mask(box_mask(KIDNEY)), resize_mask(box_mask(LIVER))
        if s["language"] == "de":
            # Text order (rechte Niere, Leber, Lunge beidseits), not keyword-length order (Leber first).
            assert keywords == ["rechte Niere", "Leber", "Lunge beidseits"]
            assert torch.equal(s["masks"][0], kidney) and torch.equal(s["masks"][1], liver)
            assert torch.equal(s["masks"][2], resize_mask(box_mask(LUNG_L) | box_mask(LUNG_R)))
        else:
            assert keywords == ["right kidney", "liver"]
            assert torch.equal(s["masks"][0], kidney) and torch.equal(s["masks"][1], liver)
        assert all(m.dtype == torch.bool and m.shape == (224, 224) for m in s["masks"])


def test_mixed_grounding_draws_both_variants(version: Path) -> None:
    got = draws(VersionDataset(version, grounding="mixed"), "2.25.1", 100)
    tasks = Counter(task for task, _ in got.elements())
    assert set(tasks) == {"detection", "segmentation"} and 30 <= tasks["detection"] <= 70


def test_report_and_vqa_prompts_per_language(version: Path) -> None:
    ds = VersionDataset(version)
    got = draws(ds, "2.25.2", 400)
    assert set(got) == {("report", "de"), ("report", "en"), ("vqa", "de"), ("vqa", "en")}
    reports = sum(n for (task, _), n in got.items() if task == "report")
    assert 160 <= reports <= 240  # 50/50 report vs VQA
    german = sum(n for (_, lang), n in got.items() if lang == "de")
    assert 160 <= german <= 240  # 50/50 language
    expected = {
        ("report", "de"): ("Beschreibe dieses Bild:", "Kein Erguss. Leber normal."),
        ("report", "en"): ("Caption this image:", "No effusion. Liver normal."),  # the translation
        ("vqa", "de"): ("Frage: Ist die Leber in diesem Bild sichtbar? Antwort:", "ja"),
        ("vqa", "en"): ("Question: Is the liver visible in this image? Answer:", "yes"),
    }
    index = ds.image_ids().index("2.25.2")
    for epoch in range(40):
        ds.set_epoch(epoch)
        s = ds[index]
        assert (s["prefix"], s["suffix"]) == expected[(s["task"], s["language"])]
        assert s["masks"] == [] and s["patient_pseudonym"] == TRAIN and s["image_id"] == "2.25.2"


def test_untranslated_report_stays_in_its_language_and_choices_are_offered(version: Path) -> None:
    ds = VersionDataset(version)
    got = draws(ds, "2.25.4", 50)
    assert {lang for _, lang in got} == {"en"} and {task for task, _ in got} == {"report", "vqa"}
    for epoch in range(10):
        s = item(ds, "2.25.4", epoch)
        if s["task"] == "vqa":
            assert s["prefix"] == ("Question: Which of these organs is visible in this image? "
                                   "Options: heart, liver, spleen Answer:")
            assert s["suffix"] == "heart"
        else:
            assert (s["prefix"], s["suffix"]) == ("Caption this image:", "Heart normal size.")


def test_sample_has_exactly_the_agreed_keys(version: Path) -> None:
    s = VersionDataset(version)[0]
    assert set(s) == {"pixel_values", "prefix", "suffix", "masks", "language", "task", "image_id",
                      "patient_pseudonym"}


# ------------------------------------------------------------------------------------ splits, determinism


def test_split_filtering_by_patient(version: Path) -> None:
    train = VersionDataset(version, "train")
    assert sorted(train.image_ids()) == ["2.25.1", "2.25.2", "2.25.4"]  # 2.25.3 has no labels
    assert {train[i]["patient_pseudonym"] for i in range(len(train))} == {TRAIN}
    assert train.counts == {"items": 3, "grounded_items": 1, "patients": 1}
    val = VersionDataset(version, "val")
    assert val.image_ids() == ["2.25.10"] and val[0]["patient_pseudonym"] == VAL
    with pytest.raises(DataError, match="'test' is for evaluation only"):
        VersionDataset(version, "test")
    test = VersionDataset(version, "test", allow_test=True)
    assert test.image_ids() == ["2.25.20"] and test[0]["suffix"] == "no"
    with pytest.raises(DataError, match="expected one of train, val, test"):
        VersionDataset(version, "validation")
    everything = VersionDataset(version, "train", slices="all")
    assert "2.25.3" in everything.image_ids()  # its study has a report


def test_same_seed_epoch_index_same_sample(version: Path) -> None:
    a, b = VersionDataset(version, seed=7), VersionDataset(version, seed=7)
    clone = pickle.loads(pickle.dumps(a))  # what a DataLoader worker or a Ray worker gets
    for epoch in (0, 3):
        for ds in (a, b, clone):
            ds.set_epoch(epoch)
        for i in range(len(a)):
            x, y, z = a[i], b[i], clone[i]
            for other in (y, z):
                assert (x["prefix"], x["suffix"], x["task"], x["language"]) == (
                    other["prefix"], other["suffix"], other["task"], other["language"])
                assert torch.equal(x["pixel_values"], other["pixel_values"])
                assert len(x["masks"]) == len(other["masks"])
                assert all(torch.equal(m, n) for m, n in zip(x["masks"], other["masks"], strict=True))
    # Another seed draws another sequence of tasks and languages.
    seq = [item(a, "2.25.2", e)["prefix"] for e in range(30)]
    c = VersionDataset(version, seed=8)
    assert seq != [item(c, "2.25.2", e)["prefix"] for e in range(30)]


# ------------------------------------------------------------------------------------ versions


def test_resolve_version_by_prefix_and_errors(tmp_path: Path, clean_env: None) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    folder = write_tiny_version(tmp_path / "data" / "versions")
    assert resolve_version(settings, folder.name[:8]) == folder.resolve()
    ds = VersionDataset.from_settings(settings, folder.name, "val")
    assert ds.digest.startswith(folder.name) and len(ds) == 1
    with pytest.raises(DataError, match="no dataset version in .* starts with it"):
        resolve_version(settings, "ffffffffffff")
    with pytest.raises(DataError, match="expected 8 to 64 hex"):
        resolve_version(settings, "abc")
    with pytest.raises(DataError, match="does not start with it"):
        resolve_version(settings, folder.name + "0" * 48)
    shutil.rmtree(next(folder.glob("images")))
    with pytest.raises(DataError, match=r"shard .* of table 'images' is missing"):
        VersionDataset(folder)


@pytest.mark.integration
def test_version_missing_locally_is_pulled_through_dvc(tmp_path: Path, clean_env: None) -> None:
    from radground.dvc import DvcRepo

    settings = load_settings(data_dir=tmp_path / "data")
    root = tmp_path / "data" / "versions"
    folder = write_tiny_version(root)
    repo = DvcRepo(root, settings)
    repo.init()
    repo.track(folder)
    repo.push()
    expected = VersionDataset(folder)[0]
    shutil.rmtree(folder)
    with pytest.raises(DataError, match="datasets pull"):
        resolve_version(settings, folder.name, pull=False)
    pulled = VersionDataset.from_settings(settings, folder.name[:10])
    assert (folder / "manifest.json").is_file()
    assert pulled[0]["suffix"] == expected["suffix"] and torch.equal(pulled[0]["pixel_values"],
                                                                      expected["pixel_values"])


# ------------------------------------------------------------------------------------ mixture


def tiny_benchmarks(root: Path) -> tuple[Path, Path]:
    slake, rad = root / "slake", root / "vqa_rad"
    (slake / "imgs" / "xmlab1").mkdir(parents=True)
    rad.mkdir()
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(slake / "imgs" / "xmlab1" / "source.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(rad / "synpic1.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(rad / "synpic2.jpg")
    q = {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "q_lang": "en", "answer_type": "CLOSED", "qid": 1}
    for name in ("train.json", "validate.json", "test.json"):
        (slake / name).write_text(json.dumps([q]))
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps([
        {"qid": 1, "image_name": "synpic1.jpg", "question": "How many?", "answer": 2, "answer_type": "OPEN",
         "phrase_type": "freeform", "qid_linked_id": "a"},
        {"qid": 2, "image_name": "synpic2.jpg", "question": "Normal?", "answer": "no", "answer_type": "CLOSED",
         "phrase_type": "test_freeform", "qid_linked_id": "b"}]))
    return slake, rad


def test_training_mixture_concatenates_version_and_benchmarks(tmp_path: Path, clean_env: None) -> None:
    slake, rad = tiny_benchmarks(tmp_path)
    folder = write_tiny_version(tmp_path / "data" / "versions")
    settings = load_settings(data_dir=tmp_path / "data", train={"slake_dir": slake, "vqa_rad_dir": rad, "seed": 3})
    mix = build_mixture(settings, folder.name)
    assert isinstance(mix, TrainingMixture)
    assert mix.counts == {"refrad2d": 3, "vqa-rad": 1, "slake": 1} and len(mix) == 5
    assert mix.datasets[0].seed == 3
    rad_item, slake_item = mix[3], mix[4]
    assert (rad_item["prefix"], rad_item["suffix"], rad_item["task"]) == ("Question: How many? Answer:", "2", "vqa")
    assert (slake_item["suffix"], slake_item["image_id"]) == ("Yes", "slake/xmlab1/source.jpg")
    torch.testing.assert_close(slake_item["pixel_values"], torch.ones(3, 224, 224))  # white -> 1
    mix.set_epoch(5)
    assert mix.datasets[0].epoch == 5
    val = build_mixture(settings, folder.name, "val")
    assert val.counts == {"refrad2d": 1, "slake": 1}  # VQA-RAD has no validation split
    with pytest.raises(DataError, match="evaluation only"):
        build_mixture(settings, folder.name, "test")
    only_version = build_mixture(load_settings(data_dir=tmp_path / "data"), folder.name)
    assert only_version.counts == {"refrad2d": 3}


# ------------------------------------------------------------------------------------ reading order


class Blocks(torch.utils.data.Dataset):
    def __init__(self, sizes: list[int]) -> None:
        starts = np.cumsum([0, *sizes]).tolist()
        self._blocks = [list(range(a, b)) for a, b in zip(starts, starts[1:], strict=False)]

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks)

    def blocks(self) -> list[list[int]]:
        return self._blocks


def test_block_shuffle_sampler_reads_each_block_in_one_window() -> None:
    ds = Blocks([5, 3, 7, 4, 6, 2])
    block_of = {i: n for n, b in enumerate(ds.blocks()) for i in b}
    sampler = BlockShuffleSampler(ds, seed=1, window=2)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds))) and len(sampler) == len(ds)  # every item once
    # deterministic in its seed alone: the global RNGs, moved on here, play no part
    import random

    random.random(), np.random.random(), torch.rand(1)
    assert order == list(BlockShuffleSampler(ds, seed=1, window=2))
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(len(ds)))
    # Each block's items are contiguous within a run of 2 blocks: no block is needed again later.
    runs = []
    for i in order:
        if not runs or block_of[i] not in runs[-1] and len(runs[-1]) == 2:
            runs.append({block_of[i]})
        else:
            runs[-1].add(block_of[i])
    assert sum(len(r) for r in runs) == len(ds.blocks())
    assert order != sorted(order)  # shuffled, not in storage order


def test_block_shuffle_sampler_gives_ranks_disjoint_blocks_and_equal_lengths() -> None:
    ds = Blocks([5, 3, 7, 4, 6, 2, 1])
    block_of = {i: n for n, b in enumerate(ds.blocks()) for i in b}
    ranks = [list(BlockShuffleSampler(ds, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # DDP needs equal step counts
    assert set().union(*map(set, ranks)) == set(range(len(ds)))  # nothing left out
    blocks = [{block_of[i] for i in r} for r in ranks]
    assert not (blocks[0] & blocks[1] or blocks[0] & blocks[2] or blocks[1] & blocks[2])
    lonely = [list(BlockShuffleSampler(Blocks([4]), num_replicas=2, rank=r)) for r in range(2)]
    assert len(lonely[0]) == len(lonely[1]) == 4  # fewer blocks than ranks: the empty rank repeats items
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        BlockShuffleSampler(ds, num_replicas=2, rank=2)


def test_version_blocks_are_row_groups(tmp_path: Path) -> None:
    folder = write_tiny_version(tmp_path / "versions", shard_target_bytes=1)  # one image per shard
    ds = VersionDataset(folder)
    assert sorted(map(len, ds.blocks())) == [1, 1, 1]
    together = VersionDataset(write_tiny_version(tmp_path / "other"))
    assert [sorted(b) for b in together.blocks()] == [[0, 1, 2]]  # one shard, one row group
    for image_id in ("2.25.1", "2.25.2", "2.25.4"):  # the same pixels, however the rows are cut
        assert torch.equal(item(ds, image_id)["pixel_values"], item(together, image_id)["pixel_values"])

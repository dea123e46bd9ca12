"""Grounded inference on a DICOM (models/inference.py): ingest's rules, coordinates on the DICOM grid, no PHI out."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from models.data import PROMPTS
from models.inference import (
    PredictError,
    box_to_dicom,
    groundings,
    mask_to_dicom,
    predict_dicom,
    read_slice,
    render_prediction,
    save_png,
)
from radground import overlay
from radground.masks import decode_rle
from radground.settings import load_settings
from radground.tokens import (
    GroundedSpan,
    decode_detection,
    encode_detection,
    encode_segmentation,
    to_paligemma_locs,
)

ROWS, COLS = 40, 48  # not square: a swapped rows/cols mapping shows
PATIENT_NAME = "Mustermann^Erika"
PHI = [
    "Mustermann", "Erika", "PID-4711-X", "19610812", "Klinikum Musterstadt", "ACC-99887766",
    "1.2.826.0.1.3680043.8.498.4711",  # the study, series and SOP UIDs all start with it
]
UID_ROOT = "1.2.826.0.1.3680043.8.498.4711"
STUDY_UID = f"{UID_ROOT}.1"


def _settings(tmp_path: Path, **overrides):
    return load_settings(data_dir=tmp_path / "data", **overrides)


def write_ct(path: Path, *, z: float = 0.0, series: int = 1, instance: int = 1, hu: np.ndarray | None = None,
             orientation=(1, 0, 0, 0, 1, 0), image_type=("ORIGINAL", "PRIMARY", "AXIAL"), modality: str = "CT",
             rgb: bool = False, secondary: bool = False, transfer_syntax=ExplicitVRLittleEndian) -> Path:
    """A CT slice PACS-style, PHI planted in the header; ``hu`` defaults to a gradient plus a block of z*10 HU."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage if secondary else CTImageStorage
    ds.SOPInstanceUID = f"{UID_ROOT}.{series}.{instance}"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = f"{UID_ROOT}.{series}"
    ds.FrameOfReferenceUID = f"{UID_ROOT}.9"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = "PID-4711-X"
    ds.PatientBirthDate = "19610812"
    ds.StudyDate = "20240301"
    ds.InstitutionName = "Klinikum Musterstadt"
    ds.AccessionNumber = "ACC-99887766"
    ds.ReferringPhysicianName = PATIENT_NAME
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 2.0
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated = 16 if not rgb else 8
    ds.BitsStored = 16 if not rgb else 8
    ds.HighBit = ds.BitsStored - 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelRepresentation = 0
        stored = np.zeros((ROWS, COLS, 3), dtype=np.uint8)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024  # stored = HU + 1024: the rescale is exercised
        if hu is None:
            hu = np.tile(np.linspace(-1000, 400, COLS), (ROWS, 1))
            hu[:4, :4] = z * 10
        stored = (np.asarray(hu) + 1024).astype(np.uint16)
    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, stored, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ct_file(tmp_path) -> Path:
    # The folder and file name carry the patient's name, as a careless export does.
    return write_ct(tmp_path / "Mustermann_Erika" / "Mustermann_Erika_CT_0001.dcm", z=12.5)


# ------------------------------------------------------------------------------------ coordinates


def test_box_to_dicom_scales_by_cols_and_rows():
    # 512 columns x 384 rows: x scales by 512/224, y by 384/224.
    # (56, 28, 112, 224) -> (56*512/224, 28*384/224, 112*512/224, 224*384/224) = (128, 48, 256, 384)
    assert box_to_dicom((56, 28, 112, 224), rows=384, cols=512) == pytest.approx([128.0, 48.0, 256.0, 384.0])
    # a box past the grid's edge is clipped to [0, cols] x [0, rows]: 230*512/224 = 525.7 -> 512
    assert box_to_dicom((-1, 0, 230, 224), rows=384, cols=512) == pytest.approx([0.0, 0.0, 512.0, 384.0])


def test_box_to_dicom_matches_decoding_the_tokens_at_the_dicom_size():
    # The tokens hold normalised bins: decoding them at 512x384 directly must give what the 224 box scales to.
    sentence = "Die Leber ist normal."
    text = encode_detection(sentence, [GroundedSpan(4, 9, "Leber", 5, (30.0, 40.0, 150.0, 200.0))], 224, 224)
    (_, [at_224]) = decode_detection(text, 224, 224)
    (_, [at_dicom]) = decode_detection(text, 512, 384)
    assert box_to_dicom(at_224.box, rows=384, cols=512) == pytest.approx(list(at_dicom.box))


def test_mask_to_dicom_thresholds_bilinear_probabilities():
    probs = np.zeros((224, 224), dtype=np.float32)
    probs[:56, :112] = 1.0  # the top quarter of the rows, the left half of the columns
    mask = mask_to_dicom(probs, rows=384, cols=512, threshold=0.5)
    assert mask.shape == (384, 512) and mask.dtype == bool
    # Columns (align_corners=False): output j samples source x = (j + 0.5) * 224/512 - 0.5; between source
    # columns 111 (1.0) and 112 (0.0) the value is 1 - (x - 111) >= 0.5 iff x <= 111.5 iff j + 0.5 <= 256,
    # so j = 0..255: 256 columns. Rows: y = (i + 0.5) * 224/384 - 0.5 <= 55.5 iff i + 0.5 <= 96: i = 0..95.
    assert mask[:96, :256].all() and not mask[96:, :].any() and not mask[:, 256:].any()
    assert int(mask.sum()) == 256 * 96  # 24576 pixels
    # shrinking (antialiased) keeps the same quarter: 224 -> 112 x 112 is exactly a factor 2
    small = mask_to_dicom(probs, rows=112, cols=112)
    assert small[:28, :56].all() and int(small.sum()) == 28 * 56


# ------------------------------------------------------------------------------------ reading


def test_read_slice_rescales_to_hounsfield_units(ct_file, tmp_path):
    image = read_slice(_settings(tmp_path), ct_file)
    assert (image.rows, image.cols, image.modality) == (ROWS, COLS, "CT")
    assert image.values[0, 0] == 125  # z = 12.5 -> 125 HU, stored as 125 + 1024 with intercept -1024
    assert image.values[10, 0] == -1000 and image.values[10, -1] == 400
    assert (image.slice_index, image.slices_in_series) == (0, 1)
    assert image.sha256 == hashlib.sha256(ct_file.read_bytes()).hexdigest()


def test_series_folder_orders_by_position_and_picks_the_middle(tmp_path):
    folder = tmp_path / "series"
    # file names run against the positions: order must come from ImagePositionPatient, not names
    for instance, (name, z) in enumerate(zip("abcde", (30.0, 10.0, 50.0, 20.0, 40.0), strict=True), start=1):
        write_ct(folder / f"{name}.dcm", z=z, instance=instance,
                 transfer_syntax=RLELossless if name == "a" else ExplicitVRLittleEndian)
    (folder / "notes.txt").write_text("not a DICOM file")
    settings = _settings(tmp_path)
    middle = read_slice(settings, folder)
    # sorted positions 10, 20, 30, 40, 50: the middle (index 5 // 2 = 2) is z = 30, file a (RLE-compressed)
    assert (middle.slice_index, middle.slices_in_series) == (2, 5)
    assert middle.values[0, 0] == 300 and middle.sha256 == hashlib.sha256((folder / "a.dcm").read_bytes()).hexdigest()
    assert middle.files_skipped == {"not_dicom": 1}
    assert read_slice(settings, folder, slice_index=0).values[0, 0] == 100  # z = 10, file b
    assert read_slice(settings, folder, slice_index=4).values[0, 0] == 500  # z = 50, file c
    with pytest.raises(PredictError, match="has 5 usable slice"):
        read_slice(settings, folder, slice_index=5)


def test_a_second_series_in_the_folder_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    write_ct(folder / "1.dcm", z=0.0, series=1)
    write_ct(folder / "2.dcm", z=2.0, series=1, instance=2)
    write_ct(folder / "3.dcm", z=0.0, series=2)
    with pytest.raises(PredictError) as refused:
        read_slice(_settings(tmp_path), folder)
    message = str(refused.value)
    assert "holds 2 series" in message and "one series" in message
    assert "2 CT slice(s) 40x48" in message and "1 CT slice(s) 40x48" in message
    assert not any(p in message for p in PHI) and str(folder) not in message


@pytest.mark.parametrize(("kind", "reason"), [
    ("text", "not_dicom"),
    ("secondary_capture_rgb", "unsupported_modality"),
    ("derived", "derived_image"),
    ("sagittal", "excluded_orientation"),
    ("rgb_ct", "unsupported_pixels"),
    ("localizer", "localizer"),
    ("truncated", "truncated"),
])
def test_a_file_ingest_would_quarantine_is_a_clear_error(tmp_path, kind, reason):
    path = tmp_path / "Mustermann_Erika" / f"{kind}.dcm"
    if kind == "text":
        path.parent.mkdir(parents=True)
        path.write_text("Patient: Mustermann^Erika PID-4711-X")
    elif kind == "secondary_capture_rgb":
        write_ct(path, modality="OT", rgb=True, secondary=True, image_type=("DERIVED", "SECONDARY"))
    elif kind == "derived":
        write_ct(path, image_type=("DERIVED", "SECONDARY", "AXIAL"))
    elif kind == "sagittal":
        write_ct(path, orientation=(0, 1, 0, 0, 0, -1))
    elif kind == "rgb_ct":
        write_ct(path, rgb=True)
    elif kind == "truncated":
        data = write_ct(path).read_bytes()
        path.write_bytes(data[:-500])  # cut inside the pixel data
    else:
        write_ct(path, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with pytest.raises(PredictError) as refused:
        read_slice(_settings(tmp_path), path)
    message = str(refused.value)
    assert f"ingest reason {reason}" in message and "Pass a single-frame grey CT or MR" in message
    assert not any(p in message for p in PHI) and path.name not in message and str(path) not in message


def test_a_folder_without_a_usable_slice_names_the_reasons(tmp_path):
    folder = tmp_path / "scouts"
    write_ct(folder / "1.dcm", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (folder / "2.txt").write_text("x")
    with pytest.raises(PredictError, match=r"1 x localizer .*1 x not_dicom"):
        read_slice(_settings(tmp_path), folder)


def test_identity_rules_of_ingest_do_not_apply(tmp_path):
    # ingest quarantines a file without PatientID (no pseudonym possible); a prediction needs none
    path = write_ct(tmp_path / "anonymous.dcm", z=1.0)
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PatientID
    ds.save_as(path)
    assert read_slice(_settings(tmp_path), path).values[0, 0] == 10


def test_sagittal_slices_pass_when_ingest_keeps_them(tmp_path):
    path = write_ct(tmp_path / "sag.dcm", orientation=(0, 1, 0, 0, 0, -1))
    settings = _settings(tmp_path, ingest={"slice_axes": ["axial", "sagittal"]})
    assert read_slice(settings, path).rows == ROWS  # the rule is ingest's setting, not a copy of it


# ------------------------------------------------------------------------------------ predict


def _phi_free(text: str, *inputs: Path) -> None:
    for value in PHI:
        assert value not in text, value
    for path in inputs:
        assert str(path) not in text and path.name not in text and path.stem not in text


@pytest.mark.parametrize(("task", "grounding"), [
    ("report", "mixed"), ("vqa", "mixed"), ("ground", "detection"), ("ground", "mixed"),
])
def test_predict_dicom_returns_the_documented_keys_and_no_phi(tiny_model, tiny_processor, ct_file, tmp_path, caplog,
                                                              capsys, task, grounding):
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, train={"grounding": grounding}, model={"max_new_tokens": 8})
    tiny_model.eval()
    result = predict_dicom(settings, ct_file, tiny_model, tiny_processor, task=task, language="de",
                           question="Ist die Leber vergrößert?" if task == "vqa" else None)
    dumped = json.dumps(result)  # JSON-serialisable as it is
    assert set(result) == {"task", "language", "prompt", "text", "raw", "groundings", "image", "overlay", "error"}
    expected_prompt = {"report": PROMPTS["report"]["de"],
                       "vqa": "Frage: Ist die Leber vergrößert? Antwort:",
                       "ground": PROMPTS["detection" if grounding == "detection" else "segmentation"]["de"]}[task]
    assert result["prompt"] == expected_prompt and result["task"] == task and result["language"] == "de"
    assert isinstance(result["raw"], str)
    assert (result["text"] is not None) or result["error"]  # plain text, or a dropped malformed grounding
    assert result["image"] == {"rows": ROWS, "cols": COLS, "modality": "CT", "slice_index": 0, "slices_in_series": 1,
                               "sha256": hashlib.sha256(ct_file.read_bytes()).hexdigest(), "files_skipped": {}}
    for g in result["groundings"]:  # a random model rarely writes well-formed markup; test_groundings_* always do
        assert set(g) == {"keyword", "start", "end", "box", "mask", "area_px", "class_id", "class_name"}
        if g["box"] is not None:
            x1, y1, x2, y2 = g["box"]
            assert 0 <= x1 <= x2 <= COLS and 0 <= y1 <= y2 <= ROWS
        if g["mask"] is not None:
            assert decode_rle(g["mask"], ROWS, COLS).shape == (ROWS, COLS)
    png = Path(result["overlay"])
    assert png == tmp_path / "data" / "predictions" / f"{result['image']['sha256'][:16]}-{result['task']}.png"
    _check_png(png, ct_file)
    printed = capsys.readouterr()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for text in (dumped, logged, printed.out, printed.err, png.name):
        _phi_free(text, ct_file, ct_file.parent)


def _check_png(png: Path, *inputs: Path) -> None:
    with Image.open(png) as picture:
        assert picture.size == (COLS * 2, ROWS * 2) and picture.mode == "RGB"  # scale 2, as `radground show`
        assert not getattr(picture, "text", {}) and not {"comment", "dpi"} & set(picture.info)
        assert set(picture.info) <= {"gamma", "srgb", "transparency", "aspect"}  # nothing that holds text
    data = png.read_bytes()
    for chunk in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
        assert chunk not in data
    for value in PHI + [str(p) for p in inputs] + [p.name for p in inputs]:
        assert value.encode() not in data and value.encode("utf-16-le") not in data


def test_predict_dicom_writes_the_overlay_where_asked_and_picks_the_middle_slice(tiny_model, tiny_processor,
                                                                                tmp_path):
    folder = tmp_path / "Mustermann_Erika"
    for instance, z in enumerate((3.0, 1.0, 2.0), start=1):
        write_ct(folder / f"Mustermann_{instance}.dcm", z=z, instance=instance)
    target = tmp_path / "out" / "picture.png"
    tiny_model.eval()
    result = predict_dicom(_settings(tmp_path, model={"max_new_tokens": 4}), folder, tiny_model, tiny_processor,
                           task="report", overlay=target)
    assert result["overlay"] == str(target) and target.is_file()
    # positions 1, 2, 3: the middle is z = 2, the third file
    assert result["image"]["slice_index"] == 1 and result["image"]["slices_in_series"] == 3
    assert result["image"]["sha256"] == hashlib.sha256((folder / "Mustermann_3.dcm").read_bytes()).hexdigest()


def test_vqa_without_a_question_and_unknown_tasks_are_refused(tiny_model, tiny_processor, ct_file, tmp_path):
    settings = _settings(tmp_path)
    with pytest.raises(PredictError, match="needs a question; pass --question"):
        predict_dicom(settings, ct_file, tiny_model, tiny_processor, task="vqa")
    with pytest.raises(PredictError, match="not one of report, vqa, ground"):
        predict_dicom(settings, ct_file, tiny_model, tiny_processor, task="caption")  # type: ignore[arg-type]
    with pytest.raises(PredictError, match="use en or de"):
        predict_dicom(settings, ct_file, tiny_model, tiny_processor, task="report", language="fr")
    with pytest.raises(PredictError, match="neither a file nor a folder") as missing:
        predict_dicom(settings, tmp_path / "Mustermann.dcm", tiny_model, tiny_processor, task="report")
    assert "Mustermann" not in str(missing.value)


# ------------------------------------------------------------------------------------ groundings (forced answers)


def _forced(model, processor, image, prefix: str, answer: str, task: str):
    """The model's own decoding of a given answer: real mask decoder output for real spans. ``answer`` is in
    tokens.py's form; the model's vocabulary has PaliGemma's 1024 location tokens, as the processor writes them."""
    prompt = processor(images=[image], prefixes=[prefix])
    ids = torch.tensor(processor.tokenizer(to_paligemma_locs(answer), add_special_tokens=False)["input_ids"])
    return model.decode_prediction(processor, prompt, ids, task)


def test_groundings_map_segmentation_masks_and_boxes_to_the_dicom_grid(tiny_model, tiny_processor, ct_file,
                                                                       tmp_path):
    tiny_model.eval()
    image = read_slice(_settings(tmp_path), ct_file)
    from models.data import model_pixels

    sentence = "Milz und Leberlappen ohne Befund."
    pred = _forced(tiny_model, tiny_processor, model_pixels(image.values, image.modality),
                   PROMPTS["segmentation"]["en"], encode_segmentation(sentence, [(0, 4), (9, 20)]), "segmentation")
    assert pred.error is None and len(pred.mask_probs) == 2
    found = groundings(pred, image.rows, image.cols, 0.5)
    assert [g["keyword"] for g in found] == ["Milz", "Leberlappen"]
    for g, probs in zip(found, pred.mask_probs, strict=True):
        mask = decode_rle(g["mask"], ROWS, COLS)
        assert mask.shape == (ROWS, COLS)
        assert (mask == mask_to_dicom(probs, ROWS, COLS, 0.5)).all() and g["area_px"] == int(mask.sum())
        if g["area_px"]:
            x1, y1, x2, y2 = g["box"]
            assert 0 <= x1 < x2 <= COLS and 0 <= y1 < y2 <= ROWS
            assert mask[int(y1):int(y2), int(x1):int(x2)].sum() == g["area_px"]  # the box holds the whole mask
        else:
            assert g["box"] is None
    # A mask forced to be non-empty: the same grounding with probabilities known by hand.
    pred.mask_probs[0] = np.zeros((224, 224), dtype=np.float32)
    pred.mask_probs[0][112:, 112:] = 1.0  # bottom-right quarter
    first = groundings(pred, ROWS, COLS, 0.5)[0]
    # 224 -> 48 columns: the right half (24 columns); 224 -> 40 rows: the bottom half (20 rows); 24 * 20 = 480
    assert first["box"] == [24.0, 20.0, 48.0, 40.0] and first["area_px"] == 480
    expected = np.zeros((ROWS, COLS), dtype=bool)
    expected[20:, 24:] = True
    assert (decode_rle(first["mask"], ROWS, COLS) == expected).all()  # the RLE is row/column-true
    png = save_png(render_prediction(image, found, pred.plain, "en"), tmp_path / "seg.png")
    _check_png(png, ct_file)
    picture = render_prediction(image, [first], pred.plain, "en")
    bare = np.asarray(render_prediction(image, [], pred.plain, "en"), dtype=np.float64)
    # inside the mask, away from its outline and label (picture is scaled 2x: row 30 -> 60, column 36 -> 72):
    # 55 % slice grey + 45 % the first span's colour, as overlay.py blends class masks
    blended = 0.55 * bare[60, 72] + 0.45 * np.asarray(overlay.class_colour(1))
    assert np.asarray(picture)[60, 72] == pytest.approx(np.round(blended), abs=1)
    assert (np.asarray(picture)[:40, :48] == bare[:40, :48]).all()  # top-left, far from mask and label: untouched
    json.dumps(found)


def test_groundings_map_detection_boxes_and_draw_them(tiny_model, tiny_processor, ct_file, tmp_path):
    tiny_model.eval()
    image = read_slice(_settings(tmp_path), ct_file)
    sentence = "The liver is normal in size."
    # liver = class 5; a box on the 224 grid (x 28..140, y 56..168)
    text = encode_detection(sentence, [GroundedSpan(4, 9, "liver", 5, (28.0, 56.0, 140.0, 168.0))], 224, 224)
    from models.data import model_pixels

    pred = _forced(tiny_model, tiny_processor, model_pixels(image.values, image.modality),
                   PROMPTS["detection"]["en"], text, "detection")
    assert pred.error is None and pred.plain == sentence
    [g] = groundings(pred, ROWS, COLS)
    assert (g["keyword"], g["class_id"], g["class_name"], g["mask"], g["area_px"]) == ("liver", 5, "liver", None, None)
    # decoded bin centres of 28/224 etc., scaled: the same as decoding the tokens at 48 x 40 directly
    (_, [direct]) = decode_detection(text, COLS, ROWS)
    assert g["box"] == pytest.approx(list(direct.box))
    # and by hand, within half a bin (224/512/2 px on the 224 grid): 28*48/224 = 6, 56*40/224 = 10, 140*48/224 = 30,
    # 168*40/224 = 30
    assert g["box"] == pytest.approx([6.0, 10.0, 30.0, 30.0], abs=0.06)
    picture = render_prediction(image, [g], pred.plain, "en")
    plain = render_prediction(image, [], pred.plain, "en")
    assert (np.asarray(picture) != np.asarray(plain)).any()  # the box and its label are drawn
    _check_png(save_png(picture, tmp_path / "det.png"), ct_file)


@pytest.mark.slow
@pytest.mark.integration
def test_predict_dicom_end_to_end_with_a_model_taught_one_box(tiny_model, tiny_processor, ct_file, tmp_path, caplog,
                                                              capsys):
    """The whole path with GENERATED markup: the tiny model is overfitted on this slice's own pixels to answer
    one detection sentence, then predict_dicom must return the box on the 48 x 40 DICOM grid."""
    caplog.set_level(logging.DEBUG)
    settings = _settings(tmp_path, train={"grounding": "detection"}, model={"max_new_tokens": 32})
    image = read_slice(settings, ct_file)
    from models.data import model_pixels

    pixels = model_pixels(image.values, image.modality)
    sentence = "The liver is normal in size."
    answer = encode_detection(sentence, [GroundedSpan(4, 9, "liver", 5, (28.0, 56.0, 140.0, 168.0))], 224, 224)
    batch = tiny_processor(images=[pixels], prefixes=[PROMPTS["detection"]["en"]], suffixes=[answer])
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=3e-3)
    for step in range(200):  # ~60 steps suffice with seed 0; the check below says if it never learned it
        tiny_model.train()
        tiny_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 9:
            tiny_model.eval()
            if tiny_model.predict(tiny_processor, pixels, PROMPTS["detection"]["en"], "detection",
                                  max_new_tokens=32).text == answer:
                break
    tiny_model.eval()
    result = predict_dicom(settings, ct_file, tiny_model, tiny_processor, task="ground", language="en")
    assert result["raw"] == answer and result["text"] == sentence and result["error"] is None
    [g] = result["groundings"]
    assert (g["keyword"], g["class_name"], g["mask"]) == ("liver", "liver", None)
    # 28*48/224 = 6, 56*40/224 = 10, 140*48/224 = 30, 168*40/224 = 30, within half a location bin
    assert g["box"] == pytest.approx([6.0, 10.0, 30.0, 30.0], abs=0.06)
    _check_png(Path(result["overlay"]), ct_file)
    printed = capsys.readouterr()
    for text in (json.dumps(result), caplog.text, printed.out, printed.err):
        _phi_free(text, ct_file, ct_file.parent)

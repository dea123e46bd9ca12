"""models/evaluation.py: predictions mode on a SLAKE folder in its published layout (scores checked against
hand arithmetic, a missing qid, broken files), a tiny model on a hand-built version's test split (every
section, the CSV, no pseudonym anywhere), and the MLflow evaluation run (embedded SQLite under tmp_path)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
from test_benchmarks import RAD_ITEMS, png, slake_item
from test_training_data import TEST, TRAIN, VAL, build_tables

from models.evaluation import CSV_COLUMNS, EvaluationError, evaluate_benchmark, evaluate_version
from radground.settings import load_settings

PSEUDONYMS = (TRAIN, VAL, TEST)


@pytest.fixture
def settings(tmp_path: Path, clean_env):
    return load_settings(data_dir=tmp_path / "data", model={"max_new_tokens": 6})


@pytest.fixture
def slake(tmp_path: Path) -> Path:
    """SLAKE's layout: imgs/<xmlabN>/source.jpg and test.json (a zh item the loader drops)."""
    root = tmp_path / "Slake1.0"
    png(root / "imgs" / "xmlab0" / "source.jpg", 255, mode="RGB")
    png(root / "imgs" / "xmlab1" / "source.jpg", 0)
    (root / "test.json").write_text(json.dumps([
        slake_item(10, "xmlab0/source.jpg", answer="Yes"),
        slake_item(11, "xmlab0/source.jpg", answer="No"),
        slake_item(12, "xmlab1/source.jpg", answer="Left Lung", answer_type="OPEN"),
        slake_item(13, "xmlab1/source.jpg", answer="Liver", answer_type="OPEN"),
        slake_item(14, "xmlab1/source.jpg", lang="zh", answer="肝脏", answer_type="OPEN")]), encoding="utf-8")
    (root / "train.json").write_text("[]", encoding="utf-8")
    return root


def jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def mlflow_client(settings):
    from radground.lineage import _client

    return _client(settings, None)


def eval_runs(settings) -> list:
    client = mlflow_client(settings)
    experiment = client.get_experiment_by_name(settings.mlflow.eval_experiment)
    return client.search_runs([experiment.experiment_id]) if experiment is not None else []


# ------------------------------------------------------------------------------------ predictions mode


def test_predictions_on_slake_match_hand_arithmetic(settings, slake: Path, tmp_path: Path, caplog) -> None:
    predictions = jsonl(tmp_path / "answers.jsonl", [
        {"qid": 10, "answer": "yes"},  # exact after lower-casing: acc 1, f1 1
        {"qid": "11", "answer": "Yes"},  # wrong: acc 0, f1 0
        "",  # blank lines are allowed
        {"qid": "12", "answer": "the left lung"},  # acc 0; 2 common tokens: P 2/3, R 2/2, F1 = 2*(2/3)/(5/3) = 0.8
    ])  # qid 13 missing: scored as "" against "Liver": acc 0, f1 0, recall 0
    with caplog.at_level(logging.WARNING, logger="models.evaluation"):
        result = evaluate_benchmark(settings, "slake", slake, "test", predictions=predictions, out=tmp_path / "out")
    m = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert m == result.metrics
    # closed: (1 + 0) / 2 for accuracy and f1
    assert (m["closed"]["n"], m["closed"]["accuracy"], m["closed"]["f1"]) == (2, 0.5, 0.5)
    # open: accuracy (0 + 0) / 2; f1 (0.8 + 0) / 2 = 0.4; recall (2/2 + 0) / 2 = 0.5
    assert (m["open"]["n"], m["open"]["accuracy"]) == (2, 0.0)
    assert m["open"]["f1"] == pytest.approx(0.4) and m["open"]["recall"] == pytest.approx(0.5)
    # all: accuracy 1/4; f1 (1 + 0 + 0.8 + 0) / 4 = 0.45
    assert (m["all"]["n"], m["all"]["accuracy"]) == (4, 0.25) and m["all"]["f1"] == pytest.approx(0.45)
    assert set(m["all"]) == {"n", "accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider"}
    assert "report" not in m and "grounding" not in m  # a benchmark is VQA only
    assert m["missing"] == 1
    assert any("1 of 4 questions have no answer" in r.getMessage() and "13" in r.getMessage()
               for r in caplog.records)
    assert m["model"]["kind"] == "predictions" and len(m["model"]["sha256"]) == 64
    assert "answers.jsonl" not in json.dumps(m)  # the input file's name stays out
    ts = m["test_set"]
    assert (ts["kind"], ts["name"], ts["split"]) == ("benchmark", "slake", "test")
    assert ts["key"] == f"slake-test-{ts['digest'][:12]}" and result.test_set_key == ts["key"]
    assert m["prompts"] == {"vqa.en": "Question: {question} Answer:"}

    with (tmp_path / "out" / "samples.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["qid"] for r in rows] == ["10", "11", "12", "13"]  # the zh item is not scored
    assert [r["answer_type"] for r in rows] == ["CLOSED", "CLOSED", "OPEN", "OPEN"]
    assert [r["prediction"] for r in rows] == ["yes", "Yes", "the left lung", ""]
    assert [float(r["f1"]) for r in rows] == pytest.approx([1.0, 0.0, 0.8, 0.0])

    # MLflow: one evaluation run with the metrics, the test-set tag, the prompt, the digest and both files
    (run,) = eval_runs(settings)
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.tags["radground.kind"] == "evaluation" and run.data.tags["radground.test_set"] == ts["key"]
    assert run.data.params["prompt.vqa.en"] == "Question: {question} Answer:"
    assert run.data.params["test_set.digest"] == ts["digest"] and run.data.params["model.kind"] == "predictions"
    assert run.data.metrics["all.accuracy"] == 0.25 and run.data.metrics["open.f1"] == pytest.approx(0.4)
    artifacts = {a.path for a in mlflow_client(settings).list_artifacts(result.run_id)}
    assert artifacts == {"metrics.json", "samples.csv"}
    assert not run.inputs.dataset_inputs  # a benchmark is not a dataset version


def test_benchmark_digest_changes_with_an_answer_or_an_image(settings, slake: Path, tmp_path: Path) -> None:
    from models.benchmarks import load_slake
    from models.evaluation import benchmark_digest

    first = benchmark_digest(load_slake(slake, "test"))
    # the same content elsewhere (another path, new file times) is the same benchmark
    import shutil

    moved = shutil.copytree(slake, tmp_path / "elsewhere" / "SLAKE", copy_function=shutil.copy)
    assert benchmark_digest(load_slake(moved, "test")) == first
    png(slake / "imgs" / "xmlab1" / "source.jpg", 1)  # one grey level in one image
    second = benchmark_digest(load_slake(slake, "test"))
    assert second != first
    items = json.loads((slake / "test.json").read_text(encoding="utf-8"))
    items[0]["answer"] = "No"
    (slake / "test.json").write_text(json.dumps(items), encoding="utf-8")
    assert benchmark_digest(load_slake(slake, "test")) not in (first, second)


@pytest.mark.parametrize(("lines", "message"), [
    (['{"qid": 10, "answer": "yes"}', "{broken"], r"line 2: not a JSON object"),
    (['{"answer": "yes"}'], r"line 1: no \"qid\""),
    (['{"qid": 10, "answer": 1}'], r"line 1: \"answer\" is missing or not a string"),
    (['{"qid": 10, "answer": "yes"}', '{"qid": 99, "answer": "no"}'], r"line 2: its qid is not a question of this"),
    (['{"qid": 10, "answer": "yes"}', '{"qid": "10", "answer": "no"}'], r"line 2: its qid was already answered on "
                                                                         r"line 1"),
])
def test_bad_predictions_files_name_the_file_and_line(settings, slake: Path, tmp_path: Path, lines, message) -> None:
    path = jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(EvaluationError, match=r"predictions file .*bad\.jsonl, " + message):
        evaluate_benchmark(settings, "slake", slake, predictions=path, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
    assert not (settings.data_dir / "mlflow").exists()  # and MLflow never opened


def test_exactly_one_source_of_answers(settings, slake: Path, tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="exactly one source of answers.*neither"):
        evaluate_benchmark(settings, "slake", slake, out=tmp_path / "out")
    with pytest.raises(EvaluationError, match="benchmark 'mimic'"):
        evaluate_benchmark(settings, "mimic", slake, predictions=tmp_path / "x", out=tmp_path / "out")


@pytest.fixture
def vqa_rad(tmp_path: Path) -> Path:
    """VQA-RAD's layout: one JSON list and "VQA_RAD Image Folder" (items of tests/models/test_benchmarks.py)."""
    root = tmp_path / "VQA_RAD"
    for n in range(1, 6):
        png(root / "VQA_RAD Image Folder" / f"synpic{n}.jpg", 40 * n)
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(RAD_ITEMS), encoding="utf-8")
    return root


def test_model_on_vqa_rad_test_split(settings, vqa_rad: Path, tmp_path: Path, tiny_model, tiny_processor) -> None:
    calls = []
    result = evaluate_benchmark(settings, "vqa-rad", vqa_rad, model=(tiny_model.eval(), tiny_processor),
                                model_info={"ref": "some/checkpoint", "kind": "checkpoint"}, out=tmp_path / "out",
                                progress=lambda d, t: calls.append((d, t)))
    m = result.metrics
    assert (m["closed"]["n"], m["open"]["n"], m["all"]["n"]) == (2, 0, 2)  # test_freeform 4 and test_para 6
    assert m["test_set"]["key"].startswith("vqa-rad-test-") and m["missing"] == 0
    assert m["model"] == {"ref": "some/checkpoint", "kind": "checkpoint", "run_id": None, "model_name": None,
                          "model_version": None, "dataset_digest": None}
    assert calls == [(0, 2), (1, 2), (2, 2)]
    with result.samples_path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["qid"], r["reference"]) for r in rows] == [("4", "yes"), ("6", "yes")]


def test_vqa_rad_split_file_from_settings(vqa_rad: Path, tmp_path: Path, clean_env) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [1, 2, 7], "test": [3, 4]}), encoding="utf-8")
    settings = load_settings(data_dir=tmp_path / "data", train={"vqa_rad_split_file": str(split)})
    predictions = jsonl(tmp_path / "answers.jsonl", [{"qid": 3, "answer": "yes"}, {"qid": 4, "answer": "no"}])
    result = evaluate_benchmark(settings, "vqa-rad", vqa_rad, predictions=predictions, out=tmp_path / "out")
    # the split file's test side (3, 4): accuracy (1 + 0) / 2; the published test item 6 is not asked
    assert (result.metrics["all"]["n"], result.metrics["all"]["accuracy"]) == (2, 0.5)


# ------------------------------------------------------------------------------------ a version's test split


def write_rich_version(settings) -> Path:
    """build_tables() with the labelled patient (grounding, reports and translations, VQA with choices) in
    ``test``: the split the evaluation reads holds every task."""
    from tasks.version import write_version
    from tasks.version_stage import versions_root

    root = versions_root(settings)
    building = root / ".building"
    manifest = write_version(build_tables(), out_dir=building, parent=None, drops=["drop-A"], settings_hash="s" * 64,
                             code_version="0.1.0", quarantine_counts={},
                             splits={TRAIN: "test", VAL: "val", TEST: "train"})
    folder = root / manifest.digest[:16]
    building.rename(folder)
    return folder


def no_pseudonym_in(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert not any(p in text for p in PSEUDONYMS), path.name


def test_model_on_a_version_test_split_writes_every_section(settings, tmp_path: Path, tiny_model,
                                                             tiny_processor) -> None:
    from radground.lineage import EVAL_CONTEXT, SPLITS_TAG, VERSION_TAG, training_use

    folder = write_rich_version(settings)
    digest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))["digest"]
    calls = []
    info = {"ref": "checkpoint-000008", "kind": "checkpoint", "run_id": None, "model_name": None,
            "model_version": None, "dataset_digest": digest}
    result = evaluate_version(settings, digest[:12], "test", model=(tiny_model.eval(), tiny_processor),
                              model_info=info, out=tmp_path / "out", progress=lambda d, t: calls.append((d, t)))
    m = json.loads(result.metrics_path.read_text(encoding="utf-8"))
    # VQA: 2 yes/no rows (de, en) + 1 multiple choice, all closed; reports: study MR de + its full English
    # translation, study EN en, study CT de (no sentences: the text) = 4; grounding: slice 2.25.1 in de and
    # en, detection and segmentation (train.grounding = mixed) = 4
    assert (m["closed"]["n"], m["open"]["n"], m["all"]["n"], m["report"]["n"], m["grounding"]["n"]) == (3, 0, 3, 4, 4)
    assert m["open"]["accuracy"] is None  # an empty group keeps its section
    # reference boxes: de "rechte Niere", "Leber", "Lunge beidseits" x (lung_left, lung_right) = 4, en 2 -> 6;
    # reference masks: one per span: de 3, en 2 -> 5
    assert m["grounding_detection"]["n_reference"] == 6 and m["grounding_segmentation"]["n_reference"] == 5
    assert m["grounding"]["n_reference"] == 11 and m["grounding"]["n_images"] == 4
    assert set(m["report"]) >= {"n", "accuracy", "f1", "recall", "bleu1", "bleu4", "rouge_l", "cider"}
    assert set(m["grounding"]) >= {"precision", "recall", "f1", "f1_iou50", "mean_iou", "dice"}
    assert m["test_set"] == {"kind": "version", "name": "version", "split": "test", "digest": digest,
                             "key": f"version-{digest[:16]}-test"}
    assert m["model"] == info and m["missing"] == 0
    assert m["prompts"]["vqa_choices.en"] == "Question: {question} Options: {choices} Answer:"
    assert m["prompts"]["report.de"] == "Beschreibe dieses Bild:"
    assert m["prompts"]["segmentation.en"] == "Caption this image and segment keywords:"
    total = 3 + 4 + 4
    assert calls[0] == (0, total) and calls[-1] == (total, total) and len(calls) == total + 1

    with result.samples_path.open(encoding="utf-8") as f:
        rows = {r["qid"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"vqa:2.25.2:0", "vqa:2.25.2:1", "vqa:2.25.4:0", "report:2.25.200:de", "report:2.25.200:en",
                         "report:2.25.300:en", "report:2.25.100:de", "detection:2.25.1:de", "detection:2.25.1:en",
                         "segmentation:2.25.1:de", "segmentation:2.25.1:en"}
    assert rows["report:2.25.200:en"]["reference"] == "No effusion. Liver normal."  # the translation, as trained
    assert rows["vqa:2.25.4:0"]["reference"] == "heart" and rows["vqa:2.25.4:0"]["answer_type"] == "CLOSED"
    assert rows["detection:2.25.1:de"]["reference"] == "rechte Niere; Leber; Lunge beidseits; Lunge beidseits"
    assert rows["segmentation:2.25.1:en"]["reference"] == "right kidney; liver"
    assert rows["segmentation:2.25.1:en"]["grounding_n_reference"] == "2"
    for row in rows.values():  # each text row's accuracy is its own exact match
        if row["task"] in ("vqa", "report"):
            from models.metrics import normalize

            assert float(row["accuracy"]) == float(normalize(row["prediction"]) == normalize(row["reference"]))
    no_pseudonym_in(tmp_path / "out")

    (run,) = eval_runs(settings)
    assert run.info.run_id == result.run_id
    assert run.data.tags["radground.test_set"] == f"version-{digest[:16]}-test"
    assert run.data.params["prompt.report.de"] == "Beschreibe dieses Bild:"
    assert run.data.params["model.dataset_digest"] == digest
    assert run.data.metrics["report.n"] == 4 and "grounding.f1_iou50" in run.data.metrics
    assert "open.accuracy" not in run.data.metrics  # None is not logged
    (dataset,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in dataset.tags}
    assert tags == {"mlflow.data.context": EVAL_CONTEXT, VERSION_TAG: digest, SPLITS_TAG: "test"}
    assert not any(p in json.dumps([run.data.params, run.data.tags]) for p in PSEUDONYMS)
    artifacts = mlflow_client(settings).download_artifacts(result.run_id, "", str(tmp_path / "logged"))
    assert sorted(p.name for p in Path(artifacts).iterdir()) == ["metrics.json", "samples.csv"]
    no_pseudonym_in(Path(artifacts))
    used = training_use(settings, TRAIN, [digest])  # TRAIN is the test patient of this version
    assert [(r["run_id"], r["split"]) for r in used["evaluated_on"]] == [(result.run_id, "test")]
    assert used["training_runs"] == []


def test_version_references_on_the_224_grid_and_a_perfect_answer_scores_one(settings) -> None:
    from models.data import VersionDataset
    from models.evaluation import _Answer, _score, _version_items

    ds = VersionDataset(write_rich_version(settings), "test", allow_test=True, slices="all")
    items = {i.qid: i for i in _version_items(settings, ds, with_grounding=True)}
    # KIDNEY = rows 10..30, cols 4..12 of a 112 x 56 slice; to 224: x * 4, y * 2 -> (16, 20, 48, 60)
    assert items["detection:2.25.1:en"].grounding_reference[0] == ("right kidney", (16.0, 20.0, 48.0, 60.0))
    keyword, mask = items["segmentation:2.25.1:en"].grounding_reference[0]
    assert keyword == "right kidney" and mask.shape == (224, 224) and int(mask.sum()) == 40 * 32  # 20x8 -> 40x32
    assert items["vqa:2.25.4:0"].prompt == ("Question: Which of these organs is visible in this image? "
                                            "Options: heart, liver, spleen Answer:")
    answers = [_Answer(i.reference, list(i.grounding_reference)) for i in items.values()]
    sections, _ = _score(list(items.values()), answers, version=True, grounding_scored=True,
                         grounding_tasks=("detection", "segmentation"))
    assert sections["all"]["accuracy"] == 1.0 and sections["report"]["accuracy"] == 1.0
    g = sections["grounding"]  # every reference region predicted exactly: 11 of 11 matched at IoU 1
    assert (g["n_predicted"], g["n_reference"], g["f1"], g["f1_iou50"]) == (11, 11, 1.0, 1.0)
    assert g["mean_iou"] == pytest.approx(1.0) and g["dice"] == pytest.approx(1.0)


def test_predictions_on_a_version_score_text_only(settings, tmp_path: Path) -> None:
    folder = write_rich_version(settings)
    predictions = jsonl(tmp_path / "answers.jsonl", [
        {"qid": "vqa:2.25.2:0", "answer": "Ja"},  # right (de): normalised "ja" == "ja"
        {"qid": "vqa:2.25.2:1", "answer": "no"},  # wrong
        {"qid": "vqa:2.25.4:0", "answer": "heart"},  # right
        {"qid": "report:2.25.300:en", "answer": "Heart normal size"},  # right once punctuation is dropped
    ])
    result = evaluate_version(settings, folder.name, predictions=predictions, out=tmp_path / "out")
    m = result.metrics
    assert (m["all"]["n"], m["all"]["accuracy"]) == (3, pytest.approx(2 / 3))  # (1 + 0 + 1) / 3
    # reports: 4 items, 1 right, 3 missing (scored empty): accuracy 1/4
    assert (m["report"]["n"], m["report"]["accuracy"], m["missing"]) == (4, 0.25, 3)
    assert m["grounding"]["n"] == 0 and m["grounding"]["f1"] is None
    assert "text tasks only" in m["note"]
    no_pseudonym_in(tmp_path / "out")


def test_log_evaluation_refuses_a_file_holding_a_pseudonym(settings, tmp_path: Path) -> None:
    from radground.lineage import LineageError, log_evaluation

    leak = tmp_path / "samples.csv"
    leak.write_text("qid\nP" + "AB" * 10 + "\n", encoding="utf-8")
    test_set = {"kind": "benchmark", "name": "slake", "split": "test", "digest": "0" * 64, "key": "slake-test-0"}
    with pytest.raises(LineageError, match="samples.csv holds a patient pseudonym"):
        log_evaluation(settings, model={"ref": "predictions", "kind": "predictions"}, test_set=test_set,
                       prompts={}, metrics={}, files=[leak])
    assert not (settings.data_dir / "mlflow").exists()  # refused before any run was created

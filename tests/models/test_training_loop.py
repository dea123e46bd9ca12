"""models/training.py without Ray (world size 1) on the tiny preset and a hand-built version: the loss
falls, checkpoints carry lineage.json with the contract's fields and no pseudonym, the tokenizer is
trained on the version's train text only, and a checkpoint resumes to the same losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_training_data import TEST, TRAIN, VAL, write_tiny_version

from models.training import LINEAGE_FIELDS, TRAINER_STATE, LoopConfig, tokenizer_texts, train_loop
from radground.settings import load_settings

SPLITS = {"train": {"rows": 3, "patients": 1}, "val": {"rows": 1, "patients": 1}}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("train")
    settings = load_settings(data_dir=root / "data", train={
        "batch_size": 3, "effective_batch": 3, "optimizer": "adamw", "lr": 5e-3, "warmup_ratio": 0.0,
        "epochs": 50, "max_steps": 8, "eval_every": 4, "eval_items": 4, "workers": 1, "use_gpu": "false"})
    folder = write_tiny_version(settings.data_dir / "versions")
    return settings, folder


def _config(settings, folder: Path, root: Path) -> LoopConfig:
    from tasks.version import read_manifest

    return LoopConfig(settings=settings, version_digest=read_manifest(folder).digest, preset="tiny", splits=SPLITS,
                      run_id="0" * 32, ray_run_name="train-test", checkpoint_root=str(root), record_mlflow=False)


@pytest.fixture(scope="module")
def unbroken(data, tmp_path_factory):
    """One 8-step run without a break: checked by the loss/checkpoint test, the reference of the resume test
    (both used to train it themselves, on the same config)."""
    settings, folder = data
    return train_loop(_config(settings, folder, tmp_path_factory.mktemp("unbroken") / "ckpt"))


def test_tokenizer_texts_are_the_train_split_text_and_prompts(data) -> None:
    settings, folder = data
    texts = tokenizer_texts(settings, folder.name)
    assert "Kein Erguss." in texts and "No effusion." in texts  # a train report and its translation
    assert "Is the liver visible in this image?" in texts and "Caption this image:" in texts
    assert "Is the heart visible in this image?" not in texts  # the test patient's question stays out
    assert not any(p in t for t in texts for p in (TRAIN, VAL, TEST))


def test_loop_without_ray_lowers_the_loss_and_writes_checkpoints_with_lineage(data, unbroken) -> None:
    settings, folder = data
    result = unbroken
    assert result.total_steps == 8 and len(result.losses) == 8 and result.start_step == 0
    assert result.losses[-1] < result.losses[0] - 0.75, result.losses  # the tiny model learns the three items
    assert sorted(result.val_losses) == [4, 8]
    assert [Path(c).name for c in result.checkpoints] == ["checkpoint-000004", "checkpoint-000008"]
    last = Path(result.checkpoints[-1])
    lineage = json.loads((last / "lineage.json").read_text(encoding="utf-8"))
    assert set(lineage) == set(LINEAGE_FIELDS)
    assert lineage["dataset_digest"].startswith(folder.name) and lineage["splits"] == SPLITS
    assert (lineage["step"], lineage["preset"], lineage["training_run_id"]) == (8, "tiny", "0" * 32)
    assert lineage["val_loss"] == pytest.approx(result.val_losses[8])
    for path in last.iterdir():  # no pseudonym, no image id in any text file of the checkpoint
        if path.suffix in (".json", ".txt", ".jinja"):
            text = path.read_text(encoding="utf-8")
            assert not any(p in text for p in (TRAIN, VAL, TEST, '"2.25.')), path.name

    # The checkpoint loads to the same model: identical logits on a validation batch.
    from models.data import build_mixture
    from models.radgrounder import RadGrounderForConditionalGeneration, RadGrounderProcessor

    processor = RadGrounderProcessor.from_pretrained(str(last))
    model = RadGrounderForConditionalGeneration.from_pretrained(str(last)).eval()
    batch = processor.collate([build_mixture(settings, folder.name, "val")[0]])
    with torch.no_grad():
        again = RadGrounderForConditionalGeneration.from_pretrained(str(last)).eval()(**batch).logits
        assert torch.equal(model(**batch).logits, again)


def test_resume_from_a_checkpoint_gives_the_same_losses(data, unbroken, tmp_path: Path, monkeypatch) -> None:
    """Restarting from step 4's checkpoint (as Ray Train does after a failure) reaches the unbroken losses."""
    import models.training as training

    settings, folder = data
    checkpoint = Path(unbroken.checkpoints[0])
    assert torch.load(checkpoint / TRAINER_STATE, weights_only=False)["step"] == 4
    import contextlib

    monkeypatch.setattr(training, "_restored", lambda ranks: contextlib.nullcontext(str(checkpoint)))
    resumed = train_loop(_config(settings, folder, tmp_path / "b"))
    assert resumed.start_step == 4 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(unbroken.losses[4:], rel=1e-5, abs=1e-6)
    assert resumed.val_losses[8] == pytest.approx(unbroken.val_losses[8], rel=1e-5)

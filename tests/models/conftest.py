"""Shared pieces of the RadGrounder tests: scrubbed-looking training text and a tiny processor/model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Stand-in for the dataset's scrubbed report text and prompts (the tiny tokenizer's training data).
TRAIN_TEXTS = [
    "Die Leber ist normal groß und homogen.",
    "Milz und Leberlappen ohne Befund.",
    "Lunge beidseits frei belüftet.",
    "The liver is normal in size.",
    "Spleen and liver lobe are unremarkable.",
    "No focal lesion < 5 mm.",
    "Caption this image:",
    "Beschreibe dieses Bild:",
    "Answer:",
    "Antwort:",
    "Caption this image and segment keywords:",
] * 8


@pytest.fixture(scope="session")
def train_texts() -> list[str]:
    return list(TRAIN_TEXTS)


@pytest.fixture(scope="session")
def tiny_processor():
    from models.radgrounder import RadGrounderProcessor

    return RadGrounderProcessor.tiny(TRAIN_TEXTS)


@pytest.fixture
def tiny_model(tiny_processor):
    import torch

    from models.radgrounder import RadGrounderForConditionalGeneration, tiny_config

    torch.manual_seed(0)
    return RadGrounderForConditionalGeneration(tiny_config(tiny_processor.tokenizer))


@pytest.fixture
def image():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.rand((3, 224, 224), generator=g) * 2 - 1

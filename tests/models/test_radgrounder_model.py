"""RadGrounder's model: presets, loss and gradients, overfitting, save/load, prediction, local PaliGemma."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.radgrounder import (
    RadGrounderForConditionalGeneration,
    RadGrounderProcessor,
    build,
    paligemma2_3b_224_config,
    tiny_config,
)
from models.radgrounder.configuration import ENV_PALIGEMMA_PATH
from radground.errors import ConfigError
from radground.settings import load_settings
from radground.tokens import encode_segmentation

SENTENCE = "Milz und Leberlappen ohne Befund."
SEG = encode_segmentation(SENTENCE, [(0, 4), (9, 20)])


def _masks():
    milz = np.zeros((224, 224), dtype=bool)
    milz[10:40, 10:60] = True
    leber = np.zeros((224, 224), dtype=bool)
    leber[100:200, 120:220] = True
    return [milz, leber]


def _seg_batch(processor, image):
    return processor(
        images=[image, -image], prefixes=["Caption this image and segment keywords:", "Answer:"],
        suffixes=[SEG, "Lunge beidseits frei belüftet."], masks=[_masks(), []],
    )


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------- presets


def test_tiny_preset_is_small_gemma2_siglip_with_the_tokenizers_ids(tiny_processor):
    config = tiny_config(tiny_processor.tokenizer)
    tok = tiny_processor.tokenizer
    assert config.text_config.model_type == "gemma2" and config.text_config.num_hidden_layers == 2
    assert config.vision_config.model_type == "siglip_vision_model" and config.vision_config.num_hidden_layers == 2
    assert config.vision_config.image_size == 224 and config.text_config.num_image_tokens == 256
    assert config.vocab_size == config.text_config.vocab_size == len(tok)
    assert config.image_token_index == tok.convert_tokens_to_ids("<image>")
    assert config.seg_close_token_id == tok.convert_tokens_to_ids("</seg>")
    assert config.mask_loss_weight == 0.1 and config.mask_threshold == 0.5
    assert config._attn_implementation == "eager"


def test_paligemma2_3b_architecture_has_about_3_03b_parameters():
    with torch.device("meta"):
        model = RadGrounderForConditionalGeneration(paligemma2_3b_224_config())
    n = sum(p.numel() for p in model.parameters())
    assert 3.00e9 < n < 3.06e9, n
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())  # SigLIP frozen by the recipe


def test_paligemma_preset_without_a_local_folder_names_the_setting(clean_env, tmp_path):
    with pytest.raises(ConfigError) as unset:
        build("paligemma2-3b-224", settings=load_settings())
    assert ENV_PALIGEMMA_PATH in str(unset.value) and "model.paligemma_path" in str(unset.value)
    with pytest.raises(ConfigError) as missing:
        build("paligemma2-3b-224", settings=load_settings(model={"paligemma_path": tmp_path / "nope"}))
    assert ENV_PALIGEMMA_PATH in str(missing.value) and "does not exist" in str(missing.value)
    with pytest.raises(ConfigError, match="unknown"):
        build("paligemma-7b", texts=[])


def test_paligemma_preset_loads_a_local_folder_and_adds_the_markup(clean_env, tmp_path, image, train_texts):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    from models.radgrounder.processing import windowed_image_processor
    from models.radgrounder.tokenizer import train_tokenizer

    # A stand-in for google/paligemma2-3b-pt-224 on disk: PaliGemma's tokenizer layout, random tiny weights.
    tok = train_tokenizer(train_texts)
    PaliGemmaProcessor(image_processor=windowed_image_processor(), tokenizer=tok)  # adds <image>, loc, seg
    tiny = tiny_config(RadGrounderProcessor.for_tokenizer(train_tokenizer(train_texts)).tokenizer)
    base = PaliGemmaConfig(
        vision_config=tiny.vision_config.to_dict(), text_config={**tiny.text_config.to_dict(), "vocab_size": len(tok)},
        projection_dim=64, hidden_size=64, vocab_size=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(1)
    PaliGemmaForConditionalGeneration(base).save_pretrained(tmp_path / "pg")
    tok.save_pretrained(tmp_path / "pg")
    model, processor = build("paligemma2-3b-224", settings=load_settings(model={"paligemma_path": tmp_path / "pg"}))
    assert len(processor.tokenizer) == len(tok) + 6  # the grounding markup joined PaliGemma's tokens
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == model.config.text_config.vocab_size == len(processor.tokenizer)
    saved = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "pg")
    loaded = model.state_dict()
    for key, want in saved.state_dict().items():  # every pretrained weight arrived (as bf16), none re-initialised
        have = loaded[key][: want.shape[0]] if "embed_tokens" in key or "lm_head" in key else loaded[key]
        assert torch.equal(have, want.to(torch.bfloat16)), key
    out = model(**{k: v.to(torch.bfloat16) if k == "pixel_values" else v
                   for k, v in _seg_batch(processor, image).items()})
    assert torch.isfinite(out.loss) and out.mask_logits.shape == (2, 224, 224)


# ---------------------------------------------------------------------------- loss and gradients


def test_forward_gives_finite_loss_and_a_gradient_on_every_parameter(tiny_model, tiny_processor, image):
    tiny_model.train()
    out = tiny_model(**_seg_batch(tiny_processor, image))
    assert torch.isfinite(out.loss) and out.mask_logits.shape == (2, 224, 224)
    assert math.isclose(out.loss.item(), out.lm_loss.item() + 0.1 * out.mask_loss.item(), rel_tol=1e-5)
    out.loss.backward()
    for name, p in _trainable(tiny_model):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in tiny_model.mask_decoder.parameters())

    # a batch without <seg>: the mask decoder still gets a (zero) gradient, so DDP has every parameter
    tiny_model.zero_grad(set_to_none=True)
    batch = tiny_processor(images=[image], prefixes=["Answer:"], suffixes=["ja"], masks=[[]])
    out = tiny_model(**batch)
    assert out.mask_loss is None and torch.isfinite(out.loss)
    out.loss.backward()
    missing = [name for name, p in _trainable(tiny_model) if p.grad is None]
    assert missing == []
    assert all((p.grad == 0).all() for p in tiny_model.mask_decoder.parameters())


def test_forward_refuses_missing_token_type_ids_and_mismatched_masks(tiny_model, tiny_processor, image):
    batch = _seg_batch(tiny_processor, image)
    with pytest.raises(ValueError, match="token_type_ids"):
        tiny_model(**{k: v for k, v in batch.items() if k != "token_type_ids"})
    with pytest.raises(ValueError, match="1 mask_labels for 2"):
        tiny_model(**{**batch, "mask_labels": batch["mask_labels"][:1], "mask_counts": None})


@pytest.mark.slow
def test_tiny_model_overfits_one_batch(tiny_model, tiny_processor, image):
    batch = _seg_batch(tiny_processor, image)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=3e-3)
    tiny_model.train()
    losses = []
    for _ in range(20):
        out = tiny_model(**batch)
        losses.append(out.loss.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if losses[-1] <= losses[0] / 2:
            break
    assert losses[-1] <= losses[0] / 2, losses


# ---------------------------------------------------------------------------- save / load, prediction


def test_save_and_load_give_identical_logits(tiny_model, tiny_processor, image, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    batch = _seg_batch(tiny_processor, image)
    tiny_model.eval()
    with torch.no_grad():
        before = tiny_model(**batch)
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(model, RadGrounderForConditionalGeneration) and isinstance(processor, RadGrounderProcessor)
    assert model.config._attn_implementation == "eager"
    again = _seg_batch(processor, image)
    assert again.keys() == batch.keys() and all(torch.equal(again[k], batch[k]) for k in batch)
    model.eval()
    with torch.no_grad():
        after = model(**again)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.mask_logits, after.mask_logits)


def test_decode_prediction_pairs_masks_with_spans_in_text_order(tiny_model, tiny_processor, image):
    tiny_model.eval()
    prompt = tiny_processor(images=[image], prefixes=["Caption this image and segment keywords:"])
    answer = torch.tensor(tiny_processor.tokenizer(SEG, add_special_tokens=False)["input_ids"])
    pred = tiny_model.decode_prediction(tiny_processor, prompt, answer, "segmentation")
    assert pred.error is None and pred.text == SEG and pred.plain == SENTENCE
    assert pred.spans == [(0, 4), (9, 20)]
    assert len(pred.masks) == 2 and all(m.shape == (224, 224) and m.dtype == bool for m in pred.masks)
    for m, prob in zip(pred.masks, pred.mask_probs, strict=True):
        assert ((prob >= 0.5) == m).all() and prob.min() >= 0 and prob.max() <= 1  # thresholded probabilities
    # the masks are the decoder's output at the 1st and 2nd </seg> of the full sequence, in that order
    full = torch.cat([prompt["input_ids"], answer[None]], 1)
    with torch.no_grad():
        out = tiny_model(input_ids=full, pixel_values=prompt["pixel_values"], attention_mask=torch.ones_like(full),
                         token_type_ids=torch.cat([prompt["token_type_ids"], torch.ones_like(answer[None])], 1),
                         return_masks=True)
    assert np.allclose(torch.sigmoid(out.mask_logits).numpy(), np.stack(pred.mask_probs))
    cut = torch.tensor(tiny_processor.tokenizer(SEG[: SEG.rindex("</seg>")], add_special_tokens=False)["input_ids"])
    broken = tiny_model.decode_prediction(tiny_processor, prompt, cut, "segmentation")  # the 2nd </seg> is missing
    assert broken.error is not None and broken.masks == []


def test_predict_generates_and_decodes_through_tokens(tiny_model, tiny_processor, image):
    tiny_model.eval()
    pred = tiny_model.predict(tiny_processor, image, "Caption this image:", task="detection", max_new_tokens=6)
    assert isinstance(pred.text, str)
    # random weights: either a well-formed detection (plain text) or a dropped one with the reason
    assert (pred.error is None and pred.plain is not None) or "malformed" in pred.error
    text = tiny_model.predict(tiny_processor, image, "Answer:", task="text", max_new_tokens=4)
    assert text.plain == text.text and text.error is None


def test_lm_head_on_label_positions_only_gives_the_same_loss(tiny_model, tiny_processor, image):
    batch = _seg_batch(tiny_processor, image)
    tiny_model.eval()
    with torch.no_grad():
        full = tiny_model(**batch)
        lean = tiny_model(**batch, logits_on_labels_only=True)
    scored = int((batch["labels"][:, 1:] != -100).sum())
    assert lean.logits.shape == (scored, full.logits.shape[-1]) and scored < full.logits.shape[1]
    assert torch.allclose(lean.lm_loss, full.lm_loss, atol=1e-5) and torch.allclose(lean.loss, full.loss, atol=1e-5)
    where = batch["labels"][:, 1:] != -100
    assert torch.allclose(lean.logits, full.logits[:, :-1][where], atol=1e-5)


def test_gradient_checkpointing_trains(tiny_model, tiny_processor, image):
    batch = _seg_batch(tiny_processor, image)
    tiny_model.activation_checkpointing_enable()
    tiny_model.train()
    out = tiny_model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for _, p in _trainable(tiny_model))

"""Training throughput of RadGrounder: tiny preset on CPU, and PaliGemma-2 3B on a GPU when one is lent.

``python bench/run.py train`` (or ``python bench/train.py``) times the ``tiny`` preset on CPU:
forward + backward + AdamW step (clip 1.0) on synthetic batches built by the real processor
(``RadGrounderProcessor.collate``), a few warm-up steps, then timed steps.

``python bench/train.py --gpu`` is the device-machine script: a random-init ``paligemma2-3b-224``
(models/radgrounder/configuration.py, ≈3.03 B parameters; no weights or tokenizer needed), bf16
autocast over fp32 master weights (``--pure-bf16``: bf16 weights), synthetic 456-token samples
(256 image tokens, 50 prompt tokens, 150 answer tokens with labels), the largest batch that fits
(doubling, then bisection on CUDA out-of-memory), then samples/s and MFU against 989 TFLOPS (H100 /
H200 dense bf16). ``--dry-run`` runs the very same path on CPU with a miniature config of the same
architecture, so the script is exercised without a GPU.

FLOPs per sample (:func:`flop_count`, from the config; matmul FLOPs, 2 per multiply-add):

* language model (Gemma2), trained: 6 · N_lm · T, with N_lm its non-embedding weights
  (q, k, v, o projections and the gated MLP's three matrices per layer) and T the sequence length;
* LM head (tied embedding, trained): 6 · V · d · T, or 6 · V · d · L with ``logits_on_labels_only``
  (L = positions with a label): ≈22 % of the total at 3B;
* attention scores and values, trained: 3 · 4 · T² · (heads · head_dim) per layer (full T × T:
  the eager kernel computes the masked part too);
* projector (trained): 6 · N_proj · 256 image tokens;
* vision tower (SigLIP, frozen by the recipe): forward only, 2 · N_vision · 256 + 4 · 256² · d per
  layer (no backward: it is frozen and its input needs no gradient); trained, it would count 3×;
* the mask decoder (≈2 M parameters) runs only at ``</seg>`` tokens: left out (< 0.1 %).

At 3B, 456 tokens: ≈5.54 TFLOP (LM) + 1.62 (head) + 0.13 (attention) + 0.21 (vision) ≈ 7.5 TFLOP.
MFU = samples/s × FLOPs per sample / peak; the recompute of activation checkpointing is not
counted (it is overhead, not model FLOPs).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: models/, radground/

PEAK_BF16_FLOPS = 989e12  # H100 / H200 SXM dense bf16 (no sparsity)
IMAGE_TOKENS = 256
PROMPT_TOKENS = 50
ANSWER_TOKENS = 150
SEQ_TOKENS = IMAGE_TOKENS + PROMPT_TOKENS + ANSWER_TOKENS  # 456: the recipe's 256 image + 200 text tokens

TEXTS = [
    "Die Leber ist normal groß und homogen. Keine fokale Läsion.",
    "Milz und Nieren ohne Befund. Kein Aszites.",
    "The liver is normal in size. No focal lesion.",
    "Both lungs are clear. The heart is not enlarged.",
    "Caption this image:", "Beschreibe dieses Bild:", "Question: Is the spleen enlarged? Answer:", "no",
] * 4


# ----------------------------------------------------------------------------- FLOP count


def flop_count(config: Any, tokens: int = SEQ_TOKENS, *, label_tokens: int | None = None,
               train_vision: bool | None = None) -> dict[str, float]:
    """Training FLOPs per sample (forward + backward) by part, and ``total``; see the module docstring.

    ``label_tokens``: with ``logits_on_labels_only`` the LM head runs at that many positions only.
    ``train_vision``: defaults to ``not config.freeze_vision_tower``.
    """
    text, vision = config.text_config, config.vision_config
    d, layers = text.hidden_size, text.num_hidden_layers
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    attn_width = heads * head_dim
    per_layer = d * attn_width + 2 * d * kv_heads * head_dim + attn_width * d + 3 * d * text.intermediate_size
    n_lm = layers * per_layer
    vocab = config.text_config.vocab_size
    dv, vlayers = vision.hidden_size, vision.num_hidden_layers
    patches = (vision.image_size // vision.patch_size) ** 2
    n_vision = vlayers * (4 * dv * dv + 2 * dv * vision.intermediate_size) + 3 * vision.patch_size ** 2 * dv
    n_proj = dv * config.projection_dim
    if train_vision is None:
        train_vision = not getattr(config, "freeze_vision_tower", True)
    vision_factor = 6 if train_vision else 2
    head_positions = tokens if label_tokens is None else label_tokens
    parts = {
        "language_model": 6.0 * n_lm * tokens,
        "lm_head": 6.0 * vocab * d * head_positions,
        "attention": 3.0 * 4 * tokens ** 2 * attn_width * layers,
        "projector": 6.0 * n_proj * patches,
        "vision_tower": float(vision_factor * n_vision * patches
                              + (vision_factor // 2) * 4 * patches ** 2 * dv * vlayers),
    }
    parts["total"] = sum(parts.values())
    parts["params_lm_non_embedding"] = float(n_lm)
    parts["params_vision"] = float(n_vision)
    parts["params_embedding"] = float(vocab * d)
    return parts


# ----------------------------------------------------------------------------- batch size search


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def largest_batch(fits: Callable[[int], bool], *, start: int = 1, limit: int = 1024) -> int:
    """The largest batch size ``b <= limit`` with ``fits(b)``: doubling from ``start``, then bisection.

    ``fits(b)`` runs a step and returns False on out-of-memory. Assumes what fits is a prefix of the
    sizes (memory grows with the batch). Returns 0 when not even ``start`` fits.
    """
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None:
        trial = min(good * 2, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


# ----------------------------------------------------------------------------- tiny preset on CPU


def _timed_steps(step: Callable[[], None], warmup: int, steps: int, sync: Callable[[], None]) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - started)
    return times


def synthetic_samples(n: int, seed: int = 0) -> list[dict]:
    """Samples in models/data.py's form: windowed pixels in [-1, 1], a prompt, an answer (no masks)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    answers = [t for t in TEXTS if len(t) > 20]
    return [{"pixel_values": torch.rand(3, 224, 224, generator=generator) * 2 - 1,
             "prefix": "Caption this image:", "suffix": answers[i % len(answers)], "masks": [],
             "language": "en", "task": "report"} for i in range(n)]


def bench_train_tiny(batch_size: int = 8, warmup: int = 3, steps: int = 10, threads: int | None = None) -> dict:
    """Samples/s of the tiny preset on CPU: forward + backward + AdamW step, processor-collated batches."""
    import torch

    from models.radgrounder import build

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, processor = build("tiny", texts=TEXTS)
    model.train()
    batch = processor.collate(synthetic_samples(batch_size))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses: list[float] = []

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    times = _timed_steps(step, warmup, steps, lambda: None)
    tokens = int(batch["input_ids"].shape[1])
    labels = int((batch["labels"][:, 1:] != -100).sum()) // batch_size
    flops = flop_count(model.config, tokens)["total"]
    median = statistics.median(times)
    return {
        "preset": "tiny", "device": "cpu", "threads": torch.get_num_threads(), "batch_size": batch_size,
        "warmup_steps": warmup, "timed_steps": steps, "tokens_per_sample": tokens,
        "label_tokens_per_sample": labels, "step_s_median": round(median, 4),
        "samples_per_s": round(batch_size / median, 2), "samples_per_s_mean": round(batch_size * steps / sum(times), 2),
        "params": sum(p.numel() for p in model.parameters()),
        "flops_per_sample": flops, "achieved_gflops": round(flops * batch_size / median / 1e9, 2),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


# ----------------------------------------------------------------------------- paligemma2-3b-224 on a GPU


def mini_config():
    """The dry run's stand-in: paligemma2-3b-224's architecture (Gemma2 + SigLIP, softcapping, GQA, frozen
    vision tower) at a size a CPU runs in seconds."""
    from transformers import Gemma2Config, SiglipVisionConfig

    from models.radgrounder.configuration import paligemma2_3b_224_config

    vocab = 2048
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=224, patch_size=14, vision_use_head=False, projection_dim=64)
    text = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, vocab_size=vocab,
                        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                        pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return paligemma2_3b_224_config(vocab_size=vocab, vision_config=vision, text_config=text, projection_dim=64,
                                    hidden_size=64, image_token_index=vocab - 64, seg_close_token_id=vocab - 1)


def synthetic_batch(config: Any, batch_size: int, device: Any) -> dict:
    """A batch of 456-token samples as the processor lays them out: image tokens, prompt (token type 0,
    no labels), answer (token type 1, labels). Random text ids below the image token id."""
    import torch

    generator = torch.Generator().manual_seed(batch_size)
    text_ids = torch.randint(3, min(config.image_token_index, config.text_config.vocab_size - 2),
                             (batch_size, PROMPT_TOKENS + ANSWER_TOKENS), generator=generator)
    image = torch.full((batch_size, IMAGE_TOKENS), config.image_token_index)
    input_ids = torch.cat([image, text_ids], dim=1)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, IMAGE_TOKENS + PROMPT_TOKENS:] = 1
    labels = torch.where(token_type_ids == 1, input_ids, torch.full_like(input_ids, -100))
    pixels = torch.rand(batch_size, 3, 224, 224, generator=generator) * 2 - 1
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "labels": labels,
             "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}
    return {k: v.to(device) for k, v in batch.items()}


def bench_train_gpu(*, dry_run: bool = False, labels_only: bool = True, pure_bf16: bool = False,
                    checkpointing: bool = False, warmup: int = 3, steps: int = 10, max_batch: int = 256) -> dict:
    """paligemma2-3b-224 (random init) throughput and MFU; ``dry_run``: the same path on CPU, miniature."""
    import torch

    from models.radgrounder import RadGrounderForConditionalGeneration
    from models.radgrounder.configuration import paligemma2_3b_224_config

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/train.py --gpu: no CUDA device here. Run it on the device machine, or use --dry-run "
                         "to exercise the script on CPU.")
    device = torch.device("cpu" if dry_run else "cuda")
    config = mini_config() if dry_run else paligemma2_3b_224_config()
    torch.manual_seed(0)
    with torch.device(device):
        model = RadGrounderForConditionalGeneration(config)
    if pure_bf16:
        model.to(torch.bfloat16)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=not dry_run)
    sync = torch.cuda.synchronize if not dry_run else (lambda: None)

    def step(batch: dict) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch, logits_on_labels_only=labels_only).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def fits(batch_size: int) -> bool:
        try:
            step(synthetic_batch(config, batch_size, device))
            sync()
            return True
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer; anything else is a bug
            if not is_oom(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            if not dry_run:
                torch.cuda.empty_cache()
            return False

    batch_size = largest_batch(fits, limit=max_batch)
    if batch_size == 0:
        raise SystemExit("bench/train.py: not even a batch of 1 fits; try --checkpointing or --pure-bf16.")
    if not dry_run:
        torch.cuda.reset_peak_memory_stats()
    batch = synthetic_batch(config, batch_size, device)
    times = _timed_steps(lambda: step(batch), warmup, steps, sync)
    median = statistics.median(times)
    label_tokens = ANSWER_TOKENS
    flops = flop_count(config, SEQ_TOKENS, label_tokens=label_tokens if labels_only else None)
    samples_per_s = batch_size / median
    result = {
        "model": "mini (dry run, CPU)" if dry_run else "paligemma2-3b-224 (random init)",
        "device": "cpu" if dry_run else torch.cuda.get_device_name(),
        "precision": "bf16 weights" if pure_bf16 else "bf16 autocast, fp32 master weights",
        "activation_checkpointing": checkpointing, "logits_on_labels_only": labels_only,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
        "tokens_per_sample": SEQ_TOKENS, "label_tokens_per_sample": label_tokens,
        "batch_size": batch_size, "batch_size_limit": max_batch, "warmup_steps": warmup, "timed_steps": steps,
        "step_s_median": round(median, 4), "samples_per_s": round(samples_per_s, 2),
        "flops_per_sample": {k: v for k, v in flops.items()},
        "achieved_tflops": round(samples_per_s * flops["total"] / 1e12, 2),
    }
    if not dry_run:
        result["mfu"] = round(samples_per_s * flops["total"] / PEAK_BF16_FLOPS, 4)
        result["peak_flops"] = PEAK_BF16_FLOPS
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return result


def bench_train() -> dict:
    """bench/run.py's entry: the tiny preset on CPU, and the 3B FLOP count it would be measured against."""
    from models.radgrounder.configuration import paligemma2_3b_224_config

    figures = bench_train_tiny()
    full = flop_count(paligemma2_3b_224_config(), SEQ_TOKENS)
    labels = flop_count(paligemma2_3b_224_config(), SEQ_TOKENS, label_tokens=ANSWER_TOKENS)
    figures["paligemma2_3b_224_tflop_per_sample"] = round(full["total"] / 1e12, 3)
    figures["paligemma2_3b_224_tflop_per_sample_labels_only"] = round(labels["total"] / 1e12, 3)
    figures["gpu"] = "not measured here: run `python bench/train.py --gpu` on a device machine"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="paligemma2-3b-224 on the CUDA device: samples/s, MFU")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: the same path on CPU, miniature model")
    parser.add_argument("--all-logits", action="store_true", help="LM head at every position (default: labels only)")
    parser.add_argument("--pure-bf16", action="store_true", help="bf16 weights instead of autocast")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--max-batch", type=int, default=256, help="upper bound of the batch size search")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="tiny preset's batch size")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args()
    if args.gpu or args.dry_run:
        figures = bench_train_gpu(dry_run=args.dry_run, labels_only=not args.all_logits, pure_bf16=args.pure_bf16,
                                  checkpointing=args.checkpointing, steps=args.steps, max_batch=args.max_batch)
    else:
        figures = bench_train_tiny(batch_size=args.batch_size, steps=args.steps)
    text = json.dumps(figures, indent=2, default=lambda v: v if math.isfinite(v) else str(v))
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

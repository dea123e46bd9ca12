"""bench/train.py's helpers: the FLOP count behind MFU, the batch size search, and the GPU path on CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# bench/ is not a package, and its module names (synth, lineage, ...) must not shadow anything: load the file alone.
_spec = importlib.util.spec_from_file_location("radground_bench_train", Path(__file__).resolve().parents[1] / "bench"
                                               / "train.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def full_config():
    from models.radgrounder.configuration import paligemma2_3b_224_config

    return paligemma2_3b_224_config()


def test_the_flop_count_reads_the_parameters_the_model_really_has(full_config):
    import torch

    from models.radgrounder import RadGrounderForConditionalGeneration

    with torch.device("meta"):
        model = RadGrounderForConditionalGeneration(full_config)
    flops = bench.flop_count(full_config)
    lm = model.model.language_model
    matrices = sum(p.numel() for p in lm.layers.parameters() if p.dim() == 2)
    assert flops["params_lm_non_embedding"] == matrices
    assert flops["params_embedding"] == lm.embed_tokens.weight.numel() == model.lm_head.weight.numel()
    vision = model.model.vision_tower
    weights = sum(p.numel() for n, p in vision.named_parameters() if p.dim() >= 2 and "position" not in n)
    assert flops["params_vision"] == weights
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.03e9, rel=0.01)


def test_a_456_token_sample_of_paligemma2_3b_costs_about_7_5_tflop(full_config):
    full = bench.flop_count(full_config, 456)
    assert full["total"] == pytest.approx(7.5e12, rel=0.03)
    assert full["language_model"] == 6 * full["params_lm_non_embedding"] * 456
    assert full["lm_head"] / full["total"] == pytest.approx(0.22, abs=0.01)  # the share labels-only can save
    labels = bench.flop_count(full_config, 456, label_tokens=150)
    assert full["total"] - labels["total"] == pytest.approx(6 * full["params_embedding"] * (456 - 150))
    assert labels["language_model"] == full["language_model"]


def test_largest_batch_doubles_then_bisects_to_the_last_size_that_fits():
    tried = []

    def fits_up_to(limit):
        def fits(size):
            tried.append(size)
            return size <= limit
        return fits

    assert bench.largest_batch(fits_up_to(37)) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert bench.largest_batch(fits_up_to(0)) == 0
    assert bench.largest_batch(fits_up_to(10_000), limit=48) == 48
    assert bench.largest_batch(fits_up_to(1), limit=1) == 1


def test_only_out_of_memory_counts_as_not_fitting():
    import torch

    assert bench.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not bench.is_oom(ValueError("token_type_ids are missing"))


@pytest.mark.slow
def test_the_gpu_script_runs_its_whole_path_on_cpu_in_a_dry_run():
    figures = bench.bench_train_gpu(dry_run=True, max_batch=1, warmup=1, steps=1)
    assert figures["batch_size"] == 1 and figures["samples_per_s"] > 0
    assert figures["logits_on_labels_only"] is True
    assert figures["flops_per_sample"] == bench.flop_count(bench.mini_config(), 456, label_tokens=150)
    assert figures["trainable_params"] < figures["params"]  # the vision tower stays frozen, as in the recipe

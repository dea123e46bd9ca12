"""The per-worker training loop of RadGrounder, as a plain function: Ray Train runs it on every worker
(flows/train.py), and it runs without Ray for a world size of 1 (tests, a quick look on one machine).

One call of :func:`train_loop` does, on each rank:

* model and processor: from the checkpoint Ray Train hands back after a restart, else built for the
  preset (``tiny``: random init, its tokenizer trained on the version's scrubbed train text, see
  :func:`tokenizer_texts`; or handed over by the driver so every rank has the same one;
  ``paligemma2-3b-224``: the local folder of ``model.paligemma_path``);
* data: :func:`models.data.build_mixture` on the ``train`` split, read in
  :class:`models.data.BlockShuffleSampler` order dealt to the ranks; validation on the first
  ``train.eval_items`` items of the ``val`` split (the same items every time, shared out by rank);
* optimisation (docs/method.md's recipe): Adafactor or AdamW with decoupled weight decay, cosine
  schedule with linear warm-up (``train.warmup_ratio``), gradient accumulation to
  ``train.effective_batch`` samples per optimizer step over all ranks, gradient clipping at 1.0;
  bf16 autocast and activation checkpointing on GPU only;
* every ``train.eval_every`` steps (else each epoch's end, and always the last step): val_loss over
  all ranks, then a checkpoint (model + processor files, ``trainer_state.pt`` with optimizer,
  schedule and position, and ``lineage.json``) reported through ``ray.train.report`` by rank 0, with
  the metrics; rank 0 also records the step metrics and the checkpoint in the MLflow run
  (radground.lineage).

Resuming: a restarted worker group reads the last checkpoint and continues at the next optimizer step,
skipping the micro-batches of the epoch it had already used: the samples are a function of (seed,
epoch, index) and the order of (seed, epoch, rank), so a resumed run sees what an unbroken run sees.

``lineage.json`` (the contract of radground.lineage.log_checkpoint): dataset digest, per split the
rows (items) and patients, code version, settings hash, training run id, Ray run name, step, epoch,
val_loss, preset: counts and ids of runs, never a pseudonym or an image id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from radground.errors import RadgroundError

log = logging.getLogger(__name__)

CHECKPOINT_LINEAGE = "lineage.json"
TRAINER_STATE = "trainer_state.pt"
CLIP_NORM = 1.0
LINEAGE_FIELDS = ("dataset_digest", "splits", "code_version", "settings_hash", "training_run_id",
                  "ray_run_name", "step", "epoch", "val_loss", "preset")


class TrainError(RadgroundError):
    """A training run cannot start or did not finish (its message is radground's own, safe to show)."""


@dataclass
class LoopConfig:
    """What the driver decides once and every rank reads (passed as ``train_loop_config["loop"]``).

    ``checkpoint_root`` is where Ray Train persists this run's checkpoints (``<storage>/<ray_run_name>``
    as a URI or path), so rank 0 can name a checkpoint in MLflow before the driver sees it.
    ``processor``: the tiny preset's processor built by the driver (identical on every rank); None =
    build here. ``progress``: a callable(step, total) or a Ray queue (rank 0 puts (step, total)).
    ``step_hook(step, rank)`` runs after every optimizer step (fault-injection tests).
    """

    settings: Any
    version_digest: str
    preset: str
    splits: dict[str, dict[str, int]]
    run_id: str | None = None
    ray_run_name: str = "local"
    checkpoint_root: str | None = None
    processor: Any = None
    progress: Any = None
    step_hook: Callable[[int, int], None] | None = None
    record_mlflow: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopResult:
    """What one rank saw (returned by :func:`train_loop`; Ray Train drops it, tests read it)."""

    losses: list[float] = field(default_factory=list)  # train loss per optimizer step (mean over ranks)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> val_loss
    checkpoints: list[str] = field(default_factory=list)  # local folders (without Ray) or URIs
    start_step: int = 0
    total_steps: int = 0
    samples: int = 0
    seconds: float = 0.0


# ------------------------------------------------------------------------------------ texts


def tokenizer_texts(settings: Any, version: str) -> list[str]:
    """The tiny preset's tokenizer corpus: the version's scrubbed TRAIN text (report sentences, their
    translations, grounded sentences, VQA questions/answers/choices) plus every prompt. Val and test text
    stay out; the reports table holds de-identified (scrubbed) text only."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from models.data import OPTIONS_PREFIX, PROMPTS, QUESTION_PREFIX, resolve_version
    from tasks.version import read_manifest, read_splits

    folder = resolve_version(settings, version)
    manifest = read_manifest(folder)
    train = pa.array(sorted(p for p, s in read_splits(folder).items() if s == "train"), pa.string())
    texts: list[str] = [p for by_lang in PROMPTS.values() for p in by_lang.values()]
    texts += list(QUESTION_PREFIX.values()) + list(OPTIONS_PREFIX.values())

    def rows(table: str, columns: list[str]) -> list[dict]:
        entry = manifest.tables.get(table)
        out: list[dict] = []
        for shard in entry.shards if entry else []:
            t = pq.read_table(folder / shard.path, columns=[*columns, "patient_pseudonym"])
            out += t.filter(pc.is_in(t.column("patient_pseudonym"), value_set=train)).select(columns).to_pylist()
        return out

    for r in rows("reports", ["text", "sentences"]):
        sentences = r["sentences"] or []
        texts += [s["text"] for s in sentences] + [s["translation"] for s in sentences if s.get("translation")]
        if not sentences:
            texts.append(r["text"])
    texts += [r["sentence"] for r in rows("grounding", ["sentence"])]
    for r in rows("vqa", ["question", "answer", "choices"]):
        texts += [r["question"], r["answer"], *(r["choices"] or [])]
    return [t for t in texts if t]


def training_version(settings: Any, version: str | None) -> tuple[Path, str]:
    """(folder, full digest) of the version to train on: ``version`` (a digest prefix), else the latest."""
    from models.data import resolve_version
    from tasks.version import read_manifest
    from tasks.version_stage import latest_version_dir

    if version is None:
        folder = latest_version_dir(settings)
        if folder is None:
            raise TrainError(f"no dataset version under {settings.data_dir.resolve()} yet: build one with "
                             "`radground rebuild DROP` (or `radground demo`), then train on it.")
    else:
        folder = resolve_version(settings, version)
    return folder, read_manifest(folder).digest


def split_counts(settings: Any, digest: str) -> dict[str, dict[str, int]]:
    """{"train": {"rows", "patients"}, "val": {...}} of the version (items = labelled slices)."""
    from models.data import VersionDataset

    counts = {}
    for split in ("train", "val"):
        c = VersionDataset.from_settings(settings, digest, split).counts
        counts[split] = {"rows": c["items"], "patients": c["patients"]}
    return counts


def check_splits(settings: Any, digest: str, splits: dict[str, dict[str, int]]) -> None:
    benchmarks = settings.train.slake_dir is not None
    if splits["val"]["rows"] == 0 and not benchmarks:
        raise TrainError(
            f"version {digest[:16]} has no val patient with labelled slices, and checkpoints are selected on "
            "val. Add patients (a new drop: each new patient lands in val with the share version.val) or raise "
            "version.val for new patients, then rebuild; patients already assigned keep their split.")
    if splits["train"]["rows"] == 0 and settings.train.vqa_rad_dir is None and not benchmarks:
        raise TrainError(f"version {digest[:16]} has no train patient with labelled slices: nothing to train on. "
                         "Add patients with a new drop and rebuild.")


def build_model(loop: LoopConfig, texts: list[str] | None = None):
    """(model, processor) for the run's preset: the driver's processor or one trained on ``texts``."""
    from models.radgrounder import RadGrounderForConditionalGeneration, build, tiny_config

    torch.manual_seed(loop.settings.train.seed)
    if loop.preset == "tiny" and loop.processor is not None:
        return RadGrounderForConditionalGeneration(tiny_config(loop.processor.tokenizer)), loop.processor
    if loop.preset == "tiny" and texts is None:
        texts = tokenizer_texts(loop.settings, loop.version_digest)
    return build(loop.preset, texts=texts, settings=loop.settings)


# ------------------------------------------------------------------------------------ distribution


@dataclass
class _Ranks:
    rank: int
    world: int
    ray: bool
    device: torch.device


def _ranks(settings: Any, in_ray: bool) -> _Ranks:
    if in_ray:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        return _Ranks(ctx.get_world_rank(), ctx.get_world_size(), True, ray.train.torch.get_device())
    want = settings.train.use_gpu
    device = torch.device("cuda" if want != "false" and torch.cuda.is_available() else "cpu")
    return _Ranks(0, 1, False, device)


def _all_mean(values: list[float], ranks: _Ranks) -> list[float]:
    """Sum of the values over ranks (callers put sums and counts in)."""
    t = torch.tensor(values, dtype=torch.float64)
    if ranks.world > 1 and torch.distributed.is_initialized():
        if ranks.device.type == "cuda":
            t = t.to(ranks.device)
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


# ------------------------------------------------------------------------------------ the loop


def _optimizer(model: torch.nn.Module, train: Any) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=train.lr)
    from transformers.optimization import Adafactor

    # A fixed learning rate driven by the schedule (relative_step off), as in the recipe.
    return Adafactor(groups, lr=train.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def _schedule(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * total), total)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _forward_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    batch = _to(batch, device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(**batch, logits_on_labels_only=True).loss


def _val_indices(n: int, eval_items: int, ranks: _Ranks) -> list[int]:
    return [i for i in range(min(n, eval_items)) if i % ranks.world == ranks.rank]


@torch.no_grad()
def _validate(model, val_ds, processor, loop: LoopConfig, ranks: _Ranks) -> float:
    """Mean per-sample loss over the first train.eval_items val items (all ranks together)."""
    train = loop.settings.train
    model = getattr(model, "module", model)  # no DDP here: ranks may run different numbers of forwards
    model.eval()
    indices = _val_indices(len(val_ds), train.eval_items, ranks)
    total, count = 0.0, 0
    for start in range(0, len(indices), train.batch_size):
        samples = [val_ds[i] for i in indices[start:start + train.batch_size]]
        batch = processor.collate(samples, max_length=processor.image_seq_length + train.max_length)
        loss = _forward_loss(model, batch, ranks.device)
        total += float(loss) * len(samples)
        count += len(samples)
    model.train()
    total, count = _all_mean([total, float(count)], ranks)
    return total / count if count else float("nan")


def _epoch_batches(sampler, dataset, epoch: int, batch_size: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    order = list(iter(sampler))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _report_progress(loop: LoopConfig, step: int, total: int) -> None:
    target = loop.progress
    if target is None:
        return
    with contextlib.suppress(Exception):  # a lost progress message must never stop training
        if callable(target):
            target(step, total)
        else:
            target.put_nowait((step, total))


def _lineage(loop: LoopConfig, step: int, epoch: int, val_loss: float) -> dict:
    import radground

    return {"dataset_digest": loop.version_digest, "splits": loop.splits, "code_version": radground.__version__,
            "settings_hash": loop.settings.settings_hash(), "training_run_id": loop.run_id,
            "ray_run_name": loop.ray_run_name, "step": step, "epoch": epoch, "val_loss": val_loss,
            "preset": loop.preset}


def _save(folder: Path, model, processor, optimizer, scheduler, state: dict, lineage: dict) -> None:
    unwrapped = getattr(model, "module", model)
    unwrapped.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
               folder / TRAINER_STATE)
    (folder / CHECKPOINT_LINEAGE).write_text(json.dumps(lineage, indent=2, sort_keys=True), encoding="utf-8")


def _restored(ranks: _Ranks) -> Iterator[Path] | None:
    if not ranks.ray:
        return None
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else checkpoint.as_directory()


def train_loop(config: dict | LoopConfig) -> LoopResult:
    """Train on this rank; Ray Train's ``train_loop_per_worker`` (config ``{"loop": LoopConfig}``), or a
    direct call with a :class:`LoopConfig` (world size 1: checkpoints go to ``checkpoint_root``, a folder)."""
    in_ray = isinstance(config, dict)
    loop: LoopConfig = config["loop"] if in_ray else config
    settings, train = loop.settings, loop.settings.train
    ranks = _ranks(settings, in_ray)
    from models.data import BlockShuffleSampler, build_mixture
    from models.radgrounder import RadGrounderForConditionalGeneration, RadGrounderProcessor

    if ranks.device.type == "cpu" and ranks.ray:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "best_val_loss": None}
    restored = _restored(ranks)
    if restored is not None:
        with restored as folder:
            folder = Path(folder)
            processor = RadGrounderProcessor.from_pretrained(str(folder))
            model = RadGrounderForConditionalGeneration.from_pretrained(str(folder))
            saved = torch.load(folder / TRAINER_STATE, map_location="cpu", weights_only=False)
        state.update({k: saved[k] for k in ("step", "epoch", "best_val_loss")})
        log.info("rank %d: resuming at step %d from the last checkpoint", ranks.rank, state["step"])
    else:
        model, processor = build_model(loop)
        saved = None

    window = 2
    train_ds = build_mixture(settings, loop.version_digest, "train", cache_row_groups=window)
    val_ds = build_mixture(settings, loop.version_digest, "val", cache_row_groups=window)
    sampler = BlockShuffleSampler(train_ds, seed=train.seed, num_replicas=ranks.world, rank=ranks.rank,
                                  window=window)
    per_rank = len(sampler)
    accum = max(1, round(train.effective_batch / (train.batch_size * ranks.world)))
    micro_per_epoch = math.ceil(per_rank / train.batch_size)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / accum))
    total = train.epochs * steps_per_epoch
    if train.max_steps is not None:
        total = min(total, train.max_steps)
    eval_every = train.eval_every or steps_per_epoch

    if ranks.device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(ranks.device)
    model.train()
    optimizer = _optimizer(model, train)
    scheduler = _schedule(optimizer, total, train.warmup_ratio)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    if ranks.ray and ranks.world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)  # DDP (the mask head's zero term keeps every grad)

    result = LoopResult(start_step=state["step"], total_steps=total)
    max_length = processor.image_seq_length + train.max_length
    step = state["step"]
    result.seconds = time.perf_counter()  # the start, until the loop ends (then the duration)
    _report_progress(loop, step, total)
    while step < total:
        epoch = step // steps_per_epoch
        batches = _epoch_batches(sampler, train_ds, epoch, train.batch_size)
        first = (step - epoch * steps_per_epoch) * accum  # micro-batches of this epoch already used
        for group_start in range(first, len(batches), accum):
            group = batches[group_start:group_start + accum]
            loss_sum = 0.0
            for k, indices in enumerate(group):
                batch = processor.collate([train_ds[i] for i in indices], max_length=max_length)
                sync = k == len(group) - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss = _forward_loss(model, batch, ranks.device) / len(group)
                    loss.backward()
                loss_sum += float(loss.detach())
                result.samples += len(indices)
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            (mean_loss,) = _all_mean([loss_sum / ranks.world], ranks)
            result.losses.append(mean_loss)
            if ranks.rank == 0:
                _report_progress(loop, step, total)
                _record_metrics(loop, {"train_loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                                       "epoch": float(epoch)}, step)
            if loop.step_hook is not None:
                loop.step_hook(step, ranks.rank)
            if step % eval_every == 0 or step == total:
                _checkpoint(model, processor, optimizer, scheduler, val_ds, loop, ranks, state, result, step,
                            epoch, mean_loss)
            if step >= total:
                break
    result.seconds = time.perf_counter() - result.seconds
    return result


def _record_metrics(loop: LoopConfig, metrics: dict[str, float], step: int) -> None:
    if loop.record_mlflow and loop.run_id:
        from radground.lineage import log_training_metrics

        log_training_metrics(loop.settings, loop.run_id, metrics, step)


def _checkpoint(model, processor, optimizer, scheduler, val_ds, loop: LoopConfig, ranks: _Ranks, state: dict,
                result: LoopResult, step: int, epoch: int, train_loss: float) -> None:
    val_loss = _validate(model, val_ds, processor, loop, ranks)
    result.val_losses[step] = val_loss
    best = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
    if best:
        state["best_val_loss"] = val_loss
    name = f"checkpoint-{step:06d}"
    lineage = _lineage(loop, step, epoch, val_loss)
    metrics = {"val_loss": val_loss, "train_loss": train_loss, "step": step, "epoch": epoch,
               # throughput of this attempt, over all ranks (each rank reads the same number of samples)
               "samples": result.samples * ranks.world, "seconds": time.perf_counter() - result.seconds}
    if ranks.rank == 0:
        _record_metrics(loop, {"val_loss": val_loss}, step)
    if not ranks.ray:
        root = Path(loop.checkpoint_root or tempfile.mkdtemp(prefix="radground-ckpt-"))
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        _save(folder, model, processor, optimizer, scheduler, {**state, "step": step, "epoch": epoch}, lineage)
        result.checkpoints.append(str(folder))
        _log_checkpoint(loop, str(folder), lineage, best)
        return
    import ray.train

    if ranks.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="radground-ckpt-") as tmp:
        _save(Path(tmp), model, processor, optimizer, scheduler, {**state, "step": step, "epoch": epoch}, lineage)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    uri = f"{loop.checkpoint_root.rstrip('/')}/{name}" if loop.checkpoint_root else name
    result.checkpoints.append(uri)
    _log_checkpoint(loop, uri, lineage, best)


def _log_checkpoint(loop: LoopConfig, uri: str, lineage: dict, best: bool) -> None:
    if loop.record_mlflow and loop.run_id:
        from radground.lineage import log_checkpoint

        log_checkpoint(loop.settings, loop.run_id, uri=uri, lineage=lineage, best=best)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)

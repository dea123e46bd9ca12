"""The train_model flow: RadGrounder on a dataset version, with Ray Train (v2 API) under Prefect.

Wiring only; the per-worker work is :func:`models.training.train_loop`. The flow

1. resolves the version (a digest prefix, pulled through DVC when absent) and refuses one whose val
   split is empty (checkpoints are selected on val);
2. opens the MLflow training run (radground.lineage.start_training_run: params, the version as input);
3. runs ``ray.train.torch.TorchTrainer`` with ``train.workers`` workers (GPU per worker when asked or
   available), a unique Ray run name (a reused name would silently resume an old run), checkpoints in
   the object store (``<data_dir>/checkpoints/<run>/`` or ``<bucket>/<prefix>checkpoints/<run>/`` on S3
   through ``pyarrow.fs.S3FileSystem``), the best ``train.num_to_keep`` kept by MIN val_loss, and
   ``FailureConfig(max_failures=train.max_failures)``: a dead worker restarts the group from the last
   checkpoint;
4. tags the best checkpoint in MLflow and closes the run FINISHED (FAILED on any error).

Ray Train v1 hangs on 2 cores; v2 is selected with RAY_TRAIN_V2_ENABLED=1 before ray.train is imported,
here and on every Ray worker.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models.training import TrainError, check_splits, split_counts, training_version  # noqa: F401
from radground.errors import ConfigError, StageError, guarded
from radground.runtime import prefect_api, ray_init_kwargs, report_progress
from radground.settings import Settings

os.environ["RAY_TRAIN_V2_ENABLED"] = "1"  # written, never read as a setting: v1 hangs on 2 cores

from prefect import flow  # noqa: E402

log = logging.getLogger(__name__)
TRAIN_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1"}


@dataclass
class TrainResult:
    """What a training run produced: its MLflow run, Ray run name, checkpoints and losses."""

    run_id: str
    ray_run_name: str
    version_digest: str
    preset: str
    best_checkpoint: str | None
    best_val_loss: float | None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # {"uri", "step", "val_loss"}
    storage: str = ""
    seconds: float = 0.0
    samples_per_s: float | None = None

    def lines(self) -> list[str]:
        loss = "n/a" if self.best_val_loss is None else f"{self.best_val_loss:.4f}"
        out = [f"training run {self.run_id} (Ray run {self.ray_run_name}) on version {self.version_digest[:16]}, "
               f"preset {self.preset}: {len(self.checkpoints)} checkpoint(s) kept in {self.storage}",
               f"best checkpoint (min val_loss {loss}): {self.best_checkpoint}"]
        if self.samples_per_s is not None:
            out.append(f"throughput: {self.samples_per_s:.2f} samples/s in the training loop (all workers, "
                       f"validation and checkpoints included); the whole run took {self.seconds:.0f} s")
        out.append(f"trace it back to the raw files: radground lineage trace {self.run_id}")
        return out


def run_name(version_digest: str) -> str:
    """A unique Ray run name: train-<digest12>-<UTC time>-<random>."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"train-{version_digest[:12]}-{stamp}-{secrets.token_hex(3)}"


def checkpoint_storage(settings: Settings) -> tuple[str, Any, str]:
    """(storage_path, storage_filesystem, URI prefix) of the checkpoints in the configured object store."""
    if settings.storage.backend == "local":
        root = (settings.data_dir / "checkpoints").resolve()
        root.mkdir(parents=True, exist_ok=True)
        return str(root), None, str(root)
    import pyarrow.fs

    from radground.store import open_store

    open_store(settings).has_objects("checkpoints/")  # the bucket exists (created when storage.create_bucket)
    s3 = settings.storage
    filesystem = pyarrow.fs.S3FileSystem(
        access_key=s3.access_key.get_secret_value() if s3.access_key else None,
        secret_key=s3.secret_key.get_secret_value() if s3.secret_key else None,
        endpoint_override=s3.endpoint, region=s3.region, scheme=s3.endpoint.split("://", 1)[0],
        connect_timeout=s3.connect_timeout_s, request_timeout=s3.read_timeout_s,
    )
    path = f"{s3.bucket}/{s3.prefix}checkpoints"
    return path, filesystem, f"s3://{path}"


def _use_gpu(settings: Settings) -> bool:
    choice = settings.train.use_gpu
    if choice != "auto":
        return choice == "true"
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def _params(settings: Settings, preset: str, workers: int, use_gpu: bool) -> dict[str, str]:
    t = settings.train
    return {"preset": preset, "workers": str(workers), "use_gpu": str(use_gpu), "optimizer": t.optimizer,
            "lr": str(t.lr), "weight_decay": str(t.weight_decay), "warmup_ratio": str(t.warmup_ratio),
            "epochs": str(t.epochs), "max_steps": str(t.max_steps or ""), "batch_size": str(t.batch_size),
            "effective_batch": str(t.effective_batch), "max_length": str(t.max_length),
            "eval_items": str(t.eval_items), "eval_every": str(t.eval_every), "grad_clip": "1.0",
            "seed": str(t.seed), "grounding": t.grounding, "schedule": "cosine"}


def _follow_progress(queue, stop: threading.Event, hook: Callable[[int, int], None]) -> None:
    while not stop.is_set():
        try:
            step, total = queue.get(timeout=0.5)
        except Exception:  # noqa: BLE001 - empty, or the queue's actor is gone
            continue
        hook(step, total)


@flow(name="train_model", validate_parameters=False, log_prints=False)
@guarded("the train_model flow")
def train_model(version: str | None, settings: Settings, *, preset: str | None = None,
                loop_fn: Callable | None = None, step_hook: Callable[[int, int], None] | None = None
                ) -> TrainResult:
    """Train ``preset`` (default model.preset) on ``version`` (default: the latest) with Ray Train.

    ``loop_fn`` replaces :func:`models.training.train_loop` (a wrapper around it); ``step_hook(step, rank)``
    runs on every worker after each optimizer step (tests inject worker failures with it).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from models.radgrounder import RadGrounderProcessor
    from models.training import LoopConfig, tokenizer_texts, train_loop
    from radground.lineage import finish_training_run, log_checkpoint, start_training_run

    preset = preset or settings.model.preset
    started = time.perf_counter()
    report_progress("preparing the data", 0, 0)
    folder, digest = training_version(settings, version)
    splits = split_counts(settings, digest)
    check_splits(settings, digest, splits)
    processor = None
    if preset == "tiny":  # one tokenizer for every rank, trained on the version's scrubbed train text
        processor = RadGrounderProcessor.tiny(tokenizer_texts(settings, digest))
    else:
        from models.radgrounder.configuration import paligemma_path

        paligemma_path(settings)  # a missing folder is named before Ray starts workers
    workers = settings.train.workers
    use_gpu = _use_gpu(settings)
    name = run_name(digest)
    storage_path, filesystem, uri_root = checkpoint_storage(settings)
    run_id = start_training_run(settings, version_digest=digest, splits=splits,
                                params=_params(settings, preset, workers, use_gpu), run_name=name)
    status = "FAILED"
    queue = Queue(maxsize=1000)
    stop = threading.Event()
    # The progress hook is a context variable of this thread: the follower runs in a copy of its context.
    follower = threading.Thread(target=contextvars.copy_context().run, daemon=True, args=(
        _follow_progress, queue, stop, lambda s, t: report_progress("training", s, t)))
    try:
        loop = LoopConfig(settings=settings, version_digest=digest, preset=preset, splits=splits, run_id=run_id,
                          ray_run_name=name, checkpoint_root=f"{uri_root}/{name}", processor=processor,
                          progress=queue, step_hook=step_hook)
        follower.start()
        trainer = TorchTrainer(
            loop_fn or train_loop,
            train_loop_config={"loop": loop},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=filesystem,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=settings.train.num_to_keep, checkpoint_score_attribute="val_loss",
                    checkpoint_score_order="min"),
                failure_config=ray.train.FailureConfig(max_failures=settings.train.max_failures),
            ),
        )
        result = trainer.fit()
        kept = [{"uri": _uri(uri_root, storage_path, c.path), "step": int(m.get("step", -1)),
                 "val_loss": float(m["val_loss"])} for c, m in (result.best_checkpoints or [])]
        best = min(kept, key=lambda c: c["val_loss"]) if kept else None
        if best is not None:
            lineage = _read_lineage(result, best["step"])
            log_checkpoint(settings, run_id, uri=best["uri"], lineage=lineage, best=True)
        status = "FINISHED"
    finally:
        stop.set()
        follower.join(timeout=2)
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)
        finish_training_run(settings, run_id, status)
    metrics = result.metrics or {}
    samples, seconds = metrics.get("samples"), metrics.get("seconds")
    return TrainResult(run_id=run_id, ray_run_name=name, version_digest=digest, preset=preset,
                       best_checkpoint=best["uri"] if best else None,
                       best_val_loss=best["val_loss"] if best else None,
                       checkpoints=sorted(kept, key=lambda c: c["step"]), storage=f"{uri_root}/{name}",
                       seconds=time.perf_counter() - started,
                       samples_per_s=samples / seconds if samples and seconds else None)


def _uri(uri_root: str, storage_path: str, path: str) -> str:
    """A Ray checkpoint path (relative to the filesystem) as the URI radground records."""
    return uri_root + path[len(storage_path):] if path.startswith(storage_path) else path


def _read_lineage(result, step: int) -> dict:
    import json

    from models.training import CHECKPOINT_LINEAGE

    for checkpoint, metrics in result.best_checkpoints or []:
        if int(metrics.get("step", -1)) == step:
            with checkpoint.as_directory() as folder:
                return json.loads((Path(folder) / CHECKPOINT_LINEAGE).read_text(encoding="utf-8"))
    raise StageError(f"the best checkpoint of step {step} has no {CHECKPOINT_LINEAGE}")


def run_training(version: str | None, settings: Settings, *, preset: str | None = None,
                 loop_fn: Callable | None = None, step_hook: Callable | None = None) -> TrainResult:
    """Run :func:`train_model` on the configured runtime (embedded Prefect API + local Ray by default)."""
    import ray

    preset = preset or settings.model.preset
    if preset == "paligemma2-3b-224":
        from models.radgrounder.configuration import paligemma_path

        paligemma_path(settings)  # ConfigError naming the setting, before anything starts
    elif preset != "tiny":
        raise ConfigError(f"preset {preset!r}: expected tiny or paligemma2-3b-224.")
    # No version yet, or one without a val patient: said before Prefect and Ray start.
    _, digest = training_version(settings, version)
    check_splits(settings, digest, split_counts(settings, digest))

    def start_local_ray(env: dict[str, str]) -> None:
        # Local Ray starts while the Prefect server boots; every Ray process gets TRAIN_ENV (Ray Train v2).
        if settings.ray.address is None and not ray.is_initialized():
            ray.init(**ray_init_kwargs(settings, {**env, **TRAIN_ENV}))

    report_progress("starting Prefect + Ray", 0, 0)
    try:
        with prefect_api(settings, while_starting=start_local_ray) as env:
            if not ray.is_initialized():
                kwargs = ray_init_kwargs(settings, {**env, **TRAIN_ENV})
                ray.init(address=settings.ray.address, **kwargs)
            return train_model(version, settings, preset=preset, loop_fn=loop_fn, step_hook=step_hook)
    finally:
        if ray.is_initialized():
            ray.shutdown()

"""The one settings object of radground.

Sources, highest priority first: keyword arguments, environment variables
(prefix ``RADGROUND_``, nested groups joined by ``__``, e.g.
``RADGROUND_STORAGE__BACKEND=s3``), an optional YAML file (``--config FILE``),
then the defaults below, which are the embedded, server-free setup.

Secrets are ``SecretStr``: they print as ``**********`` and
:meth:`Settings.public_dict` masks them, so nothing that logs or archives the
settings can leak one. Each later stage adds its own group here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from radground.errors import ConfigError

ENV_PREFIX = "RADGROUND_"
ENV_NESTED_DELIMITER = "__"
#: RADGROUND_* variables that are not settings but are read elsewhere (the --config option,
#: scripts/ensure-venv.sh); RADGROUND_TEST_* are the test suite's own switches.
OTHER_ENV_VARS = frozenset({"RADGROUND_CONFIG", "RADGROUND_VENV_CACHE"})
OTHER_ENV_PREFIXES = ("RADGROUND_TEST_",)


class _Group(BaseModel):
    """A nested settings group: unknown keys are typos, so they are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageSettings(_Group):
    """Where radground keeps objects: a local folder (default) or an S3/MinIO bucket."""

    backend: Literal["local", "s3"] = Field(
        default="local", description="local: a folder (storage.root); s3: a bucket on an S3-compatible server."
    )
    root: Path | None = Field(
        default=None, description="Local backend folder; default <data_dir>/store."
    )
    endpoint: str = Field(
        default="http://127.0.0.1:9000",
        description="S3 endpoint URL, http:// or https:// (MinIO, or any S3-compatible server).",
    )
    bucket: str = Field(default="radground", min_length=3, max_length=63, description="S3 bucket name.")
    prefix: str = Field(default="", description="Key prefix inside the bucket, e.g. 'site-a/'.")
    region: str = Field(default="us-east-1", description="S3 region the bucket is in.")
    access_key: SecretStr | None = Field(default=None, description="S3 access key; set it in the environment.")
    secret_key: SecretStr | None = Field(default=None, description="S3 secret key; set it in the environment.")
    create_bucket: bool = Field(
        default=True, description="Create the bucket when it does not exist yet."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Seconds to wait for a connection to the "
                                     "S3 endpoint.")
    read_timeout_s: float = Field(default=60.0, gt=0, description="Seconds to wait for data on an open S3 "
                                  "connection.")
    max_attempts: int = Field(
        default=4, ge=1, le=20, description="Tries per operation on transient errors."
    )
    backoff_s: float = Field(
        default=0.5, ge=0, description="First retry delay; doubles each retry (with jitter)."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "expected a URL such as http://127.0.0.1:9000 or https://minio.example.org"
            )
        if parts.path not in ("", "/"):
            raise ValueError("the endpoint must not carry a path; put the bucket in storage.bucket")
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _prefix_is_relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("expected a relative prefix without '..', e.g. 'site-a/'")
        return value.strip("/") + "/" if value.strip("/") else ""


class DeidSettings(_Group):
    """De-identification (DICOM PS3.15 basic profile, retain longitudinal temporal info
    with modified dates). The key turns source IDs into pseudonyms; whoever holds it can
    re-link, so it lives apart from the data and never enters an artifact."""

    key: SecretStr | None = Field(
        default=None,
        description="HMAC key (>= 32 characters). Unset: the embedded default generates one "
        "under <data_dir>/secrets/ on first use.",
    )
    date_shift_max_days: int = Field(
        default=730, ge=1, le=36500,
        description="Each patient's dates move back by a stable 1..N days derived from the key.",
    )

    @field_validator("key")
    @classmethod
    def _key_is_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("the de-identification key must be at least 32 characters long")
        return value


class IngestSettings(_Group):
    """What ingest accepts from a drop, and how it batches the work."""

    slice_axes: list[Literal["axial", "coronal", "sagittal", "oblique"]] = Field(
        default=["axial"], min_length=1, description="Series of other orientations are quarantined."
    )
    orphan_studies_image_only: bool = Field(
        default=False,
        description="A study without a report is quarantined as an orphan; true keeps its slices "
        "as image-only records (has_report = false).",
    )
    tasks_per_cpu: int = Field(
        default=2, ge=1, le=64,
        description="Work is cut into about this many tasks per CPU: enough to balance the load, "
        "few enough that Prefect's per-task cost (~0.1 s) stays small.",
    )


class RaySettings(_Group):
    """Where the work runs: a local Ray started in-process (default) or an existing cluster."""

    address: str | None = Field(default=None, description="e.g. ray://head:10001; unset = local Ray.")
    num_cpus: int = Field(default=2, ge=1, description="CPUs of the local Ray (ignored with address).")


class PrefectSettings(_Group):
    """Prefect's API: an existing server, or one radground starts on 127.0.0.1 for the run."""

    api_url: str | None = Field(default=None, description="e.g. http://prefect:4200/api; unset = embedded.")
    server_start_timeout_s: float = Field(default=90.0, gt=0, description="Seconds the embedded Prefect server "
                                          "may take to answer before the rebuild stops.")


class LLMSettings(_Group):
    """Keyword extraction (and, with openai, translation and free-form VQA) backend."""

    backend: Literal["lexicon", "openai"] = Field(
        default="lexicon", description="lexicon: offline, deterministic; openai: any OpenAI-compatible server."
    )
    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="OpenAI-compatible API root.")
    model: str = Field(default="gpt-oss-120b", min_length=1, description="Model name the server serves.")
    api_key: SecretStr | None = Field(default=None, description="Bearer token, if the server wants one.")
    timeout_s: float = Field(default=60.0, gt=0, description="Seconds per request before it counts as a "
                             "failed try.")
    max_concurrency: int = Field(default=8, ge=1, le=512, description="Requests in flight at once.")
    max_attempts: int = Field(default=4, ge=1, le=20, description="Tries per sentence before quarantine.")
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each retry.")
    temperature: float = Field(default=0.0, ge=0, le=2, description="Sampling temperature; 0 = the same "
                               "answer for the same sentence.")

    @field_validator("base_url")
    @classmethod
    def _base_url_is_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected a URL such as http://127.0.0.1:8000/v1")
        return value.rstrip("/")


class TranslationSettings(_Group):
    """DE<->EN sentence translation."""

    backend: Literal["auto", "none", "openai", "marian"] = Field(
        default="auto", description="auto: openai when llm.backend is openai, else none."
    )
    marian_de_en: Path | None = Field(default=None, description="Local MarianMT folder, German to English.")
    marian_en_de: Path | None = Field(default=None, description="Local MarianMT folder, English to German.")


class VQASettings(_Group):
    """Templated (and, with openai, free-form) question/answer generation."""

    seed: int = Field(default=0, ge=0, description="Seeds the choice of questions and distractors.")
    max_items_per_study: int = Field(default=24, ge=0, description="Most items kept per study, and per slice "
                                     "for slice-level items (chosen with vqa.seed).")
    choices: int = Field(default=4, ge=2, le=8, description="Options of a multiple-choice question.")
    free_form: bool = Field(default=True, description="Ask the LLM for free-form items (openai only).")


SegmentationBackendName = Literal["classical", "totalsegmentator", "sam", "imported"]


class SegmentationSettings(_Group):
    """Which backends label the slices; several are chained in order."""

    backend: list[SegmentationBackendName] = Field(
        default=["classical"], min_length=1,
        description="Chain, in order: each later backend refines or overrides the earlier masks "
        "(sam refines the previous backend's regions; imported overrides where a drop carries masks).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where model backends run "
                                                   "(totalsegmentator, sam); auto = cuda when available.")
    totalsegmentator_weights: Path | None = Field(
        default=None, description="Folder with TotalSegmentator's downloaded weights (TOTALSEG_HOME_DIR); "
        "nothing is downloaded at run time.")
    totalsegmentator_fast: bool = Field(default=False, description="The 3 mm 'fast' models.")
    sam_checkpoint: Path | None = Field(default=None, description="segment-anything / MedSAM checkpoint file.")
    sam_model: Literal["vit_b", "vit_l", "vit_h"] = Field(default="vit_b", description="Architecture of "
                                                          "sam_checkpoint.")
    sam_min_iou: float = Field(default=0.5, ge=0, le=1, description="Keep a refined mask only if it agrees "
                               "this well with the coarse one; else keep the coarse mask (and count it).")
    sam_batch_size: int = Field(default=16, ge=1, description="Box prompts per image embedding call.")
    masks_folder: str = Field(default="masks", description="Folder of a drop holding imported masks.")

    @field_validator("backend")
    @classmethod
    def _sam_refines_something(cls, value: list[str]) -> list[str]:
        if value and value[0] == "sam":
            raise ValueError("sam refines another backend's masks; put it after one, e.g. [classical, sam]")
        if len(set(value)) != len(value):
            raise ValueError("each backend may appear once in the chain")
        return value


class GroundingSettings(_Group):
    """Per-slice intersection of report keywords with segmentation classes."""

    min_area_px: int = Field(default=50, ge=1, description="A class counts as present with this many pixels.")
    per_component_boxes: bool = Field(default=False, description="One box per connected component "
                                      "instead of one per class.")
    ungrounded_sample: float = Field(default=0.1, ge=0, le=1, description="Share of slices without a "
                                     "grounded pair kept for the report and VQA tasks (seeded).")
    seed: int = Field(default=0, ge=0, description="Seeds the ungrounded sample.")
    overlays: int = Field(default=0, ge=0, description="PNG overlays to write per drop (radground rebuild "
                          "--overlays N).")


class QualitySettings(_Group):
    """Table-level gates of the quality stage: crossing one fails the build with the numbers."""

    max_quarantine_rate: float = Field(default=0.05, ge=0, le=1, description="Largest share of a table's "
                                       "rows that its expectations may move to quarantine.")
    min_grounded_slices: int = Field(default=1, ge=0, description="Fewest distinct grounded slices a build "
                                     "must keep after its checks.")


class VersionSettings(_Group):
    """Dataset versions: shard size and the patient-level split."""

    shard_target_mb: float = Field(default=128.0, gt=0, description="Target Parquet shard size; a drop's "
                                   "table is cut into shards of about this size.")
    train: float = Field(default=0.8, ge=0, le=1, description="Share of new patients assigned to train.")
    val: float = Field(default=0.1, ge=0, le=1, description="Share of new patients assigned to val.")
    test: float = Field(default=0.1, ge=0, le=1, description="Share of new patients assigned to test.")

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> VersionSettings:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train + val + test must sum to 1 (they sum to {total:g}), e.g. 0.8/0.1/0.1")
        return self


class RetentionSettings(_Group):
    """Which dataset versions `radground datasets retire` keeps; every other one loses its shards and
    splits (its manifest is kept forever). A version holding a forgotten patient is kept only as the
    latest, when pinned, or for a registered model not tagged contains_forgotten (tasks/retention.py)."""

    keep_last: int = Field(default=5, ge=1, description="Keep the newest this many versions (by creation time).")
    keep_days: float = Field(default=30.0, ge=0, description="Keep every version younger than this many days "
                             "(0: age keeps none).")
    pinned: list[str] = Field(default=[], description="Digest prefixes (8 to 64 hex characters) of versions kept "
                              "whatever their age, e.g. a published benchmark's version.")

    @field_validator("pinned")
    @classmethod
    def _hex_prefixes(cls, value: list[str]) -> list[str]:
        cleaned = [v.strip().lower() for v in value]
        bad = [v for v in cleaned if not (8 <= len(v) <= 64 and all(c in "0123456789abcdef" for c in v))]
        if bad:
            raise ValueError(f"pinned {bad!r}: each entry is 8 to 64 hex characters of a version digest "
                             "(`radground datasets list` prints 16)")
        return cleaned


class MlflowSettings(_Group):
    """Where builds and lineage are recorded. Unset tracking_uri = the embedded SQLite under data_dir;
    production names a tracking server (e.g. http://mlflow:5000, Postgres-backed with S3 artifacts)."""

    tracking_uri: str | None = Field(default=None, description="e.g. http://mlflow:5000; unset = "
                                     "sqlite under <data_dir>/mlflow.")
    build_experiment: str = Field(default="dataset-builds", min_length=1, description="MLflow experiment of "
                                  "the dataset builds.")
    train_experiment: str = Field(default="training", min_length=1, description="MLflow experiment of the "
                                  "training runs (each logs its dataset version as input, its metrics and the "
                                  "lineage.json of its checkpoints).")
    eval_experiment: str = Field(default="evaluation", min_length=1, description="MLflow experiment of the "
                                 "evaluations (each logs its test set, prompt, metrics.json and per-sample CSV).")


class TrainSettings(_Group):
    """Training data (models/data.py): the dataset version's task mixture plus the public VQA benchmarks."""

    seed: int = Field(default=0, ge=0, description="Seeds the per-item draws of the training data (task, "
                      "language, question): the same seed, epoch and index give the same sample.")
    grounding: Literal["detection", "segmentation", "mixed"] = Field(
        default="mixed", description="Grounded captioning targets: boxes as <p bbox=…> markup, <seg> spans "
        "with masks, or either one drawn 50/50 per item.")
    slake_dir: Path | None = Field(default=None, description="Local SLAKE folder (imgs/, train.json, "
                                   "validate.json or validation.json, test.json); unset = no SLAKE in the mixture.")
    vqa_rad_dir: Path | None = Field(default=None, description="Local VQA-RAD folder (one JSON list and its "
                                     "images); unset = no VQA-RAD in the mixture.")
    vqa_rad_split_file: Path | None = Field(default=None, description="Optional JSON {\"train\": [qid, …], "
                                            "\"test\": [qid, …]} that replaces VQA-RAD's published split "
                                            "(e.g. the Wu et al. 2025 re-split).")
    # The training run (models/training.py, flows/train.py): the recipe of docs/method.md by default.
    workers: int = Field(default=2, ge=1, description="Ray Train workers (DDP ranks); each holds a model copy.")
    use_gpu: Literal["auto", "false", "true"] = Field(
        default="auto", description="One GPU per worker: auto = when the Ray cluster has GPUs; bf16 and "
        "activation checkpointing are on with GPUs only.")
    epochs: int = Field(default=6, ge=1, description="Passes over the training mixture.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimizer steps "
                                  "(a cap on the epochs; the cosine schedule spans the capped length).")
    optimizer: Literal["adafactor", "adamw"] = Field(default="adafactor", description="Adafactor (the recipe) "
                                                     "or AdamW; both with train.weight_decay.")
    lr: float = Field(default=5e-5, gt=0, description="Peak learning rate (cosine decay after the warm-up).")
    weight_decay: float = Field(default=0.01, ge=0, description="Decoupled weight decay.")
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1, description="Share of the optimizer steps spent "
                                "warming the learning rate up linearly.")
    batch_size: int = Field(default=4, ge=1, description="Samples per worker per forward pass (micro-batch).")
    effective_batch: int = Field(default=288, ge=1, description="Samples per optimizer step over all workers; "
                                 "gradients are accumulated over effective_batch / (batch_size x workers) "
                                 "micro-batches (rounded, at least 1).")
    max_length: int = Field(default=200, ge=8, description="Text tokens per sample (prompt + answer); the "
                            "image tokens (256 at 224 px) come on top.")
    eval_every: int = Field(default=0, ge=0, description="Validate and checkpoint every N optimizer steps; "
                            "0 = at the end of each epoch (and always at the last step).")
    eval_items: int = Field(default=512, ge=1, description="Validation items (held-out snippets of the val "
                            "split, the same ones each time) behind val_loss.")
    num_to_keep: int = Field(default=2, ge=1, description="Checkpoints kept per run: the lowest val_loss "
                             "ones (Ray Train deletes the others).")
    max_failures: int = Field(default=2, ge=0, description="Times a run restarts its workers from the last "
                              "checkpoint after a worker dies (Ray Train FailureConfig).")


class ModelSettings(_Group):
    """The grounded VLM (RadGrounder, models/radgrounder): which preset, and where local weights are.
    Nothing is ever downloaded: the paligemma2-3b-224 preset reads a folder prepared beforehand."""

    preset: Literal["tiny", "paligemma2-3b-224"] = Field(
        default="tiny", description="tiny: random init, CPU, byte-level BPE trained on the dataset's "
        "scrubbed text; paligemma2-3b-224: PaliGemma-2 3B weights and tokenizer from model.paligemma_path.")
    paligemma_path: Path | None = Field(
        default=None, description="Local folder of a PaliGemma-2 3B 224 px checkpoint (config.json, "
        "safetensors, tokenizer and preprocessor files, e.g. google/paligemma2-3b-pt-224 fetched beforehand); "
        "needed by the paligemma2-3b-224 preset.")
    registry_name: str = Field(default="radgrounder", min_length=1, description="MLflow registered model that "
                               "`radground models register` adds versions to (aliases champion / challenger).")
    promotion_metrics: list[str] = Field(
        default=["all.accuracy", "all.f1", "report.f1", "grounding.f1_iou50"], min_length=1,
        description="Test metrics (section.metric of metrics.json) the promotion gate compares; those both the "
        "challenger and the champion have on the same test set count.")
    promotion_tolerance: float = Field(default=0.01, ge=0, description="A challenger is promoted when each "
                                       "compared metric is >= the champion's minus this (absolute).")
    max_new_tokens: int = Field(default=64, ge=1, description="Tokens generated per answer (greedy) by "
                                "evaluate and predict.")


class WatchSettings(_Group):
    """The watch-drops deployment: an inbox where hospitals deliver drops, one sub-folder (or sub-prefix) per drop."""

    inbox: str | None = Field(default=None, description="Folder, or store:PREFIX in the object store, whose "
                              "sub-folders are drops; unset = watch-drops has nothing to watch.")
    quiet_s: float = Field(default=300.0, ge=0, description="A drop is accepted once its listing (names, sizes, "
                           "times) has not changed for this many seconds and its marker file is there.")
    marker: str = Field(default="drop.yaml", min_length=1, description="Completion marker a drop's sender "
                        "writes last, at the drop's top.")


class RetrainSettings(_Group):
    """When a rebuilt version asks for a retrain (event radground.retrain.requested)."""

    min_new_patients: int = Field(default=20, ge=1, description="Patients in the new version that the "
                                  "champion's dataset version lacks, at least; a changed stage setting (another "
                                  "settings hash) or no champion yet also asks for one.")


# Fields that change how fast or where work runs, never what a stage produces: they stay out
# of the stage keys, so changing them never invalidates cached stage outputs or the digest.
_OPERATIONAL = {
    "ingest": {"tasks_per_cpu"},
    "llm": {"base_url", "api_key", "timeout_s", "max_concurrency", "backoff_s"},
    "segmentation": {"device", "sam_batch_size"},
    "grounding": {"overlays"},
}

# The settings each stage's output depends on besides the upstream stages' keys: a whole group,
# or "group.field" for one field a stage borrows from another stage's group. Keep this in step
# with what the stage reads, or a changed setting would not rerun it.
STAGE_GROUPS = {
    "ingest": ("deid", "ingest", "segmentation.masks_folder"),  # masks/ files are not images
    "curate": ("llm", "translation", "vqa"),
    "segment": ("segmentation", "grounding.min_area_px"),
    "ground": ("grounding", "vqa"),  # slice-level VQA items
    "quality": ("quality",),
    "version": ("version",),
}


class Settings(BaseSettings):
    """All of radground's configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(
        default=Path(".radground"),
        description="Everything the embedded default writes: object store, MLflow DB, "
        "Prefect home, caches, logs. A relative path is relative to the current directory.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Not read by any code yet: nothing radground prints or logs depends on it."
    )
    rebuild_lock_timeout_s: float = Field(
        default=600.0, ge=0,
        description="A rebuild waits this long for another one on the same data_dir, then fails.",
    )
    storage: StorageSettings = StorageSettings()
    deid: DeidSettings = DeidSettings()
    ingest: IngestSettings = IngestSettings()
    llm: LLMSettings = LLMSettings()
    translation: TranslationSettings = TranslationSettings()
    vqa: VQASettings = VQASettings()
    segmentation: SegmentationSettings = SegmentationSettings()
    grounding: GroundingSettings = GroundingSettings()
    ray: RaySettings = RaySettings()
    prefect: PrefectSettings = PrefectSettings()
    quality: QualitySettings = QualitySettings()
    version: VersionSettings = VersionSettings()
    mlflow: MlflowSettings = MlflowSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    retention: RetentionSettings = RetentionSettings()
    watch: WatchSettings = WatchSettings()
    retrain: RetrainSettings = RetrainSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @property
    def store_root(self) -> Path:
        """Folder of the local object store backend."""
        return self.storage.root if self.storage.root is not None else self.data_dir / "store"

    def public_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able data with every secret masked."""
        return _mask_secrets(self.model_dump(mode="python"))

    def settings_hash(self) -> str:
        """sha256 over the public settings: same settings, same hash; secrets never enter it."""
        blob = json.dumps(self.public_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def stage_hash(self, stage: str) -> str:
        """sha256 over the settings that decide what ``stage`` produces (operational ones left out)."""
        public = self.public_dict()
        chosen = {}
        for name in STAGE_GROUPS[stage]:
            group, _, field = name.partition(".")
            if field:
                chosen[name] = public[group][field]
            else:
                chosen[name] = {k: v for k, v in public[group].items() if k not in _OPERATIONAL.get(group, ())}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()

    def content_hash(self) -> str:
        """sha256 over every stage's settings: the settings part of a version digest. Paths of
        this machine (data_dir, store root) and operational knobs are not in it."""
        blob = json.dumps({stage: self.stage_hash(stage) for stage in STAGE_GROUPS}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _mask_secrets(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {k: _mask_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_secrets(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings from overrides, environment and an optional YAML file.

    Raises ConfigError naming each bad setting, the value given (secrets masked)
    and what is allowed.
    """
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} does not exist or is not a file. "
                "Pass an existing YAML file with --config, or leave it out to use the defaults."
            )
        # A throwaway subclass carries the file path into settings_customise_sources
        # without global state, so two loads with different files never interfere.
        config = SettingsConfigDict(**{**Settings.model_config, "yaml_file": path})
        settings_cls = type("FileSettings", (Settings,), {"model_config": config})
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, config_file)) from None
    except (ValueError, TypeError, yaml.YAMLError) as exc:  # YAML parse errors and the like
        # Not the library's text: a YAML error quotes the line around it, which may hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {config_file}: cannot be read as YAML settings ({type(exc).__name__}"
                          f"{where}). Fix the YAML syntax there.") from None


def _describe_validation_error(exc: ValidationError, config_file: Path | str | None) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"])
        env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(str(p) for p in error["loc"]).upper()
        secret = any(word in name for word in ("key", "secret", "password", "token"))
        given = "<hidden>" if secret else repr(error.get("input"))
        if error["type"] == "extra_forbidden":
            closest = closest_setting(name)
            hint = f"; did you mean {closest}?" if closest else ""
            problems.append(f"{name} is not a known setting (value {given}){hint}")
        else:
            problems.append(f"{name} = {given}: {error['msg']} (env {env_name})")
    where = f" in config file {config_file} or the environment" if config_file else " in the environment"
    return (
        f"invalid settings{where}: " + "; ".join(problems) + ". "
        "Fix the value, or run `radground config show` to see the effective settings."
    )


def setting_names() -> list[str]:
    """Every setting's dotted name: top-level fields, groups, and each group's fields."""
    names = []
    for name, field in Settings.model_fields.items():
        names.append(name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Group):
            names.extend(f"{name}.{sub}" for sub in field.annotation.model_fields)
    return names


def env_name(setting: str) -> str:
    """The environment variable of a dotted setting name: storage.backend -> RADGROUND_STORAGE__BACKEND."""
    return ENV_PREFIX + setting.replace(".", ENV_NESTED_DELIMITER).upper()


def closest_setting(name: str) -> str | None:
    """The known setting nearest to a mistyped dotted name (difflib), or None if none is close."""
    names = setting_names()
    group, _, field = name.rpartition(".")
    # A typo inside a known group is matched against that group's fields only: 'storage.bakend'
    # should not suggest a field of another group that happens to look alike.
    pool = [n for n in names if n.rpartition(".")[0] == group] if group in names else names
    match = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per RADGROUND_* variable that names no setting (pydantic-settings ignores those
    silently), with the closest setting. Never the value: it may be a secret."""
    environ = os.environ if environ is None else environ
    known = {env_name(name): name for name in setting_names()}
    warnings = []
    for variable in sorted(environ):
        upper = variable.upper()  # pydantic-settings matches names case-insensitively
        if (not upper.startswith(ENV_PREFIX) or upper in known or upper in OTHER_ENV_VARS
                or upper.startswith(OTHER_ENV_PREFIXES)):
            continue
        if upper.count(ENV_NESTED_DELIMITER) == 1 and upper.partition(ENV_NESTED_DELIMITER)[0] in known:
            continue  # a known group with an unknown field: load_settings rejects it, naming the closest
        # Compared without the common prefix, which would make every name look alike.
        stripped = {name[len(ENV_PREFIX):]: name for name in known}
        match = difflib.get_close_matches(upper[len(ENV_PREFIX):], list(stripped), n=1, cutoff=0.6)
        if match:
            closest = stripped[match[0]]
            hint = (f"did you mean {closest} ({known[closest]})? A group and its field are joined by two "
                    "underscores." if ENV_NESTED_DELIMITER in closest and ENV_NESTED_DELIMITER not in upper
                    else f"did you mean {closest} ({known[closest]})?")
        else:
            hint = ("run `radground config show` for the settings; their variables are RADGROUND_<NAME> or "
                    "RADGROUND_<GROUP>__<FIELD>.")
        warnings.append(f"environment variable {variable} matches no setting and is ignored; {hint}")
    return warnings


def data_dir_origin(config_file: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """Where the effective data_dir comes from, in the words of the sources (same priority as
    load_settings): the environment variable, the config file, or the default."""
    environ = os.environ if environ is None else environ
    variable = env_name("data_dir")
    given = next((name for name in environ if name.upper() == variable), None)
    if given is not None:
        return f"from {given}"
    if config_file is not None:
        try:
            content = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            content = None  # load_settings has already said what is wrong with the file
        if isinstance(content, dict) and "data_dir" in content:
            return f"from config file {config_file}"
    return "default ./.radground, relative to the current directory"

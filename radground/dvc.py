"""DVC for dataset versions: a git-less DVC repository under data_dir, remote from settings.

With radground/store.py and radground/lineage.py one of the three doors to outside
storage and tracking. The local backend pushes to ``<data_dir>/dvc-remote``; the S3
backend to ``s3://<bucket>/<prefix>dvc`` with credentials only in ``.dvc/config.local``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from radground.errors import RadgroundError
from radground.runtime import library_logs_to
from radground.settings import Settings

logger = logging.getLogger(__name__)

DVC_REMOTE_NAME = "radground"
DVC_S3_PREFIX = "dvc"  # the DVC remote's folder inside storage.bucket/storage.prefix
MANIFEST_FILE = "manifest.json"
DVC_LOGGERS = ("dvc", "dvc_data", "dvc_objects")
# DVC draws its progress bars (tqdm, on stderr) only while these loggers let ERROR through.
_DVC_PROGRESS_LOGGERS = ("dvc.progress", "dvc_data.callbacks")


class DvcError(RadgroundError):
    """DVC failed to init, track, push or pull; the message names the remote, never credentials."""


class DvcRepo:
    """A DVC project without git at ``root``; version folders live inside it.

    The remote comes from settings: ``<data_dir>/dvc-remote`` (storage.backend = local) or
    ``s3://<bucket>/<prefix>dvc`` on storage.endpoint (backend = s3). Credentials go only
    into ``.dvc/config.local``, never into the shareable ``.dvc/config``.
    """

    def __init__(self, root: Path | str, settings: Settings) -> None:
        self.root = Path(root).absolute()
        self.settings = settings

    # -- description (never with credentials)
    @property
    def remote_url(self) -> str:
        storage = self.settings.storage
        if storage.backend == "s3":
            return f"s3://{storage.bucket}/{storage.prefix}{DVC_S3_PREFIX}"
        return str((self.settings.data_dir / "dvc-remote").absolute())

    def describe_remote(self) -> str:
        storage = self.settings.storage
        if storage.backend == "s3":
            return f"'{DVC_REMOTE_NAME}' ({self.remote_url} at {storage.endpoint})"
        return f"'{DVC_REMOTE_NAME}' ({self.remote_url})"

    @contextlib.contextmanager
    def _repo(self) -> Iterator[Any]:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo

        with self._output_to_log():
            try:
                repo = Repo(str(self.root))
            except NotDvcRepoError:
                raise DvcError(f"{self.root} is not a DVC repository. Call DvcRepo.init() first.") from None
            try:
                yield repo
            finally:
                repo.close()

    @contextlib.contextmanager
    def _output_to_log(self) -> Iterator[None]:
        """Keep DVC off the terminal: its log (with "Initialized DVC repository.", which its own
        handler prints to stdout) to ``<data_dir>/logs/libraries.log``, no progress bars or spinners."""
        from dvc.ui import ui  # importing dvc installs its terminal handlers: route after it

        progress = [logging.getLogger(name) for name in _DVC_PROGRESS_LOGGERS]
        levels = [log.level for log in progress]
        for log in progress:
            log.setLevel(logging.CRITICAL)
        # `dvc add` shows a rich spinner on stderr whatever the log level; this instance
        # attribute hides the method for the block (DVC's API offers no switch for it).
        ui.status = _no_status
        try:
            # propagate: DVC's warnings and errors (why a transfer failed: endpoint, content hash)
            # also reach the root logger, for the callers' log handlers and the CLI's WARNING level.
            with library_logs_to(self.settings.data_dir, *DVC_LOGGERS, propagate=True):
                yield
        finally:
            vars(ui).pop("status", None)
            for log, level in zip(progress, levels, strict=True):
                log.setLevel(level)

    def init(self) -> None:
        """Create the DVC repo (no git) if missing, and (re)write its remote from the settings."""
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        try:
            if not (self.root / ".dvc").is_dir():
                self.root.mkdir(parents=True, exist_ok=True)
                with self._output_to_log():
                    Repo.init(str(self.root), no_scm=True).close()
            with self._repo() as repo:
                self._configure(repo)
        except DvcException as exc:
            raise DvcError(f"dvc init at {self.root} failed: {_one_line(exc)}. Check that the folder is "
                           "writable and not inside another DVC project.") from None

    def _configure(self, repo: Any) -> None:
        storage = self.settings.storage
        shared: dict[str, Any] = {"url": self.remote_url}
        if storage.backend == "s3":
            shared.update(endpointurl=storage.endpoint, region=storage.region,
                          connect_timeout=max(1, round(storage.connect_timeout_s)),
                          read_timeout=max(1, round(storage.read_timeout_s)))
            if storage.endpoint.startswith("http://"):
                shared["use_ssl"] = False
        else:
            Path(self.remote_url).mkdir(parents=True, exist_ok=True)
        with repo.config.edit("repo") as conf:
            conf["core"]["remote"] = DVC_REMOTE_NAME
            conf["core"]["analytics"] = False
            # Versions share most shards: links to DVC's cache keep one copy on disk per shard,
            # where the default (copy) would duplicate every carried-over shard in every version.
            conf["cache"]["type"] = "reflink,hardlink,copy"
            conf["remote"][DVC_REMOTE_NAME] = shared
        secret: dict[str, Any] = {}
        if storage.backend == "s3" and storage.access_key is not None and storage.secret_key is not None:
            secret = {"access_key_id": storage.access_key.get_secret_value(),
                      "secret_access_key": storage.secret_key.get_secret_value()}
        with repo.config.edit("local") as conf:
            conf["remote"].pop(DVC_REMOTE_NAME, None)
            if secret:
                conf["remote"][DVC_REMOTE_NAME] = secret
        local_config = self.root / ".dvc" / "config.local"
        if local_config.exists():
            local_config.chmod(0o600)

    def track(self, version_dir: Path | str) -> Path:
        """``dvc add`` a complete version folder; returns its ``.dvc`` file."""
        from dvc.exceptions import DvcException

        version_dir = Path(version_dir).absolute()
        if not (version_dir / MANIFEST_FILE).is_file():  # the manifest is written last: only complete versions
            raise DvcError(f"version folder {version_dir} has no {MANIFEST_FILE}: it is incomplete and is not "
                           "tracked. Rerun the build that writes it.")
        if version_dir.parent != self.root:
            raise DvcError(f"version folder {version_dir} is not directly inside the DVC repo {self.root}. "
                           "Write versions into the repo folder.")
        try:
            with self._repo() as repo:
                repo.add([str(version_dir)])
        except DvcException as exc:
            raise DvcError(f"dvc add {version_dir.name} failed: {_one_line(exc)}.") from None
        return version_dir.with_name(version_dir.name + ".dvc")

    def push(self, version: str | None = None) -> int:
        """Push one version (folder name) or every tracked one to the remote; returns files pushed."""
        self._ensure_bucket()
        try:
            with self._repo() as repo:
                return repo.push(targets=[self._dvc_file(version)] if version else None)
        except RadgroundError:
            raise
        except Exception as exc:  # DvcException, or the S3 client's own (botocore/aiohttp) errors
            raise DvcError(self._remote_failure("push", exc)) from None

    def pull(self, version: str) -> Path:
        """Fetch and check out one version (its folder name) from the remote; returns its folder."""
        try:
            with self._repo() as repo:
                repo.pull(targets=[self._dvc_file(version)])
        except RadgroundError:
            raise
        except Exception as exc:  # DvcException, or the S3 client's own (botocore/aiohttp) errors
            raise DvcError(self._remote_failure("pull", exc)) from None
        return self.root / version

    def clone(self, dest: Path | str) -> DvcRepo:
        """A fresh DVC repo at ``dest`` with this one's config and .dvc files, but no data or cache.

        Without git this is what a clone is: the small metadata travels, the data comes by pull.
        """
        dest = Path(dest).absolute()
        (dest / ".dvc").mkdir(parents=True, exist_ok=False)
        for name in ("config", "config.local"):
            if (self.root / ".dvc" / name).exists():
                shutil.copy2(self.root / ".dvc" / name, dest / ".dvc" / name)
        for dvc_file in (p for p in self.root.glob("*.dvc") if p.is_file()):
            shutil.copy2(dvc_file, dest / dvc_file.name)
        return DvcRepo(dest, self.settings)

    def _dvc_file(self, version: str) -> str:
        path = self.root / f"{Path(version).name}.dvc"
        if not path.exists():
            raise DvcError(f"version {version!r} is not tracked in {self.root} (no {path.name}). Track it first, "
                           "or copy its .dvc file from the repo that wrote it.")
        return str(path)

    def _ensure_bucket(self) -> None:
        # dvc-s3 does not create buckets; the object store does (storage.create_bucket), and
        # its errors already name the endpoint and what to do.
        if self.settings.storage.backend == "s3":
            from radground.store import open_store

            open_store(self.settings).exists(f"{DVC_S3_PREFIX}/.radground-remote")

    def _remote_failure(self, op: str, exc: Exception) -> str:
        from dvc.exceptions import DvcException

        hint = ("Check storage.endpoint, the credentials (storage.access_key/secret_key) and that the "
                "S3/MinIO server is running" if self.settings.storage.backend == "s3"
                else "Check that the remote folder exists and is readable/writable")
        what = _one_line(exc) if isinstance(exc, DvcException) else f"{type(exc).__name__}: {_one_line(exc)}"
        return f"dvc {op} with remote {self.describe_remote()} failed: {what}. {hint}, then retry."


    # -- what versions reference, and deleting exactly what none references any more (purge)
    def _object_rel(self, md5: str) -> str:
        """An object's path inside a DVC 3 cache or remote: files/md5/<2 hex>/<rest>[.dir]."""
        return f"files/md5/{md5[:2]}/{md5[2:]}"

    def _read_object(self, md5: str) -> bytes | None:
        local = self.root / ".dvc" / "cache" / self._object_rel(md5)
        if local.is_file():
            return local.read_bytes()
        if self.settings.storage.backend == "s3":
            from radground.errors import ObjectNotFoundError
            from radground.store import open_store

            try:
                return open_store(self.settings).get(f"{DVC_S3_PREFIX}/{self._object_rel(md5)}")
            except ObjectNotFoundError:
                return None
        remote = Path(self.remote_url) / self._object_rel(md5)
        return remote.read_bytes() if remote.is_file() else None

    def referenced_hashes(self, dvc_files: Iterable[Path | str]) -> set[str]:
        """Every object hash the given ``.dvc`` files reference: each folder's ``.dir`` listing and
        the files it lists (read from the local cache, else the remote)."""
        import json

        import yaml

        hashes: set[str] = set()
        for dvc_file in dvc_files:
            spec = yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8")) or {}
            for out in spec.get("outs", []):
                md5 = out.get("md5")
                if not md5:
                    continue
                hashes.add(md5)
                if md5.endswith(".dir"):
                    listing = self._read_object(md5)
                    if listing is None:
                        raise DvcError(f"{Path(dvc_file).name}: its folder listing {md5} is in neither the DVC "
                                       f"cache nor the remote {self.describe_remote()}; cannot tell which objects "
                                       "it references. Pull the version (radground datasets pull) and retry.")
                    hashes |= {entry["md5"] for entry in json.loads(listing)}
        return hashes

    def delete_objects(self, hashes: Iterable[str]) -> dict[str, int]:
        """Delete these objects from the local cache and the remote (and nothing else: a shared remote
        may hold other data_dirs' objects, so never a blanket ``dvc gc``). Returns counts."""
        counts = {"dvc_cache_objects_deleted": 0, "dvc_remote_objects_deleted": 0}
        store = None
        if self.settings.storage.backend == "s3":
            from radground.store import open_store

            store = open_store(self.settings)
        for md5 in sorted(set(hashes)):
            rel = self._object_rel(md5)
            local = self.root / ".dvc" / "cache" / rel
            if local.is_file():
                local.unlink()
                counts["dvc_cache_objects_deleted"] += 1
            if store is not None:
                key = f"{DVC_S3_PREFIX}/{rel}"
                if store.exists(key):
                    store.delete(key)
                    counts["dvc_remote_objects_deleted"] += 1
            else:
                remote = Path(self.remote_url) / rel
                if remote.is_file():
                    remote.unlink()
                    counts["dvc_remote_objects_deleted"] += 1
        return counts


class _NoStatus:
    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


def _no_status(*args: Any, **kwargs: Any) -> contextlib.nullcontext[_NoStatus]:
    return contextlib.nullcontext(_NoStatus())


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]

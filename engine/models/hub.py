"""The model hub: where a model a workflow names is found, and how a known one is fetched.

Model folders follow ComfyUI (``checkpoints``, ``loras``, ``vae``, ``text_encoders`` alias ``clip``,
``diffusion_models`` alias ``unet``, ...). A hub searches, for each folder:

1. the ``is_default`` entries of ComfyUI ``extra_model_paths.yaml`` files, if any were loaded;
2. every models root, in order (``<root>/<subdir>`` for each subdirectory of the folder);
3. the other ``extra_model_paths.yaml`` entries.

A name found nowhere that is a known model (``engine.models.known_models``) is fetched with
``huggingface_hub`` into the Hugging Face cache and linked (symlink, else copy) into the first root,
so the next lookup finds it on disk. Offline (the ``offline`` flag or ``HF_HUB_OFFLINE=1``) only the
local Hugging Face cache is consulted. ``huggingface_hub`` is imported only when a fetch is needed:
importing this module, listing folders and resolving local files stay light and torch-free (the
gateway lists models through a hub).

Names come from prompts, so they are untrusted: ``..``, absolute paths and drive letters are refused
(``engine.paths.safe_relative``, the check ``join_inside`` makes) before any path is built. Symlinks
*inside* model folders are placed by whoever runs Kiln and are followed, as ComfyUI does; the hub's
own links into the Hugging Face cache are such symlinks.
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from engine.errors import ConfigError, ModelError, UnsafePathError
from engine.inventory import MODEL_EXTENSIONS, FolderInventory, Inventory, list_files
from engine.models.known_models import (
    FOLDER_ALIASES,
    MODEL_FOLDERS,
    KnownModel,
    KnownModels,
    canonical_folder,
    download_subdir,
    folder_subdirs,
)
from engine.models.safetensors_file import ContentHasher, check_model_path
from engine.paths import join_inside, safe_relative

if TYPE_CHECKING:
    from engine.settings import EngineSettings

__all__ = [
    "FOLDER_ALIASES",
    "MODEL_FOLDERS",
    "ExtraModelPaths",
    "KnownModel",
    "KnownModels",
    "ModelHub",
    "canonical_folder",
    "hf_offline_from_env",
    "load_extra_model_paths",
]

log = logging.getLogger(__name__)

_TRUE = {"1", "ON", "YES", "TRUE"}
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODELS_KIND = "models:"


def hf_offline_from_env() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for offline mode (read now, not when huggingface_hub was imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


def default_hf_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub computes it, from the environment read now."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    cache_home = (
        Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    )
    return cache_home / "huggingface" / "hub"


# --- ComfyUI's extra_model_paths.yaml ---------------------------------------------------------------


@dataclass(frozen=True)
class ExtraModelPaths:
    """Folder paths from ComfyUI ``extra_model_paths.yaml`` files, by canonical folder name.

    ``first`` holds the ``is_default: true`` groups (searched before the roots; fetched models land
    in the first of them), ``last`` the others (searched after the roots).
    """

    first: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    last: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)

    def before_roots(self, folder: str) -> tuple[Path, ...]:
        return self.first.get(canonical_folder(folder), ())

    def after_roots(self, folder: str) -> tuple[Path, ...]:
        return self.last.get(canonical_folder(folder), ())


def load_extra_model_paths(*files: str | Path) -> ExtraModelPaths:
    """Read ComfyUI ``extra_model_paths.yaml`` files, with ComfyUI's rules.

    Each top-level group holds an optional ``base_path`` (``~`` and ``$VARS`` expanded; relative to the
    YAML file's folder when relative), an optional ``is_default`` and ``folder: path`` entries, where a
    value may hold several paths, one per line (a YAML ``|`` block), or be a list. A path is joined to
    ``base_path``; without one, a relative path is relative to the YAML file's folder. Folder aliases
    (``unet``, ``clip``) map to ComfyUI's names. Like ComfyUI, each ``is_default`` path is put first.
    Raises ConfigError for an unreadable or malformed file.
    """
    first: dict[str, list[Path]] = {}
    last: dict[str, list[Path]] = {}
    for file in files:
        path = Path(file)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"Cannot read {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected groups of model folders at the top level")
        yaml_dir = path.resolve().parent
        for group, conf in data.items():
            if conf is None:
                continue
            if not isinstance(conf, dict):
                raise ConfigError(f"{path}: group {group!r} must map folder names to paths")
            _read_group(path, yaml_dir, str(group), dict(conf), first, last)
    return ExtraModelPaths(
        first={k: tuple(v) for k, v in first.items()}, last={k: tuple(v) for k, v in last.items()}
    )


def _expand(text: str) -> str:
    return os.path.expandvars(os.path.expanduser(text))


def _read_group(
    path: Path,
    yaml_dir: Path,
    group: str,
    conf: dict[Any, Any],
    first: dict[str, list[Path]],
    last: dict[str, list[Path]],
) -> None:
    base: Path | None = None
    if conf.get("base_path") is not None:
        base = Path(_expand(str(conf.pop("base_path"))))
        if not base.is_absolute():
            base = yaml_dir / base
    conf.pop("base_path", None)
    is_default = bool(conf.pop("is_default", False))
    for folder, value in conf.items():
        if value is None:
            continue
        if isinstance(value, str):
            lines = value.split("\n")
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            lines = value
        else:
            raise ConfigError(f"{path}: {group}.{folder} must be a path, lines of paths, or a list of paths")
        try:
            name = canonical_folder(str(folder))
        except ModelError as exc:
            raise ConfigError(f"{path}: {group}: {exc}") from None
        for line in lines:
            entry = line.strip()
            if not entry:
                continue
            entry_path = Path(_expand(entry))
            full = base / entry_path if base is not None else entry_path
            if not full.is_absolute():
                full = yaml_dir / full
            if is_default:
                first.setdefault(name, []).insert(0, full)
            else:
                last.setdefault(name, []).append(full)


# --- the hub ---------------------------------------------------------------------------------------


class ModelHub:
    """Model files by ComfyUI folder: local roots first, then known models from the Hugging Face Hub.

    Also an ``engine.inventory.Inventory``: ``"models:<folder>"`` lists a folder (local files plus
    known models), any other kind (``"input_images"``) goes to the wrapped ``inputs`` inventory.
    """

    def __init__(
        self,
        roots: Sequence[Path],
        known: KnownModels,
        offline: bool,
        cache_dir: Path | None = None,
        token: str | None = None,
        *,
        extra_paths: ExtraModelPaths | None = None,
        inputs: Inventory | None = None,
        hasher: ContentHasher | None = None,
    ) -> None:
        self.roots = [Path(r) for r in roots]
        self.known = known
        self.offline = offline
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.token = token
        self.extra_paths = extra_paths or ExtraModelPaths()
        self.inputs = inputs
        self.hasher = hasher or ContentHasher()

    @classmethod
    def from_settings(
        cls,
        settings: EngineSettings,
        *,
        known: KnownModels | None = None,
        extra_paths: ExtraModelPaths | None = None,
        inputs: Inventory | None = None,
        token: str | None = None,
    ) -> ModelHub:
        """A hub over ``settings.models_dirs`` honouring ``settings.offline``; defaults for the rest."""
        if inputs is None:
            inputs = FolderInventory(settings.input_dir)
        return cls(
            list(settings.models_dirs),
            known if known is not None else KnownModels.defaults(),
            settings.offline,
            token=token,
            extra_paths=extra_paths,
            inputs=inputs,
        )

    # -- where things are ------------------------------------------------------------------------

    @property
    def is_offline(self) -> bool:
        """True when downloads are disabled: the ``offline`` flag, or ``HF_HUB_OFFLINE`` set now."""
        return self.offline or hf_offline_from_env()

    def hf_cache_dir(self) -> Path:
        """The Hugging Face cache this hub reads and fills."""
        return self.cache_dir if self.cache_dir is not None else default_hf_cache_dir()

    def search_dirs(self, folder: str) -> builtins.list[Path]:
        """The directories searched for ``folder``, in order (they need not exist)."""
        dirs = [
            *self.extra_paths.before_roots(folder),
            *(root / sub for root in self.roots for sub in folder_subdirs(folder)),
            *self.extra_paths.after_roots(folder),
        ]
        return list(dict.fromkeys(dirs))

    def download_dir(self, folder: str) -> Path | None:
        """Where a fetched model of ``folder`` is linked: the first default extra path, else the first
        root's folder; None when there is neither (the model is then used from the cache)."""
        first = self.extra_paths.before_roots(folder)
        if first:
            return first[0]
        if self.roots:
            return self.roots[0] / download_subdir(folder)
        return None

    # -- listing -----------------------------------------------------------------------------------

    def list(self, folder: str) -> builtins.list[str]:
        """Safetensors files of ``folder`` in every search directory (recursive, slash-separated) plus
        the known models of that folder, sorted. Offline, a known model is listed only if it is on
        disk or in the local Hugging Face cache, since nothing else could be loaded."""
        names: set[str] = set()
        for directory in self.search_dirs(folder):
            names.update(list_files(directory, MODEL_EXTENSIONS))
        offline = self.is_offline
        for name in self.known.names(folder):
            if name in names:
                continue
            model = self.known.get(folder, name)
            if model is not None and (not offline or self._in_hf_cache(model)):
                names.add(name)
        return sorted(names)

    def list_choices(self, kind: str) -> Sequence[str]:
        """``engine.inventory.Inventory``: ``"models:<folder>"`` here, other kinds from ``inputs``."""
        if kind.startswith(_MODELS_KIND):
            try:
                return self.list(kind[len(_MODELS_KIND) :])
            except ModelError:
                return []
        return self.inputs.list_choices(kind) if self.inputs is not None else []

    # -- resolving ---------------------------------------------------------------------------------

    def find_local(self, folder: str, name: str) -> Path | None:
        """The file ``name`` of ``folder`` on disk (first search directory wins), or None.

        Raises UnsafePathError for a name that would leave its folder, ModelError for a name Kiln would
        never load (pickled formats, non-safetensors files).
        """
        relative = self._checked_name(name)
        for directory in self.search_dirs(folder):
            candidate = directory / relative
            if candidate.is_file():
                return candidate
        return None

    def resolve(self, folder: str, name: str) -> Path:
        """The path of model ``name`` in ``folder``: on disk, else a known model fetched into the
        Hugging Face cache (or, offline, found there) and linked into the first root.

        Raises UnsafePathError for a traversal attempt and ModelError when the file is pickled, cannot be
        found, cannot be fetched (offline, gated, missing on the Hub, network), or fails its checksum.
        """
        canonical = canonical_folder(folder)
        local = self.find_local(canonical, name)
        if local is not None:
            return local
        relative = safe_relative(name)
        model = self.known.get(canonical, relative)
        if model is None:
            raise ModelError(self._not_found_message(canonical, relative))
        cached = self._fetch(model)
        self._check_sha256(model, cached)
        return self._place(cached, canonical, relative)

    def content_hash(self, folder: str, name: str) -> str:
        """sha256 of a model file (resolving it first), remembered by this hub's hasher."""
        return self.hasher.content_hash(self.resolve(folder, name))

    # -- internals ---------------------------------------------------------------------------------

    @staticmethod
    def _checked_name(name: str) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ModelError(f"Invalid model name {name!r}")
        relative = safe_relative(name)
        if not relative:
            raise UnsafePathError(f"File name {name!r} names no file")
        check_model_path(Path(relative))
        return relative

    def _not_found_message(self, folder: str, name: str) -> str:
        looked = ", ".join(str(d) for d in self.search_dirs(folder)) or "(no model folders configured)"
        known = self.known.names(folder)
        known_text = (
            f"Known models for {folder}: {', '.join(known)}." if known else f"No known models for {folder}."
        )
        return (
            f"Model {name!r} not found in folder {folder!r}. Looked in: {looked}. "
            f"It is not a known model that Kiln could fetch. {known_text}"
        )

    def _in_hf_cache(self, model: KnownModel) -> bool:
        """Whether the Hugging Face cache holds ``model`` (its layout read directly, no import)."""
        repo_dir = self.hf_cache_dir() / f"models--{model.repo_id.replace('/', '--')}"
        revision = model.revision or "main"
        commit: str | None = revision if _COMMIT.fullmatch(revision) else None
        if commit is None:
            try:
                commit = (repo_dir / "refs" / revision).read_text().strip()
            except (OSError, UnicodeDecodeError):
                return False
        return bool(commit) and (repo_dir / "snapshots" / commit / model.filename).is_file()

    def _fetch(self, model: KnownModel) -> Path:
        """The model's file in the Hugging Face cache, downloaded unless offline."""
        offline = self.is_offline
        cache_dir = self.hf_cache_dir()
        try:
            from huggingface_hub import errors as hf_errors
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise ModelError(
                f"{model.name} is a known model ({model.repo_id}) but huggingface_hub is not installed, "
                "so Kiln cannot fetch it; install huggingface_hub or put the file in "
                f"{self.download_dir(model.folder)}"
            ) from None
        if not offline:
            print(
                f"Kiln: fetching {model.folder}/{model.name} from {model.url} into {cache_dir}",
                file=sys.stderr,
                flush=True,
            )
        try:
            path = hf_hub_download(
                model.repo_id,
                model.filename,
                revision=model.revision,
                cache_dir=cache_dir,
                token=self.token,
                local_files_only=offline,
            )
        except hf_errors.LocalEntryNotFoundError:
            if offline:
                raise ModelError(self._offline_message(model, cache_dir)) from None
            raise ModelError(
                f"Could not download {model.name} from {model.url}: the Hugging Face Hub could not be "
                f"reached and the file is not in the local cache at {cache_dir}. Check the network (or "
                f"HF_ENDPOINT), or put the file in {self.download_dir(model.folder)}."
            ) from None
        except hf_errors.GatedRepoError:
            raise ModelError(self._auth_message(model, gated=True)) from None
        except hf_errors.RepositoryNotFoundError:
            raise ModelError(
                f"Could not download {model.name}: the repo {model.repo_id} was not found on the Hugging "
                f"Face Hub, or it is private or gated and needs a token. {self._token_hint(model)}"
            ) from None
        except hf_errors.RevisionNotFoundError:
            raise ModelError(
                f"Could not download {model.name}: revision {model.revision!r} does not exist in "
                f"{model.repo_id}"
            ) from None
        except hf_errors.EntryNotFoundError:
            raise ModelError(
                f"Could not download {model.name}: {model.repo_id} has no file {model.filename!r} "
                f"(revision {model.revision or 'main'}); the known-model entry is out of date"
            ) from None
        except hf_errors.HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise ModelError(self._auth_message(model, gated=model.gated)) from None
            raise ModelError(f"Could not download {model.name} from {model.url}: {exc}") from exc
        except OSError as exc:
            raise ModelError(f"Could not download {model.name} from {model.url}: {exc}") from exc
        return Path(path)

    def _offline_message(self, model: KnownModel, cache_dir: Path) -> str:
        why = "the offline setting" if self.offline else "HF_HUB_OFFLINE"
        return (
            f"Model {model.folder}/{model.name} is not on disk and downloads are disabled ({why}). It is "
            f"a known model ({model.url}) but is not in the local Hugging Face cache at {cache_dir}. Put "
            f"the file in {self.download_dir(model.folder)}, or run once with downloads enabled."
        )

    def _token_hint(self, model: KnownModel) -> str:
        if self.token or os.environ.get("HF_TOKEN"):
            return (
                f"The token in use has no access to it: accept the licence at {model.repo_url} "
                "with that account."
            )
        return (
            f"Accept the licence at {model.repo_url} while logged in, create a read token at "
            "https://huggingface.co/settings/tokens and set HF_TOKEN to it."
        )

    def _auth_message(self, model: KnownModel, *, gated: bool) -> str:
        kind = "the gated repo" if gated else "the repo"
        return (
            f"Could not download {model.name}: {kind} {model.repo_id} requires authentication. "
            f"{self._token_hint(model)}"
        )

    def _check_sha256(self, model: KnownModel, cached: Path) -> None:
        """Compare the fetched file with the known sha256: free when the cache names the blob by its
        sha256 (Git LFS files), else by hashing the file (remembered for fingerprints)."""
        if model.sha256 is None:
            return
        real = cached.resolve()
        if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
            actual = real.name
        else:
            actual = self.hasher.content_hash(real)
        if actual != model.sha256:
            raise ModelError(
                f"{model.name} from {model.url} has sha256 {actual}, not the expected {model.sha256}: "
                "the file on the Hub changed or the cache is corrupt. Pin a revision and sha256 in your "
                "known-models file, or put the file you trust in the models folder."
            )

    def _place(self, cached: Path, folder: str, relative: str) -> Path:
        """Link (or copy) the cached file into the download folder and return the linked path; when that
        is impossible (no root, read-only disk) the cached path itself is returned."""
        target_dir = self.download_dir(folder)
        if target_dir is None:
            return cached
        parent_rel, _, filename = relative.rpartition("/")
        tmp: Path | None = None
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            parent = join_inside(target_dir, parent_rel) if parent_rel else target_dir
            parent.mkdir(parents=True, exist_ok=True)
            dest = parent / filename
            tmp = parent / f".{filename}.{uuid.uuid4().hex}.tmp"
            try:
                os.symlink(cached.absolute(), tmp)
            except (OSError, NotImplementedError):
                shutil.copyfile(cached, tmp)
            os.replace(tmp, dest)
            tmp = None
            return dest
        except (OSError, UnsafePathError) as exc:
            log.warning("Could not link %s into %s (%s); using it from the cache", cached, target_dir, exc)
            return cached
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

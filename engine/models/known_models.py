"""Known models: a file name in a ComfyUI model folder -> the Hugging Face repo and file it comes from.

When a workflow names a known model that is not on disk, the model hub fetches it. The defaults ship
in ``engine/data/known_models.yaml``; a deployment adds or overrides entries from code
(``KnownModels.register``) or from its own YAML/TOML file (``KnownModels.from_file``), same format::

    known_models:
      checkpoints:                              # ComfyUI folder (aliases: unet, clip)
        my_model.safetensors:                   # the name workflows use
          repo: owner/name                      # Hugging Face repo id
          file: weights/model.safetensors       # path in the repo (default: the name)
          revision: main                        # branch, tag or commit (default: main)
          sha256: <64 hex digits>               # checked after download, when given
          gated: true                           # the repo needs an accepted licence and HF_TOKEN
        v1-5-pruned-emaonly.safetensors: null   # null removes an entry of the defaults

This module also holds ComfyUI's model folder names and their aliases. Nothing here touches the
network or imports huggingface_hub.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from engine.errors import ConfigError, ModelError, UnsafePathError
from engine.paths import safe_relative

# ComfyUI's model folders (folder_paths.py) and the subdirectories each one searches, in order.
MODEL_FOLDERS: Mapping[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "loras": ("loras",),
    "vae": ("vae",),
    "text_encoders": ("text_encoders", "clip"),
    "diffusion_models": ("unet", "diffusion_models"),
    "clip_vision": ("clip_vision",),
    "style_models": ("style_models",),
    "embeddings": ("embeddings",),
    "vae_approx": ("vae_approx",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "gligen": ("gligen",),
    "upscale_models": ("upscale_models",),
    "latent_upscale_models": ("latent_upscale_models",),
    "hypernetworks": ("hypernetworks",),
    "photomaker": ("photomaker",),
    "classifiers": ("classifiers",),
    "model_patches": ("model_patches",),
    "audio_encoders": ("audio_encoders",),
}
# ComfyUI's legacy names (folder_paths.map_legacy): the same folder under its old name.
FOLDER_ALIASES: Mapping[str, str] = {"unet": "diffusion_models", "clip": "text_encoders"}
# Where a download lands inside a root, when that is not the folder's first subdirectory.
DOWNLOAD_SUBDIR: Mapping[str, str] = {"diffusion_models": "diffusion_models"}

_FOLDER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODEL_SUFFIXES = (".safetensors", ".sft")
_FIELD_NAMES = {
    "repo": "repo_id",
    "repo_id": "repo_id",
    "file": "filename",
    "filename": "filename",
    "revision": "revision",
    "sha256": "sha256",
    "gated": "gated",
    "description": "description",
}


def canonical_folder(folder: str) -> str:
    """ComfyUI's name for a model folder (``unet`` -> ``diffusion_models``, ``clip`` -> ``text_encoders``).

    Folders outside ComfyUI's list are allowed (custom nodes add their own) if the name is one plain
    path segment; anything else raises ModelError.
    """
    name = FOLDER_ALIASES.get(folder, folder)
    if not _FOLDER_NAME.fullmatch(name) or name.strip(".") == "":
        raise ModelError(f"{folder!r} is not a model folder name")
    return name


def folder_subdirs(folder: str) -> tuple[str, ...]:
    """The subdirectories of a models root that hold ``folder``, in search order."""
    name = canonical_folder(folder)
    return MODEL_FOLDERS.get(name, (name,))


def download_subdir(folder: str) -> str:
    """The subdirectory of a models root where a fetched model of ``folder`` is placed."""
    name = canonical_folder(folder)
    return DOWNLOAD_SUBDIR.get(name, folder_subdirs(name)[0])


@dataclass(frozen=True)
class KnownModel:
    """A model Kiln can fetch: listed as ``name`` in ``folder``, stored as ``filename`` in ``repo_id``."""

    name: str
    folder: str
    repo_id: str
    filename: str
    revision: str | None = None
    sha256: str | None = None
    gated: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", canonical_folder(self.folder))
        try:
            object.__setattr__(self, "name", safe_relative(self.name))
            object.__setattr__(self, "filename", safe_relative(self.filename))
        except UnsafePathError as exc:
            raise ModelError(f"Known model {self.name!r}: {exc}") from None
        if not self.name or not self.name.lower().endswith(_MODEL_SUFFIXES):
            raise ModelError(f"Known model {self.name!r}: the name must end with .safetensors or .sft")
        if not self.filename.lower().endswith(_MODEL_SUFFIXES):
            raise ModelError(
                f"Known model {self.name!r}: {self.filename!r} is not a .safetensors file "
                "(Kiln never fetches pickled checkpoints)"
            )
        if not _REPO_ID.fullmatch(self.repo_id):
            raise ModelError(f"Known model {self.name!r}: {self.repo_id!r} is not a repo id ('owner/name')")
        if self.revision is not None and not self.revision.strip():
            raise ModelError(f"Known model {self.name!r}: empty revision")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            if not _SHA256.fullmatch(digest):
                raise ModelError(f"Known model {self.name!r}: sha256 must be 64 hex digits")
            object.__setattr__(self, "sha256", digest)

    @property
    def url(self) -> str:
        """The file's page on the Hub (for messages)."""
        return f"https://huggingface.co/{self.repo_id}/blob/{self.revision or 'main'}/{self.filename}"

    @property
    def repo_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


class KnownModels:
    """Known models by (folder, name). Build one, extend it, pass it to the model hub."""

    def __init__(self, models: Iterable[KnownModel] = ()) -> None:
        self._models: dict[tuple[str, str], KnownModel] = {}
        for model in models:
            self.add(model)

    @classmethod
    def defaults(cls) -> KnownModels:
        """A new registry holding the models that ship with Kiln."""
        text = _packaged_defaults().read_text(encoding="utf-8")
        registry = cls()
        registry._apply(_parse_entries(_load_yaml(text), "engine/data/known_models.yaml"))
        return registry

    @classmethod
    def from_file(cls, path: str | Path, base: KnownModels | None = None) -> KnownModels:
        """``base`` (the defaults when None) with the entries of a YAML or TOML file merged on top.

        An entry replaces the one with the same folder and name; an entry set to null removes it.
        Raises ConfigError when the file cannot be read or does not follow the format.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"Cannot read known-models file {path}: {exc}") from exc
        try:
            data = tomllib.loads(text) if path.suffix.lower() == ".toml" else _load_yaml(text)
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"Known-models file {path} is not valid: {exc}") from exc
        registry = (base if base is not None else cls.defaults()).copy()
        registry._apply(_parse_entries(data, str(path)))
        return registry

    def copy(self) -> KnownModels:
        return type(self)(self._models.values())

    def add(self, model: KnownModel) -> None:
        """Add ``model``, replacing a known model with the same folder and name."""
        self._models[(model.folder, model.name)] = model

    def register(
        self,
        name: str,
        *,
        folder: str,
        repo_id: str,
        filename: str | None = None,
        revision: str | None = None,
        sha256: str | None = None,
        gated: bool = False,
        description: str = "",
    ) -> KnownModel:
        """Add a known model (``filename`` defaults to ``name``) and return it."""
        model = KnownModel(
            name=name,
            folder=folder,
            repo_id=repo_id,
            filename=filename or name,
            revision=revision,
            sha256=sha256,
            gated=gated,
            description=description,
        )
        self.add(model)
        return model

    def remove(self, folder: str, name: str) -> None:
        """Forget the known model ``name`` of ``folder`` (no error if there is none)."""
        try:
            key = (canonical_folder(folder), safe_relative(name))
        except UnsafePathError:
            return
        self._models.pop(key, None)

    def get(self, folder: str, name: str) -> KnownModel | None:
        try:
            key = (canonical_folder(folder), safe_relative(name))
        except (ModelError, UnsafePathError):
            return None
        return self._models.get(key)

    def names(self, folder: str) -> list[str]:
        """The known names in ``folder``, sorted."""
        canon = canonical_folder(folder)
        return sorted(name for (f, name) in self._models if f == canon)

    def folders(self) -> list[str]:
        return sorted({f for f, _ in self._models})

    def __iter__(self) -> Iterator[KnownModel]:
        return iter(sorted(self._models.values(), key=lambda m: (m.folder, m.name)))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, key: object) -> bool:
        return key in self._models

    def _apply(self, entries: list[tuple[str, str, KnownModel | None]]) -> None:
        for folder, name, model in entries:
            if model is None:
                self.remove(folder, name)
            else:
                self.add(model)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _packaged_defaults() -> Traversable:
    """``engine/data/known_models.yaml``. ``engine`` is a namespace package, which ``files()`` rejects
    under an editable install: then the file next to this module's package is used."""
    try:
        return resources.files("engine") / "data" / "known_models.yaml"
    except (NotADirectoryError, TypeError):
        return Path(__file__).resolve().parent.parent / "data" / "known_models.yaml"


def _parse_entries(data: Any, source: str) -> list[tuple[str, str, KnownModel | None]]:
    """``(folder, name, model or None for a removal)`` for each entry of a known-models document."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'known_models' section")
    section = data.get("known_models", data.get("models"))
    if section is None:
        raise ConfigError(f"{source}: no 'known_models' section")
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: 'known_models' must map folders to models")
    entries: list[tuple[str, str, KnownModel | None]] = []
    for folder, models in section.items():
        if models is None:
            continue
        if not isinstance(folder, str) or not isinstance(models, dict):
            raise ConfigError(f"{source}: known_models.{folder} must map file names to models")
        for name, spec in models.items():
            where = f"{source}: known_models.{folder}.{name}"
            if spec is None:
                entries.append((folder, str(name), None))
                continue
            if not isinstance(spec, dict):
                raise ConfigError(f"{where} must be a mapping (repo, file, revision, sha256, gated)")
            fields: dict[str, Any] = {}
            for key, value in spec.items():
                field = _FIELD_NAMES.get(key)
                if field is None:
                    allowed = ", ".join(sorted(set(_FIELD_NAMES)))
                    raise ConfigError(f"{where}: unknown key {key!r} (allowed: {allowed})")
                fields[field] = value
            if "repo_id" not in fields:
                raise ConfigError(f"{where}: 'repo' is required")
            fields.setdefault("filename", name)
            if not isinstance(fields.get("gated", False), bool):
                raise ConfigError(f"{where}: 'gated' must be true or false")
            for key in ("repo_id", "filename", "revision", "sha256", "description"):
                if fields.get(key) is not None and not isinstance(fields[key], str):
                    raise ConfigError(f"{where}: {key!r} must be a string")
            try:
                entries.append((folder, str(name), KnownModel(name=str(name), folder=folder, **fields)))
            except ModelError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return entries

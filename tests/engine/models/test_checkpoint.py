"""Single-file checkpoints: detection, config inference, v-prediction, schedules, refusals, and the
test checkpoints' layout against the real files'."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.errors import ModelError
from engine.models.checkpoint import (
    DDPM_BUFFERS,
    EMA_COUNTERS,
    Architecture,
    inspect_checkpoint,
    inspect_text_encoder_file,
    inspect_unet_file,
    inspect_vae_file,
    split_state_dict,
)
from engine.models.clip_text import CLIPTextConfig
from engine.models.safetensors_file import read_header
from engine.models.test_checkpoint import (
    SD15_TENSORS,
    build_test_checkpoint,
    checkpoint_spec,
    ddpm_buffers,
    meta_layout,
    write_test_checkpoint,
)
from engine.sampling.model_sampling import ModelSampling, Parameterization

# The real v1-5-pruned-emaonly.safetensors: 1145 tensors = 686 UNet (model.diffusion_model.,
# 859,520,964 parameters) + 248 VAE (first_stage_model., 83,653,863) + 197 text encoder
# (cond_stage_model.transformer.text_model.: CLIP-L's 123,060,480 parameters in 196 tensors, plus
# the int64 position_ids [1, 77]) + 12 DDPM buffers + model_ema.decay and model_ema.num_updates.
# Sources: the SD1 component key lists of arenasys/stable-diffusion-webui-model-toolkit
# (UNET-v1-SD, VAE-v1-SD, CLIP-v1-SD and its OPTIONAL list of the 12 buffers and 2 EMA counters),
# ComfyUI's "left over keys" for SD1 checkpoints (the same 14), tests/engine/models/test_unet.py
# and test_vae.py (UNet and VAE key sets and parameter counts).
SD15_PARTS = {
    "model.diffusion_model.": (686, 859_520_964),
    "first_stage_model.": (248, 83_653_863),
    "cond_stage_model.transformer.text_model.": (197, 123_060_480 + 77),
}
SD15_TEXT_SAMPLE_SHAPES = {
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.bias": (768,),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
# v2-1_768-ema-pruned: the same UNet/VAE key sets, OpenCLIP-H's 24 resblocks (12 tensors each) plus
# token_embedding, positional_embedding, ln_final (2), text_projection and logit_scale.
SD21_TENSORS = 686 + 248 + (24 * 12 + 6) + 12 + 2


def _rewrite(src: Path, dst: Path, change) -> Path:
    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst))
    return dst


# ------------------------------------------------------------------------------ detection


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_detects_tiny_checkpoints_and_infers_every_config(arch, tiny_sd15, tiny_sd21):
    path = tiny_sd15 if arch == "sd15" else tiny_sd21
    spec = checkpoint_spec(arch, "tiny")
    info = inspect_checkpoint(path)
    assert info.architecture is (Architecture.SD1 if arch == "sd15" else Architecture.SD2)
    assert info.unet_config == spec.unet
    assert info.vae_config == spec.vae
    assert info.clip_config == spec.clip
    assert info.clip_layout == spec.layout
    assert info.unet_config.upcast_attention is (arch == "sd21")  # SD2 attention runs in float32
    assert info.weights_dtype == "F16"
    assert set(info.ignored) == set(DDPM_BUFFERS) | set(EMA_COUNTERS)
    # test checkpoints default to the common variants: SD1.5 eps, SD2.1 768-v
    expected = Parameterization.EPS if arch == "sd15" else Parameterization.V_PREDICTION
    assert info.parameterization is expected


def test_full_size_configs_are_inferred_from_the_header_alone(tmp_path):
    """Real layouts, no data: a header-only file with full SD1.5 / SD2.1 shapes is recognised."""
    for arch in ("sd15", "sd21"):
        spec = checkpoint_spec(arch, "full")
        info = _inspect_layout(tmp_path / f"{arch}.safetensors", meta_layout(arch, "full"))
        assert info.unet_config == dataclasses.replace(spec.unet, upcast_attention=arch == "sd21")
        assert info.clip_config == spec.clip
        assert info.vae_config == spec.vae


def _inspect_layout(path: Path, shapes: dict[str, tuple[int, ...]]):
    """inspect_checkpoint on a file with the given shapes, written as a sparse safetensors file
    (the header is real, the data region is a hole of zeros)."""
    import json

    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        dtype, size = ("I64", 8) if name.endswith("position_ids") else ("F16", 2)
        if name == "model_ema.num_updates":
            dtype, size = "I32", 4
        if name in DDPM_BUFFERS or name == "model_ema.decay":
            dtype, size = "F32", 4
        nbytes = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    # a hole reads as zeros, which is no schedule: write the real DDPM buffers
    real = ddpm_buffers()
    data_start = 8 + len(raw)
    with open(path, "r+b") as f:
        for name, tensor in real.items():
            f.seek(data_start + header[name]["data_offsets"][0])
            f.write(tensor.numpy().tobytes())
    return inspect_checkpoint(path)


def test_split_state_dict_by_part(tiny_sd15):
    sd = load_file(str(tiny_sd15))
    parts = split_state_dict(sd)
    assert "input_blocks.0.0.weight" in parts["unet"]
    assert "encoder.conv_in.weight" in parts["vae"]
    assert all(k.startswith("cond_stage_model.") for k in parts["clip"])
    assert set(parts["buffers"]) == set(DDPM_BUFFERS)
    assert set(parts["ignored"]) == set(EMA_COUNTERS)
    assert sum(len(p) for p in parts.values()) == len(sd)


def test_ema_keys_are_ignored(tiny_sd15, tmp_path):
    def add_ema(tensors):
        # full (non-emaonly) files keep an EMA copy with the dots removed from the names
        for key in list(tensors):
            if key.startswith("model.diffusion_model.input_blocks.1"):
                ema = "model_ema.diffusion_model" + key[len("model.diffusion_model.") :].replace(".", "")
                tensors[ema] = torch.full((3,), 7.0)  # wrong shapes: must never be read as weights

    path = _rewrite(tiny_sd15, tmp_path / "ema.safetensors", add_ema)
    info = inspect_checkpoint(path)
    assert info.unet_config == checkpoint_spec("sd15", "tiny").unet
    assert any(k.startswith("model_ema.diffusion_model") for k in info.ignored)


def test_position_ids_int_or_float(tiny_sd15, tmp_path):
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"

    def to_float(tensors):
        tensors[key] = tensors[key].float()

    floats = _rewrite(tiny_sd15, tmp_path / "f.safetensors", to_float)
    assert read_header(floats).tensors[key].dtype == "F32"
    assert read_header(tiny_sd15).tensors[key].dtype == "I64"
    assert inspect_checkpoint(floats).clip_config == inspect_checkpoint(tiny_sd15).clip_config


@pytest.mark.parametrize("dtype,name", [(torch.float32, "F32"), (torch.bfloat16, "BF16")])
def test_weight_dtypes(dtype, name, tiny_sd15, tmp_path):
    def convert(tensors):
        for key, value in tensors.items():
            if value.is_floating_point() and key not in DDPM_BUFFERS:
                tensors[key] = value.to(dtype)

    path = _rewrite(tiny_sd15, tmp_path / "w.safetensors", convert)
    info = inspect_checkpoint(path)
    assert info.weights_dtype == name
    assert info.unet_config == checkpoint_spec("sd15", "tiny").unet
    assert torch.equal(info.model_sampling.sigmas, ModelSampling.from_beta_schedule().sigmas)


# ------------------------------------------------------------------------------ v-prediction


def test_sd2_v_prediction_follows_comfyui_norm_bias_rule(tiny_sd21, tmp_path):
    assert inspect_checkpoint(tiny_sd21).parameterization is Parameterization.V_PREDICTION
    key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.norm1.bias"

    def with_std(std):
        def change(tensors):
            n = tensors[key].numel()
            values = torch.tensor([std, -std] * (n // 2), dtype=torch.float64)
            tensors[key] = values.to(tensors[key].dtype)  # population std == std

        return _rewrite(tiny_sd21, tmp_path / f"{std}.safetensors", change)

    assert inspect_checkpoint(with_std(0.095)).parameterization is Parameterization.V_PREDICTION
    assert inspect_checkpoint(with_std(0.085)).parameterization is Parameterization.EPS


def test_sd1_is_eps_unless_marked_v_pred(tiny_sd15, tmp_path):
    marked = write_test_checkpoint(tmp_path / "v.safetensors", "sd15", "tiny", prediction="v")
    assert "v_pred" in read_header(marked).tensors
    assert inspect_checkpoint(marked).parameterization is Parameterization.V_PREDICTION

    def big_bias(tensors):  # the SD2 rule does not apply to SD1
        key = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.norm1.bias"
        tensors[key] = torch.randn(tensors[key].shape).half()

    path = _rewrite(tiny_sd15, tmp_path / "b.safetensors", big_bias)
    assert inspect_checkpoint(path).parameterization is Parameterization.EPS


# ------------------------------------------------------------------------------ sigma table


def test_sd_buffers_give_comfyuis_float64_schedule(tiny_sd15, tmp_path):
    standard = ModelSampling.from_beta_schedule()
    assert torch.equal(inspect_checkpoint(tiny_sd15).model_sampling.sigmas, standard.sigmas)

    def to_half(tensors):
        for name in DDPM_BUFFERS:
            tensors[name] = tensors[name].half()

    half = _rewrite(tiny_sd15, tmp_path / "half.safetensors", to_half)
    assert torch.equal(inspect_checkpoint(half).model_sampling.sigmas, standard.sigmas)

    def drop(tensors):
        for name in DDPM_BUFFERS:
            del tensors[name]

    none = _rewrite(tiny_sd15, tmp_path / "none.safetensors", drop)
    assert torch.equal(inspect_checkpoint(none).model_sampling.log_sigmas, standard.log_sigmas)


def test_other_schedules_in_the_file_are_used(tiny_sd15, tmp_path):
    from engine.sampling.model_sampling import make_beta_schedule

    acp = torch.cumprod(1 - make_beta_schedule("linear", 1000, 0.0001, 0.02), 0)

    def other(tensors):
        tensors["alphas_cumprod"] = acp.float()

    info = inspect_checkpoint(_rewrite(tiny_sd15, tmp_path / "o.safetensors", other))
    expected = ModelSampling.from_alphas_cumprod(acp.float())
    assert torch.equal(info.model_sampling.sigmas, expected.sigmas)

    def only_betas(tensors):
        del tensors["alphas_cumprod"]
        tensors["betas"] = make_beta_schedule("cosine", 1000).float()

    info = inspect_checkpoint(_rewrite(tiny_sd15, tmp_path / "c.safetensors", only_betas))
    assert info.model_sampling.num_timesteps == 1000
    assert not torch.equal(info.model_sampling.sigmas, ModelSampling.from_beta_schedule().sigmas)

    def broken(tensors):
        tensors["alphas_cumprod"] = torch.full((1000,), 2.0)

    with pytest.raises(ModelError, match="alphas_cumprod"):
        inspect_checkpoint(_rewrite(tiny_sd15, tmp_path / "x.safetensors", broken))


# ------------------------------------------------------------------------------ refusals


def test_pickled_files_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ModelError, match="pickled"):
        inspect_checkpoint(ckpt)
    disguised = tmp_path / "model.safetensors"
    torch.save({"state_dict": {}}, disguised)
    with pytest.raises(ModelError, match="pickled"):
        inspect_checkpoint(disguised)


def test_sdxl_is_refused_clearly(tiny_sd15, tmp_path):
    def sdxl(tensors):
        tensors["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)

    with pytest.raises(ModelError, match="SDXL is not supported yet"):
        inspect_checkpoint(_rewrite(tiny_sd15, tmp_path / "xl.safetensors", sdxl))


def test_files_without_a_unet_are_refused(tiny_sd15, tmp_path):
    def vae_only(tensors):
        for key in list(tensors):
            if not key.startswith("first_stage_model."):
                del tensors[key]

    with pytest.raises(ModelError, match=r"no model\.diffusion_model"):
        inspect_checkpoint(_rewrite(tiny_sd15, tmp_path / "v.safetensors", vae_only))


# ------------------------------------------------------------------------------ standalone files


def test_standalone_parts(tiny_sd15, tiny_sd21, tmp_path):
    sd = load_file(str(tiny_sd21))
    unet_file = tmp_path / "unet.safetensors"
    save_file(
        {k[len("model.diffusion_model.") :]: v for k, v in sd.items() if k.startswith("model.")}, unet_file
    )
    info = inspect_unet_file(unet_file)
    assert info.prefix == "" and info.architecture is Architecture.SD2
    assert info.config == checkpoint_spec("sd21", "tiny").unet
    assert info.model_sampling.parameterization is Parameterization.V_PREDICTION

    vae_file = tmp_path / "vae.safetensors"
    save_file(
        {k[len("first_stage_model.") :]: v for k, v in sd.items() if k.startswith("first_stage")}, vae_file
    )
    assert inspect_vae_file(vae_file)[1] == checkpoint_spec("sd21", "tiny").vae

    te_file = tmp_path / "te.safetensors"
    prefix = "cond_stage_model.transformer."
    save_file(
        {k[len(prefix) :]: v for k, v in load_file(str(tiny_sd15)).items() if k.startswith(prefix)}, te_file
    )
    _, found_prefix, config, layout = inspect_text_encoder_file(te_file)
    assert (found_prefix, layout) == ("", "sd1")
    assert config == CLIPTextConfig.tiny()
    # a full checkpoint works as a text encoder file too
    assert inspect_text_encoder_file(tiny_sd21)[1:] == (
        "cond_stage_model.",
        checkpoint_spec("sd21", "tiny").clip,
        "sd2",
    )
    with pytest.raises(ModelError, match="not a CLIP text encoder"):
        inspect_text_encoder_file(vae_file)


# ------------------------------------------------------------------------------ the test checkpoints


def test_test_checkpoints_are_deterministic(tiny_sd15, tmp_path):
    again = write_test_checkpoint(tmp_path / "again.safetensors", "sd15", "tiny", seed=1)
    assert again.read_bytes() == tiny_sd15.read_bytes()


@pytest.mark.parametrize("arch", ["sd15", "sd21"])
def test_written_files_have_exactly_the_layout(arch, tiny_sd15, tiny_sd21):
    path = tiny_sd15 if arch == "sd15" else tiny_sd21
    header = read_header(path)
    assert {k: info.shape for k, info in header.tensors.items()} == meta_layout(arch, "tiny")
    assert read_header(path).metadata["kiln.test_checkpoint"].startswith(f"{arch}-tiny ")


def test_full_sd15_key_set_equals_the_real_single_file():
    layout = meta_layout("sd15", "full")
    assert len(layout) == SD15_TENSORS == 1145
    for prefix, (count, params) in SD15_PARTS.items():
        keys = [k for k in layout if k.startswith(prefix)]
        assert len(keys) == count, prefix
        assert sum(math.prod(layout[k]) for k in keys) == params, prefix
    rest = {k for k in layout if not k.startswith(tuple(SD15_PARTS))}
    assert rest == set(DDPM_BUFFERS) | set(EMA_COUNTERS)
    for key, shape in SD15_TEXT_SAMPLE_SHAPES.items():
        assert layout[key] == shape, key
    assert all(layout[name] == (1000,) for name in DDPM_BUFFERS)
    assert layout["model_ema.decay"] == layout["model_ema.num_updates"] == ()


def test_full_sd15_text_keys_are_clip_l_in_the_transformers_layout():
    layout = meta_layout("sd15", "full")
    prefix = "cond_stage_model.transformer.text_model."
    per_layer = {
        f"{kind}.{p}"
        for kind in (
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
            "self_attn.k_proj",
            "self_attn.out_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        )
        for p in ("weight", "bias")
    }
    expected = {f"{prefix}encoder.layers.{i}.{name}" for i in range(12) for name in per_layer}
    expected |= {
        f"{prefix}{name}"
        for name in (
            "embeddings.position_embedding.weight",
            "embeddings.position_ids",
            "embeddings.token_embedding.weight",
            "final_layer_norm.bias",
            "final_layer_norm.weight",
        )
    }
    assert {k for k in layout if k.startswith("cond_stage_model.")} == expected


def test_full_sd21_layout():
    layout = meta_layout("sd21", "full")
    assert len(layout) == SD21_TENSORS
    assert layout["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert layout["cond_stage_model.model.text_projection"] == (1024, 1024)
    assert layout["model.diffusion_model.input_blocks.1.1.proj_in.weight"] == (320, 320)


def test_build_rejects_bad_arguments():
    with pytest.raises(ModelError):
        build_test_checkpoint("sdxl", "tiny")  # type: ignore[arg-type]
    with pytest.raises(ModelError):
        write_test_checkpoint("/tmp/x.ckpt", "sd15", "tiny")

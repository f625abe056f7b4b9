"""The KL autoencoder (SD VAE): checkpoint layout, config inference, parity with diffusers, ComfyUI's
wrapper semantics (pixel layout, cropping, batch splitting, tiling) and chunked attention."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.errors import ModelError
from engine.models.vae import (
    VAE,
    AutoencoderKL,
    VAEConfig,
    chunked_attention,
    convert_diffusers_vae_state_dict,
    count_tiles,
    load_autoencoder,
    prepare_vae_state_dict,
    random_state_dict,
    tiled_scale,
)

# Facts about the real file: v1-5-pruned-emaonly.safetensors holds 248 tensors under
# first_stage_model. (83,653,863 parameters); vae-ft-mse-840000-ema-pruned.safetensors holds the same
# names without the prefix. Count from the LDM sources (model.py Encoder/Decoder with ComfyUI's
# default ddconfig ch=128, ch_mult=[1,2,4,4], num_res_blocks=2, z=4, embed_dim=4): encoder 106,
# decoder 138, quant_conv 2, post_quant_conv 2.
SD_VAE_TENSORS = 248
SD_VAE_PARAMS = 83_653_863
SD_VAE_SAMPLE_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.bias": (128,),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.weight": (512, 256, 1, 1),
    "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "encoder.down.3.block.1.norm2.bias": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.k.bias": (512,),
    "encoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.block_2.norm2.weight": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (8, 512, 3, 3),
    "quant_conv.weight": (8, 8, 1, 1),
    "post_quant_conv.weight": (4, 4, 1, 1),
    "decoder.conv_in.weight": (512, 4, 3, 3),
    "decoder.mid.attn_1.proj_out.bias": (512,),
    "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.2.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.norm1.weight": (128,),
    "decoder.norm_out.bias": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
SD_VAE_ABSENT_KEYS = (
    "encoder.down.3.downsample.conv.weight",  # no downsample on the last level
    "decoder.up.0.upsample.conv.weight",  # no upsample on level 0
    "encoder.down.0.block.0.nin_shortcut.weight",  # 128 -> 128
    "decoder.up.2.block.0.nin_shortcut.weight",  # 512 -> 512
)

# A two-level VAE (2x downscale): cheap enough on CPU to tile latents of a useful size.
SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def meta_state_dict(config: VAEConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return AutoencoderKL(config).state_dict()


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return random_state_dict(VAEConfig.tiny(), seed=1)


@pytest.fixture(scope="module")
def tiny_vae(tiny_sd) -> VAE:
    return VAE.from_state_dict(tiny_sd)


@pytest.fixture(scope="module")
def small_vae() -> VAE:
    return VAE.from_state_dict(random_state_dict(SMALL, seed=2))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------------------
# (a) layout and config inference


def test_sd_preset_matches_the_real_checkpoint_layout():
    sd = meta_state_dict(VAEConfig.sd())
    assert len(sd) == SD_VAE_TENSORS
    assert sum(t.numel() for t in sd.values()) == SD_VAE_PARAMS
    for name, shape in SD_VAE_SAMPLE_KEYS.items():
        assert tuple(sd[name].shape) == shape, name
    for name in SD_VAE_ABSENT_KEYS:
        assert name not in sd
    assert VAEConfig.sd().downscale_ratio == 8
    assert VAEConfig.sd().scaling_factor == 0.18215


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig.sd(),
        VAEConfig.tiny(),
        SMALL,
        VAEConfig(ch=64, ch_mult=(1, 2, 4), num_res_blocks=2),  # SD x4-upscaler-like: 4x
        VAEConfig(z_channels=16, embed_dim=16, use_quant_conv=False),  # SD3/Flux-like: no quant convs
    ],
)
def test_config_inference_round_trip(config):
    assert VAEConfig.from_state_dict(meta_state_dict(config)) == config


def test_config_inference_rejects_non_vae():
    with pytest.raises(ModelError):
        VAEConfig.from_state_dict({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})


def test_sd_preset_keys_and_shapes_equal_diffusers_sd_vae_through_diffusers_conversion():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = meta_state_dict(VAEConfig.sd())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            reference = diffusers.AutoencoderKL(**diffusers_config(VAEConfig.sd())).state_dict()
        converted = convert_ldm_vae_checkpoint(
            dict(ours), {"down_block_types": [0] * 4, "up_block_types": [0] * 4}
        )
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in reference.items()
    }


# ---------------------------------------------------------------------------------------------------------
# loading


def test_load_accepts_checkpoint_standalone_and_linear_attention_layouts(tiny_sd):
    x = rand(1, 3, 32, 32) * 2 - 1
    expected = load_autoencoder(tiny_sd).encode(x)

    checkpoint = {"first_stage_model." + k: v for k, v in tiny_sd.items()}
    checkpoint["model.diffusion_model.out.0.weight"] = torch.zeros(3)  # the rest of a checkpoint
    checkpoint["cond_stage_model.transformer.x"] = torch.zeros(3)
    linear = {k: v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v for k, v in tiny_sd.items()}
    linear["model_ema.decay"] = torch.tensor(0.999)  # ignored extra
    for sd in (checkpoint, {"vae." + k: v for k, v in tiny_sd.items()}, linear):
        model = load_autoencoder(sd)
        assert set(model.state_dict()) == set(tiny_sd)
        torch.testing.assert_close(model.encode(x), expected, rtol=0, atol=0)


def test_loads_a_checkpoint_file_in_the_real_layout(tmp_path, tiny_sd):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "tiny-checkpoint.safetensors"
    save_file({"first_stage_model." + k: v.half() for k, v in tiny_sd.items()}, str(path))
    vae = VAE.from_state_dict(load_file(str(path)), dtype=torch.float32)
    assert vae.config == VAEConfig.tiny()
    assert torch.equal(vae.model.encoder.conv_in.weight, tiny_sd["encoder.conv_in.weight"].half().float())
    assert vae.decode(randn(1, 4, 2, 3)).shape == (1, 16, 24, 3)


def test_load_assigns_tensors_without_copy_or_random_init(tiny_sd):
    model = load_autoencoder(tiny_sd)
    params = dict(model.named_parameters())
    assert params["encoder.conv_in.weight"].data_ptr() == tiny_sd["encoder.conv_in.weight"].data_ptr()
    assert all(not p.requires_grad and p.device.type == "cpu" for p in params.values())
    half = load_autoencoder(tiny_sd, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.equal(half.decoder.conv_out.weight, tiny_sd["decoder.conv_out.weight"].bfloat16())


def test_load_rejects_missing_unexpected_and_misshapen_keys(tiny_sd):
    missing = {k: v for k, v in tiny_sd.items() if k != "decoder.mid.attn_1.q.weight"}
    with pytest.raises(ModelError, match="missing"):
        load_autoencoder(missing)
    video = dict(tiny_sd, **{"decoder.mid.block_1.mix_factor": torch.zeros(1)})  # SVD's video decoder
    with pytest.raises(ModelError, match="unexpected"):
        load_autoencoder(video)
    bad = dict(tiny_sd, **{"decoder.conv_out.weight": torch.zeros(3, 32, 1, 1)})
    with pytest.raises(ModelError, match="shape"):
        load_autoencoder(bad)


def test_random_state_dict_is_deterministic_and_dtype_independent():
    a = random_state_dict(VAEConfig.tiny(), seed=3)
    b = random_state_dict(VAEConfig.tiny(), seed=3, dtype=torch.float16)
    c = random_state_dict(VAEConfig.tiny(), seed=4)
    assert set(a) == set(meta_state_dict(VAEConfig.tiny()))
    assert all(torch.equal(a[k].half(), b[k]) for k in a)
    assert not torch.equal(a["encoder.conv_in.weight"], c["encoder.conv_in.weight"])
    assert torch.equal(a["decoder.norm_out.weight"], torch.ones(32))
    assert torch.equal(a["decoder.norm_out.bias"], torch.zeros(32))


# ---------------------------------------------------------------------------------------------------------
# (b) parity with diffusers


def diffusers_config(config: VAEConfig) -> dict:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    ddconfig = {
        "double_z": True,
        "z_channels": config.z_channels,
        "resolution": 256,
        "in_channels": config.in_channels,
        "out_ch": config.out_channels,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    original = {"model": {"params": {"first_stage_config": {"params": {"ddconfig": ddconfig}}}}}
    return create_vae_diffusers_config_from_ldm(original, {"encoder.conv_in.weight": None})


def test_parity_with_diffusers_autoencoder_kl(tiny_sd):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = diffusers_config(VAEConfig.tiny())
        reference = diffusers.AutoencoderKL(**config).eval()
        converted = convert_ldm_vae_checkpoint(dict(tiny_sd), config)
        reference.load_state_dict(converted, strict=True)

        ours = load_autoencoder(tiny_sd)
        x = rand(2, 3, 64, 48) * 2 - 1
        z = randn(2, 4, 8, 6, seed=1)
        with torch.no_grad():
            ref_mean = reference.encode(x).latent_dist.mean
            ref_image = reference.decode(z).sample
    assert rel_err(ours.encode(x), ref_mean) < 1e-4
    assert rel_err(ours.decode(z), ref_image) < 1e-4
    # diffusers' names come back to the LDM layout through Kiln's own conversion
    back = prepare_vae_state_dict(reference.state_dict())
    assert back.keys() == tiny_sd.keys()
    assert all(torch.equal(back[k].reshape(tiny_sd[k].shape), tiny_sd[k]) for k in tiny_sd)
    assert convert_diffusers_vae_state_dict(converted).keys() == tiny_sd.keys()


# ---------------------------------------------------------------------------------------------------------
# the wrapper's ComfyUI semantics


def test_encode_decode_layout_range_and_crop(tiny_vae):
    pixels = rand(2, 70, 67, 4)  # RGBA, sides not multiples of 8
    latent = tiny_vae.encode(pixels)
    assert latent.shape == (2, 4, 8, 8) and latent.dtype == torch.float32
    # alpha dropped; centre crop 70 -> 64 from offset 3, 67 -> 64 from offset 1
    cropped = pixels[:, 3:67, 1:65, :3].movedim(-1, 1) * 2 - 1
    torch.testing.assert_close(latent, tiny_vae.model.encode(cropped))
    images = tiny_vae.decode(latent)
    assert images.shape == (2, 64, 64, 3)
    assert images.min() >= 0 and images.max() <= 1
    raw = tiny_vae.model.decode(latent)
    torch.testing.assert_close(images, ((raw + 1) / 2).clamp(0, 1).movedim(1, -1))
    assert tiny_vae.latent_scale_factor == 0.18215 and tiny_vae.downscale_ratio == 8


def test_batch_split_by_memory_budget_gives_the_same_result(tiny_sd, tiny_vae):
    split = VAE.from_state_dict(tiny_sd, memory_budget=1)  # forces one image per chunk
    pixels = rand(3, 32, 40, 3)
    torch.testing.assert_close(split.encode(pixels), tiny_vae.encode(pixels), rtol=1e-5, atol=1e-5)
    latent = randn(3, 4, 4, 5)
    torch.testing.assert_close(split.decode(latent), tiny_vae.decode(latent), rtol=1e-5, atol=1e-5)
    assert tiny_vae.memory_used_decode((1, 4, 64, 64)) == 2178 * 512 * 512 * 4 * 32 // 128


# ---------------------------------------------------------------------------------------------------------
# (c) tiling


def test_tiled_scale_blending_is_exact_for_local_functions():
    # A function whose output pixel depends only on its own input pixel must come back unchanged
    # from any tiling: this pins tile origins, output placement, masks and normalisation.
    x = randn(2, 3, 37, 53)

    def up(t: torch.Tensor) -> torch.Tensor:  # 8x nearest, 3 -> 2 channels
        return torch.nn.functional.interpolate(t[:, :2] * 2 + t[:, 2:], scale_factor=8, mode="nearest")

    calls = []
    tiled = tiled_scale(x, up, (16, 12), 4, scale=8.0, out_channels=2, progress=calls.append)
    torch.testing.assert_close(tiled, up(x))
    assert len(calls) == count_tiles(37, 53, (16, 12), 4) == len(range(0, 33, 12)) * len(range(0, 49, 8))

    def down(t: torch.Tensor) -> torch.Tensor:  # 1/8 average pool
        return torch.nn.functional.avg_pool2d(t, 8)

    x = randn(1, 3, 200, 264)
    torch.testing.assert_close(tiled_scale(x, down, (64, 128), 32, scale=1 / 8, out_channels=3), down(x))


def test_tiled_equals_untiled_when_the_input_fits_one_tile(tiny_vae):
    latent = randn(1, 4, 8, 8)  # fits all three tilings of 64 (32x128, 128x32, 64x64)
    torch.testing.assert_close(tiny_vae.decode_tiled(latent), tiny_vae.decode(latent), rtol=0, atol=1e-6)
    pixels = rand(1, 64, 56, 3)  # fits tiles of 512 (and 256x1024, 1024x256)
    torch.testing.assert_close(tiny_vae.encode_tiled(pixels), tiny_vae.encode(pixels), rtol=0, atol=1e-6)


def test_tiled_is_close_to_untiled_on_larger_inputs(small_vae):
    # Tolerance: the VAE's GroupNorm statistics and mid-block attention are global, so a tile never
    # sees exactly what the whole image sees: tiled output differs by design, and random weights
    # (no training to make the network local) exaggerate it. Here the mean absolute difference
    # measures ~0.13x (decode) / ~0.12x (encode) of the difference made by shifting the untiled
    # output one latent pixel, which is about what a misplaced tile or a swapped axis would cost
    # (~1x). We require < 0.25x: a 2x margin over the measurement, 4x below a placement bug.
    latent = randn(1, 4, 20, 20, seed=5)
    full = small_vae.decode(latent)  # [1, 40, 40, 3]
    seen = []
    tiled = small_vae.decode_tiled(
        latent, tile_x=16, tile_y=16, overlap=4, progress=lambda d, t: seen.append((d, t))
    )
    assert tiled.shape == full.shape
    shift = (full[:, 2:] - full[:, :-2]).abs().mean()
    assert (tiled - full).abs().mean() < 0.25 * shift
    assert seen[-1] == (12, 12)  # 2x2 + 4x1 + 1x4 tiles

    pixels = rand(1, 48, 56, 3, seed=6)
    full = small_vae.encode(pixels)  # [1, 4, 24, 28]
    tiled = small_vae.encode_tiled(pixels, tile_x=32, tile_y=32, overlap=8)
    assert tiled.shape == full.shape
    shift = (full[..., 1:] - full[..., :-1]).abs().mean()
    assert (tiled - full).abs().mean() < 0.25 * shift


# ---------------------------------------------------------------------------------------------------------
# (d) attention chunking


@pytest.mark.parametrize("max_scores", [1, 7 * 64, 64 * 64, 10**9])
def test_chunked_attention_equals_unchunked(max_scores):
    q, k, v = randn(2, 1, 64, 32, seed=1), randn(2, 1, 64, 32, seed=2), randn(2, 1, 64, 32, seed=3)
    scores = torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, dim=-1)
    torch.testing.assert_close(chunked_attention(q, k, v, max_scores), scores @ v, rtol=1e-5, atol=1e-5)


def test_mid_block_attention_chunking_does_not_change_the_model(tiny_sd):
    model = load_autoencoder(tiny_sd)
    latent = randn(2, 4, 6, 5)
    whole = model.decode(latent)
    model.set_attention_max_scores(2 * 30 * 7)  # 7 query rows per call; 30 is not a multiple of 7
    assert model.decoder.mid.attn_1.max_scores == 2 * 30 * 7
    torch.testing.assert_close(model.decode(latent), whole, rtol=1e-5, atol=1e-5)

"""ESRGAN / Real-ESRGAN upscale models: layouts, config inference, the forward pass against a plain
reference, loading through the model manager, test files and ``kiln make-test-checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.errors import ModelError
from engine.models import esrgan
from engine.models.esrgan import ESRGANConfig, RRDBNet, UpscaleModelHandle, inspect_upscale_file, load_esrgan
from engine.models.manager import ModelManager
from engine.models.safetensors_file import load_tensors
from engine.models.test_checkpoint import write_test_esrgan


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, config: ESRGANConfig) -> torch.Tensor:
    """basicsr's RRDBNet written out with plain functional ops (basicsr names, no module code shared)."""

    def conv(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(h: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(h, 0.2)

    r = config.unshuffle
    if r > 1:  # basicsr's pixel_unshuffle
        b, c, hh, ww = x.shape
        x = (
            x.view(b, c, hh // r, r, ww // r, r)
            .permute(0, 1, 3, 5, 2, 4)
            .reshape(b, c * r * r, hh // r, ww // r)
        )
    feat = conv("conv_first", x)
    trunk = feat
    for i in range(config.num_blocks):
        block_in = h = trunk
        for j in (1, 2, 3):
            prefix = f"body.{i}.rdb{j}"
            x0 = h
            x1 = lrelu(conv(f"{prefix}.conv1", x0))
            x2 = lrelu(conv(f"{prefix}.conv2", torch.cat((x0, x1), 1)))
            x3 = lrelu(conv(f"{prefix}.conv3", torch.cat((x0, x1, x2), 1)))
            x4 = lrelu(conv(f"{prefix}.conv4", torch.cat((x0, x1, x2, x3), 1)))
            x5 = conv(f"{prefix}.conv5", torch.cat((x0, x1, x2, x3, x4), 1))
            h = x5 * 0.2 + x0
        trunk = h * 0.2 + block_in
    feat = feat + conv("conv_body", trunk)
    for k in range(1, config.upsample_stages + 1):
        feat = lrelu(conv(f"conv_up{k}", F.interpolate(feat, scale_factor=2, mode="nearest")))
    return conv("conv_last", lrelu(conv("conv_hr", feat)))


def load_file(path: Path) -> RRDBNet:
    info = inspect_upscale_file(path)
    return load_esrgan(load_tensors(path), info.config, prefix=info.prefix)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("layout", ["new", "old", "bsrgan"])
@pytest.mark.parametrize(
    ("scale", "stages", "unshuffle", "raw_in"), [(1, 2, 4, 48), (2, 2, 2, 12), (4, 2, 1, 3), (8, 3, 1, 3)]
)
def test_config_is_inferred_from_shapes(tmp_path, layout, scale, stages, unshuffle, raw_in):
    path = write_test_esrgan(tmp_path / "m.safetensors", scale=scale, layout=layout, nf=12, nb=3, gc=5)
    info = inspect_upscale_file(path)
    assert info.layout == layout and info.prefix == ""
    assert info.config == ESRGANConfig(3, 3, 12, 3, 5, stages, unshuffle)
    assert info.config.scale == scale
    first = "model.0.weight" if layout == "old" else "conv_first.weight"
    assert load_tensors(path)[first].shape == (12, raw_in, 3, 3)


def test_old_layout_key_positions():
    config = ESRGANConfig.for_scale(4, 8, 2, 4)
    old = esrgan.to_file_layout(esrgan.random_state_dict(config), config, "old")
    layers = sorted({int(k.split(".")[1]) for k in old if not k.startswith("model.1.")})
    assert layers == [0, 3, 6, 8, 10]  # conv_first, two upconvs, HR conv, last conv
    assert "model.1.sub.2.weight" in old  # the trunk conv after the 2 blocks
    assert "model.1.sub.1.RDB3.conv5.0.bias" in old


@pytest.mark.parametrize("wrapper", ["params_ema.", "params.", "module."])
def test_wrapper_prefixes(tmp_path, wrapper):
    path = write_test_esrgan(tmp_path / "m.safetensors", scale=2, wrapper=wrapper)
    info = inspect_upscale_file(path)
    assert info.prefix == wrapper and info.config.scale == 2


def test_params_ema_is_preferred_over_params(tmp_path):
    ema = write_test_esrgan(tmp_path / "ema.safetensors", seed=1, wrapper="params_ema.")
    raw = write_test_esrgan(tmp_path / "raw.safetensors", seed=2, wrapper="params.")
    both = tmp_path / "both.safetensors"
    save_file({**load_tensors(raw), **load_tensors(ema)}, str(both))
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_file(both)(x), load_file(ema)(x))
        assert not torch.equal(load_file(both)(x), load_file(raw)(x))


def test_full_size_has_realesrgan_x4plus_shapes():
    config = ESRGANConfig.realesrgan_x4plus()
    with torch.device("meta"):
        sd = RRDBNet(config).state_dict()
    assert len(sd) == 702 and sum(t.numel() for t in sd.values()) == 16_697_987
    assert sd["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert sd["conv_up2.weight"].shape == (64, 64, 3, 3) and "conv_up3.weight" not in sd
    assert ESRGANConfig.from_shapes({k: tuple(v.shape) for k, v in sd.items()}) == config


def test_other_architectures_are_refused(tmp_path):
    swin = tmp_path / "swinir.safetensors"
    save_file({"layers.0.residual_group.blocks.0.norm1.weight": torch.ones(4)}, str(swin))
    with pytest.raises(ModelError, match="not an ESRGAN"):
        inspect_upscale_file(swin)
    plus = tmp_path / "plus.safetensors"
    save_file(
        {"model.0.weight": torch.ones(1), "model.1.sub.0.RDB1.conv1x1.weight": torch.ones(1)}, str(plus)
    )
    with pytest.raises(ModelError, match=r"ESRGAN\+"):
        inspect_upscale_file(plus)
    # an old-layout file whose layers are not the upconv pattern (e.g. pixel-shuffle x3)
    config = ESRGANConfig.for_scale(4, 8, 1, 4)
    old = esrgan.to_file_layout(esrgan.random_state_dict(config), config, "old")
    old["model.5.weight"] = old.pop("model.6.weight")
    odd = tmp_path / "odd.safetensors"
    save_file(old, str(odd))
    with pytest.raises(ModelError, match="upconv layout"):
        inspect_upscale_file(odd)


def test_pickles_are_refused(tmp_path):
    pickled = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.ones(1)}}, pickled)
    renamed = tmp_path / "disguised.safetensors"
    renamed.write_bytes(pickled.read_bytes())
    manager = ModelManager("cpu")
    for path in (pickled, renamed):
        with pytest.raises(ModelError, match="pickled"):
            inspect_upscale_file(path)
        with pytest.raises(ModelError, match="pickled"):
            manager.load_upscale_model(path)


# ------------------------------------------------------------------------------------------ forward


def test_layouts_with_the_same_weights_give_identical_output(tmp_path):
    x = torch.rand(2, 3, 9, 11)
    outputs = []
    for layout in ("new", "old", "bsrgan"):
        path = write_test_esrgan(tmp_path / f"{layout}.safetensors", layout=layout, seed=5)
        with torch.no_grad():
            outputs.append(load_file(path)(x))
    assert outputs[0].abs().mean() > 0.01
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_matches_the_reference_forward(scale):
    config = ESRGANConfig.for_scale(scale, 8, 2, 4)
    sd = esrgan.random_state_dict(config, seed=scale)
    net = load_esrgan(sd, config)
    x = torch.rand(1, 3, 16, 12)
    with torch.no_grad():
        out = net(x)
        ref = reference_forward(sd, x, config)
    assert out.shape == (1, 3, 16 * scale, 12 * scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scale", "size"), [(1, (7, 5)), (2, (9, 6)), (4, (5, 3)), (2, (1, 1))])
def test_output_is_scale_times_input_for_any_size(scale, size):
    config = ESRGANConfig.for_scale(scale, 8, 1, 4)
    net = load_esrgan(esrgan.random_state_dict(config), config)
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * scale, size[1] * scale)


def test_unshuffle_pads_by_reflection_then_crops():
    config = ESRGANConfig.for_scale(2, 8, 1, 4)
    sd = esrgan.random_state_dict(config, seed=3)
    net = load_esrgan(sd, config)
    x = torch.rand(1, 3, 7, 9)
    with torch.no_grad():
        padded = reference_forward(sd, F.pad(x, (0, 1, 0, 1), mode="reflect"), config)
        torch.testing.assert_close(net(x), padded[:, :, :14, :18], rtol=1e-5, atol=1e-5)


def test_load_checks_shapes_and_names():
    config = ESRGANConfig.for_scale(4, 8, 2, 4)
    sd = esrgan.random_state_dict(config)
    with pytest.raises(ModelError, match="missing"):
        load_esrgan({k: v for k, v in sd.items() if "body.1." not in k}, config)
    sd["conv_hr.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(ModelError, match=r"conv_hr\.weight has shape"):
        load_esrgan(sd, config)


# ------------------------------------------------------------------------------------------ manager


def test_manager_loads_and_lends_the_model(tmp_path):
    path = write_test_esrgan(
        tmp_path / "x2.safetensors", scale=2, seed=4, dtype="fp16", wrapper="params_ema."
    )
    manager = ModelManager("cpu", precision="fp16")
    handle = manager.load_upscale_model(path)
    assert isinstance(handle, UpscaleModelHandle) and handle.scale == 2
    assert handle.source.part == "upscale" and handle.source.prefix == "params_ema."
    assert handle.patches == () and handle.patch_signature == ""
    assert manager.dtype_for(handle) == torch.float32  # fp16 files and precision: upscale runs in fp32
    [row] = manager.resident()
    assert row["part"] == "upscale" and row["dtype"] == "float32" and row["file"] == "x2.safetensors"
    with manager.use(handle) as net:
        assert isinstance(net, RRDBNet) and net.dtype == torch.float32 and net.scale == 2
        with torch.no_grad():
            out = net(torch.rand(1, 3, 8, 8))
        assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    again = manager.load_upscale_model(path)
    assert again.cache_key == handle.cache_key
    other = manager.load_upscale_model(write_test_esrgan(tmp_path / "o.safetensors", scale=2, seed=5))
    assert other.cache_key != handle.cache_key
    assert manager.free_all() > 0 and manager.resident() == []


# ------------------------------------------------------------------------------------------ files and CLI


def test_test_files_are_deterministic(tmp_path):
    a = write_test_esrgan(tmp_path / "a.safetensors", scale=4, layout="old", seed=9)
    b = write_test_esrgan(tmp_path / "b.safetensors", scale=4, layout="old", seed=9)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ModelError, match="safetensors"):
        write_test_esrgan(tmp_path / "c.pth")


def test_make_test_checkpoint_esrgan(tmp_path, capsys):
    from kiln.cli import main

    out = tmp_path / "up.safetensors"
    args = ["make-test-checkpoint", str(out), "--arch", "esrgan", "--scale", "2", "--layout", "old"]
    assert main([*args, "--dtype", "fp32", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "esrgan" and report["scale"] == 2 and report["layout"] == "old"
    info = inspect_upscale_file(out)
    assert info.layout == "old" and info.config == ESRGANConfig.for_scale(2, 8, 2, 4)

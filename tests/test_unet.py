"""unet.py: shapes, parameter counts, gradient flow, mixed precision, conditioning, compile, for every preset."""

import copy
import json

import pytest
import torch

from unet import PRESETS, UNet, build_unet, timestep_embedding

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# Expected parameter counts (unconditional). celeba64 is DDIM's CelebA model, 78.7M in its paper's table; the exact
# figures are pinned too so that any change in the architecture shows here.
EXPECTED_PARAMS = {"tiny": 1_113_955, "small64": 35_021_011, "celeba64": 78_700_803, "celeba128": 81_344_515}


def perturb_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised parameters small random values so gradients and cond reach the output at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def inputs(image_size: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    cond = torch.randint(0, 2, (batch, 40), generator=g)
    return x, t, cond


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    with torch.device("meta"):  # shapes only: counting the big presets costs no memory or init time
        counts = {name: count(build_unet(name)) for name in PRESETS}
        cond_counts = {name: count(build_unet(name, cond_dim=40)) for name in PRESETS}
    assert counts == EXPECTED_PARAMS
    assert abs(counts["celeba64"] - 78.7e6) / 78.7e6 < 0.03
    assert 0.3e6 <= counts["tiny"] <= 2e6
    assert abs(counts["small64"] - 35e6) / 35e6 < 0.05
    # The conditioning path costs one Linear(40, 4C) and the null embedding (4C), nothing else.
    for name in PRESETS:
        emb = 4 * PRESETS[name]["base_channels"]
        assert cond_counts[name] - counts[name] == 41 * emb + emb


def narrow(name: str) -> dict:
    """Overrides that keep a big preset's modules and names but make it cheap on a CPU: 32 base channels and a quarter
    of the resolution, attention at the same levels (the tiny preset is left as it is)."""
    if name == "tiny":
        return {}
    cfg = PRESETS[name]
    return dict(base_channels=32, image_size=cfg["image_size"] // 4,
                attn_resolutions=[r // 4 for r in cfg["attn_resolutions"]])


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_forward_shape_and_autocast(name):
    """The full preset at its resolution: zero output at init (zero-initialised output conv), then, perturbed, an
    fp32 forward of the right shape. The bf16 autocast forward (the CPU's low precision), finite and close to fp32,
    runs on the narrow version of the preset: bf16 convolutions are emulated, ~200x slower than fp32, on CPUs without
    native bf16 (the 2-core AVX2 machines that run CI), where the full celeba128 took over 10 minutes."""
    torch.manual_seed(0)
    size = PRESETS[name]["image_size"]
    model = build_unet(name, cond_dim=40).eval()
    x, t, cond = inputs(size, 2 if name == "tiny" else 1)
    cond[0] = -1  # a null row
    with torch.no_grad():
        fresh = model(x, t, cond)
        assert fresh.shape == x.shape and not fresh.any()
        perturb_zero_init(model)
        out = model(x, t, cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all() and out.any()

    torch.manual_seed(0)
    small = perturb_zero_init(build_unet(name, cond_dim=40, **narrow(name))).eval()
    x, t, cond = inputs(small.image_size, 2)
    cond[0] = -1
    with torch.no_grad():
        ref = small(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = small(x, t, cond)
    assert low.shape == x.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_gradients_reach_every_parameter(name):
    """Every parameter of the preset's architecture gets a gradient. Backward through the big presets is slow on a
    CPU, so they are checked at 32 base channels and a quarter of the resolution with attention at the same levels:
    the same modules under the same names (asserted), only narrower."""
    torch.manual_seed(0)
    model = perturb_zero_init(build_unet(name, cond_dim=40, **narrow(name)))
    with torch.device("meta"):
        full = build_unet(name, cond_dim=40)
    assert list(model.state_dict()) == list(full.state_dict())
    x, t, cond = inputs(model.image_size, 2)
    cond[1] = -1  # one null row so the null embedding gets a gradient too
    model(x, t, cond).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient for {missing[:5]}"


def test_cond_changes_output_only_with_cond_dim():
    torch.manual_seed(0)
    x, t, cond = inputs(32, 4)
    other = 1 - cond
    null = torch.full_like(cond, -1)

    plain = perturb_zero_init(build_unet("tiny")).eval()
    with torch.no_grad():
        ref = plain(x, t)
        assert torch.equal(plain(x, t, cond), ref)
        assert torch.equal(plain(x, t, other), ref)

    cond_model = perturb_zero_init(build_unet("tiny", cond_dim=40)).eval()
    with torch.no_grad():
        a, b = cond_model(x, t, cond), cond_model(x, t, other)
        assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4, "every row should depend on its cond"
        # A -1 row is the null embedding, the same as cond=None; rows do not interact.
        torch.testing.assert_close(cond_model(x, t, null), cond_model(x, t, None))
        mixed = torch.cat([cond[:2], null[2:]])
        out = cond_model(x, t, mixed)
        torch.testing.assert_close(out[:2], a[:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out[2:], cond_model(x[2:], t[2:], None), rtol=1e-4, atol=1e-5)
        # Float and integer attribute vectors mean the same.
        torch.testing.assert_close(cond_model(x, t, cond.float()), a)


def test_timestep_changes_output():
    model = perturb_zero_init(build_unet("tiny")).eval()
    x, _, _ = inputs(32, 2)
    with torch.no_grad():
        a = model(x, torch.tensor([0, 0]))
        b = model(x, torch.tensor([999, 999]))
    assert (a - b).abs().max() > 1e-4


def test_config_rebuilds_same_architecture():
    model = build_unet("tiny", cond_dim=40, image_size=16, use_scale_shift_norm=True)
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    clone = UNet(**config)
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())  # strict: same names and shapes
    for key in ("image_size", "in_channels", "base_channels", "channel_mult", "num_res_blocks", "attn_resolutions",
                "num_heads", "dropout", "cond_dim"):
        assert key in model.config


def test_scale_shift_norm_variant_runs():
    model = perturb_zero_init(build_unet("tiny", use_scale_shift_norm=True)).eval()
    x, t, _ = inputs(32, 2)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_other_resolutions_and_channels():
    model = perturb_zero_init(build_unet("tiny", image_size=16, in_channels=1)).eval()
    x = torch.randn(3, 1, 16, 16)
    assert model(x, torch.tensor([1, 2, 3])).shape == x.shape
    model64 = build_unet("tiny", image_size=64)
    assert model64(torch.randn(1, 3, 64, 64), torch.tensor([5])).shape == (1, 3, 64, 64)


def test_channels_last_matches():
    model = perturb_zero_init(build_unet("tiny", cond_dim=40)).eval()
    x, t, cond = inputs(32, 2)
    with torch.no_grad():
        ref = model(x, t, cond)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl(x.to(memory_format=torch.channels_last), t, cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fp16_autocast_on_cpu_is_finite():
    model = perturb_zero_init(build_unet("tiny", cond_dim=40)).eval()
    x, t, cond = inputs(32, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out = model(x * 100, t, cond)  # large inputs: the fp32 GroupNorm keeps the statistics in range
    assert torch.isfinite(out).all()


def test_compiles_without_graph_breaks():
    """fullgraph=True raises on any graph break; the eager backend checks tracing without a C++ build."""
    torch._dynamo.reset()
    model = perturb_zero_init(build_unet("tiny", cond_dim=40)).eval()
    x, t, cond = inputs(32, 2)
    cond[1] = -1
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, cond), model(x, t, cond))
        torch.testing.assert_close(compiled(x, t, None), model(x, t, None))


def test_timestep_embedding():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 32)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    assert timestep_embedding(t, 33).shape == (3, 33)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        build_unet("huge")
    with pytest.raises(ValueError, match="not divisible"):
        build_unet("tiny", image_size=30)
    with pytest.raises(ValueError, match="groups"):
        build_unet("tiny", base_channels=20)
    model = build_unet("tiny", cond_dim=40)
    with pytest.raises(ValueError, match="cond has shape"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.zeros(2, 10))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", list(PRESETS))
def test_cuda_fp16_channels_last(name):
    """On GPU: fp16 autocast + channels_last (flash / memory-efficient attention kernels), finite and close to fp32;
    tiny and celeba64 also through inductor with fullgraph=True (the big ones would only repeat a long compile)."""
    torch._dynamo.reset()
    size = PRESETS[name]["image_size"]
    model = perturb_zero_init(build_unet(name, cond_dim=40)).cuda().eval().to(memory_format=torch.channels_last)
    x, t, cond = (v.cuda() for v in inputs(size, 4))
    cond[0] = -1
    x = x.to(memory_format=torch.channels_last)
    forward = torch.compile(model, fullgraph=True) if name in ("tiny", "celeba64") else model
    with torch.no_grad():
        ref = model(x, t, cond)
        with torch.autocast("cuda", dtype=torch.float16):
            out = forward(x, t, cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3

"""ema.py: warm-up decay, exact state_dict round trip, weight swapping that never leaks."""
import io

import pytest
import torch
from torch import nn

from ema import EMA


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 2))


def _perturb(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def _trained(decay: float, updates: int) -> tuple[nn.Module, EMA]:
    """A model and its EMA after `updates` rounds of perturbing the weights and updating the average."""
    model = _model()
    ema = EMA(model, decay=decay)
    for _ in range(updates):
        _perturb(model)
        ema.update()
    return model, ema


def test_warmup_decay_matches_formula():
    model = _model()
    ema = EMA(model, decay=0.999, warmup=True)
    w = model[0].weight
    shadow = w.detach().clone()
    for n in range(1, 6):
        _perturb(model)
        ema.update()
        d = min(0.999, (1 + n) / (10 + n))
        shadow = shadow - (1 - d) * (shadow - w.detach())
    assert ema.num_updates == 5
    with ema.average_parameters():
        torch.testing.assert_close(model[0].weight.detach(), shadow)


def test_no_warmup_uses_plain_decay_and_still_counts():
    model = _model()
    ema = EMA(model, decay=0.9, warmup=False)
    start = model[0].weight.detach().clone()
    _perturb(model)
    ema.update()
    assert ema.num_updates == 1
    expected = 0.9 * start + 0.1 * model[0].weight.detach()
    with ema.average_parameters():
        torch.testing.assert_close(model[0].weight.detach(), expected)


def test_average_parameters_restores_trained_weights_exactly():
    model, ema = _trained(0.99, 3)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.average_parameters():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
        assert not torch.equal(inside["0.weight"], trained["0.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    # Also restored when the block raises.
    with pytest.raises(RuntimeError):
        with ema.average_parameters():
            raise RuntimeError("boom")
    assert torch.equal(model.state_dict()["0.weight"], trained["0.weight"])
    assert "collected_params" not in ema.state_dict()


def test_state_dict_round_trips_through_weights_only_load():
    model, ema = _trained(0.995, 4)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)

    clone = _model(seed=1)
    clone.load_state_dict(model.state_dict())
    ema2 = EMA(clone, decay=0.5, warmup=False)
    ema2.load_state_dict(sd)
    assert ema2.num_updates == 4 and ema2.decay == 0.995 and ema2.warmup
    for a, b in zip(ema.state_dict()["shadow_params"], ema2.state_dict()["shadow_params"]):
        assert torch.equal(a, b)
    # The continued averages stay identical.
    _perturb(model)
    clone.load_state_dict(model.state_dict())
    ema.update()
    ema2.update()
    for a, b in zip(ema.state_dict()["shadow_params"], ema2.state_dict()["shadow_params"]):
        assert torch.equal(a, b)


def test_state_dict_is_a_snapshot():
    model = _model()
    ema = EMA(model)
    sd = ema.state_dict()
    before = sd["shadow_params"][0].clone()
    _perturb(model, 1.0)
    ema.update()
    assert torch.equal(sd["shadow_params"][0], before)


def test_copy_to_another_model_and_mismatch_refused():
    model = _model()
    ema = EMA(model, decay=0.9)
    _perturb(model)
    ema.update()
    fresh = _model(seed=3)
    ema.copy_to(fresh)
    with ema.average_parameters():
        for a, b in zip(model.parameters(), fresh.parameters()):
            assert torch.equal(a, b)
    with pytest.raises(ValueError):
        ema.copy_to(nn.Linear(4, 8))
    with pytest.raises(ValueError):
        EMA(nn.Linear(4, 8)).load_state_dict(ema.state_dict())

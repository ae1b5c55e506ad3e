"""Growing a trained PocusNet (Net2Net) keeps its outputs, so a larger model starts where it stands."""
import pytest
import torch

from training.grow import grow
from training.models import PocusNet


def _trained_like(net: PocusNet) -> PocusNet:
    """Random BatchNorm statistics and affine parameters, as after training (not the identity at init)."""
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def test_grow_keeps_the_outputs_in_eval_mode():
    torch.manual_seed(0)
    small = _trained_like(PocusNet(widths=(4, 8, 16), depth=1, hidden=16, dropout=0.0))
    big = PocusNet(widths=(6, 12, 20), depth=3, hidden=16, dropout=0.0)
    frames = torch.rand(64, 1, 32, 32)
    grow(small, big, frames, noise=0.0)
    with torch.no_grad():
        for a, b in zip(small(frames), big.eval()(frames)):
            assert torch.allclose(a, b, atol=1e-4), float((a - b).abs().max())
    assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in small.parameters())


def test_grow_noise_separates_the_copies_a_little():
    torch.manual_seed(0)
    small = _trained_like(PocusNet(widths=(4, 8, 16), depth=1, hidden=16, dropout=0.0))
    big = grow(small, PocusNet(widths=(8, 16, 24), depth=1, hidden=16, dropout=0.0), torch.rand(8, 1, 32, 32),
               noise=0.01)
    stem = big.features[0][0].weight
    assert not torch.equal(stem[4:8], stem[:4])          # copies differ from the originals
    frames = torch.rand(16, 1, 32, 32)
    with torch.no_grad():
        diff = (small(frames)[1] - big.eval()(frames)[1]).abs().max()
    assert 0 < diff < 0.05


def test_grow_refuses_a_smaller_or_different_net():
    small = PocusNet(widths=(4, 8, 16), depth=2, hidden=16)
    with pytest.raises(ValueError, match="same number of stages"):
        grow(small, PocusNet(widths=(8, 16), depth=2, hidden=16), torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="convs per stage"):
        grow(small, PocusNet(widths=(8, 16, 32), depth=1, hidden=16), torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="hidden"):
        grow(small, PocusNet(widths=(8, 16, 32), depth=2, hidden=32), torch.rand(2, 1, 32, 32))

"""common.aux_loss: the per-example cosine and the authors' broadcast variant (authors-code §1.3)."""
import math

import pytest
import torch

from common.aux_loss import aux_loss, broadcast_cosine_distance, cosine_distance


def test_cosine_distance_is_per_example():
    torch.manual_seed(0)
    x, t = torch.randn(7, 16), torch.randn(7, 16)
    expected = sum(1 - float(x[i] @ t[i]) / (float(x[i].norm()) * float(t[i].norm())) for i in range(7)) / 7
    assert float(cosine_distance(x, t)) == pytest.approx(expected, abs=1e-6)
    assert float(cosine_distance(x, x * 3.0)) == pytest.approx(0.0, abs=1e-6)


def test_broadcast_variant_equals_closed_form():
    torch.manual_seed(1)
    h = torch.relu(torch.randn(64, 16))
    h[:, 5] = 0.0                                  # a unit that is all-zero in the batch: cosine 0
    t = torch.randn(64, 16)
    B = h.shape[0]
    stat = h.sum(0) / (math.sqrt(B) * h.norm(dim=0).clamp_min(1e-30))   # (16,) per-unit batch statistic
    closed = (1 - torch.sign(t) * stat[None, :]).mean()
    assert float(broadcast_cosine_distance(h, t)) == pytest.approx(float(closed), abs=1e-6)


def test_broadcast_variant_sees_only_target_signs():
    torch.manual_seed(2)
    h, t = torch.relu(torch.randn(32, 16)), torch.randn(32, 16)
    scaled = t.sign() * torch.rand(32, 16) * 100
    assert float(broadcast_cosine_distance(h, t)) == pytest.approx(float(broadcast_cosine_distance(h, scaled)), abs=1e-6)
    assert float(cosine_distance(h, t)) != pytest.approx(float(cosine_distance(h, scaled)), abs=1e-3)


def test_dispatch_and_gradients():
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3)
    aux_loss(x, t, "cosine").backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError):
        aux_loss(x, t, "l2")

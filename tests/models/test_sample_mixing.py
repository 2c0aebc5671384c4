"""Models that mix samples are refused at the first forward pass with an error
that says why and what to do; fxdp.validate lists BatchNorm statically and
fxdp.fix_batchnorm replaces it by GroupNorm, after which training is exact."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.fix import ValidationIssue, group_count
from tests.models.helpers import check_against_reference

B = 5


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3),
                         nn.Flatten(1), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


class CenterOverBatch(nn.Module):
    """h - h.mean(0): every sample's value depends on the whole batch."""

    def __init__(self, at_output=False):
        super().__init__()
        self.fc1, self.fc2, self.at_output = nn.Linear(4, 6), nn.Linear(6, 2), at_output

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if not self.at_output:
            h = h - h.mean(0, keepdim=True)
        out = self.fc2(h)
        return out - out.mean(0, keepdim=True) if self.at_output else out


class AttentionOverBatch(nn.Module):
    """Scores between *samples* (x @ x.T over the batch): cross-sample attention."""

    def __init__(self):
        super().__init__()
        self.q, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        q = self.q(x)
        attn = torch.softmax(q @ q.T, dim=-1)
        return self.head(attn @ x)


def test_batchnorm_in_train_mode_is_refused_at_the_first_forward_with_the_fix():
    model = fxdp.privatize(bn_cnn())
    with pytest.raises(fxdp.SampleMixingError) as err:
        model(torch.randn(B, 3, 7, 7))  # the forward itself raises, before any backward
    msg = str(err.value)
    assert "BatchNorm" in msg and "whole batch" in msg and "GroupNorm" in msg and "fix_batchnorm" in msg


def test_frozen_batchnorm_in_train_mode_is_still_refused():
    model = bn_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(False)
    fxdp.privatize(model)
    with pytest.raises(fxdp.SampleMixingError, match="BatchNorm"):
        model(torch.randn(B, 3, 7, 7))


def test_frozen_batchnorm_in_eval_mode_uses_running_stats_and_is_exact():
    model = bn_cnn().double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.requires_grad_(False)
            m.eval()
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x, y = torch.randn(B, 3, 7, 7, dtype=torch.float64), torch.randint(0, 3, (B,))
    check_against_reference(model, (x,), {}, y, F.cross_entropy, style="layer-wise")


@pytest.mark.parametrize("at_output", [False, True])
def test_reduction_over_the_batch_is_refused_with_advice(at_output):
    model = fxdp.privatize(CenterOverBatch(at_output))
    with pytest.raises(fxdp.SampleMixingError) as err:
        model(torch.randn(B, 4))
    msg = str(err.value)
    assert "mixed" in msg and "depend on that sample only" in msg
    assert ("output" in msg) if at_output else ("fc2" in msg)


def test_cross_sample_attention_is_refused():
    model = fxdp.privatize(AttentionOverBatch())
    with pytest.raises(fxdp.SampleMixingError, match="mixed"):
        model(torch.randn(B, 4))


class MixUp(nn.Module):
    """Mixes each sample with a randomly chosen other one inside the forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        perm = torch.randperm(x.shape[0])
        return self.fc(0.7 * x + 0.3 * x[perm])


def test_mixup_inside_the_model_is_refused():
    model = fxdp.privatize(MixUp())
    with pytest.raises(fxdp.PrivacyError):
        model(torch.randn(B, 4))


def test_validate_lists_every_batchnorm_with_reason_and_fix():
    model = bn_cnn()
    issues = fxdp.validate(model)
    assert [(i.module, i.module_type) for i in issues] == [("1", "BatchNorm2d"), ("6", "BatchNorm1d")]
    assert all(isinstance(i, ValidationIssue) and "whole batch" in i.reason and "GroupNorm" in i.fix for i in issues)
    with pytest.raises(fxdp.SampleMixingError, match="BatchNorm1d"):
        fxdp.validate(model, strict=True)
    assert fxdp.validate(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2), nn.LayerNorm(2))) == []


def test_fix_batchnorm_replaces_by_groupnorm_and_training_becomes_exact():
    model = bn_cnn()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    w = model[1].weight.detach().clone()
    fixed = fxdp.fix_batchnorm(model)
    assert fixed is model and fxdp.validate(model) == []
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 6 and model[1].num_channels == 6
    assert isinstance(model[6], nn.GroupNorm) and model[6].num_groups == 1
    torch.testing.assert_close(model[1].weight.detach(), w)
    model = model.double()
    x, y = torch.randn(B, 3, 7, 7, dtype=torch.float64), torch.randint(0, 3, (B,))
    check_against_reference(model, (x,), {}, y, F.cross_entropy, style="layer-wise")


def test_fix_batchnorm_keeps_flags_shares_and_refuses_privatized_models():
    shared = nn.BatchNorm1d(48, affine=False, eps=1e-3)
    model = nn.Sequential(nn.Linear(4, 48), shared, nn.Linear(48, 48), shared)
    fxdp.fix_batchnorm(model)
    gn = model[1]
    assert isinstance(gn, nn.GroupNorm) and gn is model[3]
    assert gn.num_groups == 1 and not gn.affine and gn.eps == 1e-3
    three = fxdp.fix_batchnorm(nn.BatchNorm3d(48))
    assert isinstance(three, nn.GroupNorm) and three.num_groups == 24
    assert group_count(7) == 7 and group_count(64) == 32 and group_count(96, 32) == 32 and group_count(34) == 17
    bn = bn_cnn()
    fxdp.privatize(bn)
    with pytest.raises(ValueError, match="before fxdp.privatize"):
        fxdp.fix_batchnorm(bn)

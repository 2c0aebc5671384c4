"""Losses under fxdp: composed per-sample losses (sums, scalings, several heads of
one forward) are exact; parameter-only terms (weight decay) never enter a
sample's clipped gradient (they land in p.grad, exactly); per_sample_loss
gives each sample the mean over its own tokens, which keeps samples decoupled."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.training.losses import reduce_token_losses
from tests import models_zoo as Z
from tests.models.helpers import check_against_reference

B = 6


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.cls, self.reg = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.cls(h), self.reg(h).squeeze(-1)


def data():
    torch.manual_seed(1)
    return torch.randn(B, 5, dtype=torch.float64), (torch.randint(0, 3, (B,)), torch.randn(B, dtype=torch.float64))


def composed(out, target):
    logits, value = out
    labels, y = target
    return 0.7 * F.cross_entropy(logits, labels) + 3.0 * F.mse_loss(value, y) + F.l1_loss(value, y) / 4


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_composed_losses_of_several_heads_from_one_forward_equal_reference(style):
    x, target = data()
    check_against_reference(TwoHeads().double(), (x,), {}, target, composed, style=style)


def test_composed_sum_reduction_equals_reference():
    x, target = data()

    def loss(out, t):
        return 2.0 * F.cross_entropy(out[0], t[0], reduction="sum") + (out[1] - t[1]).square().sum()

    check_against_reference(TwoHeads().double(), (x,), {}, target, loss, loss_reduction="sum",
                            clipping_fn="automatic")


def test_two_backward_calls_through_one_forward_are_refused():
    """Several losses of one forward must be summed before one backward: a second backward through
    the same forward could not be clipped together with the first."""
    x, (labels, y) = data()
    model = fxdp.privatize(TwoHeads().double())
    logits, value = model(x)
    F.cross_entropy(logits, labels).backward(retain_graph=True)
    with pytest.raises(fxdp.PrivacyError, match="backward"):
        F.mse_loss(value, y).backward()


def weight_decay_run(lam):
    model = TwoHeads().double()
    fxdp.privatize(model, max_grad_norm=0.3)
    x, target = data()
    loss = composed(model(x), target)
    if lam:
        loss = loss + lam * model.body.weight.square().sum() + lam * model.cls.weight.abs().sum()
    loss.backward()
    return model


def test_parameter_only_term_never_enters_the_clipped_gradient_and_is_exact_in_grad():
    lam = 0.37
    plain, reg = weight_decay_run(0.0), weight_decay_run(lam)
    for (n, p), q in zip(plain.named_parameters(), reg.parameters()):
        torch.testing.assert_close(q.private_grad, p.private_grad, rtol=0, atol=0, msg=n)
        assert p.grad is None
    torch.testing.assert_close(reg.body.weight.grad, 2 * lam * reg.body.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(reg.cls.weight.grad, lam * reg.cls.weight.detach().sign(), rtol=0, atol=0)
    assert reg.body.bias.grad is None and reg.reg.weight.grad is None
    norms_plain = fxdp.get_engine(plain).last_stats["group_norms"]["all"]
    torch.testing.assert_close(fxdp.get_engine(reg).last_stats["group_norms"]["all"], norms_plain)


def test_parameter_only_term_inside_the_forward_is_refused():
    """Inside the privatized forward a parameter used by an op no rule covers is refused: fxdp cannot
    tell a data-independent term from a data-dependent one there."""

    class Regularized(TwoHeads):
        def forward(self, x):
            logits, value = super().forward(x)
            return logits, value, self.body.weight.square().sum()

    model = fxdp.privatize(Regularized())
    with pytest.raises(fxdp.UncoveredParameterError, match="body.weight"):
        model(torch.randn(B, 5))


def test_dp_optimizer_treats_a_parameter_only_term_as_public():
    """The optimizer's policy for p.grad written outside the privatized forward (see DPOptimizer):
    refused by default; with public_grads='add' refused too for parameters the forward used on data
    (a weight-decay term cannot be told from a data term there: weight_decay= of the inner optimizer
    is the same update), added unclipped and un-noised for the others."""
    lam = 0.1
    model = weight_decay_run(lam)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.3,
                           expected_batch_size=B)
    with pytest.raises(fxdp.PrivacyError, match="public_grads"):
        opt.step()
    model = weight_decay_run(lam)
    w0 = model.body.weight.detach().clone()
    private = model.body.weight.private_grad.clone()
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.3,
                           expected_batch_size=B, public_grads="add")
    with pytest.raises(fxdp.PrivacyError, match="used these parameters on data.*weight_decay="):
        opt.step()
    model = weight_decay_run(0.0)
    opt = fxdp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0, weight_decay=2 * lam), noise_multiplier=0.0,
                           max_grad_norm=0.3, expected_batch_size=B)
    opt.step()
    torch.testing.assert_close(w0 - model.body.weight.detach(), private / B + 2 * lam * w0)


# ----------------------------------------------------------------- per_sample_loss
def test_per_sample_loss_is_the_mean_of_each_samples_own_tokens():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 5, 7, dtype=torch.float64), torch.randint(0, 7, (3, 5))
    target[0, 3:] = -100
    target[2, :] = -100  # a sample with no counted token
    per = fxdp.per_sample_loss(logits, target, reduction="none")
    for b in range(3):
        keep = target[b] != -100
        want = F.cross_entropy(logits[b][keep], target[b][keep]) if keep.any() else torch.zeros((), dtype=per.dtype)
        torch.testing.assert_close(per[b], want)
    torch.testing.assert_close(fxdp.per_sample_loss(logits, target), per.mean())
    torch.testing.assert_close(fxdp.per_sample_loss(logits, target, reduction="sum"), per.sum())
    shifted = fxdp.per_sample_loss(logits, target, shift=True, reduction="none")
    torch.testing.assert_close(shifted, fxdp.per_sample_loss(logits[:, :-1], target[:, 1:], reduction="none"))
    w = torch.rand(7, dtype=torch.float64) + 0.5
    weighted = fxdp.per_sample_loss(logits[:1], target[:1], weight=w, reduction="none")
    keep = target[0] != -100
    torch.testing.assert_close(weighted[0], F.cross_entropy(logits[0][keep], target[0][keep], weight=w))
    smooth = fxdp.per_sample_loss(logits[1:2], target[1:2], label_smoothing=0.1)
    torch.testing.assert_close(smooth, F.cross_entropy(logits[1], target[1], label_smoothing=0.1))


def test_per_sample_loss_of_a_sample_without_tokens_gives_it_zero_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    target = torch.randint(0, 5, (2, 4))
    target[1] = -100
    fxdp.per_sample_loss(logits, target).backward()
    assert torch.count_nonzero(logits.grad[1]) == 0 and torch.count_nonzero(logits.grad[0]) > 0


def test_per_sample_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        fxdp.per_sample_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), reduction="batchmean")
    with pytest.raises(ValueError, match="do not match"):
        fxdp.per_sample_loss(torch.randn(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="batch dimension"):
        reduce_token_losses(torch.tensor(1.0))
    torch.testing.assert_close(reduce_token_losses(torch.ones(3, 2, 2) * torch.arange(3.).view(3, 1, 1)),
                               torch.tensor(1.0))


def seq_batch(lengths, vocab=20, T=6):
    torch.manual_seed(3)
    ids = torch.randint(1, vocab, (len(lengths), T))
    labels = ids.clone()
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    return ids, labels


def token_mean(out, labels):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=-100)


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc = nn.Embedding(20, 8), nn.Linear(8, 20)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)))


def sample0_norm(loss_fn, lengths):
    model = fxdp.privatize(TokenModel().double(), max_grad_norm=1e6)
    ids, labels = seq_batch(lengths)
    loss_fn(model(ids), labels).backward()
    return float(fxdp.get_engine(model).last_stats["group_norms"]["all"][0])


def test_token_mean_over_the_batch_couples_samples_and_per_sample_loss_does_not():
    """Sample 0 is the same in both batches; only sample 1's length differs. With a token mean
    over the batch, sample 0's gradient (as fxdp sees it) changes; with per_sample_loss it does not."""
    a, b = [6, 6, 4], [6, 2, 4]
    assert sample0_norm(fxdp.per_sample_loss, a) == pytest.approx(sample0_norm(fxdp.per_sample_loss, b), rel=1e-12)
    assert sample0_norm(token_mean, a) != pytest.approx(sample0_norm(token_mean, b), rel=1e-3)


def test_per_sample_loss_with_padding_equals_reference():
    ids, labels = seq_batch([6, 3, 5, 1, 6, 4])
    check_against_reference(TokenModel().double(), (ids,), {}, labels, fxdp.per_sample_loss, style="layer-wise")


def test_scaled_loss_equals_reference_of_the_scaled_per_sample_losses():
    model = Z.MLP().double()
    x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
    check_against_reference(model, (x,), {}, y, lambda o, t: 5.0 * F.cross_entropy(o, t))

"""Models and batches that used to be refused wrongly, or failed with raw torch errors (issue #18, §4).

Each is now exact against the one-sample-at-a-time reference (float64, R at the median norm), or refused
with an fxdp error that names the parameter, the op and what to do."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.models.helpers import check_against_reference


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


# ---------------------------------------------------------------- identical samples in the first batch
def test_gpt2_first_batch_with_identical_padded_samples_equals_reference():
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    ids = torch.randint(1, 40, (5, 6))
    ids[1], ids[2] = ids[0], ids[0]          # three identical padded examples first
    mask = torch.ones_like(ids)
    mask[:3, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    check_against_reference(model, (), {"input_ids": ids, "attention_mask": mask}, labels,
                            lambda o, y: fxdp.per_sample_loss(o.logits, y, shift=True), style="block-wise")


def test_batch_of_one_repeated_float_sample_equals_reference():
    x = torch.randn(1, 5, dtype=torch.float64).expand(6, 5).clone()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    check_against_reference(mlp(), (x,), {}, y, sum_ce, loss_reduction="sum", R=None)


def test_batch_of_one_repeated_integer_sample_is_refused_with_advice():
    torch.manual_seed(0)
    model = fxdp.privatize(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)))
    ids = torch.tensor([[1, 2, 3]]).expand(4, 3).clone()
    with pytest.raises(fxdp.BatchLayoutError, match="at least two distinct samples"):
        model(ids)


# ---------------------------------------------------------------- retained graphs
def _private(model, x, y):
    m = fxdp.privatize(model, max_grad_norm=0.5)
    loss = sum_ce(m(x), y)
    return m, loss


def test_backward_then_autograd_grad_gives_input_gradients_and_private_grads_once():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    once, l1 = _private(mlp(), x, y)
    l1.backward()
    want = {n: p.private_grad.clone() for n, p in once.named_parameters()}
    plain = mlp()
    want_dx, = torch.autograd.grad(sum_ce(plain(x), y), x)
    m, loss = _private(mlp(), x, y)
    loss.backward(retain_graph=True)
    dx, = torch.autograd.grad(loss, x)
    torch.testing.assert_close(dx, want_dx)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.private_grad, want[n])


def test_second_accumulating_backward_through_a_retained_graph_is_refused():
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    once, l1 = _private(mlp(), x, y)
    l1.backward()
    m, loss = _private(mlp(), x, y)
    loss.backward(retain_graph=True)
    with pytest.raises(fxdp.PrivacyError, match="second backward pass .* count its samples twice"):
        loss.backward()
    for (n, p), q in zip(m.named_parameters(), once.parameters()):  # the first backward's, once
        torch.testing.assert_close(p.private_grad, q.private_grad)


def test_input_gradient_pass_then_backward_through_the_retained_graph_forms_private_grads_once():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    once, l1 = _private(mlp(), x, y)
    l1.backward()
    m, loss = _private(mlp(), x, y)
    torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    for (n, p), q in zip(m.named_parameters(), once.parameters()):
        torch.testing.assert_close(p.private_grad, q.private_grad)


def test_second_backward_through_a_freed_graph_is_refused():
    m = fxdp.privatize(nn.Linear(5, 3).double())
    loss = m(torch.randn(4, 5, dtype=torch.float64)).sum()
    loss.backward()
    with pytest.raises(fxdp.PrivacyError, match="retain_graph=True"):
        loss.backward()


# ---------------------------------------------------------------- in-place ops with parameters
class InplaceBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.b = nn.Parameter(torch.randn(4))
        self.g = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        h += self.b
        h.mul_(self.g)
        return self.out(torch.tanh(h))


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_inplace_ops_with_parameters_equal_reference(style):
    torch.manual_seed(0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    check_against_reference(InplaceBias().double(), (x,), {}, y, sum_ce, style=style, loss_reduction="sum")


class ModifiesParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x):
        self.w.add_(x.sum(0))
        return x * self.w


def test_inplace_update_of_a_parameter_in_forward_is_refused():
    m = fxdp.privatize(ModifiesParam())
    with pytest.raises(fxdp.UncoveredParameterError, match="'w'.*in place"):
        m(torch.randn(4, 5)).sum().backward()


# ---------------------------------------------------------------- EmbeddingBag
def test_embedding_bag_with_flat_ids_and_offsets_is_refused_with_advice():
    m = fxdp.privatize(nn.EmbeddingBag(10, 3, mode="sum"))
    ids, offsets = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([0, 2, 5, 6])
    with pytest.raises(fxdp.UncoveredParameterError, match="(?s)embedding_bag.*'weight'.*2-D"):
        m(ids, offsets).sum().backward()


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_with_2d_padded_ids_equals_reference(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(12, 4, mode=mode, padding_idx=0), nn.Linear(4, 3)).double()
    ids = torch.randint(1, 12, (6, 4))
    ids[1, 2:] = 0
    ids[4, 1:] = 0
    check_against_reference(model, (ids,), {}, torch.randint(0, 3, (6,)), sum_ce, loss_reduction="sum")


# ---------------------------------------------------------------- user hooks
def test_analysis_says_it_reruns_user_hooks_and_in_analysis_lets_them_skip():
    seen, guarded = [], []
    model = mlp()
    model[0].register_forward_pre_hook(lambda mod, a: seen.append(1))
    model[2].register_forward_hook(lambda mod, a, o: None if fxdp.in_analysis() else guarded.append(1))
    fxdp.privatize(model)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.warns(RuntimeWarning, match=r"ran the model's forward (\d+) more times.*hooks of 0, 2"):
        sum_ce(model(x), y).backward()
    assert len(guarded) == 1, "the guarded hook runs once per training forward"
    assert len(seen) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # same input structure: no new analysis, no warning
        sum_ce(model(x), y).backward()
    assert len(guarded) == 2


def test_no_warning_without_user_hooks():
    model = fxdp.privatize(mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sum_ce(model(torch.randn(4, 5, dtype=torch.float64)), torch.randint(0, 3, (4,))).backward()


# ---------------------------------------------------------------- privatizing inside a privatized model
def test_privatizing_a_submodule_of_a_privatized_model_names_the_ancestor():
    outer = nn.Sequential(nn.Sequential(nn.Linear(3, 4)), nn.Linear(4, 2))
    fxdp.privatize(outer)
    with pytest.raises(ValueError, match="submodule '0' of a model that is already privatized"):
        fxdp.privatize(outer[0])
    fxdp.unprivatize(outer)
    fxdp.privatize(outer[0])                 # allowed once the ancestor is unprivatized
    with pytest.raises(ValueError, match="already privatized"):
        fxdp.privatize(outer)

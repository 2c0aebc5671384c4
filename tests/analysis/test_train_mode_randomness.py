"""Forwards that draw randomness or update state in training mode, per sample, train exactly (no false
refusal): dropout drawn inside an attention call that uses a parameter (fxdp.analysis.drawn_dropout)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests.analysis.same_draws import check_same_draws


class RelativeBiasAttention(nn.Module):
    """T5-style: a learned relative position bias is the attn_mask of an sdpa call with dropout."""

    def __init__(self, d=8, heads=2, T=5, p=0.3):
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 3)
        self.bias = nn.Embedding(2 * T - 1, heads)
        pos = torch.arange(T)
        self.register_buffer("rel", pos[None, :] - pos[:, None] + T - 1)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias(self.rel).permute(2, 0, 1).unsqueeze(0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, d)).sum(1)


def _attention():
    torch.manual_seed(0)
    return RelativeBiasAttention().double().train()


X = torch.randn(6, 5, 8, dtype=torch.float64)
Y = torch.randint(0, 3, (6,))


def ce(out):
    return F.cross_entropy(out, Y, reduction="none")


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_parameter_inside_attention_with_dropout_equals_same_draw_reference(style):
    check_same_draws(_attention(), lambda m: m(X), ce, style=style)


def test_parameter_inside_attention_with_dropout_under_compile_is_refused_naming_the_cause():
    m = torch.compile(fxdp.privatize(_attention()), backend="fxdp", options={"compiler": "aot_eager"})
    with pytest.raises(fxdp.UncoveredParameterError, match=r"dropout_p=0.3 uses trainable parameter\(s\) bias.weight"
                       r".*eager fxdp.privatize"):
        m(X)


# ------------------------------------------------------------- spectral norm's power iteration (weights only)
def _spectral(kind):
    from torch.nn.utils import parametrizations, spectral_norm

    torch.manual_seed(0)
    sn = parametrizations.spectral_norm if kind == "parametrization" else spectral_norm
    return nn.Sequential(sn(nn.Linear(8, 6)), nn.Tanh(), sn(nn.Conv1d(5, 3, 3)), nn.Flatten(),
                         nn.Linear(12, 3)).double().train()


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_spectral_norm_in_train_mode_equals_reference_and_advances_u_v_once(kind):
    # u, v (buffers) are refined from the weights by a power iteration each training forward: allowed, and
    # once per forward (the analysis runs restore them); same_draws checks buffers equal one plain forward's
    x = torch.randn(6, 5, 8, dtype=torch.float64)
    check_same_draws(_spectral(kind), lambda m: m(x), ce, style="param-wise")


class SpectralAndTracker(nn.Module):
    """Spectral norm next to a buffer updated from the batch (an EMA of the inputs)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 3))
        self.register_buffer("mean", torch.zeros(8, dtype=torch.float64))

    def forward(self, x):
        with torch.no_grad():
            self.mean.mul_(0.9).add_(0.1 * x.mean((0, 1)))
        return self.fc(x).sum(1)


def test_buffer_updated_from_the_batch_next_to_spectral_norm_is_still_refused():
    torch.manual_seed(0)
    m = fxdp.privatize(SpectralAndTracker().double().train())
    with pytest.raises(fxdp.PrivacyError, match=r"buffer\(s\) mean were updated"):
        m(torch.randn(6, 5, 8, dtype=torch.float64))


# ------------------------------------------------------------- numpy's global RNG in the analysis runs
def test_batch_shuffled_by_numpy_permutation_is_still_refused():
    # the analysis seeds numpy per call from the call's arguments: a draw over the batch is a real shuffle
    import numpy as np

    class Shuffles(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x)
            return h[torch.from_numpy(np.random.permutation(h.shape[0]))]

    torch.manual_seed(0)
    m = fxdp.privatize(Shuffles().double())
    with pytest.raises((fxdp.SampleMixingError, fxdp.BatchLayoutError)):
        m(torch.randn(6, 8, dtype=torch.float64))


class PositionalDropoutAttention(nn.Module):
    """sdpa with its dropout rate given by position (``sdpa(q, k, v, None, p)``), no parameter inside the call."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, 3)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, None, 0.3 if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, d)).sum(1)


def test_attention_dropout_given_by_position_equals_same_draw_reference():
    # the analysis runs turn attention dropout off however the rate is given (was: keyword only, so the
    # positional rate drew masks in the analysis runs and the model was refused as mixing)
    torch.manual_seed(0)
    check_same_draws(PositionalDropoutAttention().double().train(), lambda m: m(X), ce)

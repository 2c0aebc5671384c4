"""End-to-end exactness of privatize on the core models, against the
one-sample-at-a-time reference (float64, R at the median per-sample norm)."""
import pytest
import torch

from tests import models_zoo as Z
from tests.reference import check_against_reference

STYLES = ["all-layer", "layer-wise", "param-wise", "block-wise"]
FNS = ["abadi", "automatic", "global"]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def _assert_exact(*a, **k):
    err, R, clipped = check_against_reference(*a, **k)
    if k.get("clipping_fn", "abadi") != "automatic":
        assert 0.0 < clipped < 1.0, "R must clip some samples and not others for the test to mean anything"
    return err


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_private_grad_equals_per_sample_reference(style, fn, reduction):
    model = Z.MLP()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    _assert_exact(model, (x,), {}, y, Z.ce_sum, style=style, clipping_fn=fn, loss_reduction=reduction)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fn", ["abadi", "automatic"])
def test_cnn_groupnorm_grouped_conv_equals_reference(style, fn):
    model = Z.CNN()
    x, y = torch.randn(5, 3, 9, 9), torch.randint(0, 4, (5,))
    _assert_exact(model, (x,), {}, y, Z.ce_sum, style=style, clipping_fn=fn)


def test_conv1d_conv3d_with_two_inputs_equal_reference():
    model = Z.Conv13()
    x1, x3, y = torch.randn(6, 2, 11), torch.randn(6, 1, 4, 5, 3), torch.randn(6, 1)
    _assert_exact(model, (x1, x3), {}, y, Z.mse_sum, style="layer-wise")


@pytest.mark.parametrize("style", STYLES)
def test_sequence_model_embedding_padding_layernorm_rmsnorm_equals_reference(style):
    model = Z.SeqModel()
    ids = torch.randint(0, 20, (6, 6))
    ids[:, -2:] = 0  # padding tokens
    y = torch.randint(0, 3, (6,))
    _assert_exact(model, (ids,), {}, y, Z.ce_sum, style=style)


@pytest.mark.parametrize("style", STYLES)
def test_raw_parameters_broadcast_and_functional_reuse_equal_reference(style):
    model = Z.RawParams()
    x, y = torch.randn(5, 4, 6), torch.randint(0, 2, (5,))
    _assert_exact(model, (x,), {}, y, Z.ce_sum, style=style)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fn", ["abadi", "global"])
def test_gpt2_tied_embeddings_equal_reference(style, fn):
    model = Z.gpt2()
    ids = torch.randint(0, 40, (5, 8))
    _assert_exact(model, (ids,), {}, ids, Z.lm_sum, style=style, clipping_fn=fn)


def test_gpt2_block_heads_equal_reference():
    model = Z.gpt2()
    ids = torch.randint(0, 40, (4, 8))
    _assert_exact(model, (ids,), {}, ids, Z.lm_sum, style="block-wise",
                  block_heads=["transformer.h.1", "transformer.ln_f"])


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
def test_bert_with_attention_mask_kwargs_equals_reference(style):
    model = Z.bert()
    ids = torch.randint(1, 30, (5, 7))
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    y = torch.randint(0, 3, (5,))
    _assert_exact(model, (), {"input_ids": ids, "attention_mask": mask}, y, Z.ce_sum, style=style)


def test_batch_equal_to_sequence_length_is_grouped_by_sample():
    """B == T must not confuse the batch layout (Opacus is silently wrong there)."""
    model = Z.SeqModel(T=5)
    ids = torch.randint(1, 20, (5, 5))
    y = torch.randint(0, 3, (5,))
    _assert_exact(model, (ids,), {}, y, Z.ce_sum, style="all-layer")

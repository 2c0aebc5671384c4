"""DeBERTa-v2 with relative (disentangled) attention, tiny config from scratch (random weights): the relative
position embeddings go through pos_dropout (p = 0) and batch-free key / query projections viewed as (H, S, dh)
and repeated to the B*H query rows (``.repeat(B*H // H, 1, 1)``) -- a broadcast of virtual parameters -- and the
model equals the one-sample-at-a-time reference (float64, R at the median norm), eager and compiled. With
hidden_dropout_prob > 0 pos_dropout is active on that parameter: refused, eager and compiled alike."""
import pytest
import torch
import torch.nn.functional as F

import fxdp
from tests.compile.helpers import check_compiled_against_reference
from tests.models.helpers import check_against_reference

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

B, T = 4, 7


def deberta_v2(hidden_dropout_prob=0.0):
    cfg = transformers.DebertaV2Config(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, relative_attention=True, position_buckets=4, max_relative_positions=8,
        pos_att_type=["p2c", "c2p"], hidden_dropout_prob=hidden_dropout_prob, attention_probs_dropout_prob=0.0,
        num_labels=3, type_vocab_size=0)
    torch.manual_seed(0)
    return transformers.DebertaV2ForSequenceClassification(cfg).double()


def sum_ce(out, y):
    return F.cross_entropy(out.logits, y, reduction="sum")


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(1, 40, (B, T), generator=g), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
def test_deberta_v2_relative_attention_equals_reference(style):
    ids, y = batch()
    r = check_against_reference(deberta_v2(), (ids,), {}, y, sum_ce, style=style, loss_reduction="sum")
    names = set(r["engine"].plan.group_of)
    assert {"deberta.encoder.rel_embeddings.weight",
            "deberta.encoder.layer.0.attention.self.pos_key_proj.weight"} <= names


def test_deberta_v2_relative_attention_equals_reference_compiled():
    # pos_dropout (p = 0) on the relative embeddings, a parameter: the identity, as in eager mode
    ids, y = batch()
    check_compiled_against_reference(deberta_v2(), (ids,), {}, y, sum_ce)


@pytest.mark.parametrize("compiled", [False, True])
def test_deberta_v2_with_active_pos_dropout_is_refused_naming_it(compiled):
    model = fxdp.privatize(deberta_v2(hidden_dropout_prob=0.1).train(), loss_reduction="sum")
    run = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}) if compiled else model
    ids, y = batch()
    with pytest.raises(fxdp.UncoveredParameterError, match=r"F.dropout with p=0.1 applied to "
                       r"deberta.encoder.rel_embeddings.weight directly, before it meets the batch"):
        sum_ce(run(ids), y).backward()
    assert all(getattr(p, "private_grad", None) is None for p in model.parameters())

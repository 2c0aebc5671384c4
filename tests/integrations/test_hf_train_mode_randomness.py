"""Real HuggingFace models in training mode, whose forwards draw randomness (dropout, time masks), train
exactly: private_grad equals the clipped sum of the per-sample gradients under the same draws
(tests/analysis/same_draws.py), and fxdp's analysis runs leave the user's RNG streams as they were."""
import pytest
import torch

import fxdp
from tests.analysis.same_draws import check_same_draws

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()


def test_t5_with_attention_dropout_in_train_mode_equals_same_draw_reference():
    # sdpa(..., attn_mask=relative position bias, dropout_p=0.1): the bias is a virtual parameter inside an
    # attention call that draws its own dropout mask (was refused: "behaves differently from one forward
    # pass to the next")
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).double().train()
    ids, labels = torch.randint(1, 100, (4, 10)), torch.randint(1, 100, (4, 6))
    check_same_draws(model, lambda m: m(input_ids=ids, labels=labels),
                     lambda out: fxdp.per_sample_loss(out.logits, labels, reduction="none"))

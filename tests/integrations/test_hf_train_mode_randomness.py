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


def _wav2vec2(**kw):
    cfg = transformers.Wav2Vec2Config(
        vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, mask_time_prob=0.3, mask_time_length=2,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, do_stable_layer_norm=True, feat_extract_norm="layer", **kw)
    torch.manual_seed(0)
    return transformers.Wav2Vec2ForCTC(cfg).double().train()


@pytest.mark.parametrize("feature_masks", [False, True])
def test_wav2vec2_time_masks_from_numpy_in_train_mode_equal_same_draw_reference(feature_masks):
    # SpecAugment draws its masks with np.random, one sample after the other, and writes masked_spec_embed
    # (a parameter) into the masked steps (was refused: "reordering the samples does not reorder this tensor",
    # then the assignment's IndexPutBackward0 bypassing the taps)
    model = _wav2vec2(mask_feature_prob=0.3 if feature_masks else 0.0, mask_feature_length=2)
    x = torch.randn(5, 400, dtype=torch.float64)
    frames = model(x).logits.shape[1]
    y = torch.randint(0, 12, (5, frames), generator=torch.Generator().manual_seed(1))
    check_same_draws(model, lambda m: m(x),
                     lambda out: torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), y,
                                                                   reduction="none").mean(1))

"""Small models shared by the core tests (float64, no dropout)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    """Conv2d with groups, dilation, string padding; GroupNorm; Conv1d/3d branches."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding="same")
        self.gn = nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, dilation=1)
        self.conv3 = nn.Conv2d(8, 6, 2, dilation=2, padding="valid", bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.gn(self.conv1(x)))
        h = F.relu(self.conv2(h))
        h = self.conv3(h)
        return self.head(h.mean((2, 3)))


class Conv13(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2)
        self.c3 = nn.Conv3d(1, 2, (2, 3, 2), padding=(1, 0, 1), groups=1)
        self.out = nn.Linear(4 + 2, 1)

    def forward(self, x1, x3):
        a = self.c1(x1).mean(-1)
        b = self.c3(x3).mean((2, 3, 4))
        return self.out(torch.cat([a, b], 1))


class SeqModel(nn.Module):
    """Embedding (padding_idx) + position embedding + LayerNorm + Linear head."""

    def __init__(self, vocab=20, d=8, T=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(T, d)
        self.ln = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = self.ln(self.emb(ids) + self.pos(pos))
        h = self.rms(torch.relu(self.fc(h)) + h)
        return self.head(h.mean(1))


class RawParams(nn.Module):
    """Parameters used raw: cls token expanded over the batch, position table
    added by broadcast, layer-scale gamma, a hand-written RMSNorm weight, and a
    weight reused functionally besides its module call."""

    def __init__(self, d=6, T=4):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, T + 1, d))
        self.gamma = nn.Parameter(torch.randn(d))
        self.norm_w = nn.Parameter(torch.rand(d) + 0.5)
        self.fc1 = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        B = x.shape[0]
        h = torch.cat([self.cls.expand(B, -1, -1), x], 1) + self.pos
        h = h + self.gamma * torch.tanh(self.fc1(h))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_w
        h = h + F.linear(h, self.fc1.weight)
        return self.head(h[:, 0])


def gpt2(n_layer=2, d=16, vocab=40, T=16):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = GPT2Config(n_layer=n_layer, n_embd=d, n_head=2, vocab_size=vocab, n_positions=T,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double()


def bert(classes=3):
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=classes,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).double()


def llama(n_layer=2):
    """Llama (RMSNorm, rotary, grouped-query attention) from config, torch seed 0."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=n_layer,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


def peft_llama(kind: str):
    """A one-layer :func:`llama` with PEFT ``"ia3"`` or ``"dora"`` adapters, the trainable ones moved off
    their (identity / zero) initialisation so that every adapter has a gradient. Needs ``peft``."""
    import peft
    if kind == "ia3":
        conf = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        conf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               use_dora=True)
    model = peft.get_peft_model(llama(n_layer=1), conf)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def swin():
    """Swin from config (torch seed 0) with random relative position bias tables (a virtual parameter: the
    table gathered with a fixed index); 3 classes, 3x8x8 images."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    cfg = transformers.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1],
                                  num_heads=[2, 2], window_size=2, mlp_ratio=1.0, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(cfg).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_()
    return model


class ClipScore(nn.Module):
    """Per-sample CLIP score of each image with its own caption, scaled by logit_scale.exp() (a virtual
    parameter); inputs: token ids (B, T < 16, vocab 40) and 3x8x8 images."""

    def __init__(self):
        super().__init__()
        import transformers
        transformers.utils.logging.set_verbosity_error()
        cfg = transformers.CLIPConfig(
            text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=16, projection_dim=8),
            vision_config=dict(image_size=8, patch_size=4, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=1, num_attention_heads=2, projection_dim=8), projection_dim=8)
        self.clip = transformers.CLIPModel(cfg)

    def forward(self, ids, pixels):
        t = self.clip.get_text_features(input_ids=ids).pooler_output
        i = self.clip.get_image_features(pixel_values=pixels).pooler_output
        t, i = t / t.norm(dim=-1, keepdim=True), i / i.norm(dim=-1, keepdim=True)
        return (t * i).sum(-1) * self.clip.logit_scale.exp()


def ce_sum(out, y):
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits, y, reduction="sum")


def lm_sum(out, ids):
    """Sum over samples of each sample's mean next-token loss."""
    logits = (out.logits if hasattr(out, "logits") else out)[:, :-1]
    tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return tok.view(ids.shape[0], -1).mean(1).sum()


def mse_sum(out, y):
    return (out - y).pow(2).sum()


# --------------------------------------------------------------- forwards that would break the guarantee
# (shared by the eager and the compiled refusal tests: each must be refused, never trained)
class MinMaxScaled(nn.Module):
    """Min-max scaling over the whole batch: 2.6 R, missed by the probe unless sample 0 held the extreme."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc((x - x.min()) / (x.max() - x.min()))


class MixesLargeBatches(nn.Module):
    """Mixes only in batches larger than the analysis's 3 probed samples."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] > 3:
            x = x - x.mean(0)
        return self.fc(x)


class LateMixup(nn.Module):
    """Mixup inside the model, switched on (``model.mixup = True``) after the analysed forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.mixup = False

    def forward(self, x):
        return self.fc(0.7 * x + 0.3 * x.roll(1, 0) if self.mixup else x)


class MatmulFunction(torch.autograd.Function):
    """``x @ w.t()`` as a custom autograd.Function: the parameter's gradient bypasses every tap."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return MatmulFunction.apply(torch.tanh(self.fc(x)), self.w)


class CachedView(nn.Module):
    """A view of a weight made once at ``__init__`` (build in the dtype to train in: ``.double()``
    afterwards would replace the weight and leave the view on the old one)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.fc = nn.Linear(6, 3).to(dtype)
        self.wt = self.fc.weight.t()

    def forward(self, x):
        return x @ self.wt + self.fc.bias

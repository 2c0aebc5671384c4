"""Virtual parameters (u = f(theta) before it meets the batch) under torch.compile(backend="fxdp") are exact:
against the one-sample-at-a-time reference (float64, R at the median norm), for rule-level models (views,
transposes, slices, casts, a parameter used directly and through virtuals, exp of a scalar, gathers from a
table with a fixed index, weight_norm / orthogonal parametrizations, a conv of a parameter) and for real
models built from config (T5, Swin, CLIP, nanoGPT, Llama + PEFT IA3 / DoRA). The compiled region replays each
batch-free node into the same VirtualParam records eager mode makes (fxdp.compile.virtual_taps)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z
from tests.compile.helpers import check_compiled_against_reference
from tests.rules.test_virtual import Elementwise, Gathers, Views, seq
from tests.models.test_virtual_models import ClipScore

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

B = 6


def sum_ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def labels(n=B, classes=3):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("style", ["all-layer", "param-wise"])
def test_views_casts_slices_and_direct_use_are_exact_compiled(style):
    torch.manual_seed(0)
    m = check_compiled_against_reference(Views().double(), (seq(),), {}, labels(), sum_ce, style=style,
                                         fullgraph=True)
    assert p_grad_none(m)


def p_grad_none(model):
    return all(p.grad is None for p in model.parameters())


def test_gathers_from_tables_with_fixed_indices_are_exact_compiled():
    torch.manual_seed(0)
    check_compiled_against_reference(Gathers().double(), (seq(d=4),), {}, labels(), sum_ce, style="block-wise",
                                     fullgraph=True)


def test_elementwise_functions_and_multi_output_transforms_are_exact_compiled():
    """exp of a scalar, sigmoid of a vector, torch.unbind(W)[0] (several virtual outputs of one node)."""
    torch.manual_seed(0)
    check_compiled_against_reference(Elementwise().double(), (seq(),), {}, labels(), sum_ce, fullgraph=True)


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_weight_norm_and_orthogonal_parametrizations_are_exact_compiled(compiler):
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 6)), nn.Tanh(),
                          nn.utils.parametrizations.orthogonal(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(B, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_compiled_against_reference(model, (x,), {}, labels(), sum_ce, style="layer-wise", compiler=compiler,
                                     rtol=1e-6)


class NormedAttention(nn.Module):
    """nn.MultiheadAttention whose out_proj is weight-normed: a virtual weight fed to the attention."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        nn.utils.parametrizations.weight_norm(self.mha.out_proj)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


def test_weight_normed_attention_projection_is_exact_compiled():
    torch.manual_seed(0)
    x = torch.randn(B, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    check_compiled_against_reference(NormedAttention().double(), (x,), {}, labels(), sum_ce, fullgraph=True)


class ParamImage(nn.Module):
    """A conv weight used on the batch and on a parameter (a virtual: cross terms with the direct use)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 2, 5, 5))
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return (self.conv(x) + self.conv(self.table)).flatten(1)[:, :3]


def test_conv_weight_used_on_a_parameter_and_on_the_batch_is_exact_compiled():
    torch.manual_seed(0)
    x = torch.randn(B, 2, 5, 5, dtype=torch.float64)
    check_compiled_against_reference(ParamImage().double(), (x,), {}, labels(), sum_ce, fullgraph=True)


# ---------------------------------------------------------------- real models built from config
class NanoGPT(nn.Module):
    """nanoGPT's blocks: wpe(arange(T)) with no batch dimension, causal attention, head tied as x @ wte.weight.t()."""

    def __init__(self, vocab=30, d=16, T=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, idx):
        Bx, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).view(Bx, T, 3, 2, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bx, T, -1)
        x = x + self.proj(a)
        x = x + self.fc(F.gelu(self.ln2(x)))
        return x @ self.wte.weight.t()


def lm_sum(out, y):
    return fxdp.per_sample_loss(getattr(out, "logits", out), y, shift=True, reduction="sum")


def test_nanogpt_positions_and_tied_head_are_exact_compiled():
    torch.manual_seed(0)
    ids = torch.randint(0, 30, (4, 7))
    check_compiled_against_reference(NanoGPT().double(), (ids,), {}, ids, lm_sum, style="param-wise",
                                     fullgraph=True)


@pytest.mark.slow  # ~7 s; a table gathered with a batch-free index by default: Gathers and Swin
def test_t5_trainable_relative_attention_bias_is_exact_compiled():
    cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg).double()
    ids = torch.randint(1, 40, (4, 5))
    target = torch.randint(1, 40, (4, 5))
    m = check_compiled_against_reference(model, (), {"input_ids": ids, "labels": target}, target,
                                         lambda o, y: fxdp.per_sample_loss(o.logits, y, reduction="sum"))
    assert any("relative_attention_bias" in n for n in fxdp.get_engine(m).plan.group_of)


def test_swin_relative_position_bias_table_is_exact_compiled():
    model = Z.swin()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    check_compiled_against_reference(model, (x,), {}, labels(4), lambda o, t: sum_ce(o.logits, t),
                                     style="block-wise")


def test_clip_logit_scale_is_exact_compiled():
    torch.manual_seed(0)
    ids, px = torch.randint(1, 40, (4, 6)), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    check_compiled_against_reference(ClipScore().double(), (ids, px), {}, y, lambda o, t: ((o - t) ** 2).sum(),
                                     style="layer-wise")


def peft_llama(kind):
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg).double()
    if kind == "ia3":
        conf = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    else:
        conf = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                               use_dora=True)
    model = peft.get_peft_model(base, conf)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kind", ["ia3", pytest.param("dora", marks=pytest.mark.slow)])  # DoRA: ~10 graph breaks
def test_llama_with_peft_ia3_or_dora_is_exact_compiled(kind):
    """DoRA: dynamo breaks the graph inside PEFT's DoRA forward right after the batch-free
    ``lora_B(lora_A(eye))``; that virtual parameter is returned detached (PEFT only uses it detached)."""
    ids = torch.randint(1, 40, (4, 6), generator=torch.Generator().manual_seed(1))
    check_compiled_against_reference(peft_llama(kind), (), {"input_ids": ids}, ids, lm_sum)


class BreakAfterTransform(nn.Module):
    """A virtual parameter (W.t()) made before a graph break and used on the batch after it."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        u = self.W.t()
        torch._dynamo.graph_break()
        return x @ u


def test_virtual_parameter_used_across_a_graph_break_is_refused():
    """Handed on detached at the break, so the use after it is not tapped: the forward is refused when it ends
    (fewer tapped uses than the analysis found), never trained with W's gradient unclipped or missing."""
    model = fxdp.privatize(BreakAfterTransform().double())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.raises(Exception, match="(?s)analysis found 2 parameter uses.*tapped 1"):
        compiled(x)
    assert model.W.grad is None and getattr(model.W, "private_grad", None) is None


@pytest.mark.parametrize("model_cls,d,dynamic", [(Views, 5, None), (Gathers, 4, True)])
def test_virtual_parameters_stay_exact_when_batch_size_and_length_vary(model_cls, d, dynamic):
    """Symbolic sizes (``pos[:, :T]`` with a dynamic T, SymFloat arguments under dynamic=True) reach the
    run-time replay of the batch-free nodes; the graph compiled once serves the later shapes."""
    import copy
    from tests.compile.models import assert_same_private_grads
    torch.manual_seed(0)
    base = model_cls().double()
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.5)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}, dynamic=dynamic)
    for B, T in [(6, 4), (4, 3), (3, 2)]:  # the second shape recompiles with dynamic sizes, the third reuses it
        T = T if model_cls is Views else 4  # Gathers' relative-position index is built for T = 4
        x, y = torch.randn(B, T, d, dtype=torch.float64), labels(B)
        eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.5)
        sum_ce(eager(x), y).backward()
        for p in model.parameters():
            p.private_grad = None
        sum_ce(compiled(x), y).backward()
        assert_same_private_grads(model, eager)


def test_a_graph_reused_for_another_instance_replays_that_instances_virtual_parameters():
    """Dynamo reuses the graph compiled for the first model for a second one of the class: the batch-free
    nodes are replayed on the second model's parameters (found at run time), never the first one's."""
    import copy
    from tests.compile.models import assert_same_private_grads
    x, y = seq(d=4), labels()
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = Gathers().double()
        eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3)
        sum_ce(eager(x), y).backward()
        model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.3)
        sum_ce(torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})(x), y).backward()
        assert_same_private_grads(model, eager)

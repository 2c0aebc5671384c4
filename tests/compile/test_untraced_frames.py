"""A root forward that dynamo does not trace -- ``torch.compiler.disable``'d, or its frame past
``torch._dynamo.config.recompile_limit`` (HuggingFace's shared forward wrapper reaches it after about a dozen
model classes in one process) -- trains exactly through the eager fallback: the whole forward runs under the
eager interceptor (the root island, :mod:`fxdp.compile.islands`). Before, only submodules owning parameters
were tapped: T5's relative attention bias and Swin's relative position bias, made in one submodule and meeting
the batch in another, were refused (63 / 49 uses), so was BERT with reentrant checkpointing (22 / 6), and a
non-reentrant checkpointed block (GPT-2, Llama) was refused in backward because its recomputation saw calls
its forward had not (``layer_norm`` vs ``Tensor.split``)."""
import copy
import functools
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z
from tests.compile.models import assert_same_private_grads

COMPILE = {"backend": "fxdp", "options": {"compiler": "aot_eager"}}


def untraced_root(model):
    """``model`` as an instance of a fresh subclass whose forward dynamo never traces."""
    cls = type(model)
    model.__class__ = type(f"{cls.__name__}Untraced", (cls,), {"forward": torch.compiler.disable(cls.forward)})
    return model


def compiled_equals_eager(base, loss, args=(), kwargs=None, R=0.05):
    kwargs = kwargs or {}
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=R, loss_reduction="sum")
    loss(eager(*args, **kwargs)).backward()
    model = fxdp.privatize(untraced_root(copy.deepcopy(base)), max_grad_norm=R, loss_reduction="sum")
    loss(torch.compile(model, **COMPILE)(*args, **kwargs)).backward()
    assert_same_private_grads(model, eager)


def _ids(B=3, T=6, vocab=30, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_swin_relative_position_bias_in_an_untraced_forward_equals_eager():
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    compiled_equals_eager(Z.swin(), lambda out: Z.ce_sum(out, y), (x,))


def test_t5_relative_attention_bias_in_an_untraced_forward_equals_eager():
    import transformers
    cfg = transformers.T5Config(vocab_size=30, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration(cfg).double()
    x, y = _ids(T=6), _ids(T=4, seed=1)
    compiled_equals_eager(base, lambda out: fxdp.per_sample_loss(out.logits, y, reduction="sum"),
                          kwargs={"input_ids": x, "decoder_input_ids": y})


@pytest.mark.parametrize("name, reentrant", [("bert", True), ("gpt2", False), ("llama", False)])
def test_hf_gradient_checkpointing_in_an_untraced_forward_equals_eager(name, reentrant):
    torch.manual_seed(0)
    base = {"bert": Z.bert, "gpt2": Z.gpt2, "llama": Z.llama}[name]()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = _ids(vocab=30)
    if name == "bert":
        y = torch.tensor([0, 1, 2])
        compiled_equals_eager(base, lambda out: Z.ce_sum(out, y), (ids,))
    else:
        compiled_equals_eager(base, lambda out: Z.lm_sum(out, ids), (ids,))


# ------------------------------------------------------- the recompile limit, forced on a wrapper of our own
def shared_wrapper(tag):
    """A decorator like HuggingFace's ``can_return_tuple``: every forward it wraps runs the same ``wrapper``
    code, whose dynamo cache fills up across model classes (the code is fresh per ``tag``: tests share a
    process, and dynamo's cache is per code object)."""
    def template(func):
        def wrapper(self, *args, **kwargs):
            return func(self, *args, **kwargs)
        return wrapper
    code = template(None).__code__.replace(co_name=f"wrapper_{tag}")

    def decorate(fn):
        closure = template(fn).__closure__
        return functools.wraps(fn)(types.FunctionType(code, fn.__globals__, code.co_name, None, closure))
    return decorate


class RelativeBias(nn.Module):
    """T5-like: a (2T-1, heads) table gathered with a batch-free index -- a virtual parameter that meets the
    batch in the attention, outside this module."""

    def __init__(self, heads=2, T=5):
        super().__init__()
        self.table = nn.Embedding(2 * T - 1, heads)
        pos = torch.arange(T)
        self.register_buffer("index", pos[None, :] - pos[:, None] + T - 1)

    def forward(self):
        return self.table(self.index).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """No parameters of its own: before, no island covered the scores, the bias, softmax or the output."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.qkv, self.o, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, h, bias):
        B, T, d = h.shape
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(h).split(d, dim=2))
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.ln, self.attn, self.fc = nn.LayerNorm(d), Attention(d), nn.Linear(d, d)

    def forward(self, h, bias):
        h = h + self.attn(self.ln(h), bias)
        return h + torch.tanh(self.fc(h)).split(4, dim=2)[0].repeat(1, 1, 2)


class Encoder(nn.Module):
    """The relative bias made once and used by both blocks; the second block checkpointed (non-reentrant)."""

    def __init__(self, d=8, root_scale=False):
        super().__init__()
        self.inp, self.rel = nn.Linear(4, d), RelativeBias()
        self.blocks, self.head = nn.ModuleList([Block(d), Block(d)]), nn.Linear(d, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4)) if root_scale else None

    def forward(self, x):
        if self.scale is not None:
            x = x * self.scale  # a parameter of the root used in its own code, before any submodule runs
        h, bias = self.inp(x), self.rel()
        h = self.blocks[0](h, bias)
        h = torch.utils.checkpoint.checkpoint(self.blocks[1], h, bias, use_reentrant=False)
        return self.head(h.mean(1))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.mean(1))


def _past_the_limit(tag, root_scale=False):
    """An :class:`Encoder` whose forward frame dynamo gives up on: another class's forward, compiled first
    through the same wrapper, holds its only cache entry (``recompile_limit = 1``)."""
    wrap = shared_wrapper(tag)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    torch.compile(type("Tiny" + tag, (Tiny,), {"forward": wrap(Tiny.forward)})(), backend="eager")(x.float())
    torch.manual_seed(0)
    return type("Encoder" + tag, (Encoder,), {"forward": wrap(Encoder.forward)})(root_scale=root_scale).double(), x


def test_a_forward_past_the_recompile_limit_equals_eager():
    y = torch.tensor([0, 1, 2])
    with torch._dynamo.config.patch(recompile_limit=1):
        base, x = _past_the_limit("exact")
        eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.05, loss_reduction="sum")
        F.cross_entropy(eager(x), y, reduction="sum").backward()
        model = fxdp.privatize(base, max_grad_norm=0.05, loss_reduction="sum")
        F.cross_entropy(torch.compile(model, **COMPILE)(x), y, reduction="sum").backward()
    assert_same_private_grads(model, eager)


def test_a_root_parameter_used_before_any_submodule_past_the_recompile_limit_equals_eager():
    """The root island opens when the forward starts if the root's forward frame is past the limit: a use in
    the root's own code before any submodule is tapped (it was not seen, and refused)."""
    y = torch.tensor([0, 1, 2])
    with torch._dynamo.config.patch(recompile_limit=1):
        base, x = _past_the_limit("root_scale", root_scale=True)
        eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.05, loss_reduction="sum")
        F.cross_entropy(eager(x), y, reduction="sum").backward()
        model = fxdp.privatize(base, max_grad_norm=0.05, loss_reduction="sum")
        F.cross_entropy(torch.compile(model, **COMPILE)(x), y, reduction="sum").backward()
    assert_same_private_grads(model, eager)


class MixupFirst(nn.Module):
    """Mixup with the reversed batch in the root's own code, before any submodule (a review: 2.74 R when the
    root frame was past the recompile limit, because the root island opened at the first submodule)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        if x.shape[0] > 5:
            x = 0.5 * x + 0.5 * x.flip(0)
        return self.head(torch.tanh(self.fc(x)))


def test_mixing_in_the_root_code_past_the_recompile_limit_is_refused():
    with torch._dynamo.config.patch(recompile_limit=1):
        model = fxdp.privatize(MixupFirst().double(), max_grad_norm=1.0)
        compiled = torch.compile(model, backend="fxdp", dynamic=False, options={"compiler": "eager"})
        compiled(torch.randn(5, 4, dtype=torch.float64)).sum().backward()  # the one cache entry: B = 5
        with pytest.raises(fxdp.SampleMixingError, match="flip along dim 0"):
            compiled(torch.randn(8, 4, dtype=torch.float64)).sum().backward()

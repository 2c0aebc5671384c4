"""How people call torch.compile (the README's table): each pattern trains exactly or is refused with an
fxdp error that says what happened."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxdp
from fxdp.core.errors import PrivacyError
from tests import models_zoo as Z
from tests.compile.models import assert_same_private_grads
from tests.training.stack_helpers import make_loader


class ModeMLP(nn.Module):
    """MLPs with forward code objects of their own: dynamo's cache, and its recompile limit (8), is per code
    object, and every pattern below compiles anew."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class GraphMLP(ModeMLP):
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _exact(make, cls, R=0.05):
    torch.manual_seed(30)
    base = cls().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=R)
    Z.ce_sum(eager(x), y).backward()
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=R)
    Z.ce_sum(make(model)(x), y).backward()
    assert_same_private_grads(model, eager, rtol=1e-9)


@pytest.mark.slow  # ~20 s cold (inductor); the default run checks the same chain in the two tests below
def test_torch_compile_mode_applies_to_inductor():
    _exact(lambda m: torch.compile(m, backend="fxdp", mode="reduce-overhead"), ModeMLP)


class ModeSpyMLP(ModeMLP):
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_torch_compile_mode_reaches_the_inner_compiler(monkeypatch):
    """torch.compile's ``mode`` reaches fxdp's inner compiler with the default (inductor) compiler. The
    region then runs under aot_eager: building inductor's settings for every mode is checked below, and
    compiling with them by the inductor tests (on CPU, CUDA graphs off, reduce-overhead's are the default's)."""
    from fxdp.compile import backend
    real, asked = backend._inner_compiler, []

    def spy(name, mode, example_inputs):
        asked.append((name, mode))
        real(name, mode, example_inputs)  # the mode's checks and settings, as for the real compile
        return real("aot_eager", None, example_inputs)

    monkeypatch.setattr(backend, "_inner_compiler", spy)
    _exact(lambda m: torch.compile(m, backend="fxdp", mode="reduce-overhead"), ModeSpyMLP)
    assert asked and set(asked) == {("inductor", "reduce-overhead")}


def test_every_mode_has_inductor_settings_without_cuda_graphs():
    from fxdp.compile.backend import MODES, _inner_compiler
    for mode in MODES:  # builds the inner compiler (settings checked), compiles nothing
        assert callable(_inner_compiler("inductor", mode, []))
    with pytest.raises(ValueError, match="unknown mode"):
        _inner_compiler("inductor", "fastest", [])


@pytest.mark.parametrize("dynamic", [True, False, None])
def test_dynamic_flag(dynamic):
    _exact(lambda m: torch.compile(m, backend="fxdp", dynamic=dynamic, options={"compiler": "aot_eager"}), ModeMLP)


def test_fullgraph_compile():
    _exact(lambda m: torch.compile(m, backend="fxdp", fullgraph=True, options={"compiler": "aot_eager"}), GraphMLP)


def test_module_compile_in_place():
    """``model.compile()`` compiles ``_call_impl``, hooks included: dynamo traces fxdp's forward pre-hook
    (and the eager analysis it runs), breaking the graph there; still exact. (~10-15 s on 2 CPU cores, nearly
    all of it dynamo tracing the analysis; partly paid by whichever test of the process first has the hooks
    traced, e.g. test_exactness's compiled step function.)"""
    def in_place(m):
        m.compile(backend="fxdp", options={"compiler": "aot_eager"})
        return m
    _exact(in_place, GraphMLP)


def test_mode_with_a_non_inductor_compiler_is_refused():
    from fxdp.compile.backend import fxdp_backend
    with pytest.raises(ValueError, match="tunes inductor"):
        fxdp_backend(None, [], {"compiler": "aot_eager"}, mode="max-autotune")


class Checkpointed(nn.Module):
    def __init__(self, checkpointed=True):
        super().__init__()
        self.a, self.b, self.checkpointed = nn.Linear(6, 8), nn.Linear(8, 3), checkpointed

    def forward(self, x):
        def body(z):
            return torch.tanh(self.a(z))
        reentrant = getattr(self, "reentrant", False)
        h = torch.utils.checkpoint.checkpoint(body, x, use_reentrant=reentrant) if self.checkpointed else body(x)
        return self.b(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_inlined_under_compile_and_exact(reentrant):
    """Both flavours reach the region as a checkpoint body, which is inlined and tapped like the rest (exact;
    the activations are kept, warned); the eager analysis of the input structure sees through checkpoints."""
    torch.manual_seed(31)
    base = Checkpointed().double()
    base.reentrant = reentrant
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    eager = fxdp.privatize(Checkpointed(checkpointed=False).double(), max_grad_norm=0.1)
    eager.load_state_dict(base.state_dict())
    Z.ce_sum(eager(x), y).backward()
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    with pytest.warns(UserWarning, match="inlined"):
        Z.ce_sum(torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})(x), y).backward()
    assert_same_private_grads(model, eager)


@pytest.mark.parametrize("reentrant", [  # False: HF's default; both flavours by default on the small model above
    False, pytest.param(True, marks=pytest.mark.slow)])
def test_huggingface_gradient_checkpointing(reentrant):
    torch.manual_seed(32)
    base = Z.gpt2(n_layer=1)  # HF checkpoints each block alike: one shows the pattern
    ids = torch.randint(0, 40, (4, 8))
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    Z.lm_sum(eager(ids), ids).backward()
    ck = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model = fxdp.privatize(ck.train(), max_grad_norm=0.1)
    with pytest.warns(UserWarning, match="inlined"):
        Z.lm_sum(torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})(ids), ids).backward()
    assert_same_private_grads(model, eager)


def test_lora_under_compile():
    """PEFT LoRA: frozen base weights, trainable adapters (the same peft layers as on a transformer)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(33)
    peft_model = get_peft_model(GraphMLP().double(), LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    eager = fxdp.privatize(copy.deepcopy(peft_model), max_grad_norm=0.01)
    Z.ce_sum(eager(x), y).backward()
    model = fxdp.privatize(copy.deepcopy(peft_model), max_grad_norm=0.01)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    Z.ce_sum(compiled(x), y).backward()
    assert sum(p.requires_grad for p in model.parameters()) == 4
    assert_same_private_grads(model, eager)


def test_fp16_autocast_with_grad_scaler():
    torch.manual_seed(34)
    base, x, y, loss_fn = GraphMLP(), torch.randn(5, 6), torch.randint(0, 3, (5,)), Z.ce_sum
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    loss_fn(eager(x), y).backward()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1, grad_scaler=scaler)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})
    with torch.autocast("cpu", dtype=torch.float16):
        out = compiled(x)
    scaler.scale(loss_fn(out.float(), y)).backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert p.private_grad.dtype == torch.float32
        torch.testing.assert_close(p.private_grad, q.private_grad, rtol=0.05, atol=5e-3, msg=name)


class OwnMLP(nn.Module):
    """A forward code object of its own: dynamo's cache (and its recompile limit) is per code object."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class OtherMLP(OwnMLP):
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class GivenUpLinear(nn.Linear):
    """nn.Linear with a forward code object of its own. Past the recompile limit dynamo runs the frame's callees
    "run only": a callee with a cached graph whose guards pass runs that graph. nn.Linear.forward is shared by
    every Linear of the process, so graphs other tests compiled for it could run here; this code has none."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class GivenUpMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = GivenUpLinear(6, 8), GivenUpLinear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_a_frame_dynamo_gives_up_on_trains_exactly_through_eager_taps():
    """Past dynamo's recompile limit the forward runs uncompiled: its submodules fall back to eager taps. The
    limit is set for this test only, and every frame it runs has code of its own: what other tests compiled
    in this process cannot change which frames are given up."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    torch.manual_seed(36)
    base = GivenUpMLP().double()
    eager = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    compiled = torch.compile(model, backend="fxdp", dynamic=False, options={"compiler": "eager"})
    with torch._dynamo.config.patch(recompile_limit=1):
        for B in (3, 4):
            x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
            Z.ce_sum(eager(x), y).backward()
            Z.ce_sum(compiled(x), y).backward()
    assert len(_debug_get_cache_entry_list(GivenUpMLP.forward.__code__)) == 1  # B = 3 compiled, B = 4 given up
    assert not _debug_get_cache_entry_list(GivenUpLinear.forward.__code__)
    assert_same_private_grads(model, eager)


def test_poisson_training_recompiles_a_bounded_number_of_times():
    """50 steps of make_private training with a compiled model: batch sizes vary (0 and 1 included)."""
    torch.manual_seed(35)
    model = OtherMLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = fxdp.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=make_loader(n=40, batch_size=4),
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    compiles = []

    def counting(gm, inputs):
        compiles.append(1)
        from fxdp.compile.backend import fxdp_backend
        return fxdp_backend(gm, inputs, {"compiler": "aot_eager"})

    compiled = torch.compile(model, backend=counting)
    sizes, steps = set(), 0
    while steps < 50:
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(compiled(x), y).backward()
            opt.step()
            sizes.add(len(x))
            steps += 1
            if steps == 50:
                break
    assert len(sizes) >= 4 and {0, 1} & sizes
    assert len(compiles) <= 4  # static first size, one dynamic-B graph, B = 1 and B = 0 (specialised)
    assert sum(n for _, _, n in engine.accountant.history) == 50

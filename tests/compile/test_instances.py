"""Many privatized models compiled in one process, with no dynamo cache reset: dynamo reuses a
graph for every instance of a class, and each run must feed the engine of the model it ran for."""
import copy
import gc

import torch

import fxdp
from tests.compile.models import assert_same_private_grads, case


def _compiled(model):
    return torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"})


def _step(model, args, target, loss_fn):
    loss_fn(model(*args), target).backward()


def _eager_twin(base, **kw):
    return fxdp.privatize(copy.deepcopy(base), **kw)


def test_same_class_different_styles_and_thresholds_interleaved():
    torch.manual_seed(10)
    base, args, target, loss_fn, _ = case("seq", B=6)
    configs = [dict(style="all-layer", max_grad_norm=0.3), dict(style="layer-wise", max_grad_norm=0.05),
               dict(style="param-wise", max_grad_norm=1.0, clipping_fn="automatic")]
    pairs = []
    for kw in configs:
        model = fxdp.privatize(copy.deepcopy(base), **kw)
        pairs.append((model, _compiled(model), _eager_twin(base, **kw)))
    for _ in range(2):  # interleaved: every graph runs for every model, in turn
        for model, compiled, eager in pairs:
            _step(compiled, args, target, loss_fn)
            _step(eager, args, target, loss_fn)
    for model, _, eager in pairs:
        assert_same_private_grads(model, eager)
    # different thresholds really gave different sums: no model was fed another's engine
    g = [float(m.head.weight.private_grad.norm()) for m, _, _ in pairs]
    assert len({round(x, 8) for x in g}) == 3


def test_a_step_of_one_model_leaves_the_other_untouched():
    torch.manual_seed(11)
    base, args, target, loss_fn, _ = case("mlp")
    a = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    b = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.1)
    ca, cb = _compiled(a), _compiled(b)
    _step(ca, args, target, loss_fn)
    before = {n: p.private_grad.clone() for n, p in a.named_parameters()}
    _step(cb, args, target, loss_fn)
    for n, p in a.named_parameters():
        assert torch.equal(p.private_grad, before[n]), n
    eager = _eager_twin(base, max_grad_norm=0.1)
    _step(eager, args, target, loss_fn)
    assert_same_private_grads(b, eager)


def test_different_classes_in_one_process():
    torch.manual_seed(12)
    for name in ("mlp", "cnn", "raw", "mlp"):
        base, args, target, loss_fn, kw = case(name)
        model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.05, **kw)
        _step(_compiled(model), args, target, loss_fn)
        eager = _eager_twin(base, max_grad_norm=0.05, **kw)
        _step(eager, args, target, loss_fn)
        assert_same_private_grads(model, eager)


def test_model_deleted_then_rebuilt():
    torch.manual_seed(13)
    base, args, target, loss_fn, _ = case("mlp")
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.2)
    _step(_compiled(model), args, target, loss_fn)
    del model
    gc.collect()
    model = fxdp.privatize(copy.deepcopy(base), style="layer-wise", max_grad_norm=0.2)
    _step(_compiled(model), args, target, loss_fn)
    eager = _eager_twin(base, style="layer-wise", max_grad_norm=0.2)
    _step(eager, args, target, loss_fn)
    assert_same_private_grads(model, eager)


def test_deepcopy_of_a_compiled_privatized_model():
    torch.manual_seed(14)
    base, args, target, loss_fn, _ = case("seq")
    model = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.2)
    _step(_compiled(model), args, target, loss_fn)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.private_grad = None
    _step(_compiled(twin), args, target, loss_fn)
    eager = _eager_twin(base, max_grad_norm=0.2)
    _step(eager, args, target, loss_fn)
    assert_same_private_grads(twin, eager)
    assert_same_private_grads(model, eager)  # the original got exactly one step, its own

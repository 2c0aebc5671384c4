"""torch.compile(backend="fxdp"): same clipped sums as eager privatize; never
non-private training that looks private."""
import copy
import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

import fxdp
from tests import models_zoo as Z


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare(base, args, loss_fn, target, compiler="aot_eager", **kw):
    ref = fxdp.privatize(copy.deepcopy(base), **kw)
    loss_fn(ref(*args), target).backward()
    m = fxdp.privatize(copy.deepcopy(base), **kw)
    compiled = torch.compile(m, backend="fxdp", options={"compiler": compiler})
    loss_fn(compiled(*args), target).backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        assert p.grad is None
        torch.testing.assert_close(p.private_grad, q.private_grad, rtol=1e-10, atol=1e-12, msg=n)


def test_backend_is_registered_by_name_on_import():
    from torch._dynamo.backends.registry import list_backends
    assert "fxdp" in list_backends(exclude_tags=())


def test_backend_is_declared_as_entry_point():
    try:
        eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("fxdp is not pip-installed here")
    names = {e.name: e.value for e in eps}
    if "fxdp" not in names:
        pytest.skip("fxdp is not pip-installed in this environment")
    assert names["fxdp"] == "fxdp.backend:fxdp_backend"


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
def test_compiled_privatized_gpt2_equals_eager_privatize(style):
    torch.manual_seed(0)
    base = Z.gpt2()
    ids = torch.randint(0, 40, (4, 8))
    _compare(base, (ids,), Z.lm_sum, ids, style=style, max_grad_norm=0.05)


def test_compiled_mlp_with_inductor_equals_eager_privatize():
    torch.manual_seed(0)
    base = Z.MLP().double()
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))
    _compare(base, (x,), Z.ce_sum, y, compiler="inductor", max_grad_norm=0.2)


def test_varying_batch_sizes_stay_exact_under_compile():
    torch.manual_seed(0)
    base = Z.MLP().double()
    ref = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.2)
    m = fxdp.privatize(copy.deepcopy(base), max_grad_norm=0.2)
    compiled = torch.compile(m, backend="fxdp", options={"compiler": "aot_eager"})
    for B in (5, 3, 7, 1):
        x, y = torch.randn(B, 6, dtype=torch.float64), torch.randint(0, 3, (B,))
        F.cross_entropy(ref(x), y).backward()
        F.cross_entropy(compiled(x), y).backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.private_grad, q.private_grad)


def test_compiling_an_unprivatized_model_is_refused():
    model = Z.MLP()
    with pytest.raises(Exception, match="not privatized"):
        torch.compile(model, backend="fxdp")(torch.randn(3, 6))


def test_unknown_backend_option_is_refused():
    model = fxdp.privatize(Z.MLP())
    with pytest.raises(Exception, match="unknown"):
        torch.compile(model, backend="fxdp", options={"compiler": "tvm"})(torch.randn(3, 6))


def test_debug_dumps_write_each_compiled_region(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDP_DEBUG", "2")
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    model = fxdp.privatize(Z.MLP())
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "eager"})
    compiled(torch.randn(3, 6)).sum().backward()
    dumps = sorted(tmp_path.glob("compile_*/00_dynamo_graph.txt"))
    assert dumps and "def forward" in dumps[0].read_text()

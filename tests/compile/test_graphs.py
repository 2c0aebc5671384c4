"""Backend "fxdp" adds no graph break; regions are rewritten by named passes, each dumped on request."""
import pytest
import torch

import fxdp
from tests.compile.models import case


@pytest.mark.parametrize("name", [  # GPT-2 in one graph by default: test_exactness (fullgraph=True)
    pytest.param("gpt2", marks=pytest.mark.slow), "encoder"])
def test_privatized_model_traces_as_one_graph(name):
    base, args, target, loss_fn, kw = case(name, B=3)
    model = fxdp.privatize(base, **kw)
    regions = []

    def counting(gm, inputs):
        regions.append(gm)
        from fxdp.compile.backend import fxdp_backend
        return fxdp_backend(gm, inputs, {"compiler": "eager"})

    compiled = torch.compile(model, backend=counting, fullgraph=True)
    loss_fn(compiled(*args), target).backward()
    assert len(regions) == 1
    code = regions[0].code
    assert "forward_token" in code and "capture" in code
    with torch.no_grad():  # explain compiles with its own backend: only outside grad mode
        explained = torch._dynamo.explain(model)(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0


def test_every_pass_dumps_its_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDP_DEBUG", "2")
    monkeypatch.setenv("FXDP_DUMP_DIR", str(tmp_path))
    base, args, target, loss_fn, _ = case("mlp", B=3)
    model = fxdp.privatize(base)
    compiled = torch.compile(model, backend="fxdp", options={"compiler": "eager"})
    loss_fn(compiled(*args), target).backward()
    folder = sorted(tmp_path.glob("compile_*"))[0]
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00_dynamo_graph.txt", "01_inline_checkpoints.txt", "02_find_parameters.txt",
                     "03_bind_call_sites.txt", "04_match_analysis.txt", "05_insert_taps.txt",
                     "06_check_no_direct_use.txt"]
    assert "capture" in (folder / "05_insert_taps.txt").read_text()
    assert "capture" not in (folder / "00_dynamo_graph.txt").read_text()


def test_backend_is_registered_by_name_on_import():
    from torch._dynamo.backends.registry import list_backends
    assert "fxdp" in list_backends(exclude_tags=())


def test_backend_is_declared_as_entry_point():
    import importlib.metadata
    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    if "fxdp" not in eps:
        pytest.skip("fxdp is not pip-installed in this environment")
    assert eps["fxdp"] == "fxdp.compile.backend:fxdp_backend"


def test_unknown_backend_option_is_refused():
    model = fxdp.privatize(case("mlp")[0])
    with pytest.raises(Exception, match="unknown"):
        torch.compile(model, backend="fxdp", options={"compiler": "tvm"})(torch.randn(3, 6, dtype=torch.float64))

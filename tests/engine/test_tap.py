"""Taps: the op runs on detached parameters, so autograd never computes (or writes) the plain weight
gradient; the input gradient is autograd's own; the output gradient reaches the engine once."""
import torch
import torch.nn.functional as F

from fxdp.core.layout import BatchLayout, LayoutKind
from fxdp.engine.tap import ForwardContext, LayerUse, TapFunction
from fxdp.rules import OpCall, bind


class FakeEngine:
    def __init__(self):
        self.received = []

    def receive(self, use, grad_output, extra):
        self.received.append((use, grad_output.clone(), extra))


def test_tap_captures_the_output_gradient_and_never_writes_p_grad():
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    engine = FakeEngine()
    call = OpCall(F.linear, (x, W), {}, {id(W): "W"})
    binding = bind(call)
    ctx = ForwardContext(2, lambda: engine)
    use = LayerUse(0, call.name, binding, BatchLayout(LayoutKind.BATCH, 0), ctx)
    out = TapFunction.apply(use, call, x, W)
    assert torch.equal(out, F.linear(x, W))
    g = torch.randn_like(out)
    out.backward(g)
    assert W.grad is None
    assert torch.allclose(x.grad, g @ W.detach())
    assert len(engine.received) == 1
    assert torch.equal(engine.received[0][1], g)
    assert set(use.saved) == set(binding.saved) and all(not t.requires_grad for t in use.saved.values())

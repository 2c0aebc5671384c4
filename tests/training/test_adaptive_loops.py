"""Adaptive clipping in the training loops: virtual steps (one count and one update per logical batch),
exact resumption of the learned R, and the compiled path learning the same R as eager mode."""
import io

import pytest
import torch
import torch.nn.functional as F

import fxdp
from fxdp import BatchMemoryManager, DPOptimizer
from fxdp.training.adaptive import AdaptiveClipping
from tests.training.stack_helpers import assert_close_dicts, make_data, make_loader, make_model, median_R, params_of

ADAPTIVE = dict(clipping="adaptive", target_unclipped_quantile=0.5, clipbound_learning_rate=0.5,
                count_noise_multiplier=1.0)


def _run(sigma, micro=None, logical_steps=3, R=0.5, optimizer_cls=torch.optim.SGD, seed=0):
    torch.manual_seed(seed)
    model = make_model()
    engine = fxdp.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=optimizer_cls(model.parameters(), lr=0.3),
        data_loader=make_loader(n=48, batch_size=12, sampler_seed=3), noise_multiplier=sigma, max_grad_norm=R,
        noise_generator=torch.Generator().manual_seed(11), **ADAPTIVE)
    return engine, model, opt, loader


def _loop(model, opt, batches, logical_steps, trace):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = opt.steps_taken
        opt.step()
        if opt.steps_taken > before:
            trace.append((opt.last_release["max_grad_norm"], opt.last_release["unclipped_fraction"]))
        if opt.steps_taken == logical_steps:
            break


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_micro_batches_release_one_count_per_logical_batch_and_learn_the_same_R(sigma):
    _, big_model, big_opt, loader = _run(sigma)
    big = []
    _loop(big_model, big_opt, loader, 3, big)
    engine, small_model, small_opt, loader = _run(sigma)
    small = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=small_opt) as batches:
        _loop(small_model, small_opt, batches, 3, small)
    assert len(small) == len(big) == 3 and engine.accountant.history == [(sigma, loader.sample_rate, 3)]
    # a count released per micro-batch, or noise drawn per micro-batch, would change R and the fractions
    for (r_big, f_big), (r_small, f_small) in zip(big, small):
        assert r_small == pytest.approx(r_big, rel=1e-12) and f_small == pytest.approx(f_big, rel=1e-9, abs=1e-12)
    assert len({r for r, _ in big}) == 3, "R was meant to change at every step"
    assert_close_dicts(params_of(small_model), params_of(big_model))


def test_checkpoint_resumes_the_learned_R_exactly():
    engine, model, opt, loader = _run(1.0, optimizer_cls=torch.optim.Adam)
    trace_a = []
    _loop(model, opt, loader, 4, trace_a)
    buf = io.BytesIO()
    engine.save_checkpoint(path=buf, module=model, optimizer=opt)
    R_saved = opt.max_grad_norm
    assert R_saved != 0.5
    _loop(model, opt, loader, 8, trace_a)
    final_a, R_a, eps_a = params_of(model), opt.max_grad_norm, engine.get_epsilon(1e-5)

    buf.seek(0)
    engine, model, opt, loader = _run(1.0, optimizer_cls=torch.optim.Adam, seed=1)
    engine.load_checkpoint(path=buf, module=model, optimizer=opt)
    assert opt.max_grad_norm == R_saved == fxdp.get_engine(model).clip_bound.value
    trace_b = []
    _loop(model, opt, loader, 8, trace_b)
    assert trace_b == trace_a[4:] and opt.max_grad_norm == R_a
    assert all(torch.equal(p, final_a[n]) for n, p in params_of(model).items())
    assert engine.get_epsilon(1e-5) == eps_a

    # a fixed-R optimizer cannot load the adaptive state (and the reverse)
    buf.seek(0)
    m = make_model()
    plain = fxdp.PrivacyEngine(accountant="rdp")
    m, o, _ = plain.make_private(module=m, optimizer=torch.optim.Adam(m.parameters(), lr=0.3),
                                 data_loader=make_loader(n=48, batch_size=12), noise_multiplier=1.0,
                                 max_grad_norm=0.5)
    with pytest.raises(ValueError, match="adaptive clipping"):
        plain.load_checkpoint(path=buf, module=m, optimizer=o)


def test_compiled_path_learns_the_same_R_as_eager():
    x, y = make_data(12, seed=2)
    R0 = median_R(make_model(2), x, y)
    runs = []
    for compiled in (False, True):
        model = fxdp.privatize(make_model(2), style="layer-wise", max_grad_norm=R0)
        run = torch.compile(model, backend="fxdp", options={"compiler": "aot_eager"}) if compiled else model
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), 0.0, R0, expected_batch_size=12,
                          adaptive_clipping=AdaptiveClipping(run, target_unclipped_quantile=0.8,
                                                             clipbound_learning_rate=0.5,
                                                             count_noise_multiplier=0.0))
        Rs = []
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(run(x), y).backward()
            opt.step()
            Rs.append(opt.max_grad_norm)
        runs.append((Rs, params_of(model)))
    (R_eager, p_eager), (R_compiled, p_compiled) = runs
    assert R_compiled == pytest.approx(R_eager, rel=1e-12) and len(set(R_eager)) == 4
    assert_close_dicts(p_compiled, p_eager, rtol=1e-12, atol=1e-14)


def test_digits_example_with_adaptive_clipping_learns_R_at_the_stated_epsilon():
    pytest.importorskip("sklearn")
    from examples.dp_digits import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = main(["--epochs", "1", "--epsilon", "2", "--adaptive"])
    finally:
        torch.set_num_threads(threads)
    assert out["epsilon"] <= 2.0 and out["max_grad_norm"] != 1.0 and 0.0 <= out["acc_dp"] <= 1.0

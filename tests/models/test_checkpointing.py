"""HuggingFace ``gradient_checkpointing_enable()`` (both flavours) on GPT-2: the private gradients are those of
the same model without checkpointing (same seed and data, float64, R at the median per-sample norm), and one
example moves a ``make_private`` step by at most R (noise off)."""
import copy
import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxdp
from tests import models_zoo as Z
from tests.reference import CHECKPOINT_FLAVOURS as FLAVOURS


def checkpointed(model, reentrant):
    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train()


def private_grads(model, ids, R, style):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # hooks re-run by the analysis (HF's input-grad hook)
        fxdp.privatize(model, max_grad_norm=R, style=style)
        (Z.lm_sum(model(input_ids=ids), ids) / len(ids)).backward()
    return {n: p.private_grad.clone() for n, p in model.named_parameters()}, fxdp.get_engine(model).last_stats


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(32)
    return Z.gpt2().train(), torch.randint(0, 40, (6, 8), generator=torch.Generator().manual_seed(3))


def median_R(model, ids):
    _, stats = private_grads(copy.deepcopy(model), ids, 1.0, "all-layer")
    norms = sorted(float(v) for v in next(iter(stats["group_norms"].values())))
    k = len(norms) // 2
    return 0.5 * (norms[k - 1] + norms[k])


@pytest.mark.parametrize("style", ["all-layer", "block-wise"])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_gradient_checkpointing_gives_the_private_gradients_of_the_model_without_it(gpt2, flavour, style):
    base, ids = gpt2
    R = median_R(base, ids)
    want, _ = private_grads(copy.deepcopy(base), ids, R, style)
    model = checkpointed(base, FLAVOURS[flavour])
    calls = []
    model.transformer.h[0].attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    got, stats = private_grads(model, ids, R, style)
    if style == "all-layer":
        assert 0 < int(stats["unclipped"].sum()) < len(ids)
    calls.clear()
    fxdp.clear_private_grads(model)
    (Z.lm_sum(model(input_ids=ids), ids) / len(ids)).backward()
    assert len(calls) == 2, "checkpointing is active: the block's attention ran in the forward and its recomputation"
    scale = max(float(w.abs().max()) for w in want.values())
    for n, w in want.items():
        assert float((got[n] - w).abs().max()) <= 1e-10 * scale, n
        assert float((dict(model.named_parameters())[n].private_grad - w).abs().max()) <= 1e-10 * scale, n


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_one_example_moves_a_make_private_step_by_at_most_R(gpt2, flavour):
    base, ids = gpt2
    R = median_R(base, ids)
    template = checkpointed(base, FLAVOURS[flavour])

    def step(rows):
        model = copy.deepcopy(template)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, loader = fxdp.PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(rows), batch_size=len(rows)),
                noise_multiplier=0.0, max_grad_norm=R)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            for (xb,) in loader:
                opt.zero_grad()
                (Z.lm_sum(model(input_ids=xb), xb) / len(xb)).backward()
                opt.step()
                break
        assert opt.steps_taken == 1
        return {n: (before[n] - p.detach()) * opt.expected_batch_size for n, p in model.named_parameters()}

    full = step(ids)
    moves = []
    for i in range(len(ids)):
        other = step(torch.cat([ids[:i], ids[i + 1:]]))
        moves.append(math.sqrt(sum(float((full[n] - other[n]).square().sum()) for n in full)))
        assert moves[-1] <= R * (1 + 1e-9), f"removing example {i} moved the step by {moves[-1]:.6g} > R = {R:.6g}"
    assert max(moves) > 0.5 * R  # examples were clipped at R: the bound is reached, not passed by moving nothing

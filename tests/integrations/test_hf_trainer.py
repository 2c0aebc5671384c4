"""DPTrainer end to end on tiny GPT-2 + LoRA (from config, CPU): the update equals the per-sample
reference, the loss is the per-sample mean (checked by hand), ε is logged and calibrated, the budget
is enforced, and a resume from a checkpoint continues the uninterrupted run exactly."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
transformers.utils.logging.set_verbosity_error()

import fxdp  # noqa: E402
from fxdp.integrations import BudgetExceededError, DPTrainer, PrivacyArguments  # noqa: E402
from fxdp.integrations.hf_budget import STATE_FILE  # noqa: E402
from fxdp.training.accounting import create_accountant, epsilon_spent  # noqa: E402
from tests.integrations.hf_helpers import args, padded_texts, tiny_gpt2  # noqa: E402
from tests.reference import median_threshold, per_sample_gradients, reference_private_grads  # noqa: E402


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _hand_loss(logits, labels):
    """Per-sample causal-LM loss written out: for each sample, the mean over its own counted tokens of
    -log softmax(logits[t])[labels[t+1]], then the mean over samples."""
    losses = []
    for b in range(labels.shape[0]):
        terms = [-torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]]
                 for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def test_loss_is_the_per_sample_mean_by_hand_not_the_token_mean(tmp_path):
    data = padded_texts(4, min_len=2)
    model = tiny_gpt2(dtype=torch.float64)
    trainer = DPTrainer(model=model, args=args(tmp_path), train_dataset=data,
                        privacy_args=PrivacyArguments(noise_multiplier=1.0, max_grad_norm=1.0))
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss.detach(), _hand_loss(logits, batch["labels"]))
    model.eval()  # the model's own labels= loss (a token mean over the batch) is a different number
    hf = model(**batch).loss
    assert not torch.allclose(hf.double(), loss.detach(), atol=1e-6)


def test_one_step_without_noise_equals_the_per_sample_reference(tmp_path):
    """q = 1 (N = per-device batch × GA), σ = 0, SGD lr 1: the update is -Σ_i C_i ∇ℓ_i / L, with two
    micro-batches of 3 accumulated, R near the median per-sample norm (some samples clipped)."""
    data = padded_texts(6)
    model = tiny_gpt2(dtype=torch.float64)
    clean = copy.deepcopy(model)
    names = [n for n, p in clean.named_parameters() if p.requires_grad]

    def sample_loss(out, labels):
        return fxdp.per_sample_loss(out.logits, labels, shift=True)

    samples = [((), {"input_ids": d["input_ids"][None], "attention_mask": d["attention_mask"][None]},
                d["labels"][None]) for d in data]
    per_sample = per_sample_gradients(clean, samples, sample_loss)
    R = median_threshold(per_sample, [names])
    want, norms = reference_private_grads(per_sample, [names], R)
    assert 0 < sum(n[0] > R for n in norms) < len(norms)
    before = _trainable(model)
    trainer = DPTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=3, max_steps=1, optim="sgd",
                                               learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0),
                        train_dataset=data, privacy_args=PrivacyArguments(noise_multiplier=0.0, max_grad_norm=R))
    trainer.train()
    assert trainer.budget.sample_rate == 1.0 and trainer.dp_optimizer.expected_batch_size == 6
    after = _trainable(model)
    for n in names:
        torch.testing.assert_close(before[n] - after[n], want[n] / 6, rtol=1e-9, atol=1e-12)
    assert trainer.budget.accountant.history == [(0.0, 1.0, 1)] and math.isinf(trainer.get_epsilon())


def test_epsilon_is_logged_each_step_and_spends_the_calibrated_budget(tmp_path):
    data = padded_texts(64)
    model = tiny_gpt2()
    trainer = DPTrainer(model=model, args=args(tmp_path, max_steps=4), train_dataset=data,
                        privacy_args=PrivacyArguments(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=0.5,
                                                      style="block-wise"))
    before = _trainable(model)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    eps = [entry["epsilon"] for entry in logs]
    assert all(a < b for a, b in zip(eps, eps[1:])) and 3.0 - 0.05 <= eps[-1] <= 3.0
    q, sigma = 8 / 64, trainer.budget.sigma
    assert trainer.budget.accountant.history == [(sigma, q, 4)]
    ref = create_accountant("pld")
    ref.history = [(sigma, q, 4)]
    assert eps[-1] == epsilon_spent(ref, 1e-5)
    assert all(entry["noise_multiplier"] == sigma and entry["max_grad_norm"] == 0.5 for entry in logs)
    # the clipped fraction is not DP: only logged when asked for; HF's own (non-private) grad_norm never
    assert all("clipped_fraction" not in entry for entry in logs) and "grad_norm" not in logs[0]
    assert any(not torch.equal(before[n], p) for n, p in _trainable(model).items())
    assert all("lora_" in n for n in before)
    # a second train() continues the same budget: its first step would exceed it and is refused before release
    trainer.args.max_steps = 5
    params = _trainable(model)
    with pytest.raises(BudgetExceededError, match="target_epsilon"):
        trainer.train()
    assert len(trainer.budget.accountant) == 4
    assert all(torch.equal(params[n], p) for n, p in _trainable(model).items())


def test_noise_multiplier_that_overspends_the_target_is_refused(tmp_path):
    trainer = DPTrainer(model=tiny_gpt2(), args=args(tmp_path, max_steps=50), train_dataset=padded_texts(16),
                        privacy_args=PrivacyArguments(target_epsilon=1.0, noise_multiplier=0.5))
    with pytest.raises(fxdp.PrivacyError, match="target_epsilon"):
        trainer.train()


def _run(tmp_path, max_steps, resume=None, save_steps=2):
    model = tiny_gpt2()
    trainer = DPTrainer(model=model, args=args(tmp_path, max_steps=max_steps, save_strategy="steps",
                                               save_steps=save_steps),
                        train_dataset=padded_texts(64), privacy_args=PrivacyArguments(target_epsilon=5.0))
    trainer.train(resume_from_checkpoint=resume)
    return trainer, _trainable(model)


def test_resume_from_a_checkpoint_continues_the_run_exactly(tmp_path):
    full, want = _run(tmp_path / "a", 4)
    assert (tmp_path / "a" / "checkpoint-2" / STATE_FILE).is_file()
    resumed, got = _run(tmp_path / "b", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.budget.accountant.history == full.budget.accountant.history == [(full.budget.sigma, 0.125, 4)]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)
    assert resumed.get_epsilon() == full.get_epsilon()


def test_resume_refuses_a_checkpoint_without_privacy_state_or_another_calibration(tmp_path):
    _run(tmp_path / "a", 2)
    ckpt = tmp_path / "a" / "checkpoint-2"
    with pytest.raises(fxdp.PrivacyError, match="another privacy calibration"):
        _run(tmp_path / "b", 6, resume=str(ckpt))  # σ calibrated for 6 steps differs from the checkpoint's
    (ckpt / STATE_FILE).unlink()
    with pytest.raises(fxdp.PrivacyError, match="under-count"):
        _run(tmp_path / "c", 2, resume=str(ckpt))


def test_empty_micro_batches_run_and_step_with_noise_only(tmp_path):
    """Expected logical batch 2 split into 4 micro-batches: most micro-batches are empty (zero rows)."""
    model = tiny_gpt2()
    trainer = DPTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                                               max_steps=3),
                        train_dataset=padded_texts(64), privacy_args=PrivacyArguments(noise_multiplier=1.0))
    trainer.train()
    assert len(trainer.budget.accountant) == 3 and trainer.budget.sample_rate == 4 / 64


def test_bf16_autocast_trains(tmp_path):
    model = tiny_gpt2()
    trainer = DPTrainer(model=model, args=args(tmp_path, bf16=True, max_steps=2), train_dataset=padded_texts(16),
                        privacy_args=PrivacyArguments(target_epsilon=8.0))
    before = _trainable(model)
    trainer.train()
    after = _trainable(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in after) and 0 < trainer.get_epsilon() <= 8.0


@pytest.mark.slow
def test_torch_compile_uses_the_fxdp_backend_in_one_graph_and_matches_eager(tmp_path):
    """torch_compile=True: the training model is torch.compile(model, backend="fxdp") -- one graph,
    no break -- and two noiseless steps match eager DPTrainer (float32, inductor: ~1e-6)."""
    from torch._dynamo.utils import counters

    result = {}
    for compiled in (False, True):
        model = tiny_gpt2()
        counters.clear()
        trainer = DPTrainer(model=model, args=args(tmp_path / str(compiled), torch_compile=compiled, max_steps=2,
                                                   per_device_train_batch_size=16, gradient_accumulation_steps=1),
                            train_dataset=padded_texts(16),
                            privacy_args=PrivacyArguments(noise_multiplier=0.0, max_grad_norm=0.05))
        trainer.train()
        result[compiled] = _trainable(model)
        if compiled:
            assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
            assert counters["stats"]["unique_graphs"] >= 1 and sum(counters["graph_break"].values()) == 0
    for n in result[False]:
        torch.testing.assert_close(result[True][n], result[False][n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("accumulation", [1, 4])
def test_zero_row_micro_batches_skip_the_model_and_still_step_and_charge(tmp_path, accumulation):
    """HF GPT-2 with an attention mask cannot run a forward on zero rows (a raw torch reshape error,
    and under two ranks the other rank hung in the step's agreement): an empty micro-batch contributes
    the exact zero clipped sum without a forward, and every logical step is still noised and charged."""
    trainer = DPTrainer(model=tiny_gpt2(), args=args(tmp_path, per_device_train_batch_size=1,
                                                     gradient_accumulation_steps=accumulation, max_steps=4),
                        train_dataset=padded_texts(6), privacy_args=PrivacyArguments(noise_multiplier=1.0))
    calls = []
    trainer.model.register_forward_pre_hook(lambda m, a, k: calls.append(len(next(iter(k.values())))),
                                            with_kwargs=True)
    trainer.train()
    assert len(trainer.budget.accountant) == 4 and 0 not in calls

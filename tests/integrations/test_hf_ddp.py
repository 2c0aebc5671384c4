"""DPTrainer under a multi-process launch (2 CPU gloo ranks, as torchrun starts them): fxdp's data
parallelism instead of the Trainer's DDP -- each rank draws its own share of the global Poisson batch,
the clipped sums are summed once per logical batch, the noise is drawn once (rank 0), ε is the one-process
ε at the global q on every rank, and checkpoints resume exactly; what cannot work is refused."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
transformers.utils.logging.set_verbosity_error()

import fxdp  # noqa: E402
from fxdp.integrations import DPTrainer, PrivacyArguments  # noqa: E402
from fxdp.training.accounting import create_accountant, epsilon_spent  # noqa: E402
from tests.distributed.cluster import Cluster  # noqa: E402
from tests.integrations.hf_ddp_jobs import trainable  # noqa: E402
from tests.integrations.hf_helpers import args, padded_texts, tiny_gpt2  # noqa: E402
from tests.reference import median_threshold, per_sample_gradients, reference_private_grads  # noqa: E402

SGD = dict(optim="sgd", lr_scheduler_type="constant", weight_decay=0.0)
PRIVACY = dict(noise_multiplier=1.0, target_delta=1e-5, max_grad_norm=0.5)
JOB = "tests.integrations.hf_ddp_jobs:"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(world_size=2)
    yield c
    for inbox in c.inboxes:  # as Cluster.close, without waiting 10 s for threads transformers left behind
        inbox.put(None)
    for p in c.procs:
        p.join(timeout=2)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _values(cluster, job, timeout=120, **kwargs):
    return cluster.values(JOB + job, timeout=timeout, **kwargs)


def _reference(indices, R=None):
    """Per-sample clipped gradients of the float64 tiny GPT-2 + LoRA on ``indices`` of padded_texts(16)."""
    data = padded_texts(16)
    model = tiny_gpt2(dtype=torch.float64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    samples = [((), {"input_ids": data[i]["input_ids"][None], "attention_mask": data[i]["attention_mask"][None]},
                data[i]["labels"][None]) for i in indices]
    per_sample = per_sample_gradients(model, samples, lambda out, y: fxdp.per_sample_loss(out.logits, y, shift=True))
    R = median_threshold(per_sample, [names]) if R is None else R
    want, norms = reference_private_grads(per_sample, [names], R)
    return R, want, norms


@pytest.fixture(scope="module")
def R():
    return _reference(range(16))[0]


def test_noiseless_ranks_hold_the_one_process_parameters_on_the_same_logical_batches(cluster, R, tmp_path):
    """q = 1 (every example in every logical batch), 3 SGD steps, GA = 2 on each of the 2 ranks: the ranks'
    parameters are bitwise equal and equal a one-process DPTrainer with the same logical batch (float64)."""
    out = _values(cluster, "train", out_dir=str(tmp_path / "ddp"), n=12, privacy=dict(noise_multiplier=0.0,
                  max_grad_norm=R), per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=3,
                  learning_rate=0.5, **SGD)
    assert [o["optimizer"] for o in out] == ["DistributedDPOptimizer"] * 2
    assert all("DistributedDataParallel" not in o["wrapped"] for o in out)
    assert all(o["expected_batch_size"] == 12 and o["sample_rate"] == 1.0 for o in out)
    shards = [set(o["seen"]) for o in out]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(12))  # each example on one rank
    single = tiny_gpt2(dtype=torch.float64)
    start = trainable(single)
    DPTrainer(model=single, args=args(tmp_path / "one", per_device_train_batch_size=6, gradient_accumulation_steps=2,
                                      max_steps=3, learning_rate=0.5, **SGD),
              train_dataset=padded_texts(12), privacy_args=PrivacyArguments(noise_multiplier=0.0,
                                                                            max_grad_norm=R)).train()
    want = trainable(single)
    for name in want:
        assert torch.equal(out[0]["params"][name], out[1]["params"][name])
        assert not torch.equal(want[name], start[name])
        torch.testing.assert_close(out[0]["params"][name], want[name], rtol=1e-9, atol=1e-12)


def test_each_rank_draws_its_share_and_the_update_is_the_clipped_sum_over_the_global_batch(cluster, R, tmp_path):
    """q = 8/16: the ranks draw disjoint shares; the update is -lr Σ_{i in both shares} clip_R(g_i) / L with
    L = 4 × 1 × 2 = 8 (the global expected size, not the local one nor the realised one)."""
    out = _values(cluster, "train", out_dir=str(tmp_path), n=16,
                  privacy=dict(noise_multiplier=0.0, max_grad_norm=R, log_clipped_fraction=True),
                  per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1, learning_rate=1.0,
                  **SGD)
    drawn = [o["seen"] for o in out]
    assert all(drawn) and not set(drawn[0]) & set(drawn[1]) and out[0]["sample_rate"] == 0.5
    union = sorted(drawn[0] + drawn[1])
    _, want, norms = _reference(union, R)
    clipped = sum(n[0] > R for n in norms)
    assert 0 < clipped < len(norms)  # some clipped, some not
    assert [o["clipped_fraction"] for o in out] == [[clipped / len(union)]] * 2  # counted over both ranks
    start = trainable(tiny_gpt2(dtype=torch.float64))
    for name, grad in want.items():
        torch.testing.assert_close(start[name] - out[0]["params"][name], grad / 8, rtol=1e-9, atol=1e-12)
        assert torch.equal(out[0]["params"][name], out[1]["params"][name])


@pytest.fixture(scope="module")
def budgeted(cluster, tmp_path_factory):
    """4 steps at σ = 1 with checkpoints at steps 2 and 4 (L = 4 × 2 × 2 = 16 of N = 64)."""
    folder = tmp_path_factory.mktemp("budgeted")
    run = dict(n=64, dtype=torch.float32, privacy=PRIVACY,
               per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4, save_strategy="steps",
               save_steps=2)
    full = _values(cluster, "train", out_dir=str(folder / "full"), **run)
    resumed = _values(cluster, "train", out_dir=str(folder / "resumed"), resume=str(folder / "full" / "checkpoint-2"),
                      **run)
    return folder, full, resumed


def test_epsilon_on_every_rank_is_the_one_process_epsilon_at_the_global_sample_rate(budgeted):
    _, full, _ = budgeted
    q = 16 / 64
    ref = create_accountant("pld")
    ref.history = [(1.0, q, 4)]
    for o in full:
        assert o["sample_rate"] == q and o["history"] == [(1.0, q, 4)]  # one charge per logical step, global q
        assert o["epsilon"] == epsilon_spent(ref, 1e-5) > 0
    assert full[0]["logged_epsilon"] == full[1]["logged_epsilon"] and len(full[0]["logged_epsilon"]) == 4
    assert full[0]["logged_epsilon"][-1] == full[0]["epsilon"]


def test_resume_from_a_checkpoint_continues_every_rank_exactly(budgeted):
    folder, full, resumed = budgeted
    assert (folder / "full" / "checkpoint-2" / "fxdp_privacy.pt").is_file()
    for r in range(2):
        assert resumed[r]["history"] == full[r]["history"] and resumed[r]["epsilon"] == full[r]["epsilon"]
        for name, p in full[r]["params"].items():
            assert torch.equal(resumed[r]["params"][name], p)
    assert any(not torch.equal(full[0]["params"][n], p) for n, p in trainable(tiny_gpt2()).items())


def test_noise_is_drawn_once_per_logical_batch_not_once_per_rank(cluster, tmp_path):
    """One step with σ = 2 minus the same step with σ = 0 (same batches): the released sum carries one
    N(0, σ²R²) draw, so the update differs by lr·σR/L per coordinate (√2 times that if each rank drew)."""
    sigma, R, lr = 2.0, 0.5, 1.0
    out = _values(cluster, "noise_of_one_step", out_dir=str(tmp_path), n=16, sigma=sigma, R=R, lr=lr,
                  per_device_train_batch_size=4, gradient_accumulation_steps=2, **SGD)
    assert torch.equal(out[0]["diff"], out[1]["diff"])  # the same noised update on both ranks
    diff, L = out[0]["diff"], out[0]["L"]
    assert L == 16 and diff.numel() > 600
    ratio = float(diff.std()) / (lr * sigma * R / L)
    assert abs(ratio - 1) < 0.15, ratio  # std error ≈ 1/sqrt(2·704) ≈ 3 %
    assert abs(float(diff.mean())) < 4 * lr * sigma * R / L / math.sqrt(diff.numel())


@pytest.fixture(scope="module")
def eager_float32(cluster, tmp_path_factory):
    return _values(cluster, "train", out_dir=str(tmp_path_factory.mktemp("eager")), **FLOAT32)


FLOAT32 = dict(n=16, dtype=torch.float32, privacy=dict(noise_multiplier=0.0, max_grad_norm=0.05), max_steps=2,
               per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=0.5, **SGD)


@pytest.mark.parametrize("option, tol", [
    ("bf16", 1e-3),
    pytest.param("torch_compile", 1e-6, marks=pytest.mark.slow),  # inductor on 2 ranks: ~1 min
])
def test_bf16_and_torch_compile_run_under_two_ranks(cluster, eager_float32, tmp_path, option, tol):
    """bf16 autocast / torch.compile(backend="fxdp") on both ranks: same parameters on the ranks, close to eager
    float32 (bf16: 2 noiseless steps move the LoRA weights by ~1e-2, autocast changes them by ~1e-4)."""
    out = _values(cluster, "train", timeout=600, out_dir=str(tmp_path), **FLOAT32, **{option: True})
    if option == "torch_compile":
        assert out[0]["wrapped"] == "OptimizedModule"
    else:  # accelerate's autocast is applied although the model is not DDP-wrapped
        assert any(not torch.equal(out[0]["params"][n], p) for n, p in eager_float32[0]["params"].items())
    for name, want in eager_float32[0]["params"].items():
        assert torch.equal(out[0]["params"][name], out[1]["params"][name])
        torch.testing.assert_close(out[0]["params"][name], want, rtol=0, atol=tol)


def test_ranks_built_with_different_privacy_arguments_fail_together_instead_of_hanging(cluster, tmp_path):
    outcomes = cluster.run(JOB + "train", timeout=120, out_dir=str(tmp_path), n=16,
                           privacy=dict(noise_multiplier=1.0, max_grad_norm=1.0),
                           perturb={1: dict(max_grad_norm=2.0)}, max_steps=1)
    assert [o.error_type for o in outcomes] == ["RankMismatchError"] * 2
    assert all("privacy arguments" in o.message for o in outcomes)
    # a setup error on one rank only (its σ overspends its target): it raises, the other rank too
    outcomes = cluster.run(JOB + "train", timeout=120, out_dir=str(tmp_path), n=16,
                           privacy=dict(noise_multiplier=1.0, max_grad_norm=1.0),
                           perturb={1: dict(target_epsilon=0.01)}, max_steps=1)
    assert [o.error_type for o in outcomes] == ["PeerRankError", "PrivacyError"]
    assert "target_epsilon" in outcomes[0].message and "target_epsilon" in outcomes[1].message


def test_a_process_group_the_trainer_does_not_see_is_refused(cluster, tmp_path):
    """Ranks started without torchrun's environment: each would train its own model on all the data."""
    outcomes = cluster.run(JOB + "unlaunched", timeout=60, out_dir=str(tmp_path))
    assert [o.error_type for o in outcomes] == ["PrivacyError"] * 2
    assert all("torchrun" in o.message for o in outcomes)


def test_a_ddp_wrapped_training_model_is_refused_before_any_release(cluster, tmp_path):
    outcomes = cluster.run(JOB + "ddp_wrapped", timeout=60, out_dir=str(tmp_path))
    assert [o.error_type for o in outcomes] == ["PrivacyError"] * 2
    assert all("DistributedDataParallel" in o.message and "private_grad" in o.message for o in outcomes)


def test_fsdp_through_training_arguments_is_refused(tmp_path):
    with pytest.raises(fxdp.PrivacyError, match="FSDP.*fxdp.DPDistributed"):
        DPTrainer(model=tiny_gpt2(), args=args(tmp_path, fsdp=True), train_dataset=padded_texts(8),
                  privacy_args=PrivacyArguments(noise_multiplier=1.0))


def test_a_two_process_checkpoint_is_refused_in_one_process(budgeted, tmp_path):
    folder, _, _ = budgeted
    trainer = DPTrainer(model=tiny_gpt2(), args=args(tmp_path, per_device_train_batch_size=8,
                                                     gradient_accumulation_steps=2, max_steps=4),
                        train_dataset=padded_texts(64), privacy_args=PrivacyArguments(**PRIVACY))
    with pytest.raises(fxdp.PrivacyError, match="written by 2 process"):
        trainer.train(resume_from_checkpoint=str(folder / "full" / "checkpoint-2"))

"""DPTrainer refuses, with a clear fxdp error, what would defeat Poisson sampling, per-sample clipping
or the accounting: group_by_length, packing / row-changing collators, overridden samplers, iterable
data sets, compute_loss_func, labels reaching the model in training, a loss computed without labels,
fp16, auto_find_batch_size; and its Poisson micro-batch sampler splits each logical batch exactly."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
transformers.utils.logging.set_verbosity_error()

import fxdp  # noqa: E402
from fxdp.integrations import DPTrainer, PrivacyArguments  # noqa: E402
from fxdp.integrations.hf_data import PerSampleCollator, PoissonMicroBatchSampler  # noqa: E402
from tests.integrations.hf_helpers import args, padded_texts, tiny_gpt2  # noqa: E402

PA = dict(noise_multiplier=1.0, max_grad_norm=1.0)


def _trainer(tmp_path, trainer_cls=DPTrainer, data=None, **kw):
    targs = kw.pop("targs", {})
    return trainer_cls(model=tiny_gpt2(), args=args(tmp_path, **targs),
                       train_dataset=padded_texts(16) if data is None else data,
                       privacy_args=PrivacyArguments(**PA), **kw)


@pytest.mark.parametrize("strategy", ["group_by_length", "sequential"])
def test_length_grouped_or_ordered_sampling_is_refused(tmp_path, strategy):
    with pytest.raises(fxdp.PrivacyError, match="Poisson"):
        _trainer(tmp_path, targs=dict(train_sampling_strategy=strategy))


def test_packing_collator_is_refused(tmp_path):
    with pytest.raises(fxdp.PrivacyError, match="packs several examples"):
        _trainer(tmp_path, data_collator=transformers.DataCollatorWithFlattening())


def test_collator_that_drops_rows_is_refused_at_the_first_batch(tmp_path):
    def drop_one(examples):
        return {k: torch.stack([e[k] for e in examples[1:]]) for k in examples[0]}

    trainer = _trainer(tmp_path, data_collator=drop_one, targs=dict(per_device_train_batch_size=8))
    with pytest.raises(fxdp.PrivacyError, match="exactly one row"):
        trainer.train()


def test_overridden_sampler_or_dataloader_is_refused(tmp_path):
    class MySampler(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with pytest.raises(fxdp.PrivacyError, match="overrides _get_train_sampler"):
        _trainer(tmp_path, trainer_cls=MySampler)


def test_iterable_dataset_is_refused(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(padded_texts(4))

    with pytest.raises(fxdp.PrivacyError, match="IterableDataset"):
        _trainer(tmp_path, data=Stream())


def test_compute_loss_func_is_refused(tmp_path):
    with pytest.raises(ValueError, match="per_sample_loss_fn"):
        _trainer(tmp_path, compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)


def test_labels_passed_through_to_the_model_are_refused(tmp_path):
    """A subclass that lets the model compute its own (token-mean) loss from labels= is stopped at the
    model's forward, before any gradient exists."""
    class OwnLoss(DPTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss

    trainer = _trainer(tmp_path, trainer_cls=OwnLoss)
    with pytest.raises(fxdp.PrivacyError, match="token-level mean"):
        trainer.train()
    assert len(trainer.budget.accountant) == 0


def test_a_loss_computed_without_labels_is_refused(tmp_path):
    """Labels under another name reach the model, which returns a batch-level loss."""
    # label_names=["targets"]: 'labels' is then an ordinary input, and the model uses it for its own loss
    trainer = _trainer(tmp_path, targs=dict(label_names=["targets"], remove_unused_columns=False))
    with pytest.raises(fxdp.PrivacyError, match="returned a loss"):
        trainer.train()


@pytest.mark.parametrize("targs, match", [
    (dict(fp16=True), "bf16"),
    (dict(auto_find_batch_size=True), "auto_find_batch_size"),
])
def test_unsupported_training_arguments_are_refused(tmp_path, targs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, targs=targs)


def test_missing_privacy_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="privacy_args"):
        DPTrainer(model=tiny_gpt2(), args=args(tmp_path), train_dataset=padded_texts(4))
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyArguments()
    with pytest.raises(ValueError, match="row-wise"):
        PrivacyArguments(target_epsilon=1.0, style="row-wise")


def test_sampler_splits_each_poisson_batch_into_all_its_micro_batches():
    g = torch.Generator().manual_seed(0)
    sampler = PoissonMicroBatchSampler(50, 0.2, 3, 4, g)
    chunks = list(sampler)
    assert len(chunks) == len(sampler) == 12
    ref = torch.Generator().manual_seed(0)
    for step in range(4):
        want = (torch.rand(50, generator=ref) < 0.2).nonzero().flatten().tolist()
        got = chunks[3 * step] + chunks[3 * step + 1] + chunks[3 * step + 2]
        assert got == want  # each example at most once per step, all sampled ones used
        sizes = [len(c) for c in chunks[3 * step:3 * step + 3]]
        assert max(sizes) - min(sizes) <= 1


def test_empty_micro_batch_collates_to_zero_rows():
    data = padded_texts(3)
    collate = PerSampleCollator(lambda ex: {k: torch.stack([e[k] for e in ex]) for k in ex[0]}, data)
    empty = collate([])
    assert set(empty) == {"input_ids", "attention_mask", "labels"} and all(v.shape == (0, 10) for v in empty.values())

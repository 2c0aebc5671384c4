"""``DPTrainer``: DP-SGD with the HuggingFace ``transformers.Trainer``.

    trainer = DPTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        privacy_args=PrivacyArguments(target_epsilon=8, target_delta=1e-5, max_grad_norm=1.0,
                                                      style="block-wise"))
    trainer.train()          # logs epsilon, noise_multiplier, max_grad_norm, clipped_fraction

What it does (the guarantee: each optimizer step is one Poisson-subsampled Gaussian
mechanism with sensitivity R, and the accountant charges exactly those steps):

- privatizes the model in place (``fxdp.privatize``; PEFT models: only the trainable
  adapters get private gradients);
- samples Poisson logical batches of expected size L = per_device_train_batch_size ×
  gradient_accumulation_steps × world size (q = L / N), split into the GA micro-batches the
  Trainer accumulates over (virtual steps: clipping per sample, noise once per step, division
  by the expected L) -- :mod:`fxdp.integrations.hf_data`;
- under a multi-process launch (``torchrun --nproc_per_node=W train.py``) runs fxdp's data
  parallelism instead of the Trainer's DDP: each rank draws its share of the global Poisson
  batch, rank 0 adds the noise once, the clipped sums are all-reduced in buckets, every rank
  applies the same update and charges the same accountant -- :mod:`fxdp.integrations.hf_distributed`;
- computes the per-sample loss itself (mean over each sample's own tokens, then over the
  batch; labels are never passed to the model) -- :mod:`fxdp.integrations.hf_loss`;
- calibrates σ for ``target_epsilon`` over the Trainer's planned number of optimizer steps
  (``max_steps`` or ``num_train_epochs`` × ceil(N / L)), logs ε, σ, R and the fraction of
  clipped samples at each logging step, stops before a step that would exceed the budget
  and refuses one that would (:mod:`fxdp.integrations.hf_budget`);
- saves the accountant and sampler state with every Trainer checkpoint and restores them on
  ``train(resume_from_checkpoint=...)`` (with the optimizer's noise state, so a resume
  continues the run exactly and never replays noise);
- ``bf16=True`` runs under the Trainer's autocast (norms and noise in fp32);
  ``torch_compile=True`` trains through ``torch.compile(model, backend="fxdp")`` (the
  Trainer's accelerate plugin only knows its own backends, so DPTrainer compiles itself).

Refused (ValueError or PrivacyError, before training): ``fp16`` (use bf16), a
``train_sampling_strategy`` other than "random" (``group_by_length`` etc.: the sampler is
Poisson), an overridden train dataloader / sampler, an ``IterableDataset``, packing
collators (and, at run time, any batch whose rows are not its examples),
``compute_loss_func``, ``auto_find_batch_size``, labels reaching the model's forward in
training (its own loss is a token mean over the batch), a model output with a loss
computed without labels, a resume from a checkpoint without fxdp's privacy state (or from
one written by another number of processes), FSDP / DeepSpeed / tensor parallelism and
``nn.DataParallel`` (:func:`~fxdp.integrations.hf_distributed.refuse_unsupported_parallelism`).
The Trainer's own ``max_grad_norm`` is set to 0: R is
``privacy_args.max_grad_norm``. ``ignore_data_skip`` is set: a resumed run draws its next
Poisson batches from the saved sampler state instead of replaying skipped ones.
"""
from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fxdp.engine.finalize import accumulation_dtype
from fxdp.core.errors import PrivacyError
from fxdp.engine.install import clear_private_grads, get_engine, privatize
from fxdp.integrations.hf_arguments import PrivacyArguments
from fxdp.integrations.hf_budget import Budget, BudgetCallback, load_state, save_state
from fxdp.integrations import hf_distributed as ddp
from fxdp.integrations.hf_data import PerSampleCollator, PoissonMicroBatchSampler, check_train_dataset
from fxdp.integrations.hf_loss import batch_mean, default_per_sample_losses, is_causal_lm
from fxdp.training.accounting import PoissonCharge, create_accountant, epsilon_spent, get_noise_multiplier
from fxdp.training.noise import generator_from_os_entropy
from fxdp.training.optimizer import DPOptimizer

OPTIMIZER_FILE = "optimizer.pt"


class _RefuseLabels:
    """Forward pre-hook: in training, labels must not reach the model (it would compute a token mean)."""

    def __init__(self, label_names):
        self.label_names = tuple(label_names)

    def __call__(self, module, args, kwargs):
        if module.training and any(kwargs.get(n) is not None for n in self.label_names):
            raise PrivacyError(
                f"fxdp: {', '.join(n for n in self.label_names if kwargs.get(n) is not None)} passed to the model's "
                "forward during DP training: HuggingFace models then compute one token-level mean over the whole "
                "batch, which is not a per-sample loss (its normaliser depends on the other samples). Let DPTrainer "
                "compute the loss, or pass PrivacyArguments(per_sample_loss_fn=...).")


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with DP-SGD (module docstring).

    Args: those of ``Trainer``, plus ``privacy_args`` (:class:`PrivacyArguments`, required).
    Attributes after ``train()`` starts: ``budget`` (accountant, δ, calibrated σ and steps),
    ``dp_optimizer``, ``sampler_generator``; :meth:`get_epsilon` gives ε spent so far.
    """

    def __init__(self, model=None, args: TrainingArguments = None, *pargs, privacy_args: PrivacyArguments = None,
                 **kwargs):
        if not isinstance(privacy_args, PrivacyArguments):
            raise ValueError("fxdp: DPTrainer needs privacy_args=PrivacyArguments(target_epsilon=..., ...).")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("fxdp: compute_loss_func gets the whole batch and usually returns a token mean over it; "
                             "pass PrivacyArguments(per_sample_loss_fn=...) returning one loss per sample instead.")
        args = args if args is not None else TrainingArguments(output_dir="trainer_output")
        self.privacy_args = privacy_args
        self._fxdp_compile = self._check_args(args)
        super().__init__(model, args, *pargs, **kwargs)
        ddp.refuse_unsupported_parallelism(self.args, self)
        for name in ("get_train_dataloader", "_get_train_sampler"):
            if getattr(type(self), name) is not getattr(DPTrainer, name):
                raise PrivacyError(f"fxdp: {type(self).__name__} overrides {name}; DPTrainer's Poisson sampling is "
                                   "what the accountant charges for, and a different sampler would break that.")
        if self.train_dataset is not None:
            check_train_dataset(self.train_dataset)
        PerSampleCollator(self.data_collator, None)  # refuses packing collators now
        self._privatize_model()
        self.budget = None
        self.dp_optimizer = None
        self.sampler_generator = None
        self._sampling = None
        self._planned_steps = None
        self._clip_counts = [0, 0]
        self._stats_seen = None
        self.add_callback(BudgetCallback(self))

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_args(args) -> bool:
        ddp.refuse_unsupported_parallelism(args)
        if args.fp16:
            raise ValueError("fxdp: fp16 with the Trainer's GradScaler is not supported by DPTrainer; use bf16=True.")
        if getattr(args, "train_sampling_strategy", "random") != "random" or getattr(args, "group_by_length", False):
            raise PrivacyError(
                f"fxdp: train_sampling_strategy={getattr(args, 'train_sampling_strategy', None)!r} / group_by_length "
                "chooses batches by length or order; DP-SGD's accounting assumes Poisson sampling, which DPTrainer "
                "does itself. Leave train_sampling_strategy='random'.")
        if args.auto_find_batch_size:
            raise ValueError("fxdp: auto_find_batch_size changes the batch size (and so the sampling rate) during the "
                             "run; set per_device_train_batch_size and gradient_accumulation_steps explicitly.")
        compile_ = bool(args.torch_compile)
        if compile_ and args.torch_compile_backend not in (None, "inductor", "fxdp"):
            raise ValueError(f"fxdp: torch_compile_backend={args.torch_compile_backend!r}; a privatized model is "
                             "compiled with the 'fxdp' backend (it runs inductor after its own passes).")
        if compile_:  # DPTrainer compiles with backend="fxdp" itself; accelerate only knows its own backends
            args.torch_compile, args.torch_compile_backend, args.torch_compile_mode = False, "no", None
        args.max_grad_norm = 0.0
        args.ignore_data_skip = True
        return compile_

    def _privatize_model(self):
        config = self.privacy_args.config
        engine = get_engine(self.model)
        if engine is None:
            privatize(self.model, config=config)
        elif engine.config != config:
            raise ValueError(f"fxdp: the model is already privatized with {engine.config}, not {config}.")
        self.model.register_forward_pre_hook(_RefuseLabels(self.label_names), with_kwargs=True)

    def _wrap_model(self, model, training=True, dataloader=None):
        """The Trainer's wrapping, except DDP: under a multi-process launch the model is prepared by
        accelerate in evaluation mode (device placement and autocast, no DistributedDataParallel, which
        would reduce p.grad) -- fxdp reduces the private gradients itself. With ``torch_compile=True``
        the training model is ``torch.compile(model, backend="fxdp")`` (one graph per region)."""
        model = super()._wrap_model(model, training, dataloader)
        if training and ddp.is_multi_process(self.args) and model is self.model:
            model = self.accelerator.prepare_model(model, evaluation_mode=True)  # marks it prepared: no DDP later
        if self._fxdp_compile and training and not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = torch.compile(model, backend="fxdp")
        return model

    def train(self, *args, **kwargs):
        """``Trainer.train``; private gradients left by an interrupted call (a logical batch that was
        never released nor charged, e.g. after a refused step) are dropped first, so they cannot
        leak into the next release."""
        clear_private_grads(self.model)
        if self.dp_optimizer is not None:
            self.dp_optimizer.reset_logical_batch()
        return super().train(*args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """Poisson logical batches of expected size L, each as gradient_accumulation_steps micro-batches."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = self.train_dataset
        n = check_train_dataset(dataset)
        ga = self.args.gradient_accumulation_steps
        logical = self.args.per_device_train_batch_size * ga * self.args.world_size
        q = logical / n
        if hasattr(dataset, "column_names"):  # a datasets.Dataset: drop the columns the model does not take
            dataset = self._remove_unused_columns(dataset, description="training")
            collate = self.data_collator
        else:
            collate = self._get_collator_with_removed_columns(self.data_collator, description="training")
        multi = ddp.is_multi_process(self.args)
        if self.sampler_generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            if multi:  # independent streams per rank (a shared seed would correlate the ranks' draws)
                self.sampler_generator = ddp.rank_sampler_generator(int(seed), self.privacy_args.secure_mode)
            else:
                self.sampler_generator = (generator_from_os_entropy() if self.privacy_args.secure_mode
                                          else torch.Generator().manual_seed(int(seed)))
        self._sampling = (q, logical, n)
        steps = math.ceil(n / logical)
        if multi:  # this rank's share of each global Poisson batch
            sampler = ddp.distributed_sampler(self.args, n, q, steps, self.sampler_generator)
        else:
            sampler = PoissonMicroBatchSampler(n, q, ga, steps, self.sampler_generator)
        workers = self.args.dataloader_num_workers
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=PerSampleCollator(collate, dataset),
                          num_workers=workers, pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=self.args.dataloader_persistent_workers if workers else False,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers else None)

    def _get_train_sampler(self, train_dataset=None):
        raise PrivacyError("fxdp: DPTrainer samples Poisson batches itself (get_train_dataloader).")

    def set_initial_training_values(self, args, dataloader, *rest, **kwargs):
        values = super().set_initial_training_values(args, dataloader, *rest, **kwargs)
        self._planned_steps = int(values[-1])  # the Trainer's max_steps: what σ is calibrated for
        return values

    def create_optimizer(self, model=None):
        """The Trainer's optimizer wrapped in :class:`fxdp.DPOptimizer`, with σ calibrated for the run."""
        if self.dp_optimizer is not None:
            return self.optimizer
        if not ddp.is_multi_process(self.args):
            dp = self._build_dp_optimizer(model)
        else:  # the ranks fail together: an error on one rank must not leave the others waiting
            dp, error = None, None
            try:
                dp = self._build_dp_optimizer(model)
            except Exception as exc:
                error = exc
            ddp.agree_and_broadcast(self.model, dp, self.privacy_args, self._sampling, self.budget, error)
        self.optimizer = self.dp_optimizer = dp
        return dp

    def _build_dp_optimizer(self, model):
        inner = super().create_optimizer(model)
        if self._sampling is None or self._planned_steps is None:
            raise ValueError("fxdp: DPTrainer builds its optimizer inside train() (it needs the sampling rate and the "
                             "number of steps).")
        q, logical, n = self._sampling
        pa = self.privacy_args
        delta, steps = pa.delta_for(n), self._planned_steps
        accountant = create_accountant(pa.accountant)
        if pa.noise_multiplier is None:
            sigma = get_noise_multiplier(target_epsilon=pa.target_epsilon, target_delta=delta, sample_rate=q,
                                         steps=steps, accountant=pa.accountant, epsilon_tolerance=pa.epsilon_tolerance)
        else:
            sigma = float(pa.noise_multiplier)
            if pa.target_epsilon is not None:
                probe = create_accountant(pa.accountant)
                probe.history = [(sigma, q, steps)]
                eps = epsilon_spent(probe, delta)
                if eps > pa.target_epsilon:
                    raise PrivacyError(f"fxdp: noise_multiplier={sigma} over {steps} steps at q={q:.4g} spends "
                                       f"ε = {eps:.4g} > target_epsilon = {pa.target_epsilon} (δ = {delta:g}).")
        self.budget = Budget(accountant, delta, pa.target_epsilon, sigma, q, steps)
        if ddp.is_multi_process(self.args):  # noise once on rank 0, bucketed sum of the clipped sums
            dp = ddp.distributed_optimizer(inner, sigma, pa.config.max_grad_norm, logical, secure=pa.secure_mode,
                                           bucket_cap_mb=self.args.ddp_bucket_cap_mb)
        else:
            dp = DPOptimizer(inner, sigma, pa.config.max_grad_norm, expected_batch_size=logical,
                             loss_reduction="mean", secure_mode=pa.secure_mode)
        dp.attach_step_hook(PoissonCharge(accountant, q))
        dp.set_param_names(self.model)
        return dp

    # -------------------------------------------------------------- the step
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean over the micro-batch of per-sample losses (:mod:`fxdp.integrations.hf_loss`)."""
        inputs = dict(inputs)
        labels = {k: inputs.pop(k) for k in self.label_names if k in inputs}
        outputs = model(**inputs)
        if getattr(outputs, "loss", None) is not None or (isinstance(outputs, dict) and outputs.get("loss") is not None):
            raise PrivacyError("fxdp: the model returned a loss although DPTrainer passed it no labels; that loss is "
                               "computed over the whole batch. Rename the label column to one of "
                               f"{self.label_names} or pass PrivacyArguments(per_sample_loss_fn=...).")
        if not labels:
            raise ValueError(f"fxdp: the batch has no label column {self.label_names}; DPTrainer computes the "
                             "per-sample loss from the labels.")
        if self.privacy_args.per_sample_loss_fn is not None:
            per_sample = self.privacy_args.per_sample_loss_fn(outputs, labels)
        else:
            shift = self.privacy_args.shift_labels
            per_sample = default_per_sample_losses(outputs, labels, is_causal_lm(self.model) if shift is None else shift)
        loss = batch_mean(per_sample)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and backward of one micro-batch; its private gradients add to the logical batch's."""
        ddp.refuse_ddp_wrapped(model)
        model.train()
        inputs = self._prepare_inputs(inputs)
        if _rows(inputs) == 0:
            # An empty micro-batch (frequent under Poisson sampling) contributes an exact zero clipped sum;
            # many models cannot run a forward on zero rows (HF GPT-2 reshapes its attention mask).
            add_zero_private_grads(self.model)
            return torch.zeros((), device=self.args.device)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        self.accelerator.backward(loss)
        self._count_clipped()
        return loss.detach() / max(1, self.current_gradient_accumulation_steps)

    def _count_clipped(self):
        engine = get_engine(self.model)
        stats = engine.last_stats if engine is not None else None
        if not stats or stats is self._stats_seen or not self.privacy_args.log_clipped_fraction:
            return
        self._stats_seen = stats
        factors = [f.detach().float().reshape(-1) for f in stats.get("clip_factors", {}).values()]
        if factors and factors[0].numel():
            self._clip_counts[0] += int((torch.stack(factors) < 1).any(0).sum())
            self._clip_counts[1] += factors[0].numel()

    # ------------------------------------------------------------ reporting
    def get_epsilon(self) -> float:
        """ε spent so far at the run's δ (0 before the first step)."""
        return 0.0 if self.budget is None else self.budget.epsilon()

    def log(self, logs, start_time=None):
        if self.budget is not None and ("loss" in logs or "train_loss" in logs):
            logs.pop("grad_norm", None)  # the Trainer's pre-step norm of p.grad: always 0 here (gradients are private)
            logs["epsilon"] = self.budget.epsilon()
            logs["noise_multiplier"] = self.budget.sigma
            logs["max_grad_norm"] = self.privacy_args.config.max_grad_norm
            if self.privacy_args.log_clipped_fraction and ddp.is_multi_process(self.args):
                self._clip_counts = ddp.sum_over_ranks(self._clip_counts)  # collective: every rank logs
            if self._clip_counts[1]:
                logs["clipped_fraction"] = self._clip_counts[0] / self._clip_counts[1]
                self._clip_counts = [0, 0]
        super().log(logs, start_time)

    # ----------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.budget is None:
            return
        states = None
        if ddp.is_multi_process(self.args):  # collective: rank 0 saves every rank's sampler stream
            states = ddp.sampler_states(self.sampler_generator, self.privacy_args.secure_mode)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_state(self, folder, states)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None and not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_FILE)):
            raise PrivacyError(f"fxdp: the checkpoint {checkpoint} has no {OPTIMIZER_FILE}: the noise generator's "
                               "state would restart and replay earlier noise. Resume from a full checkpoint "
                               "(save_only_model=False).")
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_state(self, checkpoint)


__all__ = ["DPTrainer", "PrivacyArguments"]


def _rows(inputs) -> int:
    """The number of rows of a collated micro-batch (-1 if it holds no tensor)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return -1


def add_zero_private_grads(model) -> None:
    """The clipped sum of an empty batch: zero, for every trainable parameter without a private gradient yet."""
    for p in model.parameters():
        if p.requires_grad and getattr(p, "private_grad", None) is None:
            p.private_grad = torch.zeros(p.shape, dtype=accumulation_dtype(p), device=p.device)

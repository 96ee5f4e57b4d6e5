"""The Trainer a run trains with, built through its public API: hpclora's loss from the labelled positions only
(loss.py, as the Trainer's `compute_loss_func`), its one token-weighted validation loss, the real tokens
trained, checkpoints published whole (checkpoint.py), a stop signal agreed by every rank at a step boundary,
TensorBoard events in the run directory, and DDP or FSDP through accelerate for several ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..config import RunConfig
from ..internals import (TokenizedPreferenceData, fp16_loss_scaling_on_cpu, fsdp_on_cpu, narrower_preference_head_tiles, tensorboard_callback,
                         warmup_from_the_first_step)
from . import checkpoint, distributed
from .kernels import LIGER_CONFIG, reads_varlen_bounds
from .preempt import StopRequest
from .progress import ProgressLog
from .tracking import TENSORBOARD_DIR


def build_trainer(cfg, model, tokenizer, data, out: Path, precision: str, sharded: bool, liger: bool, steps: int,
                  progress: ProgressLog, stop: StopRequest, trackers: list[str], at_train_begin, checkpoint_state):
    """The Trainer, through its public API: `at_train_begin()` runs before the first step (the base model's
    evaluation), `checkpoint_state()` is what hpclora adds to each checkpoint."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

    from ..data import Collator
    from .loss import LabelledHead, output_head

    preference = cfg.method.name != "sft"
    if preference:
        from . import preference as methods

        Base, Arguments = methods.trainer_class(cfg.method.name)
        steps_class: type = PreferenceSteps
        narrower_preference_head_tiles()
    else:
        Base, Arguments, steps_class = Trainer, TrainingArguments, SupervisedSteps

    class HpcloraTrainer(steps_class, Base):
        """Counts real tokens for throughput and evaluates as the method does (the steps class), with the run's
        mixed precision, adapter-only FSDP saves and a warmup that starts at the first step."""

        run_method = cfg.method.name
        tokens_seen = 0  # real tokens trained by all ranks (summed at each step's end)
        local_tokens = 0  # this rank's, since the last step's end
        evaluated: tuple[int, dict] | None = None  # (step, metrics) of the latest periodic evaluation

        def autocast_smart_context_manager(self, cache_enabled=True):
            """The mixed precision training's forward runs under, for the evaluations too (accelerate puts it around
            the prepared model's forward only, which the loss of loss.py does not call); fp16 on a CPU: torch's CPU
            autocast, which accelerate would not give (internals.fp16_loss_scaling_on_cpu)."""
            import torch

            if fp16_on_cpu:
                return torch.autocast("cpu", dtype=torch.float16, cache_enabled=cache_enabled)
            return self.accelerator.autocast()

        def save_model(self, output_dir=None, _internal_call=False):
            """Under FSDP only the adapter is gathered and saved (accelerate's FSDP checkpoint beside it is the adapter
            alone too): the Trainer's own gathers the whole model into rank 0's memory first."""
            if not self.is_fsdp_enabled:
                return super().save_model(output_dir, _internal_call)
            weights = distributed.gathered_trainable_state(self.model)
            if self.args.should_save:
                self.model.save_pretrained(output_dir or self.args.output_dir, state_dict=weights, selected_adapters=["default"])

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:  # made once; no step of warmup at a learning rate of 0
                made = super().create_scheduler(num_training_steps, optimizer)
                self.lr_scheduler = warmup_from_the_first_step(made, self.args.get_warmup_steps(num_training_steps))
            return self.lr_scheduler

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            step = self.state.global_step
            if metric_key_prefix == "eval" and self.evaluated and self.evaluated[0] == step:
                return self.evaluated[1]  # asked again at a step that is also an epoch's end: measured and logged once
            if metric_key_prefix == "eval" and step >= self.state.max_steps:
                return {}  # the last step's weights are the final ones: the final evaluation measures them, once
            model, started = self.model, time.time()
            was_training = model.training
            model.eval()
            # Evaluating must not move training's random numbers (a DataLoader draws its seed from them), so
            # that a restart that reuses the base evaluation, or another eval_every, trains the same steps.
            import torch

            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            rows = self.eval_dataset if eval_dataset is None else eval_dataset
            with torch.random.fork_rng(devices=devices):
                metrics = self.measure(rows, metric_key_prefix)
            metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - started, 3)
            self.log(metrics)  # to every callback's on_log (the progress log, TensorBoard, W&B), in eval mode
            model.train(was_training)
            if metric_key_prefix == "eval":
                self.evaluated = (step, metrics)
            return metrics

        def summed_over_shards(self, rows, numbers, width: int, collate=None) -> list[float]:
            """`numbers(batch)` (`width` of them) summed over every row of `rows`, each on exactly one rank and collated
            by `collate` (else the training's collator); a rank out of rows still joins the forward passes (under FSDP
            each is a collective) without counting them (eval_shard)."""
            import torch

            world = distributed.world()
            batches, runs = eval_shard(len(rows), world.rank, world.size, self.args.per_device_eval_batch_size)
            totals = torch.zeros(width, dtype=torch.float64, device=self.args.device)
            for i in range(runs):
                batch = (collate or self.data_collator)([rows[j] for j in (batches[i] if i < len(batches) else [0])])
                batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with self.autocast_smart_context_manager():
                    values = numbers(batch)
                if i < len(batches):
                    totals += torch.tensor(values, dtype=torch.float64, device=self.args.device)
            if world.size > 1:  # each rank held a shard
                torch.distributed.all_reduce(totals)
            return totals.tolist()

    class PublishCheckpoint(TrainerCallback):
        """Trainer writes each checkpoint into the staging area (its output_dir); once it is whole, it is
        checksummed, marked and renamed into checkpoints/ (checkpoint.publish)."""

        def __init__(self, state: callable):
            self.state = state  # what hpclora adds to each checkpoint

        def on_save(self, args, state, control, **kwargs):
            distributed.barrier()  # every rank has written its part (its RNG state)
            if state.is_world_process_zero:
                staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                checkpoint.publish(staged, out / "checkpoints", self.state(), cfg.train.keep_checkpoints)
            distributed.barrier()

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            at_train_begin()

    class StopAtStepBoundary(TrainerCallback):
        """At each step's end the ranks sum (stop asked, tokens trained) in one small collective: after a stop
        signal to any of them all save a checkpoint of this step and stop, and tokens_seen counts the world."""

        def on_step_end(self, args, state, control, **kwargs):
            stops, tokens = distributed.sum_over_ranks([float(stop.requested), float(trainer.local_tokens)])
            trainer.tokens_seen += int(tokens)
            trainer.local_tokens = 0
            if stops:
                control.should_save = True
                control.should_training_stop = True

    import torch

    cuda = torch.cuda.is_available()
    fp16_on_cpu = precision == "fp16" and not cuda
    has_val = data.val is not None
    t = cfg.train
    args = Arguments(
        output_dir=str(out / "checkpoints" / checkpoint.STAGING),
        max_steps=steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=int(t.warmup_ratio * steps),
        # unpacked SFT rows: each item is a micro-batch of rows of similar length (train.batched_by_length)
        per_device_train_batch_size=t.micro_batch_size if cfg.data.packing or preference else 1,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16" and cuda,
        logging_strategy="steps",
        logging_steps=t.log_every,
        eval_strategy="steps" if has_val and t.eval_every else "no",
        eval_steps=t.eval_every or None,
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or None,
        save_total_limit=1,  # in the staging area, emptied by each publish; checkpoint.publish keeps train.keep_checkpoints
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        report_to=trackers or "none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not cuda,
        # Several ranks (torchrun): DDP on NCCL or gloo, through the process group distributed.start joined.
        ddp_backend=("nccl" if cuda else "gloo") if distributed.world().size > 1 else None,
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter gets a gradient
        ddp_timeout=distributed.COLLECTIVE_TIMEOUT_S,
        **(fsdp_arguments() if sharded else {}),
        **({"use_liger_kernel": True, "liger_kernel_config": LIGER_CONFIG} if liger else {}),
        **(methods.method_arguments(cfg) if preference else {}),
        **({"pad_to_multiple_of": 8 if cuda else None} if cfg.method.name in ("dpo", "kto") else {}),
    )
    # The loss from the labelled positions' hidden states only (loss.py); FSDP (whose head is a shard) and other
    # architectures use the model's own loss. Either way the Trainer normalises it over the accumulated batch.
    callbacks = [AtTrainBegin(), progress, StopAtStepBoundary(), PublishCheckpoint(checkpoint_state)]
    if preference:  # TRL's collator of pairs, and its loss
        rows = methods.kl_rows(data.train, t.micro_batch_size, cfg.run.seed) if methods.with_kl_term(cfg.method) else data.train
        trainer = HpcloraTrainer(model=model, args=args, train_dataset=rows, eval_dataset=data.val, processing_class=tokenizer,
                                 callbacks=callbacks)
        methods.starting_reference(trainer.model, fresh_adapter=not cfg.model.adapter)
        if cfg.quant.bits:
            methods.trained_weights_in_fp32(trainer.model)
    else:
        head = None if sharded else output_head(model)
        labelled = LabelledHead(head) if head is not None else None
        trainer = HpcloraTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.val,
            data_collator=Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if cuda else 1,
                                   varlen=reads_varlen_bounds(cfg.model.attn_implementation)),
            callbacks=callbacks,
            compute_loss_func=labelled.loss if labelled is not None else None,
        )
    if fp16_on_cpu:
        fp16_loss_scaling_on_cpu(trainer.accelerator)
    if sharded and not cuda:
        fsdp_on_cpu(trainer)
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)  # ProgressLog prints instead
    # TensorBoard event files in every run (clusters are often offline; `tensorboard --logdir RUN_DIR`).
    trainer.add_callback(tensorboard_callback(str(out / TENSORBOARD_DIR)))
    return trainer


class SupervisedSteps:
    """SFT's steps: the collator's `num_tokens` counts real tokens (it never reaches the model), and the evaluation is
    the one token-weighted validation loss of loss.py."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.local_tokens += int(inputs.pop("num_tokens", 0))
        return super().training_step(model, inputs, num_items_in_batch)

    def measure(self, rows, prefix: str) -> dict:
        from .loss import summed_loss

        total, count = self.summed_over_shards(rows, lambda batch: summed_loss(self.model, batch), 2)
        return {f"{prefix}_loss": total / count, f"{prefix}_tokens": int(count)}


class PreferenceSteps(TokenizedPreferenceData):
    """Preference methods' steps (TRL's loss): the real tokens of the pairs counted, and an evaluation of the held-out
    pairs by the model's own preference and, against the reference, by DPO's implicit reward (job/preference.py)."""

    SEQUENCE_MASKS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")  # DPO's, KTO's; ORPO's and CPO's

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.local_tokens += sum(int(inputs[key].sum()) for key in self.SEQUENCE_MASKS if key in inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def tokenize_row(self, feature, model=None):
        """ORPO's and CPO's rows from the pairs the data stage tokenized (their own tokenize_row would tokenize text
        columns): prompt, then prompt + each answer with the prompt's labels masked."""
        from ..data.tokenize import IGNORE

        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = feature[f"{side}_ids"]
            row.update({f"{side}_input_ids": prompt + answer, f"{side}_attention_mask": [1] * (len(prompt) + len(answer)),
                        f"{side}_labels": [IGNORE] * len(prompt) + answer})
        return row

    def measure(self, rows, prefix: str) -> dict:
        from . import preference

        pad = self.processing_class.pad_token_id
        if "completion_ids" in rows.column_names:  # kto's labelled answers
            totals = self.summed_over_shards(rows, lambda batch: preference.summed_answer_numbers(self.model, batch),
                                             len(preference.ANSWER_KEYS), preference.unpaired_collator(pad))
            return preference.answer_metrics(dict(zip(preference.ANSWER_KEYS, totals)), self.args.beta, prefix)
        with_reference = self.run_method in preference.WITH_REFERENCE
        totals = self.summed_over_shards(
            rows, lambda batch: preference.summed_pair_numbers(preference.pair_scores(self.model, batch, with_reference)),
            5 if with_reference else 3, preference.pair_collator(pad))
        return preference.preference_metrics(dict(zip(preference.TOTAL_KEYS, totals)), self.args.beta, prefix)


def eval_shard(rows: int, rank: int, world: int, batch_size: int) -> tuple[list[list[int]], int]:
    """(this rank's validation rows in micro-batches, how many forward passes every rank runs). Each row is on exactly
    one rank; every rank runs as many passes as the rank with the most rows. The Trainer's own evaluation loader
    would instead pad the last batches with repeated rows (accelerate's even_batches), which the summed loss would
    then count twice."""
    mine = list(range(rank, rows, world))
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    most = -(-rows // world)
    return batches, -(-most // batch_size)


def fsdp_arguments() -> dict:
    """TrainingArguments for FSDP through accelerate (FSDP2): full shard of every decoder layer (the model's
    own no-split modules; activations are recomputed by those layers themselves, model.attach_lora), and
    checkpoints gathered whole, which for a PEFT model holds the adapter and its optimizer state only."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }

"""The in-job entrypoint: `hpclora train` runs this in-process, locally or inside a Slurm job.

It reads top to bottom: choose precision, set up the run directory, tokenizer, data and model, measure
the base model, train, measure the adapter, save. Everything it needs is in the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, distributed
from ..config import RunConfig, to_yaml
from ..config.slurm_syntax import slurm_mem_gb, slurm_time
from ..errors import UserError
from .kernels import LIGER_CONFIG, reads_varlen_bounds
from .preempt import StopRequest
from .progress import ProgressLog, emit, peak_allocated_gb, peak_memory_gb
from .quiet import quiet_libraries
from ..rundir import PROBE_FILE, STOP_MARKER_VAR, STOPPED_MARKER, config_hash, environment, job_header, prepare_run_dir, verdict, write_config, write_json, write_text_atomic
from .tracking import TENSORBOARD_DIR, report_to, start_wandb


@dataclass
class TrainedRun:
    run_dir: Path  # holds adapter/, config.yaml, env.json, metrics.jsonl, summary.json, checkpoints/
    model: object  # the PEFT model as it is in memory at the end of training
    tokenizer: object
    summary: dict
    finished: bool = True  # False: stopped by a signal after saving a checkpoint; run again to resume


def train(cfg: RunConfig, run_dir: str | None = None, fresh: bool = False, stop: StopRequest | None = None) -> TrainedRun:
    """Fine-tune per `cfg` and save the adapter into the run directory.

    Resumes from the newest complete checkpoint in the run directory. A stop signal (see preempt.py)
    makes it checkpoint at the next step boundary and return with `finished=False`. Pass an active
    StopRequest to listen from earlier on (the command line does, before the heavy imports).
    """
    if stop is not None:
        return _train(cfg, run_dir, fresh, stop)
    with StopRequest() as stop:
        return _train(cfg, run_dir, fresh, stop)


def _train(cfg: RunConfig, run_dir: str | None, fresh: bool, stop: StopRequest) -> TrainedRun:
    import transformers

    from ..catalog.precision import choose_precision, detect_device

    quiet_libraries()
    transformers.set_seed(cfg.run.seed)
    device, bf16_ok = detect_device()
    precision, why = choose_precision(cfg.train.precision, device, bf16_ok)

    trackers = report_to(cfg)
    world = distributed.world()
    distributed.start(world, cuda=device == "cuda")
    out, lock = prepare_run_dir(cfg, run_dir, fresh) if world.main else (None, None)  # rank 0's, shared below
    try:
        return _train_in(distributed.share(out), cfg, world, trackers, device, precision, why, stop)
    finally:
        if lock is not None:
            lock.close()  # the run directory is free for the next training


def _train_in(out: Path, cfg: RunConfig, world: distributed.World, trackers: list[str], device: str, precision: str, why: str,
              stop: StopRequest) -> TrainedRun:
    from ..data import batched_by_length, prepare
    from .model import attach_lora, load_base, load_tokenizer

    config_sha256 = config_hash(to_yaml(cfg))
    resume, base_loss = None, None
    if world.main:  # rank 0 decides about the run directory; every rank resumes from what it chose
        (out / STOPPED_MARKER).unlink(missing_ok=True)
        resume = find_resume_point(out, config_sha256, world.size)  # before config.yaml is written: refuse, lose nothing
        base_loss = reusable_base_loss(out, config_sha256) if resume is None else None  # before config.yaml is rewritten
        if trackers:
            start_wandb(cfg, out)
        config_text = write_config(out, cfg)
        write_json(out / "env.json", environment(device, precision, why))
        if cfg.run.probe:
            from ..site.probe import node_report

            write_json(out / PROBE_FILE, node_report(device))
        emit(job_header(out, config_text))
    resume, base_loss = distributed.share((resume, base_loss))
    emit(f"device {device} | precision {precision} ({why})")
    strategy = choose_strategy(cfg, world, device, precision)
    if world.size > 1:
        emit(f"world {world.size} ranks ({'NCCL' if device == 'cuda' else 'gloo'}), {strategy.upper()}: every rank trains on its share "
             "of each step's rows" + ("; weights, gradients and optimizer states are sharded over the ranks" if strategy == "fsdp" else ""))

    cfg, liger, choices = resolve_auto(cfg, device, precision)
    for line in choices:
        emit(line)

    tokenizer = load_tokenizer(cfg.model)
    with distributed.main_first():  # rank 0 tokenizes into the cache, the others read it
        data = prepare(cfg.data, tokenizer, cfg.run.seed, packed=cfg.data.packing)
    emit(describe_data(data.stats))

    sharded = strategy == "fsdp"
    model = load_base(cfg, precision, device, sharded)
    model, targets = attach_lora(model, cfg, sharded)
    trainable, total = model.get_nb_trainable_parameters()
    emit(f"model {cfg.model.name} ({model.config.model_type}) | LoRA r={cfg.lora.r} on {targets}")
    emit(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    if cfg.data.packing:
        micro_batches = math.ceil(len(data.train) / cfg.train.micro_batch_size)
    else:  # items of the training set become whole micro-batches of similar-length rows
        data.train = batched_by_length(data.train, cfg.train.micro_batch_size, cfg.run.seed)
        micro_batches = len(data.train)
    steps = total_steps(micro_batches, cfg, world.size)
    ranks = f" x {world.size} ranks" if world.size > 1 else ""
    emit(
        f"batch {cfg.train.micro_batch_size} x {cfg.train.grad_accum} accumulation{ranks} = "
        f"{cfg.train.micro_batch_size * cfg.train.grad_accum * world.size} rows/step | {steps} steps | up to {cfg.data.max_length} tokens/row"
    )
    progress = ProgressLog(out / "metrics.jsonl", tokens_seen=lambda: trainer.tokens_seen)

    def measure_base():  # when training begins: the Trainer has placed (under FSDP: sharded) the model by then
        nonlocal base_loss
        if resume is None and base_loss is None and data.val is not None:
            with model.disable_adapter():
                base_loss = trainer.evaluate(metric_key_prefix="base")["base_loss"]

    trainer = build_trainer(cfg, model, tokenizer, data, out, precision, sharded, liger, steps, progress, stop, trackers, measure_base,
                            checkpoint_state=lambda: {"step": trainer.state.global_step, "tokens_seen": trainer.tokens_seen,
                                                      "base_val_loss": base_loss, "config_sha256": config_sha256,
                                                      "world_size": world.size})

    restart = distributed.share(record_attempt(out, resume) if world.main else None)
    if resume is not None:
        state = checkpoint.read_state(resume)
        base_loss, trainer.tokens_seen = state["base_val_loss"], state["tokens_seen"]
        if world.main:
            keep_metrics_up_to(out / "metrics.jsonl", state["step"])
        emit(f"resumed from step {state['step']} (restart {restart})")
    else:  # a first start, or a restart before any checkpoint: from step 0, with no step logged twice
        if world.main:
            keep_metrics_up_to(out / "metrics.jsonl", 0 if base_loss is not None else -1)
        if base_loss is not None:
            emit(f"restart {restart} from step 0 (no checkpoint yet) | val_loss base {base_loss:.4f} (measured by the first start)")
    tokens_before = trainer.tokens_seen
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    step = trainer.state.global_step
    if step < steps:  # the ranks agreed on a stop (StopAtStepBoundary), which published this step's checkpoint
        saved = checkpoint.latest(out / "checkpoints")
        at = checkpoint.step_of(saved) if saved else 0
        what = ("checkpoint saved; the same command resumes from it" if at == step
                else f"the newest checkpoint is of step {at}; the same command resumes from there")
        by = stop.signal_name or "a stop signal to another rank"
        emit(f"stopped by {by} at step {step}/{steps}: {what}")
        if world.main:  # the job script's sign that the ranks stopped (torchrun would take exit 75 for a failure)
            for marker in (out / STOPPED_MARKER, *([Path(os.environ[STOP_MARKER_VAR])] if os.environ.get(STOP_MARKER_VAR) else [])):
                marker.write_text(f"{step}\n", encoding="utf-8")
        return TrainedRun(out, model, tokenizer, {"steps": step, "stopped_by": by}, finished=False)
    if stop.requested:  # every step is done: finishing costs less than a requeue would
        emit(f"{stop.signal_name} received after the last step: finishing (final evaluation, adapter) instead of checkpointing")

    final_loss = None
    if data.val is not None:
        step = trainer.state.global_step
        if progress.last_eval and progress.last_eval[0] == step:  # just evaluated at this very step
            final_loss = progress.last_eval[1]
            progress.evaluation(step, "final", final_loss)
        else:
            final_loss = trainer.evaluate(metric_key_prefix="final")["final_loss"]

    # Under FSDP every rank holds a shard of the adapter: they all take part in gathering it.
    weights = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if world.main:
        save_adapter(model, tokenizer, out, weights)
    runtime = result.metrics.get("train_runtime", 0.0)
    summary = {
        "base_val_loss": base_loss,
        "final_val_loss": final_loss,
        "val_loss_change": None if base_loss is None or final_loss is None else final_loss - base_loss,
        "train_loss": result.training_loss,  # over this attempt's steps when the run was resumed
        "steps": trainer.state.global_step,
        "tokens": trainer.tokens_seen,
        "restarts": restart,
        "runtime_s": round(runtime, 1),  # this attempt's
        "tokens_per_s": round((trainer.tokens_seen - tokens_before) / max(runtime, 1e-9), 1),
        "peak_mem_gb": round(peak_memory_gb(), 3),
        "peak_mem_allocated_gb": None if (allocated := peak_allocated_gb()) is None else round(allocated, 3),
        "precision": precision,
        "target_modules": targets,
        "trainable_params": trainable,
        "data": data.stats,
    }
    if world.main:
        write_json(out / "summary.json", summary)
    emit(describe_result(summary, out))
    return TrainedRun(out, model, tokenizer, summary)


def choose_strategy(cfg: RunConfig, world: distributed.World, device: str, precision: str) -> str:
    """single, ddp or fsdp: train.distributed as `hpclora submit` resolved it, or for `auto` the planner's choice
    (DDP when it cannot tell); FSDP only where it can work (bf16 GPUs)."""
    from .. import plan

    if world.size == 1:
        return "single"
    strategy = cfg.train.distributed
    if strategy == "auto":  # planned for the world torchrun started, which a hand-written job may not have in its config
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
        slurm = dataclasses.replace(cfg.slurm, nodes=world.size // per_node, gpus=per_node if device == "cuda" else 0)
        try:
            strategy = plan.make_plan(dataclasses.replace(cfg, slurm=slurm, train=dataclasses.replace(cfg.train, cpu_ranks=per_node))).strategy
        except UserError:
            strategy = "ddp"
    if strategy == "fsdp" and (device != "cuda" or precision != "bf16"):
        what = "CPU ranks" if device != "cuda" else f"{precision} on this GPU"
        raise UserError(f"train.distributed: FSDP trains in bf16 on GPUs, not with {what}: use train.distributed=ddp "
                        "(with quant.bits=4 where a replica does not fit a GPU)")
    return strategy


def resolve_auto(cfg: RunConfig, device: str, precision: str) -> tuple[RunConfig, bool, list[str]]:
    """The config with data.packing and train.gradient_checkpointing decided (`hpclora submit` has already
    decided them for its jobs; a run started by hand decides here, for the memory it really has) and the
    attention kernel chosen, whether the Liger kernels run, and a log line for each decision."""
    from .. import plan
    from .kernels import kernels_here
    from ..catalog.models import packing_choice

    try:
        model_type = plan.find_dims(cfg)[0].model_type
    except UserError:  # no config.json the planner can read: the model's own config tells
        from transformers import AutoConfig

        from .model import from_pretrained

        model_type = from_pretrained(AutoConfig, cfg.model.name, cfg.model).model_type
    packing, packing_why = packing_choice(cfg.data.packing, model_type, cfg.data.max_length)
    checkpointing, layers = cfg.train.gradient_checkpointing, cfg.train.checkpointed_layers
    if checkpointing == "auto":
        try:
            p = plan.make_plan(cfg, device=this_device(device), capacity_gb=memory_here_gb(device))
            checkpointing, layers, checkpointing_why = p.gradient_checkpointing, p.checkpointed_layers, p.checkpointing_reason
        except UserError as exc:
            checkpointing, checkpointing_why = False, f"auto, without a plan ({exc})"
    else:
        checkpointing_why = f"train.gradient_checkpointing={str(checkpointing).lower()}"
        if checkpointing and layers:
            checkpointing_why += f", train.checkpointed_layers={layers}"
    kernels = kernels_here(cfg.model.attn_implementation, model_type, precision, device, packed=packing)
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packing),
                                   train=dataclasses.replace(cfg.train, gradient_checkpointing=checkpointing, checkpointed_layers=layers),
                                   model=dataclasses.replace(cfg.model, attn_implementation=kernels.attention))
    lines = [f"data: {packing_why}", f"gradient checkpointing {'on' if checkpointing else 'off'}: {checkpointing_why}", *kernels.lines]
    return resolved, kernels.liger, lines


def this_device(device: str):
    """The planner's description of the device this process trains on."""
    import torch

    from ..plan import DEVICES, Device

    if device != "cuda":
        return DEVICES["cpu"]
    index = distributed.world().local_rank
    props = torch.cuda.get_device_properties(index)
    return Device(props.name, props.total_memory / 1e9, torch.cuda.is_bf16_supported(including_emulation=False), 0.0, 0.6)


def memory_here_gb(device: str) -> float:
    """Memory this training has: its GPU's, or on CPU the job's (Slurm's --mem) or else the machine's."""
    if device == "cuda":
        return this_device(device).memory_gb
    if os.environ.get("SLURM_MEM_PER_NODE"):
        return slurm_mem_gb(os.environ["SLURM_MEM_PER_NODE"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def find_resume_point(run_dir: Path, config_sha256: str, world_size: int = 1) -> Path | None:
    """The newest sound checkpoint of this very config and world size, after clearing what a killed save
    left and moving damaged ones aside."""
    root = run_dir / "checkpoints"
    checkpoint.discard_partial(root)
    latest = checkpoint.newest_sound(root, emit)
    if latest is None:
        return None
    state = checkpoint.read_state(latest)
    if state["config_sha256"] != config_sha256:
        raise UserError(
            f"{run_dir} holds checkpoints of a different config: resume with the config.yaml in it, "
            "or pass --fresh (or another --run-dir) to start over"
        )
    saved_by = state.get("world_size", 1)
    if saved_by != world_size:  # each rank's random state and data share belong to that world
        raise UserError(
            f"{run_dir}: its newest checkpoint ({latest.name}) was written by {saved_by} rank(s) and this training has "
            f"{world_size}: resume with {saved_by} (the same nodes x GPUs), or pass --fresh to start over"
        )
    return latest


def reusable_base_loss(run_dir: Path, config_sha256: str) -> float | None:
    """The base model's validation loss measured by an earlier start of this very config that died before
    its first checkpoint (an OOM kill, a node failure): measuring it again would give the same number."""
    old_config, metrics = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not (old_config.is_file() and metrics.is_file()) or config_hash(old_config.read_text(encoding="utf-8")) != config_sha256:
        return None
    for line in metrics.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("eval") == "base":
            return entry["val_loss"]
    return None


def record_attempt(run_dir: Path, resume: Path | None) -> int:
    """Append this start to attempts.jsonl; return how many starts came before it (the restart number)."""
    path = run_dir / "attempts.jsonl"
    before = len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0
    entry = {
        "restart": before, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "resumed_from": checkpoint.step_of(resume) if resume else None,
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    return before


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint (step -1: all of them): the resumed run logs those steps again."""
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line).get("step", 0) <= step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def total_steps(micro_batches: int, cfg: RunConfig, world_size: int = 1) -> int:
    """Optimizer steps for the run: max_steps if set, else epochs over the training set's micro-batches, of
    which each step takes grad_accum x world_size."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(micro_batches / cfg.train.grad_accum / world_size)
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def build_trainer(cfg, model, tokenizer, data, out: Path, precision: str, sharded: bool, liger: bool, steps: int,
                  progress: ProgressLog, stop: StopRequest, trackers: list[str], at_train_begin, checkpoint_state):
    """The Trainer, through its public API: `at_train_begin()` runs before the first step (the base model's
    evaluation), `checkpoint_state()` is what hpclora adds to each checkpoint."""
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.integrations import TensorBoardCallback

    from ..data import Collator

    class HpcloraTrainer(Trainer):
        """Counts real tokens for throughput (the collator's `num_tokens` never reaches the model) and
        evaluates with the one token-weighted loss of loss.py."""

        tokens_seen = 0  # real tokens trained by all ranks (summed at each step's end)
        local_tokens = 0  # this rank's, since the last step's end

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.local_tokens += int(inputs.pop("num_tokens", 0))
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """The model's own loss, computed from the hidden states of labelled positions only (loss.py): the
            same number and gradients without the (tokens x vocabulary) logits. Normalised as the Trainer does
            for a model's loss: over the accumulated batch's labelled tokens, on every rank."""
            from .loss import HeadInputs, labelled_loss, output_head

            head = None if sharded else output_head(self.accelerator.unwrap_model(model))
            if head is None:  # other architectures, and FSDP (its head is a shard): the model's own loss
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            with HeadInputs(head) as seen:
                outputs = model(**inputs)
            total, count = labelled_loss(seen.hidden, labels, head)
            loss = total / (num_items_in_batch if num_items_in_batch is not None else max(count, 1))
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over the ranks
            return (loss, outputs) if return_outputs else loss

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            import torch

            from .loss import summed_loss

            model, started = self.model, time.time()
            was_training = model.training
            model.eval()
            totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)  # loss sum, token count
            # Evaluating must not move training's random numbers (a DataLoader draws its seed from them), so
            # that a restart that reuses the base evaluation, or another eval_every, trains the same steps.
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                for batch in self.get_eval_dataloader(eval_dataset):
                    with self.autocast_smart_context_manager():
                        total, count = summed_loss(model, {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()})
                    totals += torch.tensor([total, count], dtype=torch.float64, device=self.args.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():  # each rank held a shard
                torch.distributed.all_reduce(totals)
            model.train(was_training)
            metrics = {f"{metric_key_prefix}_loss": (totals[0] / totals[1]).item(), f"{metric_key_prefix}_tokens": int(totals[1]),
                       f"{metric_key_prefix}_runtime": round(time.time() - started, 3)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

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

    has_val = data.val is not None
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(out / "checkpoints" / checkpoint.STAGING),
        max_steps=steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=int(t.warmup_ratio * steps),
        per_device_train_batch_size=t.micro_batch_size if cfg.data.packing else 1,  # unpacked: each item is a micro-batch
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
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
        use_cpu=not _cuda(),
        # Several ranks (torchrun): DDP on NCCL or gloo, through the process group distributed.start joined.
        ddp_backend=("nccl" if _cuda() else "gloo") if distributed.world().size > 1 else None,
        ddp_find_unused_parameters=False,  # LoRA: every trainable parameter gets a gradient
        ddp_timeout=distributed.COLLECTIVE_TIMEOUT_S,
        **(fsdp_arguments(cfg) if sharded else {}),
        **({"use_liger_kernel": True, "liger_kernel_config": LIGER_CONFIG} if liger else {}),
    )
    trainer = HpcloraTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.val,
        data_collator=Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if _cuda() else 1,
                               varlen=reads_varlen_bounds(cfg.model.attn_implementation)),
        callbacks=[AtTrainBegin(), progress, StopAtStepBoundary(), PublishCheckpoint(checkpoint_state)],
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)  # ProgressLog prints instead
    # TensorBoard event files in every run (clusters are often offline; `tensorboard --logdir RUN_DIR`),
    # in the run directory: the callback's documented TENSORBOARD_LOGGING_DIR, which also holds for the
    # writer it opens again after training (for the final evaluation).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / TENSORBOARD_DIR)
    trainer.add_callback(TensorBoardCallback())
    return trainer


def fsdp_arguments(cfg: RunConfig) -> dict:
    """TrainingArguments for FSDP through accelerate (FSDP2): full shard of every decoder layer (the model's
    own no-split modules), the activations recomputed by FSDP where gradient checkpointing is on, and
    checkpoints gathered whole, which for a PEFT model holds the adapter and its optimizer state only."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": cfg.train.gradient_checkpointing is True,
        },
    }


def save_adapter(model, tokenizer, out: Path, weights: dict | None = None) -> Path:
    """Write adapter/ (PEFT weights + tokenizer) atomically: a partial adapter is never left in place.
    `weights`: the model's full state dict where it is sharded (FSDP), gathered by every rank."""
    target = out / "adapter"
    tmp = out / ".adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def describe_data(stats: dict) -> str:
    parts = [f"data {stats['rows']} rows ({stats['format']}, template {stats['template']})"]
    for split in ("train", "val"):
        if f"{split}_examples" in stats:
            extra = f", {stats[f'{split}_packed_rows']} packed rows" if f"{split}_packed_rows" in stats else ""
            cached = " (cached)" if stats.get(f"{split}_cached") else ""
            parts.append(f"{split} {stats[f'{split}_examples']} examples, {stats[f'{split}_tokens']:,} tokens{extra}{cached}")
            if stats[f"{split}_truncated"] or stats[f"{split}_dropped"]:
                parts.append(f"{split}: {stats[f'{split}_truncated']} truncated, {stats[f'{split}_dropped']} dropped (no response left)")
    return " | ".join(parts)


def describe_result(summary: dict, out: Path) -> str:
    lines = [f"done: {summary['steps']} steps in {slurm_time(summary['runtime_s'])}, {summary['tokens_per_s']:,.0f} tok/s, peak mem {summary['peak_mem_gb']:.1f} GB"]
    if summary["base_val_loss"] is not None:
        change = summary["val_loss_change"]
        lines.append(f"val_loss base {summary['base_val_loss']:.4f} -> adapter {summary['final_val_loss']:.4f} "
                     f"({change:+.4f}: {verdict(summary['base_val_loss'], summary['final_val_loss'])})")
    lines.append(f"adapter saved to {out / 'adapter'}")
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()

"""The in-job entrypoint: `hpclora train` runs this in-process, locally or inside a Slurm job.

It reads top to bottom: choose the device and precision, take the run directory, decide what is left to
decide, set up tokenizer, data and model, measure the base model, train, measure the adapter, save.
Everything it needs is in the resolved config.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..catalog.precision import cpu_job_notes
from ..config import RunConfig, to_yaml
from ..config.slurm_syntax import slurm_time
from ..rundir import PROBE_FILE, STOP_MARKER_VAR, STOPPED_MARKER, config_hash, metric_entries, resume_command, staged, verdict, write_config, write_json
from ..stops import CANCEL_REQUEST, CANCELLED, job_label
from . import checkpoint, distributed
from .preempt import StopRequest
from .preference import evaluation_numbers, held_out_change
from .progress import ProgressLog, emit, peak_allocated_gb, peak_memory_gb
from .quiet import quiet_libraries
from .resume import find_resume_point, first_start, keep_metrics_up_to, record_attempt, reusable_base_loss
from .tracking import report_to, start_wandb
from .workdir import environment, job_header, prepare_run_dir


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

    from ..catalog.precision import choose_precision, trained_bias_problem
    from ..errors import UserError
    from .gpu_expected import require_usable_gpu
    from .resolve import detect_device

    quiet_libraries()
    transformers.set_seed(cfg.run.seed)
    device, bf16_ok = detect_device()
    if cpu_anyway := require_usable_gpu(cfg.slurm.gpus):  # a job that asked for a GPU does not train on the CPU, unless told
        emit(cpu_anyway)
    precision, why = choose_precision(cfg.train.precision, device, bf16_ok)
    if problem := trained_bias_problem(cfg.lora.bias, cfg.quant.bits, cfg.quant.compute_dtype, precision):
        raise UserError(f"lora.bias: {problem}")  # precision `auto` became fp16 on this GPU

    trackers = report_to(cfg)
    world = distributed.world()
    distributed.start(world, cuda=device == "cuda")
    out, lock = prepare_run_dir(cfg, run_dir, fresh) if world.main else (None, None)  # rank 0's, shared below
    try:
        return _train_in(distributed.share(out), cfg, world, trackers, device, precision, why, stop)
    except KeyboardInterrupt:  # a second Ctrl-C (preempt.py): say what it cost
        if out is not None:
            emit(interrupted(out))
        raise
    finally:
        if lock is not None:
            lock.close()  # the run directory is free for the next training
        distributed.finish()


def _train_in(out: Path, cfg: RunConfig, world: distributed.World, trackers: list[str], device: str, precision: str, why: str,
              stop: StopRequest) -> TrainedRun:
    from ..data import batched_by_length, prepare
    from ..data.split import held_out_warning
    from ..plan.steps import total_steps
    from .model import attach_lora, load_base, load_tokenizer
    from .resolve import resolve_auto, strategy_for
    from .trainer import build_trainer

    config_sha256 = config_hash(to_yaml(cfg))
    resume, base_loss = None, None
    if world.main:  # rank 0 decides about the run directory; every rank resumes from what it chose
        stop.watch(out / CANCEL_REQUEST, job_label())  # the ranks stop together on what rank 0 hears (sum_over_ranks)
        resume = find_resume_point(out, config_sha256, world.size)  # before config.yaml is written: refuse, lose nothing
        base_loss = reusable_base_loss(out, config_sha256) if resume is None else None  # before config.yaml is rewritten
        if trackers:
            start_wandb(cfg, out)
        config_text = write_config(out, cfg)
        write_json(out / "env.json", environment(device, precision, why))
        if cfg.run.probe:
            from .node_report import node_report

            write_json(out / PROBE_FILE, node_report(device))
        emit(job_header(out, config_text))
    resume, base_loss = distributed.share((resume, base_loss))
    emit(f"device {device} | precision {precision} ({why})")
    if device == "cpu":
        for note in cpu_job_notes(cfg.quant.bits, cfg.train.optimizer, cfg.train.distributed):
            emit(note)
    if device == "cpu" and cfg.slurm.gpus > 0:
        emit(f"note: slurm.gpus={cfg.slurm.gpus} asks jobs for a GPU; run here, outside a Slurm job, this process has none and trains on the CPU")
    strategy, strategy_why = strategy_for(cfg, world, device, precision)
    if world.size > 1:
        emit(f"world {world.size} ranks ({'NCCL' if device == 'cuda' else 'gloo'}), {strategy.upper()} ({strategy_why}): every rank "
             "trains on its share of each step's rows" + ("; weights, gradients and optimizer states are sharded over the ranks"
                                                          if strategy == "fsdp" else ""))

    cfg, liger, choices = resolve_auto(cfg, device, precision)
    for line in choices:
        emit(line)

    tokenizer = load_tokenizer(cfg.model)
    with distributed.main_first():  # rank 0 tokenizes into the cache, the others read it
        data = prepare(cfg.data, tokenizer, cfg.run.seed, packed=cfg.data.packing, method=cfg.method.name)
    emit(describe_data(data.stats))
    if warning := held_out_warning(data.stats["rows"], cfg.data.val_size):
        emit(warning)

    sharded = strategy == "fsdp"
    preference = cfg.method.name != "sft"
    if preference and liger:
        liger = False
        emit("Liger kernels: not with preference methods (TRL scores the answers with its own fused head)")
    model = load_base(cfg, precision, device, sharded)
    model, targets = attach_lora(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    lora = model.peft_config["default"]
    start = f" | going on from {cfg.model.adapter}" if cfg.model.adapter else ""
    emit(f"model {cfg.model.name} ({model.config.model_type}) | LoRA r={lora.r} on {targets}{start}")
    if preference:
        emit(describe_method(cfg))
    emit(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    if cfg.data.packing or preference:
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
            # With LoRA's B matrices at zero the untrained adapter adds nothing: this is the base model's loss (as
            # `hpclora eval` measures it with the adapter disabled). Disabling it here would freeze the adapter for
            # FSDP's first forward, where FSDP fixes which parameters it reduces gradients for: none.
            measured = trainer.evaluate(metric_key_prefix="base")
            base_loss = evaluation_numbers(measured, "base") if preference else measured["base_loss"]

    trainer = build_trainer(cfg, model, tokenizer, data, out, precision, sharded, liger, steps, progress, stop, trackers, measure_base,
                            checkpoint_state=lambda: {"step": trainer.state.global_step, "tokens_seen": trainer.tokens_seen,
                                                      "base_val_loss": base_loss, "config_sha256": config_sha256,
                                                      "world_size": world.size, "trained_s": round(trained_s(), 1)})
    trained_before, resumed_step = 0.0, 0  # the training time and steps of the attempts before this one, as checkpointed

    def trained_s() -> float:  # the whole run's, up to now: what earlier attempts checkpointed, and this attempt's
        return trained_before + time.monotonic() - attempt_started

    restart = distributed.share(record_attempt(out, resume) if world.main else None)
    if resume is not None:
        state = checkpoint.read_state(resume)
        base_loss, trainer.tokens_seen = state["base_val_loss"], state["tokens_seen"]
        trained_before, resumed_step = state.get("trained_s", 0.0), state["step"]
        if world.main:
            keep_metrics_up_to(out / "metrics.jsonl", state["step"])
        emit(f"resumed from step {state['step']} (restart {restart})")
    else:  # a first start, or a restart before any checkpoint: from step 0, with no step logged twice
        if world.main:
            keep_metrics_up_to(out / "metrics.jsonl", 0 if base_loss is not None else -1)
        if base_loss is not None:
            emit(f"restart {restart} from step 0 (no checkpoint yet) | val_loss base {base_loss:.4f} (measured by the first start)")
    tokens_before, attempt_started = trainer.tokens_seen, time.monotonic()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as exc:
        if (refusal := checkpoint.save_refusal(exc, out / "checkpoints")) is None:
            raise
        raise refusal from exc
    step = trainer.state.global_step
    if step < steps:  # the ranks agreed on a stop (StopAtStepBoundary), which published this step's checkpoint
        return stopped(out, model, tokenizer, stop, step, steps, world)
    if stop.requested:  # every step is done: finishing costs less than a requeue would
        emit(f"{stop_name(stop)} asked for a stop after the last step: finishing (final evaluation, adapter) instead of checkpointing")

    final = trainer.evaluate(metric_key_prefix="final") if data.val is not None else None
    final_loss = None if final is None else evaluation_numbers(final, "final") if preference else final["final_loss"]

    # Under FSDP every rank holds a shard of the adapter: they all take part in gathering it.
    weights = distributed.gathered_trainable_state(trainer.model) if sharded else None
    if world.main:
        save_adapter(model, tokenizer, out, weights)
    runtime = result.metrics.get("train_runtime", 0.0)
    if preference:  # no validation loss: the held-out pairs' preference (preference.preference_metrics)
        base_loss, final_loss, held_out = None, None, {"method": cfg.method.name, "base_preference": base_loss, "final_preference": final_loss}
    else:
        held_out = {}
    summary = {
        "base_val_loss": base_loss,
        "final_val_loss": final_loss,
        "val_loss_change": None if base_loss is None or final_loss is None else final_loss - base_loss,
        **held_out,
        "train_loss": result.training_loss,  # over this attempt's steps when the run was resumed
        "steps": trainer.state.global_step,
        "tokens": trainer.tokens_seen,
        "restarts": restart,
        "runtime_s": round(runtime, 1),  # this attempt's
        "tokens_per_s": round((trainer.tokens_seen - tokens_before) / max(runtime, 1e-9), 1),  # this attempt's
        "attempt_steps": trainer.state.global_step - resumed_step,
        # The whole run, all attempts: the training time of the work kept (steps redone after a restart are counted
        # once), and the time from the first start, queue waits between attempts included.
        "run_trained_s": round(trained_s(), 1),
        "run_tokens_per_s": round(trainer.tokens_seen / max(trained_s(), 1e-9), 1),
        "run_span_s": None if (first := first_start(out)) is None else round(time.time() - first, 1),
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


def stopped(out: Path, model, tokenizer, stop: StopRequest, step: int, steps: int, world: distributed.World) -> TrainedRun:
    """Training stopped at a checkpoint before its end: say so, and leave the stop marker the job script reads
    (several ranks end with 0, which torchrun would otherwise take for the end of the run)."""
    saved = checkpoint.latest(out / "checkpoints")
    at = checkpoint.step_of(saved) if saved else 0
    what = "checkpoint saved" if at == step else f"the newest checkpoint is of step {at}"
    resume = resume_command(out)
    if not os.environ.get("SLURM_JOB_ID"):  # in a job its script says whether it requeues, and if not, this
        what += f"; to resume: {resume}"
    by = stop_name(stop) if stop.requested else "a stop signal to another rank"
    emit(f"stopped by {by} at step {step}/{steps}: {what}")
    if world.main:  # `<step> cancel`: the job script cancels the job instead of requeueing it; then how to resume
        why = CANCELLED if stop.cancelled else "stop"
        Path(os.environ.get(STOP_MARKER_VAR) or out / STOPPED_MARKER).write_text(f"{step} {why}\n{resume}\n", encoding="utf-8")
    return TrainedRun(out, model, tokenizer, {"steps": step, "stopped_by": by}, finished=False)


def interrupted(out: Path) -> str:
    """What a stop at once lost: the steps trained since the newest checkpoint, and how to go on from it."""
    saved = checkpoint.latest(out / "checkpoints")
    at = checkpoint.step_of(saved) if saved else 0
    metrics = out / "metrics.jsonl"
    logged = max((e["step"] for e in metric_entries(metrics) if "loss" in e), default=0) if metrics.is_file() else 0
    lost = f"what it trained after step {at} is lost" + (f" (logged up to step {logged})" if logged > at else "")
    kept = f"the newest checkpoint is of step {at}" if saved else "there is no checkpoint: it starts over"
    return f"stopped at once by a second Ctrl-C: {lost}; {kept}; to resume: {resume_command(out)}"


def stop_name(stop: StopRequest) -> str:
    return "`hpclora cancel`" if stop.cancelled else stop.signal_name


def save_adapter(model, tokenizer, out: Path, weights: dict | None = None) -> Path:
    """Write adapter/ (PEFT weights + tokenizer) in one rename: a partial adapter is never left in place.
    `weights`: the trainable state where the model is sharded (FSDP), gathered by every rank."""
    target = out / "adapter"
    with staged(target) as tmp:
        model.save_pretrained(tmp, state_dict=weights, selected_adapters=["default"])  # not a preference run's frozen reference
        tokenizer.save_pretrained(tmp)
    return target


def describe_data(stats: dict) -> str:
    parts = [f"data {stats['rows']} rows ({stats['format']}, template {stats['template']})"]
    if "sources" in stats:  # a mix: each source's part of the training examples
        trained = sum(s["train_examples"] for s in stats["sources"]) or 1
        parts = [f"data {stats['rows']} rows from {len(stats['sources'])} sources"] + [
            f"{Path(s['path']).name}: {s['rows']} rows ({s['format']}, template {s['template']}) x{s['weight']:g} = "
            f"{s['train_examples']} training examples ({s['train_examples'] / trained:.0%})" for s in stats["sources"]]
    for split in ("train", "val"):
        if f"{split}_examples" in stats:
            extra = f", {stats[f'{split}_packed_rows']} packed rows" if f"{split}_packed_rows" in stats else ""
            cached = " (cached)" if stats.get(f"{split}_cached") else ""
            parts.append(f"{split} {stats[f'{split}_examples']} examples, {stats[f'{split}_tokens']:,} tokens{extra}{cached}")
            if stats[f"{split}_truncated"] or stats[f"{split}_dropped"]:
                parts.append(f"{split}: {stats[f'{split}_truncated']} truncated, {stats[f'{split}_dropped']} dropped (no response left)")
    return " | ".join(parts)


def describe_result(summary: dict, out: Path) -> str:
    if not summary["restarts"]:
        lines = [f"done: {summary['steps']} steps in {slurm_time(summary['runtime_s'])}, {summary['tokens_per_s']:,.0f} tok/s, "
                 f"peak mem {summary['peak_mem_gb']:.1f} GB"]
    else:  # the whole run first: the last attempt alone is a part of it
        span = f"; {slurm_time(summary['run_span_s'])} since the first start, queue waits included" if summary["run_span_s"] else ""
        lines = [f"done: {summary['steps']} steps in {slurm_time(summary['run_trained_s'])} of training over {summary['restarts'] + 1} "
                 f"attempts, {summary['run_tokens_per_s']:,.0f} tok/s{span}",
                 f"this attempt: {summary['attempt_steps']} steps in {slurm_time(summary['runtime_s'])}, {summary['tokens_per_s']:,.0f} tok/s, "
                 f"peak mem {summary['peak_mem_gb']:.1f} GB"]
    if summary.get("base_preference") and summary.get("final_preference"):
        lines.append(held_out_change(summary["base_preference"], summary["final_preference"]))
    if summary["base_val_loss"] is not None:
        change = summary["val_loss_change"]
        lines.append(f"val_loss base {summary['base_val_loss']:.4f} -> adapter {summary['final_val_loss']:.4f} "
                     f"({change:+.4f}: {verdict(summary['base_val_loss'], summary['final_val_loss'])})")
    lines.append(f"adapter saved to {out / 'adapter'}")
    return "\n".join(lines)


def describe_method(cfg: RunConfig) -> str:
    from .preference import WITH_REFERENCE, beta, method_arguments

    m = cfg.method
    if m.name not in WITH_REFERENCE:
        reference = "reference-free"
    elif cfg.model.adapter:
        reference = f"reference: the starting adapter, frozen ({cfg.model.adapter})"
    else:
        reference = "reference: the base model (the adapter switched off)"
    args = method_arguments(cfg)
    loss = {"dpo": " + ".join(args.get("loss_type", [])), "orpo": "chosen answers' SFT + odds ratio",
            "simpo": f"simpo, margin gamma {m.simpo_gamma:g}",
            "kto": f"{args.get('loss_type')}, weights good {m.desirable_weight:g} / bad {m.undesirable_weight:g}"}[m.name]
    return f"method {m.name} | beta {beta(m):g} | loss {loss} | {reference}"

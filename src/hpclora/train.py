"""The in-job entrypoint: `hpclora train` runs this in-process, locally or inside a Slurm job.

It reads top to bottom: choose precision, set up the run directory, tokenizer, data and model, measure
the base model, train, measure the adapter, save. Everything it needs is in the resolved config.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig, to_yaml
from .progress import ProgressLog, emit, hms
from .quiet import quiet_libraries
from .rundir import environment, job_header, prepare_run_dir, write_json


@dataclass
class TrainedRun:
    run_dir: Path  # holds adapter/, config.yaml, env.json, metrics.jsonl, summary.json
    model: object  # the PEFT model as it is in memory at the end of training
    tokenizer: object
    summary: dict


def train(cfg: RunConfig, run_dir: str | None = None, fresh: bool = False) -> TrainedRun:
    """Fine-tune per `cfg` and save the adapter into the run directory."""
    import transformers

    from .data import prepare
    from .model import attach_lora, load_base, load_tokenizer
    from .precision import choose_precision, detect_device

    quiet_libraries()
    transformers.set_seed(cfg.run.seed)
    device, bf16_ok = detect_device()
    precision, why = choose_precision(cfg.train.precision, device, bf16_ok)

    out = prepare_run_dir(cfg, run_dir, fresh)
    write_json(out / "env.json", environment(device, precision, why))
    emit(job_header(out, to_yaml(cfg)))
    emit(f"device {device} | precision {precision} ({why})")

    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, cfg.run.seed)
    emit(describe_data(data.stats))

    model = load_base(cfg, precision, device)
    model, targets = attach_lora(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    emit(f"model {cfg.model.name} ({model.config.model_type}) | LoRA r={cfg.lora.r} on {targets}")
    emit(f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")

    steps = total_steps(len(data.train), cfg)
    emit(
        f"batch {cfg.train.micro_batch_size} x {cfg.train.grad_accum} accumulation = {cfg.train.micro_batch_size * cfg.train.grad_accum} rows/step"
        f" | {steps} steps | up to {cfg.data.max_length} tokens/row"
    )
    progress = ProgressLog(out / "metrics.jsonl", tokens_seen=lambda: trainer.tokens_seen)
    trainer = build_trainer(cfg, model, tokenizer, data, out, precision, steps, progress)

    base_loss = None
    if data.val is not None:
        with model.disable_adapter():
            base_loss = trainer.evaluate(metric_key_prefix="base")["base_loss"]
    result = trainer.train()
    final_loss = None
    if data.val is not None:
        step = trainer.state.global_step
        if progress.last_eval and progress.last_eval[0] == step:  # just evaluated at this very step
            final_loss = progress.last_eval[1]
            progress.evaluation(step, "final", final_loss)
        else:
            final_loss = trainer.evaluate(metric_key_prefix="final")["final_loss"]

    save_adapter(model, tokenizer, out)
    summary = {
        "base_val_loss": base_loss,
        "final_val_loss": final_loss,
        "val_loss_change": None if base_loss is None or final_loss is None else final_loss - base_loss,
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "tokens": trainer.tokens_seen,
        "runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "tokens_per_s": round(trainer.tokens_seen / max(result.metrics.get("train_runtime", 0.0), 1e-9), 1),
        "peak_mem_gb": round(_peak(), 3),
        "precision": precision,
        "target_modules": targets,
        "trainable_params": trainable,
        "data": data.stats,
    }
    write_json(out / "summary.json", summary)
    emit(describe_result(summary, out))
    return TrainedRun(out, model, tokenizer, summary)


def total_steps(train_rows: int, cfg: RunConfig) -> int:
    """Optimizer steps for the run: max_steps if set, else epochs over the (packed) training rows."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(train_rows / cfg.train.micro_batch_size / cfg.train.grad_accum)
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def build_trainer(cfg, model, tokenizer, data, out: Path, precision: str, steps: int, progress: ProgressLog):
    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    from .data import Collator

    class CountingTrainer(Trainer):
        """Counts real tokens for throughput; the collator's `num_tokens` never reaches the model."""

        tokens_seen = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.tokens_seen += int(inputs.pop("num_tokens", 0))
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop("num_tokens", None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    has_val = data.val is not None
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=steps,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=int(t.warmup_ratio * steps),
        per_device_train_batch_size=t.micro_batch_size,
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
        save_total_limit=2,
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=not _cuda(),
    )
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.val,
        data_collator=Collator(tokenizer.pad_token_id, pad_to_multiple_of=8 if _cuda() else 1),
        callbacks=[progress],
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)  # ProgressLog prints instead
    return trainer


def save_adapter(model, tokenizer, out: Path) -> Path:
    """Write adapter/ (PEFT weights + tokenizer) atomically: a partial adapter is never left in place."""
    target = out / "adapter"
    tmp = out / ".adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
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
    lines = [f"done: {summary['steps']} steps in {hms(summary['runtime_s'])}, {summary['tokens_per_s']:,.0f} tok/s, peak mem {summary['peak_mem_gb']:.1f} GB"]
    if summary["base_val_loss"] is not None:
        change = summary["val_loss_change"]
        verdict = "adapter is better" if change < 0 else "adapter is NOT better than the base model"
        lines.append(f"val_loss base {summary['base_val_loss']:.4f} -> adapter {summary['final_val_loss']:.4f} ({change:+.4f}: {verdict})")
    lines.append(f"adapter saved to {out / 'adapter'}")
    return "\n".join(lines)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak() -> float:
    from .progress import peak_memory_gb

    return peak_memory_gb()

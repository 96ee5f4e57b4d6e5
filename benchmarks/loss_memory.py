"""The training loss through the full logits (the model's own loss) against hpclora's loss from the hidden
states of labelled positions only (loss.py), side by side in fresh processes: one optimizer step's
forward and backward of the bundled SmolLM2-135M (fp32, CPU), LoRA r=8 on q_proj/v_proj, packed rows of
`--length` tokens of which `--response` are labelled, as in instruction data. Prints peak RSS and seconds
per step for each, and their ratios. The loss and gradients are equal (tests/test_loss.py).

    .venv/bin/python benchmarks/loss_memory.py [--rows 4] [--length 1024] [--response 0.5] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

STEP = r"""
import json, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from hpclora.job.bundled import bundled_model_dir
from hpclora import loss as hloss

variant, rows, length, response, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32)
model.config.use_cache = False
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])).train()
ids = torch.randint(10, model.config.vocab_size, (rows, length))
labels = ids.clone()
examples = 2  # two packed examples per row, each a prompt followed by its response
per = length // examples
positions = torch.arange(per).repeat(examples)[:length].expand(rows, -1).contiguous()
for e in range(examples):
    labels[:, e * per: e * per + int(per * (1 - response))] = -100
items = int((labels[:, 1:] != -100).sum())
times = []
for _ in range(steps):
    model.zero_grad()
    start = time.perf_counter()
    if variant == "full logits":
        loss = model(input_ids=ids, position_ids=positions, labels=labels, num_items_in_batch=items).loss
    else:
        head = hloss.output_head(model)
        with hloss.HeadInputs(head) as seen:
            model(input_ids=ids, position_ids=positions)
        total, _ = hloss.labelled_loss(seen.hidden, labels, head)
        loss = total / items
    loss.backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"loss": loss.item(), "s_per_step": min(times), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--response", type=float, default=0.5, help="share of each example's tokens that are labelled")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for variant in ("full logits", "labelled only"):
        done = subprocess.run([sys.executable, "-c", STEP, variant, str(args.rows), str(args.length), str(args.response), str(args.steps)],
                              capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["full logits"]
    print(f"SmolLM2-135M, LoRA r=8 q/v, fp32 CPU, {args.rows} packed rows x {args.length} tokens, {args.response:.0%} labelled; best of {args.steps} steps")
    print(f"{'loss path':<15} {'loss':>8} {'s/step':>8} {'peak RSS GB':>12} {'time ratio':>11} {'memory ratio':>13}")
    for name, r in results.items():
        print(f"{name:<15} {r['loss']:8.4f} {r['s_per_step']:8.2f} {r['peak_rss_gb']:12.2f} "
              f"{r['s_per_step'] / base['s_per_step']:11.2f} {r['peak_rss_gb'] / base['peak_rss_gb']:13.2f}")


if __name__ == "__main__":
    main()

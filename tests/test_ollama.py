"""The Modelfile `hpclora export` writes, read as Ollama reads one and its TEMPLATE rendered by Go's text/template
as Ollama prompts a model (tests/ollama/modelfile_check.go: Ollama itself cannot be installed here), against
hpclora's own rendering of the same conversation, for each template hpclora writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHECK = Path(__file__).parent / "ollama" / "modelfile_check.go"
CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "富士山の高さは？ \"引用\" と\\n"}]


@pytest.fixture(scope="module")
def modelfile_check(tmp_path_factory) -> Path:
    """The Go program, built once (Debian's golang-go: `make go`, part of `make test`)."""
    if shutil.which("go") is None:
        if os.environ.get("HPCLORA_REQUIRE_GO") == "1":
            pytest.fail("HPCLORA_REQUIRE_GO=1 but go is not on PATH; `make go` installs it")
        pytest.skip("go is not on PATH: `make go` (part of `make test`) installs it")
    tmp = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(tmp / "cache"), "GO111MODULE": "off", "HOME": str(tmp)}
    subprocess.run(["go", "build", "-o", str(tmp / "modelfile_check"), str(CHECK)], check=True, env=env, cwd=tmp)
    return tmp / "modelfile_check"


def read_as_ollama(check: Path, modelfile: str, tmp_path: Path) -> dict:
    (tmp_path / "Modelfile").write_text(modelfile, encoding="utf-8")
    messages = [{"Role": m["role"], "Content": m["content"]} for m in CONVERSATION]
    done = subprocess.run([str(check), str(tmp_path / "Modelfile")], input=json.dumps(messages), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("template", ["alpaca", "alpaca_ja", "calm", "none"])
def test_the_modelfile_reads_as_ollama_reads_it_and_its_template_renders_as_hpclora(template, modelfile_check, bundled_dir, tokenizer, tmp_path):
    import dataclasses

    from hpclora import config
    from hpclora.data import render
    from hpclora.data.templates import EOS
    from hpclora.results.export import modelfile
    from hpclora.results.generate import Sampling

    from conftest import tiny_run_yaml

    cfg = config.load(tiny_run_yaml(tmp_path, bundled_dir), check_files=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, template=template))
    eos = tokenizer.eos_token
    read = read_as_ollama(modelfile_check, modelfile("run-q8_0.gguf", cfg, {"eos": eos}, adapter_only=False), tmp_path)

    pieces = render(template, [dict(m, input="") for m in CONVERSATION], tokenizer)
    assert read["prompt"] == "".join(eos if text == EOS else text for text, _ in pieces)
    commands = dict(read["commands"])
    assert commands["from"] == "./run-q8_0.gguf" and commands["stop"] == eos
    defaults = Sampling()
    assert float(commands["temperature"]) == 0 and int(commands["num_predict"]) == defaults.max_new_tokens
    assert float(commands["top_p"]) == defaults.top_p and int(commands["top_k"]) == defaults.top_k


def test_an_adapter_alone_reads_as_a_base_and_an_adapter(modelfile_check, bundled_dir, tmp_path):
    from hpclora import config
    from hpclora.results.export import modelfile

    from conftest import tiny_run_yaml

    cfg = config.load(tiny_run_yaml(tmp_path, bundled_dir), check_files=False)
    read = read_as_ollama(modelfile_check, modelfile("run-lora-f16.gguf", cfg, {}, adapter_only=True), tmp_path)
    commands = dict(read["commands"])
    assert commands["adapter"] == "./run-lora-f16.gguf" and commands["from"].endswith(".gguf")
    assert "template" not in commands  # no EOS known from an adapter: Ollama takes the base GGUF's own template


def test_the_check_refuses_what_ollama_refuses(modelfile_check, tmp_path):
    """The reader itself: an unclosed multi-line value, an unknown instruction, no FROM."""
    for text in ('FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\n', "FROM ./m.gguf\nTEMPERATURE 0\n", "PARAMETER top_k 5\n"):
        (tmp_path / "Modelfile").write_text(text)
        done = subprocess.run([str(modelfile_check), str(tmp_path / "Modelfile")], input="[]", capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.startswith("modelfile:"), text

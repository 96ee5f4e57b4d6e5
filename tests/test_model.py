"""Model: LoRA target detection per architecture, precision choice, and real LoRA/QLoRA training steps."""

from __future__ import annotations

import json

import pytest

from hpclora import config
from hpclora.errors import UserError
from hpclora.job.model import attach_lora, choose_targets
from hpclora.catalog.precision import choose_precision

from conftest import ROOT, alpaca_rows, tiny_model, tiny_run_yaml, write_jsonl

EXPECTED = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def lora_cfg(*overrides):
    return config.load(None, ["data.path=x/y", *overrides])


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_auto_targets_every_projection_of_each_architecture(model_type):
    model = tiny_model(model_type)
    cfg = lora_cfg()
    assert choose_targets(model, cfg.lora) == EXPECTED[model_type]
    matching = sum(1 for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in EXPECTED[model_type])
    peft_model, _ = attach_lora(model, cfg)
    wrapped = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters() if "lora_A" in name}
    assert wrapped == set(EXPECTED[model_type])
    lora_a = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    assert len(lora_a) == matching >= 2 * len(EXPECTED[model_type])  # every matching layer of both blocks
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())


def test_user_targets_are_checked_against_the_model():
    model = tiny_model("llama")
    with pytest.raises(UserError, match=r"\['query_key_value'\] not found in this llama model; its linear layers are \["):
        choose_targets(model, lora_cfg("lora.target_modules=[q_proj,query_key_value]").lora)
    assert choose_targets(model, lora_cfg("lora.target_modules=[q_proj,v_proj]").lora) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "requested, device, bf16, expected",
    [
        ("auto", "cpu", False, "fp32"),
        ("auto", "cuda", True, "bf16"),   # A100, H100
        ("auto", "cuda", False, "fp16"),  # V100, T4
        ("fp32", "cuda", False, "fp32"),
    ],
)
def test_precision_choice(requested, device, bf16, expected):
    assert choose_precision(requested, device, bf16)[0] == expected


def test_impossible_precisions_are_user_errors_and_fp16_on_a_cpu_is_the_v100_path_tried_here():
    with pytest.raises(UserError, match="V100/T4 have no bf16"):
        choose_precision("bf16", "cuda", False)
    precision, why = choose_precision("fp16", "cpu", False)
    assert precision == "fp16" and "V100/T4 path" in why and "before the queue" in why


def train_tiny(tmp_path, tiny_llama_dir, *overrides):
    from hpclora.job.train import train

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    cfg = config.load(None, [
        f"model.name={tiny_llama_dir}", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
        f"run.output_root={tmp_path / 'runs'}", "data.val_size=4", "data.template=none", "train.micro_batch_size=2",
        "train.log_every=1", "train.save_every=0", "train.eval_every=0", *overrides,
    ])
    return train(cfg, run_dir=str(tmp_path / "run")).run_dir


def test_qlora_step_on_cpu(tmp_path, tiny_llama_dir):
    """bitsandbytes quantizes to nf4 and trains on CPU: the adapter lands and the base layers are 4-bit."""
    out = train_tiny(tmp_path, tiny_llama_dir, "quant.bits=4", "train.max_steps=2")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_val_loss"] is not None
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and set(adapter_cfg["target_modules"]) == set(EXPECTED["llama"])
    env = json.loads((out / "env.json").read_text())
    assert env["precision"] == "fp32" and env["packages"]["bitsandbytes"]


def test_qlora_model_really_is_4bit(tiny_llama_dir):
    import bitsandbytes as bnb

    from hpclora.job.model import load_base

    cfg = lora_cfg(f"model.name={tiny_llama_dir}", "quant.bits=4")
    model, _ = attach_lora(load_base(cfg, "fp32", "cpu"), cfg)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7 and four_bit[0].weight.quant_type == "nf4"


def test_run_directory_describes_itself(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = train_tiny(tmp_path, tiny_llama_dir, "train.max_steps=3", "data.packing=true", "data.max_length=128", "slurm.gpus=0")
    for name in ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/tokenizer.json"):
        assert (out / name).is_file(), name
    assert config.load_run_config(out / "config.yaml").data.packing is True
    env = json.loads((out / "env.json").read_text())
    assert env["slurm"]["SLURM_JOB_ID"] == "4242"
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml"):
            assert "hf_secret_value_123" not in path.read_text(errors="replace"), path
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    assert [s["eval"] for s in steps if "eval" in s] == ["base", "final"]


@pytest.mark.parametrize("quant", [[], ["quant.bits=4"]], ids=["lora", "qlora"])
def test_cli_train_prints_plain_progress_lines_in_a_batch_log(tmp_path, tiny_llama_dir, quant):
    """stdout is a pipe here, as in a Slurm log: one plain line per log step, no carriage returns. The program loads
    bitsandbytes (whose import compiles kernels) only for a run that uses it: Python's -X importtime names every
    module the process imported."""
    import re
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows(12))
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hpclora", "train", str(ROOT / "configs" / "demo-cpu.yaml"),
         f"model.name={tiny_llama_dir}", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=4",
         "train.max_steps=4", "train.log_every=1", "train.micro_batch_size=2", "train.eval_every=2", "train.gradient_checkpointing=true",
         *quant, "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600,
    )
    imported = {ln.rsplit("|", 1)[1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    said = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    assert proc.returncode == 0, said[-2000:]
    assert "\r" not in proc.stdout and "\r" not in said
    line = re.compile(r"^step (\d+)/4 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d,]+ tok/s \| mem [\d.]+ GB \| eta \d\d:\d\d:\d\d$")
    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ")]
    assert [int(line.match(ln).group(1)) for ln in progress] == [1, 2, 3, 4]
    assert "eval base @ step 0" in proc.stdout and "eval final @ step 4" in proc.stdout
    evaluations = [ln.split(" | ")[0] for ln in proc.stdout.splitlines() if ln.startswith("eval ")]
    assert evaluations == ["eval base @ step 0", "eval adapter @ step 2", "eval final @ step 4"]  # the last weights once
    assert "FutureWarning" not in said and "deprecated" not in said
    assert ("bitsandbytes.nn" in imported) == bool(quant) and "peft" in imported  # (an import refused is listed too)
    # What bitsandbytes' import costs: were it to stop, internals.without_bitsandbytes would have no reason left.
    assert ("torch._inductor.compile_fx" in imported) == bool(quant)


def test_bitsandbytes_is_loaded_for_quantized_weights_its_optimizers_and_models_it_cannot_see(tmp_path, tiny_llama_dir):
    """What the program decides before it imports anything heavy: a checkpoint saved in 4 bits (a `-bnb-4bit` model)
    needs bitsandbytes though quant.bits is null, and so may a hub model whose config.json is not in the cache."""
    import shutil

    from hpclora.job.entry import needs_bitsandbytes

    saved_4bit = tmp_path / "saved-4bit"
    shutil.copytree(tiny_llama_dir, saved_4bit)
    settings = json.loads((saved_4bit / "config.json").read_text())
    (saved_4bit / "config.json").write_text(json.dumps({**settings, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}))

    def needs(*overrides):
        return needs_bitsandbytes(config.load(None, ["data.path=x.jsonl", f"cache.hf_home={tmp_path / 'hf'}", *overrides], check_files=False))

    assert not needs(f"model.name={tiny_llama_dir}") and not needs("model.name=smollm2-135m")
    assert needs(f"model.name={tiny_llama_dir}", "quant.bits=4") and needs(f"model.name={tiny_llama_dir}", "train.optimizer=paged_adamw_8bit")
    assert needs(f"model.name={saved_4bit}") and needs("model.name=someone/not-in-the-cache")


def test_finished_run_directory_is_never_overwritten(tmp_path, tiny_llama_dir):
    out = train_tiny(tmp_path, tiny_llama_dir, "train.max_steps=1")
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a finished run"):
        train_tiny(tmp_path, tiny_llama_dir, "train.max_steps=1")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_qlora_gradients_are_unchanged_by_an_evaluation_pass_on_cpu(tiny_llama_dir):
    """bitsandbytes repacks 4-bit weights for fast CPU inference on the first eval-mode forward; that
    layout has no backward. Training after an evaluation (hpclora evaluates the base first) must still
    get the same gradients in the lowest layers as training without one."""
    import torch

    from hpclora.job.model import load_base

    cfg = lora_cfg(f"model.name={tiny_llama_dir}", "quant.bits=4", "lora.dropout=0")
    model, _ = attach_lora(load_base(cfg, "fp32", "cpu"), cfg)
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]]), "labels": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    # lora_B of the first layer: its gradient must flow back through every frozen 4-bit layer above it.
    lowest = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]

    def grads():
        model.train()
        model.zero_grad()
        model(**batch).loss.backward()
        return [p.grad.clone() for p in lowest]

    before = grads()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = grads()
    assert all(b.abs().sum() > 0 for b in before)
    assert all(torch.allclose(b, a, atol=1e-6) for b, a in zip(before, after))


def test_qlora_keeps_embeddings_and_head_in_the_compute_dtype_with_the_loss_and_gradients_of_peft_upcasting(tiny_llama_dir):
    """bf16 compute under autocast, as on an A100 (here on CPU): PEFT's prepare_model_for_kbit_training holds the
    embeddings and head in fp32, hpclora keeps them in bf16 (norms in fp32). Same adapter weights: the loss and
    the LoRA gradients agree to bf16 rounding."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training, set_peft_model_state_dict

    from hpclora.job.model import load_base

    cfg = lora_cfg(f"model.name={tiny_llama_dir}", "quant.bits=4", "lora.dropout=0", "train.precision=bf16")
    ours, _ = attach_lora(load_base(cfg, "bf16", "cpu"), cfg)
    base = ours.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16 and base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in base.named_parameters() if "norm" in n)
    theirs = prepare_model_for_kbit_training(load_base(cfg, "bf16", "cpu"), use_gradient_checkpointing=False)
    assert theirs.get_input_embeddings().weight.dtype == torch.float32
    theirs = get_peft_model(theirs, ours.peft_config["default"])
    torch.manual_seed(0)
    for name, param in ours.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.02)  # a trained adapter: gradients reach lora_A too
    set_peft_model_state_dict(theirs, get_peft_model_state_dict(ours))
    ids = torch.randint(5, 1000, (2, 24))
    results = []
    for model in (ours, theirs):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ours, grads_ours), (loss_theirs, grads_theirs) = results
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) > 0
    assert abs(loss_ours - loss_theirs) <= 1e-3 * abs(loss_theirs)
    for name in grads_ours:
        scale = grads_theirs[name].abs().max().item()
        assert scale > 0 and (grads_ours[name] - grads_theirs[name]).abs().max().item() <= 0.03 * scale, name  # bf16 has 8 bits of mantissa


@pytest.mark.parametrize("overrides", [["train.gradient_checkpointing=true"], ["quant.bits=8"], ["quant.bits=4", "train.gradient_checkpointing=true"]],
                         ids=["lora-checkpointing", "8bit", "qlora-checkpointing"])
def test_memory_saving_options_train(tmp_path, tiny_llama_dir, overrides):
    out = train_tiny(tmp_path, tiny_llama_dir, "train.max_steps=2", *overrides)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_loss"] > 0


@pytest.mark.parametrize("layers", [None, 1])
def test_checkpointing_all_or_only_the_first_layers_gives_the_gradients_of_no_checkpointing(tiny_llama_dir, layers):
    import torch

    from hpclora.job.model import load_base
    from transformers.modeling_layers import GradientCheckpointingLayer

    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), "labels": torch.tensor([[-100, -100, 7, 8, 9, 10, 11]])}

    def loss_and_grads(*overrides):
        cfg = lora_cfg(f"model.name={tiny_llama_dir}", "lora.dropout=0", *overrides)
        torch.manual_seed(0)
        model, _ = attach_lora(load_base(cfg, "fp32", "cpu"), cfg)
        model.train()
        loss = model(**batch).loss
        loss.backward()
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, flags

    plain_loss, plain_grads, plain_flags = loss_and_grads("train.gradient_checkpointing=false")
    selective = ["train.gradient_checkpointing=true"] + ([f"train.checkpointed_layers={layers}"] if layers else [])
    loss, grads, flags = loss_and_grads(*selective)
    assert plain_flags == [False, False] and flags == ([True, False] if layers == 1 else [True, True])
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert any(g.abs().max() > 0 for g in plain_grads.values())
    for name, grad in plain_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-7), name


def test_by_default_bloom_trains_unpacked_and_llama_packed_and_the_log_says_why(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoTokenizer

    bloom = tmp_path / "bloom"
    tiny_model("bloom", vocab_size=len(AutoTokenizer.from_pretrained(tiny_llama_dir))).save_pretrained(bloom)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bloom)
    out = train_tiny(tmp_path, bloom, "train.max_steps=2")
    log = capsys.readouterr().out
    assert "data: not packed: bloom attention ignores the per-example positions" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "train_packed_rows" not in summary["data"]
    (tmp_path / "llama").mkdir()
    llama = train_tiny(tmp_path / "llama", tiny_llama_dir, "train.max_steps=2")
    assert "data: packed: several examples per row" in capsys.readouterr().out
    assert json.loads((llama / "summary.json").read_text())["data"]["train_packed_rows"] < 8


@pytest.mark.parametrize("job_memory, expected", [("64000", "off: auto: the run fits in 67.1 GB without it"),  # MiB, as Slurm sets it
                                                  ("100M", "on: auto: without it the run needs")])
def test_gradient_checkpointing_auto_follows_the_memory_of_the_job(tmp_path, tiny_llama_dir, capsys, monkeypatch, job_memory, expected):
    """On CPU the job's memory is Slurm's --mem (SLURM_MEM_PER_NODE in the job's environment)."""
    monkeypatch.setenv("SLURM_MEM_PER_NODE", job_memory)
    out = train_tiny(tmp_path, tiny_llama_dir, "train.max_steps=2")
    assert f"gradient checkpointing {expected}" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_default_attention_loads_every_architecture(tmp_path):
    """transformers has no sdpa for BLOOM: the default `auto` must load it (a fixed `sdpa` refused it)."""
    from hpclora.job.model import load_base

    tiny_model("bloom").save_pretrained(tmp_path)
    cfg = lora_cfg(f"model.name={tmp_path}")
    assert cfg.model.attn_implementation == "auto"
    model = load_base(cfg, "fp32", "cpu")
    assert model.config.model_type == "bloom" and model.config._attn_implementation == "eager"


def test_the_bundled_conversion_accounts_for_every_weight():
    """A renamed or dropped weight must stop the conversion, not leave part of the model random."""
    import torch

    from hpclora.job.bundled import copy_weights

    source = tiny_model("llama")
    weights = source.state_dict()
    target = tiny_model("llama", seed=1)
    copy_weights(target, weights)  # (the bundled model's own conversion covers a tied, absent head)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), weights.values()))
    renamed = {k.replace("layers.0.mlp.up_proj", "layers.0.mlp.upper"): v for k, v in weights.items()}
    with pytest.raises(RuntimeError, match=r"1 weights missing \(e.g. \['model.layers.0.mlp.up_proj.weight'\]\), 1 unexpected"):
        copy_weights(tiny_model("llama"), renamed)


def test_fast_kernels_are_chosen_only_where_installed_and_usable():
    """Packed rows run variable-length attention everywhere. FlashAttention and the Liger kernels need CUDA, which this machine lacks: the choice is tested on described
    devices (compute capability, installed packages); a CPU run's choice is tested for real."""
    from hpclora.job.kernels import choose_kernels, kernels_here

    a100 = choose_kernels("auto", "llama", "bf16", (8, 0), has_flash_attn=True, has_liger=True)
    assert a100.attention == "flash_attention_2" and a100.liger and "variable-length" in a100.lines[0]
    v100 = choose_kernels("auto", "llama", "fp16", (7, 0), has_flash_attn=True, has_liger=False)
    assert v100.attention == "auto" and not v100.liger and "sm_70, FlashAttention needs sm_80+" in v100.lines[0]
    v100_packed = choose_kernels("auto", "llama", "fp16", (7, 0), has_flash_attn=True, has_liger=False, packed=True)
    assert v100_packed.attention == "sdpa_varlen" and v100_packed.lines[0].startswith("attention: PyTorch sdpa once per packed example")
    assert choose_kernels("auto", "llama", "bf16", (9, 0), has_flash_attn=False, has_liger=False).lines == (
        "attention: PyTorch sdpa (flash-attn is not installed)",)
    bloom = choose_kernels("auto", "bloom", "bf16", (8, 0), has_flash_attn=True, has_liger=True)
    assert bloom.attention == "auto" and not bloom.liger  # eager-only, and not a Liger architecture
    assert choose_kernels("sdpa", "llama", "bf16", (8, 0), True, False).attention == "sdpa"  # the user's choice stands
    cpu = kernels_here("auto", "llama", "fp32", "cpu")
    assert cpu.attention == "auto" and not cpu.liger and cpu.lines == ()
    cpu_packed = kernels_here("auto", "llama", "fp32", "cpu", packed=True)
    assert cpu_packed.attention == "sdpa_varlen" and cpu_packed.lines == ("attention: PyTorch sdpa once per packed example (no FlashAttention on a CPU)",)
    assert kernels_here("auto", "bloom", "fp32", "cpu", packed=True).attention == "auto"  # eager-only: never split


def test_generate_eval_and_chat_load_the_model_onto_the_device_the_node_has(tmp_path, tiny_llama_dir, monkeypatch):
    """Answers and held-out losses are computed on the node's GPU, not on its CPU beside an idle GPU. There is no GPU
    here: torch's `meta` device, which holds no storage, stands in as the device the node reports (a fake of what
    cannot exist here)."""
    from hpclora.job import resolve
    from hpclora.results.generate import load_model

    monkeypatch.setattr(resolve, "detect_device", lambda: ("meta", False))
    model, _ = load_model(config.load(tiny_run_yaml(tmp_path, tiny_llama_dir)))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_4bit_weights_that_fsdp_shards_are_stored_in_bf16_whatever_the_compute_dtype(tmp_path, tiny_llama_dir):
    """FSDP computes in bf16 and casts any parameter of another dtype before gathering it: 4-bit bytes packed into
    fp16 or fp32 storage would be cast as numbers and become garbage."""
    import torch

    from hpclora.job.model import load_base

    cfg = config.load(tiny_run_yaml(tmp_path, tiny_llama_dir, quant={"bits": 4, "compute_dtype": "fp32"}))
    packed = {p.dtype for name, p in load_base(cfg, "bf16", "cpu", sharded=True).named_parameters() if name.endswith("proj.weight")}
    assert packed == {torch.bfloat16}


def test_biases_that_lora_trains_beside_fp16_weights_are_fp32(tmp_path, tiny_llama_dir):
    """lora.bias=all on a model with biases (GPT-NeoX, as OpenCALM) in fp16, as on a V100: fp16 loss scaling cannot
    unscale fp16 gradients, so every trained parameter must be fp32, the base's biases included."""
    import torch

    cfg = config.load(tiny_run_yaml(tmp_path, tiny_llama_dir, lora={"bias": "all"}))
    model, _ = attach_lora(tiny_model("gpt_neox").half(), cfg)
    trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any(name.endswith(".bias") for name in trained)
    assert set(trained.values()) == {torch.float32}


def test_a_trainings_peak_memory_is_its_own_not_the_process_that_started_it():
    """Linux keeps the resident high-water mark of a parent across fork and exec (ru_maxrss): a training started by
    a large process (a notebook, a launcher) must not report the parent's peak as its own."""
    import subprocess
    import sys

    parent = (
        "import subprocess, sys\n"
        "held = bytearray(1_500_000_000)\n"
        "held[::4096] = b'x' * len(held[::4096])\n"
        "child = 'import resource; from hpclora.job.progress import peak_resident_gb as p; "
        "print(p(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True, check=True).stdout)\n"
    )
    own, inherited = map(float, subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout.split())
    assert inherited > 1.5, "ru_maxrss no longer carries the parent's peak: this guard is moot"
    assert own < 1.0, f"the child's peak {own:.2f} GB includes its parent's 1.5 GB"

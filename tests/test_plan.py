"""The planner's arithmetic: parameter counts against real models built from config.json files, and
the memory model's behaviour (monotone in batch and length, QLoRA below LoRA, precision per GPU).
How close its predictions come to measured peaks is a benchmark (benchmarks/), not a test."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from hpclora.catalog.devices import DEVICES
from hpclora.catalog.dims import dims_from_config, find_dims, parameter_counts
from hpclora.plan.make import SELECTIVE_HEADROOM
from hpclora.plan.memory import lora_parameters, memory_gb
from hpclora.plan.speed import SCALING
from hpclora import config, plan
from hpclora.config import slurm_syntax
from hpclora.errors import UserError

from conftest import ROOT, alpaca_rows, tiny_model, tiny_run_yaml, write_jsonl


def cfg_for(tmp_path, *overrides):
    return config.load(None, ["data.path=owner/dataset", *overrides], check_files=False)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gpt_neox", "bloom", "gpt2", "gemma3_text"])
def test_parameter_counts_match_real_models(tmp_path, model_type):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "m")
    dims = dims_from_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    counts = parameter_counts(dims)
    real = sum(p.numel() for p in model.parameters())
    assert abs(counts["total"] - real) / real < 0.02, (counts, real)  # biases and position tables aside


def test_lora_parameter_count_matches_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    dims = dims_from_config(json.loads((tmp_path / "m" / "config.json").read_text()))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    assert lora_parameters(dims, 8, targets) == peft_model.get_nb_trainable_parameters()[0]


def test_a_7b_llama_from_the_table_has_its_published_size(tmp_path):
    cfg = cfg_for(tmp_path, "model.name=meta-llama/Llama-2-7b-hf")
    dims, source = find_dims(cfg)
    assert source == "built-in table"
    assert 6.7e9 < parameter_counts(dims)["total"] < 6.8e9  # 6.74 B


def test_memory_grows_with_batch_and_length_and_qlora_needs_less(tmp_path):
    device = DEVICES["a100-40gb"]
    base = ["model.name=meta-llama/Llama-2-7b-hf", "data.max_length=512"]
    dims, _ = find_dims(cfg_for(tmp_path, *base))
    peak = lambda *o, b=1: memory_gb(dims, cfg_for(tmp_path, *base, *o), device, "bf16", b)["peak_gb"]  # noqa: E731
    assert peak(b=1) < peak(b=2) < peak(b=8)
    assert peak("data.max_length=256") < peak() < peak("data.max_length=2048")
    assert peak("quant.bits=4") < peak("quant.bits=8") < peak()
    assert peak("quant.bits=4", "quant.double_quant=true") < peak("quant.bits=4", "quant.double_quant=false")
    assert peak("train.gradient_checkpointing=true", b=8) < peak(b=8)


def test_auto_checkpointing_recomputes_the_fewest_layers_with_which_the_run_fits(tmp_path):
    """Between the memory a run needs without checkpointing and with every layer recomputing, `auto` picks the
    fewest recomputing layers that fit with the planner's headroom; one fewer would not, and fewer cost less
    compute."""
    base = ["model.name=meta-llama/Llama-2-7b-hf", "data.max_length=2048", "train.micro_batch_size=4"]
    make = lambda *o: plan.make_plan(cfg_for(tmp_path, *base, *o), "a100-80gb")  # noqa: E731
    none, every = make("train.gradient_checkpointing=false"), make("train.gradient_checkpointing=true")
    assert every.peak_gb < 0.95 * every.capacity_gb < none.peak_gb  # fits only with (some) checkpointing
    auto = make()
    layers = auto.checkpointed_layers
    assert auto.gradient_checkpointing and auto.fits and 0 < layers < 32
    assert f"{layers} of 32 layers recompute" in auto.checkpointing_reason
    fewer = make("train.gradient_checkpointing=true", f"train.checkpointed_layers={layers - 1}")
    headroom = 0.95 * auto.capacity_gb * SELECTIVE_HEADROOM
    assert auto.peak_gb <= headroom < fewer.peak_gb and every.peak_gb < auto.peak_gb < fewer.peak_gb < none.peak_gb
    assert every.tokens_per_s < auto.tokens_per_s < none.tokens_per_s
    small = make("train.micro_batch_size=1")
    assert not small.gradient_checkpointing and small.checkpointed_layers is None  # fits without: off


def test_eager_attention_grows_with_the_square_of_the_length(tmp_path):
    def activations(model, length, *extra):
        cfg = cfg_for(tmp_path, f"model.name={model}", f"data.max_length={length}", "train.micro_batch_size=1", *extra)
        return plan.make_plan(cfg, "a100-80gb").breakdown["activations_gb"]

    bloom = [activations("bigscience/bloom-560m", n) for n in (512, 1024, 2048)]
    assert bloom[2] - bloom[1] > 2.5 * (bloom[1] - bloom[0])  # quadratic: BLOOM attention is eager only
    llama = [activations("meta-llama/Llama-2-7b-hf", n) for n in (512, 1024, 2048)]
    assert llama[2] - llama[1] == pytest.approx(2 * (llama[1] - llama[0]), rel=0.01)  # sdpa keeps no scores
    assert activations("meta-llama/Llama-2-7b-hf", 2048, "model.attn_implementation=eager") > 1.5 * llama[2]


def test_quantized_bases_keep_embeddings_and_head_in_the_compute_dtype(tmp_path):
    """Llama-2-7B: 6.48 B quantized weights, 0.262 B others in bf16 (PEFT's kbit preparation would hold them in fp32:
    0.5 GB more)."""
    weights = lambda *o: plan.make_plan(cfg_for(tmp_path, "model.name=meta-llama/Llama-2-7b-hf", *o), "a100-80gb").weights_gb  # noqa: E731
    assert weights("quant.bits=4", "quant.double_quant=true") == pytest.approx(6.48 * (0.5 + 1.0156 / 64) + 0.262 * 2, rel=0.02)
    assert weights("quant.bits=8") == pytest.approx(6.48 * 1.001 + 0.262 * 2, rel=0.02)


def test_plan_exits_3_for_a_run_that_does_not_fit_so_that_scripts_can_tell(tmp_path, cli):
    seven_b = [ROOT / "configs" / "open-calm-7b-qlora-dolly-ja.yaml", "quant.bits=null", "data.max_length=512"]
    assert cli("plan", *seven_b, "--gpu", "a100-80gb").returncode == 0
    tight = cli("plan", *seven_b, "--gpu", "v100-16gb")
    assert tight.returncode == 3 and "DOES NOT FIT" in tight.stdout
    helped = subprocess.run([sys.executable, "-m", "hpclora", "plan", "--help"], capture_output=True, text=True)
    assert "exit status: 0 when the run fits, 3 when it does not" in " ".join(helped.stdout.split())


def test_precision_and_fit_per_gpu(tmp_path):
    cfg = cfg_for(tmp_path, "model.name=meta-llama/Llama-2-7b-hf", "train.micro_batch_size=4", "data.max_length=512")
    assert plan.make_plan(cfg, "v100-16gb").precision == "fp16"
    assert plan.make_plan(cfg, "t4-16gb").precision == "fp16"
    assert plan.make_plan(cfg, "a100-40gb").precision == "bf16"
    lora_v100 = plan.make_plan(cfg, "v100-16gb")
    assert not lora_v100.fits and lora_v100.max_micro_batch == 0  # 13.5 GB of bf16 weights alone
    qlora = ["model.name=meta-llama/Llama-2-7b-hf", "quant.bits=4", "train.micro_batch_size=1", "train.gradient_checkpointing=true"]
    qlora_v100 = plan.make_plan(cfg_for(tmp_path, *qlora), "v100-16gb")
    assert qlora_v100.fits and qlora_v100.max_micro_batch >= 1
    with pytest.raises(UserError, match="bf16 is not supported"):
        plan.make_plan(cfg_for(tmp_path, "model.name=meta-llama/Llama-2-7b-hf", "train.precision=bf16"), "v100-16gb")


def test_a_shrunk_micro_batch_keeps_the_effective_batch(tmp_path):
    cfg = cfg_for(tmp_path, "model.name=meta-llama/Llama-2-7b-hf", "quant.bits=4", "train.micro_batch_size=64", "train.grad_accum=1",
                  "data.max_length=1024", "train.gradient_checkpointing=true")
    p = plan.make_plan(cfg, "t4-16gb")
    assert not p.fits and 1 <= p.max_micro_batch < 64
    assert p.max_micro_batch * p.grad_accum >= 64


def test_unknown_model_offline_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="hpclora stage"):
        plan.make_plan(cfg_for(tmp_path, "model.name=someone/unknown-13b", f"cache.hf_home={tmp_path}"), "a100-40gb")


def test_plan_cli_json_without_heavy_imports():
    code = (
        "import sys; from hpclora.cli import main; rc = main(sys.argv[1:]); "
        "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules), file=sys.stderr); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code, "plan", str(ROOT / "configs" / "open-calm-7b-qlora-dolly-ja.yaml"), "--gpu", "v100-16gb", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    for key in ("params_total", "params_trainable", "weights_gb", "optimizer_gb", "activations_gb", "peak_gb", "capacity_gb",
                "fits", "precision", "max_micro_batch", "grad_accum", "tokens_per_s", "time", "recommended"):
        assert key in result, key
    assert result["precision"] == "fp16" and result["fits"] and "HEAVY []" in done.stderr


def test_submit_refuses_what_does_not_fit_unless_forced_and_fills_time_auto(tmp_path):
    big = [str(ROOT / "configs" / "open-calm-3b-lora.yaml"), "slurm.gpu_type=v100", "train.micro_batch_size=64",
           f"run.output_root={tmp_path}", "--dry-run"]
    refused = subprocess.run([sys.executable, "-m", "hpclora", "submit", *big], capture_output=True, text=True)
    assert refused.returncode == 2 and "does not fit in 16.0 GB on v100-16gb" in refused.stderr
    fitting = plan.make_plan(config.load(big[0], big[1:3]))
    assert 1 <= fitting.max_micro_batch < 64 and fitting.max_micro_batch * fitting.grad_accum >= 64
    assert f"train.micro_batch_size={fitting.max_micro_batch} train.grad_accum={fitting.grad_accum}" in refused.stderr
    assert "Traceback" not in refused.stderr
    forced = subprocess.run([sys.executable, "-m", "hpclora", "submit", *big, "--force"], capture_output=True, text=True)
    assert forced.returncode == 0 and "DOES NOT FIT: forced" in forced.stderr

    auto = subprocess.run([sys.executable, "-m", "hpclora", "submit", str(ROOT / "configs" / "demo-cpu.yaml"), "slurm.time=auto",
                           f"run.output_root={tmp_path}", "--dry-run"], capture_output=True, text=True)
    assert auto.returncode == 0, auto.stderr
    estimate = next(l for l in auto.stderr.splitlines() if "slurm.time auto ->" in l).split("-> ")[1].split()[0]
    assert f"#SBATCH --time={estimate}\n" in auto.stdout
    sweep = subprocess.run([sys.executable, "-m", "hpclora", "sweep", str(ROOT / "configs" / "demo-cpu.yaml"), "slurm.time=auto",
                            "--grid", "train.epochs=1,4", f"run.output_root={tmp_path}", "--dry-run"], capture_output=True, text=True)
    assert sweep.returncode == 0, sweep.stderr
    longest = next(l for l in sweep.stderr.splitlines() if "slurm.time auto ->" in l).split("-> ")[1].split()[0]
    assert f"#SBATCH --time={longest}\n" in sweep.stdout and slurm_syntax.slurm_seconds(longest) > slurm_syntax.slurm_seconds(estimate)


def test_fsdp_memory_per_gpu_falls_with_the_world_size_and_ddp_does_not(tmp_path):
    base = ["model.name=meta-llama/Llama-2-13b-hf", "data.max_length=1024", "train.gradient_checkpointing=true", "slurm.gpu_type=a100"]
    plans = {(n, g): plan.make_plan(cfg_for(tmp_path, *base, f"slurm.nodes={n}", f"slurm.gpus={g}"), "a100-80gb")
             for n, g in ((1, 2), (1, 4), (1, 8), (2, 8))}
    fsdp = [plans[k].peak_by_strategy_gb["fsdp"] for k in ((1, 2), (1, 4), (1, 8), (2, 8))]
    ddp = [plans[k].peak_by_strategy_gb["ddp"] for k in ((1, 2), (1, 4), (1, 8), (2, 8))]
    assert fsdp[0] > fsdp[1] > fsdp[2] > fsdp[3]
    assert len(set(ddp)) == 1  # a replica per GPU, whatever the world
    single = plan.make_plan(cfg_for(tmp_path, *base, "slurm.gpus=1"), "a100-80gb")
    assert single.strategy == "single" and ddp[0] == single.peak_gb and fsdp[0] < single.peak_gb
    # 26 GB of bf16 weights over 16 ranks, plus what is gathered at a time: two of the 40 layers and the head.
    cfg = cfg_for(tmp_path, *base, "slurm.nodes=2", "slurm.gpus=8")
    dims, _ = find_dims(cfg)
    shard = memory_gb(dims, cfg, DEVICES["a100-80gb"], "bf16", 1, "fsdp", 16)
    assert 26.0 / 16 + 2 * 26.0 / 40 < shard["weights_gb"] < 26.0 / 16 + 2 * 26.0 / 40 + 0.4
    # World throughput: ranks x one GPU's x the stated scaling, which is lower across nodes.
    p4, p16 = plans[(1, 4)], plans[(2, 8)]
    assert p4.world_size == 4 and p16.world_size == 16 and p16.scaling_efficiency < p4.scaling_efficiency < 1
    per_rank = single.tokens_per_s
    assert p4.tokens_per_s == pytest.approx(per_rank * 4 * p4.scaling_efficiency, rel=0.01)
    assert p16.recommended["nodes"] == 2 and p16.recommended["gres"] == "gpu:a100:8" and p16.recommended["cpus_per_task"] == 64


def test_fsdp_with_4bit_weights_counts_each_gpu_loading_the_whole_quantized_model(tmp_path):
    """bitsandbytes quantizes on the GPU, so under FSDP every rank first holds the whole 4-bit model, then its shard:
    with many GPUs that loading moment, not training, is the peak."""
    qlora = ["model.name=meta-llama/Llama-2-13b-hf", "quant.bits=4", "data.max_length=256", "train.micro_batch_size=1",
             "train.gradient_checkpointing=true", "train.distributed=fsdp", "train.precision=bf16", "slurm.gpus=8"]
    cfg = cfg_for(tmp_path, *qlora)
    p = plan.make_plan(cfg, "a100-80gb")
    whole = memory_gb(find_dims(cfg)[0], cfg, DEVICES["a100-80gb"], "bf16", 1, "ddp", 8)
    assert p.breakdown["weights_gb"] < whole["weights_gb"] / 4  # trained sharded
    assert p.peak_gb == p.breakdown["loading_gb"] > whole["weights_gb"]  # but loaded whole first
    assert "while loading: each GPU holds the whole quantized model until FSDP shards it" in plan.format_plan(p)
    plain = plan.make_plan(cfg_for(tmp_path, *qlora, "quant.bits=null"), "a100-80gb")
    assert "loading_gb" not in plain.breakdown  # plain weights are sharded as they load


def test_auto_picks_ddp_when_a_replica_fits_and_fsdp_only_on_bf16_gpus_when_it_does_not(tmp_path):
    lora_13b = ["model.name=meta-llama/Llama-2-13b-hf", "data.max_length=1024", "train.gradient_checkpointing=true", "slurm.gpus=4"]
    assert plan.make_plan(cfg_for(tmp_path, *lora_13b), "a100-80gb").strategy == "ddp"  # 26 GB of weights fit 80 GB
    sharded = plan.make_plan(cfg_for(tmp_path, *lora_13b), "l4-24gb")  # bf16, but 26 GB of weights do not fit its 22.5 GB
    assert sharded.strategy == "fsdp" and sharded.fits and sharded.peak_by_strategy_gb["ddp"] > 26
    v100 = plan.make_plan(cfg_for(tmp_path, *lora_13b), "v100-16gb")  # no bf16: FSDP is not chosen; the advice says what is
    assert v100.strategy == "ddp" and not v100.fits and "quant.bits=4" in v100.strategy_reason
    text = plan.format_plan(sharded)
    assert "world         4 ranks: 1 node(s) x 4 GPUs" in text and "strategy      FSDP" in text and "per GPU       DDP" in text


def test_submit_writes_the_chosen_strategy_into_the_job_and_refuses_fsdp_where_it_cannot_run(tmp_path):
    common = [str(ROOT / "configs" / "open-calm-7b-qlora-dolly-ja.yaml"), "quant.bits=null", "train.gradient_checkpointing=true",
              "slurm.gpus=4", "data.max_length=512", "train.max_steps=100", f"run.output_root={tmp_path}", "--dry-run"]
    chosen = subprocess.run([sys.executable, "-m", "hpclora", "submit", *common, "slurm.gpu_type=a100"], capture_output=True, text=True)
    assert chosen.returncode == 0, chosen.stderr
    assert "4 ranks with DDP" in chosen.stderr or "4 ranks with FSDP" in chosen.stderr
    v100 = subprocess.run([sys.executable, "-m", "hpclora", "submit", *common, "slurm.gpu_type=v100", "train.distributed=fsdp"],
                          capture_output=True, text=True)
    assert v100.returncode == 2 and "train.distributed" in v100.stderr and "train.distributed=ddp" in v100.stderr
    assert "Traceback" not in v100.stderr
    cpu = [sys.executable, "-m", "hpclora", "validate", str(ROOT / "configs" / "demo-cpu.yaml"), "train.cpu_ranks=2", "train.distributed=fsdp"]
    assert subprocess.run(cpu, capture_output=True, text=True).returncode == 0  # FSDP over CPU ranks: the GPU path, tried here
    fp16 = subprocess.run([*cpu, "train.precision=fp16"], capture_output=True, text=True)
    assert fp16.returncode == 2 and "train.distributed: FSDP trains in bf16 or fp32, not fp16" in fp16.stderr


def test_cpu_speed_scales_with_the_jobs_cores_and_is_shared_by_its_ranks(tmp_path):
    base = ["model.name=tokyotech-llm/Swallow-7b-instruct-hf", "slurm.gpus=0", "slurm.mem=64G", "train.max_steps=100",
            "train.gradient_checkpointing=true"]
    speed = lambda *o: plan.make_plan(cfg_for(tmp_path, *base, *o)).tokens_per_s  # noqa: E731
    two, sixteen = speed("slurm.cpus_per_task=2"), speed("slurm.cpus_per_task=16")
    assert 2 * two < sixteen < 8 * two  # more cores are faster, and less than linearly
    assert speed("slurm.cpus_per_task=16", "train.cpu_ranks=2") == pytest.approx(sixteen * SCALING["ddp"][0], rel=0.01)
    assert "16 cores" in plan.make_plan(cfg_for(tmp_path, *base, "slurm.cpus_per_task=16")).tokens_per_s_note


def test_the_planner_counts_the_steps_the_job_trains(tmp_path, tiny_llama_dir):
    """One validation split, one cut and one packing rule for both, and the login node's tokens are the job's. 17 rows
    with val_size 0.1 hold out round(1.7) = 2 rows (the planner once held out int(1.7) = 1); a row whose prompt fills
    data.max_length trains nothing and is dropped; packed, several examples share a row (the planner once counted one
    row per example: 40 steps where the demo trains 16). The login node reads the tokenizer's files without
    transformers (catalog/tokenizer_files.py): its tokens equal transformers' for every template."""
    from transformers import AutoTokenizer

    from hpclora.catalog.tokenizer_files import file_tokenizer
    from hpclora.data import encode, render
    from hpclora.job.train import train
    from hpclora.plan.steps import planned_steps

    rows = alpaca_rows(17)
    rows[5]["instruction"] = "Say nothing. " * 80
    write_jsonl(tmp_path / "rows.jsonl", rows)
    steps = {}
    for packing in (False, True):
        cfg = config.load(tiny_run_yaml(tmp_path, tiny_llama_dir, data={"path": str(tmp_path / "rows.jsonl"), "val_size": 0.1, "max_length": 128, "packing": packing},
                                        train={"max_steps": None, "epochs": 1, "micro_batch_size": 1, "log_every": 5}))
        steps[packing], note = planned_steps(cfg, packing)
        assert note == ("packed rows" if packing else "examples") + " counted with the model's tokenizer"
        assert train(cfg, run_dir=str(tmp_path / f"run-{packing}")).summary["steps"] == steps[packing]
    assert steps[False] in (14, 15) and steps[True] <= steps[False] / 2
    tokenizer, on_files = AutoTokenizer.from_pretrained(tiny_llama_dir), file_tokenizer(cfg)
    conversation = [{"role": "user", "content": "日本の首都は？", "input": "One word."}, {"role": "assistant", "content": "東京です。"},
                    {"role": "user", "content": "And of France?"}, {"role": "assistant", "content": "Paris."}]
    for template in ("alpaca", "alpaca_ja", "calm", "chat", "none"):
        assert encode(render(template, conversation, on_files), on_files, template) == encode(render(template, conversation, tokenizer), tokenizer, template)


def test_fsdp_is_chosen_and_allowed_only_where_the_job_can_run_it(tmp_path):
    """The planner applies the job's own FSDP rule: 8-bit weights and bitsandbytes' 8-bit optimizers cannot be
    sharded, so `auto` keeps DDP for them (it once chose FSDP for quant.bits=8, which the job then refused), and
    asking for FSDP with them is refused on the login node."""
    lora_13b = ["model.name=meta-llama/Llama-2-13b-hf", "data.max_length=1024", "train.gradient_checkpointing=true", "slurm.gpus=4"]
    assert plan.make_plan(cfg_for(tmp_path, *lora_13b), "l4-24gb").strategy == "fsdp"
    eight_bit = plan.make_plan(cfg_for(tmp_path, *lora_13b, "quant.bits=8"), "rtx3060-12gb")  # 13 GB of int8: no replica fits
    assert eight_bit.strategy == "ddp" and "8-bit weights cannot be sharded" in eight_bit.strategy_reason
    paged = plan.make_plan(cfg_for(tmp_path, *lora_13b, "train.optimizer=paged_adamw_8bit"), "l4-24gb")
    assert paged.strategy == "ddp" and "cannot step FSDP's sharded parameters" in paged.strategy_reason
    for setting in ("quant.bits=8", "train.optimizer=adamw_8bit"):
        with pytest.raises(UserError, match="train.distributed"):
            cfg_for(tmp_path, *lora_13b, "train.distributed=fsdp", setting)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"cpu|m": {"device": "cpu"}}'])
def test_a_calibration_file_that_cannot_be_read_is_named_and_plans_go_on_with_the_estimate(tmp_path, monkeypatch, cli, content):
    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "calibration.json").write_text(content)
    done = cli("plan", ROOT / "configs" / "demo-cpu.yaml", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["tokens_per_s_note"].startswith("estimate")
    assert f"warning: {tmp_path / 'state' / 'calibration.json'} is not a calibration file hpclora can read" in done.stderr


def test_plan_says_whether_the_memory_the_config_asks_is_enough_in_words_that_agree_with_its_verdict(tmp_path):
    """Recommending mem=24G beside a config's 48G read as advice to lower it; beside 7G it is a warning about loading,
    which the GPU's verdict does not contradict. On CPU, where slurm.mem is the run's memory, a job that holds the
    peak but not the recommended margin fits and says so; one that does not hold it does not fit."""
    base = ["model.name=meta-llama/Llama-2-7b-hf", "quant.bits=4", "slurm.gpus=1"]
    recommended = plan.make_plan(cfg_for(tmp_path, *base), gpu="v100-16gb").recommended["mem"]
    assert plan.make_plan(cfg_for(tmp_path, *base, "slurm.mem=48G"), gpu="v100-16gb").memory_note == "slurm.mem=48G is enough"
    short = plan.make_plan(cfg_for(tmp_path, *base, "slurm.mem=7G"), gpu="v100-16gb")
    assert short.fits and short.memory_note == (f"slurm.mem=7G is less than the recommended mem={recommended} for loading the "
                                                "model through host memory (fp16 weights x 1.2 + 8 GB)")
    assert short.memory_note in plan.format_plan(short)
    cpu = ["model.name=meta-llama/Llama-2-7b-hf", "slurm.gpus=0", "data.max_length=256", "train.gradient_checkpointing=true"]
    peak = plan.make_plan(cfg_for(tmp_path, *cpu, "slurm.mem=64G")).peak_gb
    for gb, fits in ((peak * 1.15, True), (peak * 0.9, False)):
        p = plan.make_plan(cfg_for(tmp_path, *cpu, f"slurm.mem={gb * 1e9 / 2 ** 20:.0f}M"))
        assert p.fits is fits and ("holds the estimated peak" in p.memory_note) is fits, p.memory_note
        assert "killed" not in plan.format_plan(p)


def test_fp32_on_a_v100_is_planned_at_its_fp32_peak_and_advised_to_fp16_where_that_fits(tmp_path):
    base = ["model.name=meta-llama/Llama-2-7b-hf", "slurm.gpus=1", "train.gradient_checkpointing=true", "data.max_length=256",
            "train.micro_batch_size=1"]
    half = plan.make_plan(cfg_for(tmp_path, *base, "quant.bits=4"), gpu="v100-32gb")
    full = plan.make_plan(cfg_for(tmp_path, *base, "quant.bits=4", "quant.compute_dtype=fp32"), gpu="v100-32gb")
    assert full.tokens_per_s == pytest.approx(half.tokens_per_s * 15.7 / 125, rel=0.01)
    assert "15.7 TFLOP/s fp32 peak" in full.tokens_per_s_note and "125.0 TFLOP/s fp16/bf16 tensor-core peak" in half.tokens_per_s_note
    fp32 = plan.make_plan(cfg_for(tmp_path, *base, "train.precision=fp32"), gpu="v100-16gb")
    assert not fp32.fits and fp32.precision_advice.startswith("train.precision=auto (fp16 on v100-16gb: peak ")
    assert plan.fit_advice(fp32) == fp32.precision_advice and f"try {fp32.precision_advice}" in plan.format_plan(fp32)
    larger = [*base, "model.name=meta-llama/Llama-2-13b-hf", "train.precision=fp32"]
    assert plan.make_plan(cfg_for(tmp_path, *larger), gpu="v100-16gb").precision_advice == ""  # fp16 does not fit either


def test_a_hub_dataset_cut_to_max_rows_is_planned_with_that_many_rows(tmp_path):
    """The rows of a hub dataset are not read on the login node; data.max_rows bounds them (the swallow config's
    2000), so the plan has a step count and a time instead of `time unknown`."""
    cfg = cfg_for(tmp_path, "data.max_rows=100", "data.val_size=10", "train.micro_batch_size=2", "train.grad_accum=3",
                  "train.epochs=2", "slurm.gpus=1")
    p = plan.make_plan(cfg, gpu="a100-80gb")
    assert p.steps == 2 * math.ceil(math.ceil(90 / 2) / 3) and p.time is not None
    assert plan.make_plan(cfg_for(tmp_path, "slurm.gpus=1"), gpu="a100-80gb").time is None  # no bound: unknown

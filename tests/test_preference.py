"""Preference tuning (method.name dpo): the forms pairs come in, the errors of bad pairs with their file and line, the
loss TRL trains with against the model's own log-probabilities, the reference a run means, and the run's resume.

Tiny random llamas with the real SmolLM2 tokenizer; every training runs in this process, for real.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from conftest import StopAt, write_jsonl
from hpclora import config as config_module
from hpclora.errors import DataError

# The chosen answer differs from the rejected one in its words, not in its length: a preference a tiny model learns in
# a few steps and carries over to held-out pairs.
PAIRS = [{"prompt": f"Is {i} a number?", "chosen": f"Yes, {i} is a number.", "rejected": f"No, {i} is a word."} for i in range(24)]


def pair_config(tmp_path: Path, model_dir: Path, rows=PAIRS, *overrides: str):
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return config_module.load(None, [
        f"data.path={data}", f"model.name={model_dir}", "method.name=dpo", "data.val_size=4", "data.max_length=64",
        f"data.cache_dir={tmp_path / 'cache'}", f"run.output_root={tmp_path / 'runs'}", "train.max_steps=6",
        "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.lr=5e-3",
        "slurm.gpus=0", *overrides])


def train_here(cfg, run_dir: Path, stop_at: int | None = None):
    from hpclora.job.preempt import StopRequest
    from hpclora.job.train import train

    with StopAt(stop_at) if stop_at else StopRequest() as stop:
        return train(cfg, run_dir=str(run_dir), stop=stop)


def entries(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pairs_in_every_form_are_the_same_tokens_and_the_prompt_is_generates(tmp_path, tokenizer):
    from hpclora.data import encode, prepare, render

    user = [{"role": "user", "content": "What colour is the sky?"}]
    forms = [
        {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}]},
        {"chosen": user + [{"role": "assistant", "content": "Blue."}], "rejected": user + [{"role": "assistant", "content": "Green."}]},
        {"prompt": [{"from": "human", "value": "What colour is the sky?"}], "chosen": "Blue.", "rejected": "Green."},
        {"chosen": "What colour is the sky? Blue.", "rejected": "What colour is the sky? Green."},  # one text, shared prompt
    ]
    data = write_jsonl(tmp_path / "forms.jsonl", forms)
    cfg = config_module.load(None, [f"data.path={data}", "method.name=dpo", "data.val_size=0", f"data.cache_dir={tmp_path}"])
    train = prepare(cfg.data, tokenizer, 0, method="dpo").train
    assert train["row"] == [1, 2, 3, 4, 5]
    prompt = encode(render("alpaca", [{"role": "user", "content": "What colour is the sky?", "input": ""}], tokenizer), tokenizer, "alpaca")[0]
    assert all(ids == prompt for ids in train["prompt_ids"])  # as `generate` tokenizes the prompt
    assert {tokenizer.decode(ids) for ids in train["chosen_ids"]} == {"Blue." + tokenizer.eos_token}
    assert {tokenizer.decode(ids) for ids in train["rejected_ids"]} == {"Green." + tokenizer.eos_token}

    kto = prepare(cfg.data, tokenizer, 0, method="kto").train  # a pair is a good and a bad answer
    assert kto["label"][:2] == [True, False] and len(kto) == 10


@pytest.mark.parametrize("row, method, message", [
    ({"prompt": "Hi", "chosen": "Hello."}, "dpo", "pairs.jsonl:2: missing field 'rejected'"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": " Hello. "}, "dpo", "pairs.jsonl:2: chosen and rejected are the same answer"),
    ({"prompt": "word " * 80, "chosen": "Yes.", "rejected": "No."}, "dpo", "pairs.jsonl:2: the prompt alone is"),
    ({"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}],
      "rejected": [{"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}, "dpo", "share every turn but their last"),
    ({"prompt": "Hi", "completion": "Hello.", "label": True}, "dpo", "pairs.jsonl:1: these are unpaired preference rows"),
])
def test_a_bad_pair_is_named_by_its_file_and_line(tmp_path, tokenizer, row, method, message):
    from hpclora.data import prepare

    good = row if "completion" in row else PAIRS[0]
    data = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    cfg = config_module.load(None, [f"data.path={data}", f"method.name={method}", "data.val_size=0", "data.max_length=48"])
    with pytest.raises(DataError) as caught:
        prepare(cfg.data, tokenizer, 0, method=method)
    assert message in str(caught.value)


def test_the_method_and_the_rows_must_agree(tmp_path, tokenizer):
    from hpclora.data import prepare

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    cfg = config_module.load(None, [f"data.path={pairs}", "data.val_size=0"])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: these are preference rows \(prompt/chosen/rejected pairs\), which method.name=sft does not train on: set method.name=dpo"):
        prepare(cfg.data, tokenizer, 0)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    cfg = config_module.load(None, [f"data.path={alpaca}", "data.val_size=0", "method.name=dpo"])
    with pytest.raises(DataError, match=r"alpaca.jsonl:1: method.name=dpo trains on prompt/chosen/rejected pairs, and these rows are alpaca data"):
        prepare(cfg.data, tokenizer, 0, method="dpo")
    with pytest.raises(Exception, match="data.packing: method.name=dpo scores each answer"):
        config_module.load(None, [f"data.path={pairs}", "method.name=dpo", "data.packing=true"])


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo"])
def test_each_methods_loss_is_computed_from_the_models_own_log_probabilities(tmp_path, tiny_llama_dir, tokenizer, method):
    """Step 2's logged loss, over all 8 training pairs (one micro-batch per step, so its order does not matter), against
    the method's formula on the summed log-probabilities of each answer under step 1's checkpoint (and, for DPO, the
    base as the reference): DPO -log sigmoid(beta ((c - ref c) - (r - ref r))); SimPO -log sigmoid(beta (c/|c| - r/|r|)
    - gamma); ORPO the token-mean NLL of the chosen rows (TRL's ORPOTrainer counts their prompt tokens too) - beta log
    sigmoid(log odds(c/|c|) - log odds(r/|r|))."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hpclora.data import prepare
    from hpclora.job.preference import pair_collator, pair_scores

    beta = {"dpo": 0.5, "orpo": 0.5, "simpo": 2.0}[method]
    cfg = pair_config(tmp_path, tiny_llama_dir, PAIRS[:10], f"method.name={method}", f"method.beta={beta}", "data.val_size=2",
                      "train.micro_batch_size=8", "train.max_steps=2", "train.save_every=1", "train.warmup_ratio=0")
    run = train_here(cfg, tmp_path / "run")
    logged = next(e["loss"] for e in entries(run.run_dir) if e.get("step") == 2 and "loss" in e)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run.run_dir / "checkpoints" / "checkpoint-1").eval()
    pairs = prepare(cfg.data, tokenizer, cfg.run.seed, method=method).train
    batch = pair_collator(tokenizer.pad_token_id)([pairs[i] for i in range(len(pairs))])
    c, r, ref_c, ref_r = pair_scores(model, batch, with_reference=method == "dpo")
    n_c, n_r = batch["completion_mask"].sum(1).chunk(2)
    logsigmoid = torch.nn.functional.logsigmoid
    if method == "dpo":
        expected = -logsigmoid(beta * ((c - ref_c) - (r - ref_r))).mean()
    elif method == "simpo":
        expected = -logsigmoid(beta * (c / n_c - r / n_r) - cfg.method.simpo_gamma).mean()
    else:
        log_odds = lambda mean: mean - torch.log1p(-torch.exp(mean))  # noqa: E731
        ids, mask = batch["input_ids"][:8], batch["attention_mask"][:8]  # the chosen rows, prompt and answer
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits[mask[:, 1:].bool()], ids[:, 1:][mask[:, 1:].bool()])
        expected = nll - beta * logsigmoid(log_odds(c / n_c) - log_odds(r / n_r)).mean()
    assert len(pairs) == 8 and logged == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_a_dpo_run_raises_held_out_preference_and_resumes_exactly(tmp_path, tiny_llama_dir, capsys):
    """Stopped at step 4 of 12 and resumed: the adapter of an uninterrupted run, bit for bit. Its held-out pairs are
    preferred more often than by the base, and the adapter holds no copy of the reference."""
    from test_resume import assert_same_adapter

    cfg = pair_config(tmp_path, tiny_llama_dir, PAIRS, "train.max_steps=12", "train.save_every=4", "train.eval_every=6", "train.lr=1e-2")
    whole = train_here(cfg, tmp_path / "whole")
    stopped = train_here(cfg, tmp_path / "parts", stop_at=4)
    assert not stopped.finished
    resumed = train_here(cfg, tmp_path / "parts")
    assert resumed.finished
    assert_same_adapter(whole.run_dir, resumed.run_dir)

    log = capsys.readouterr().out
    assert "reference: the base model (the adapter switched off)" in log
    base, final = whole.summary["base_preference"], whole.summary["final_preference"]
    assert final["pref_accuracy"] > base["pref_accuracy"] and final["pref_margin"] > base["pref_margin"]
    assert base["reward_accuracy"] == 0 and base["reward_margin"] == 0  # the untrained adapter is the reference
    steps = [e for e in entries(whole.run_dir) if "loss" in e]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and {"reward_accuracy", "reward_margin", "logps_chosen"} <= steps[0].keys()
    assert [e["eval"] for e in entries(whole.run_dir) if "eval" in e] == ["base", "eval", "final"]
    kept = lambda run_dir: [(e["step"], e.get("eval"), e.get("loss"), e.get("pref_accuracy")) for e in entries(run_dir)]  # noqa: E731
    assert kept(resumed.run_dir) == kept(whole.run_dir)  # the resume kept every entry, the evaluations' too
    assert not (whole.run_dir / "adapter" / "ref").exists()

    from hpclora.results.evaluate import describe_evaluation, evaluate

    result = evaluate(whole.run_dir, n=1, max_new_tokens=3)  # `hpclora eval`: the same held-out pairs, loaded anew
    assert result["before_is"] == "base model" and result["pairs"] == 4
    assert result["preference"]["before"]["accuracy"] == base["pref_accuracy"] and result["preference"]["adapter"]["accuracy"] == final["pref_accuracy"]
    assert result["preference"]["adapter"]["mean_margin"] == pytest.approx(final["pref_margin"], rel=1e-4)
    assert result["samples"][0]["chosen"].startswith("Yes,") and "| chosen | rejected | base model | with adapter |" in (whole.run_dir / "eval.md").read_text()
    assert "preference accuracy base model" in describe_evaluation(result, whole.run_dir)

    from hpclora.results.report import report

    written = report(str(whole.run_dir)).read_text()
    assert f"Held-out preference accuracy base {base['pref_accuracy']:.2f} -> adapter {final['pref_accuracy']:.2f}" in written
    assert "![rewards and preference](preference.png)" in written and (whole.run_dir / "preference.png").stat().st_size > 10_000
    from hpclora.rundir import foreign_entries

    assert foreign_entries(whole.run_dir) == []  # `--fresh` may empty it: hpclora wrote all of it


def test_dpo_from_an_sft_run_keeps_the_sft_adapter_as_its_reference_in_fp16(tmp_path, tiny_llama_dir, capsys):
    """SFT -> DPO in one line (model.adapter), in fp16 on the CPU (the V100's precision): the starting adapter is the
    policy and the reference, so the first step's loss is log 2 with no reward margin, which a bare-base reference would
    not give; the LoRA weights stay fp32 and no loss is NaN."""
    from safetensors.torch import load_file

    from conftest import tiny_run_yaml

    sft = train_here(config_module.load(tiny_run_yaml(tmp_path, tiny_llama_dir, train={"max_steps": 3, "lr": 1e-2})), tmp_path / "sft")
    cfg = pair_config(tmp_path, tiny_llama_dir, PAIRS, f"model.adapter={sft.run_dir}", "train.precision=fp16", "train.max_steps=3")
    assert cfg.model.adapter == str(sft.run_dir / "adapter")
    run = train_here(cfg, tmp_path / "dpo")
    log = capsys.readouterr().out
    assert f"reference: the starting adapter, frozen ({sft.run_dir / 'adapter'})" in log and "precision fp16" in log
    steps = [e for e in entries(run.run_dir) if "loss" in e]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and steps[0]["reward_margin"] == pytest.approx(0, abs=1e-3)
    assert all(math.isfinite(e["loss"]) for e in steps) and steps[-1]["loss"] < steps[0]["loss"]
    assert run.summary["base_preference"]["reward_accuracy"] == 0
    weights = load_file(run.run_dir / "adapter" / "adapter_model.safetensors")
    sft_weights = load_file(sft.run_dir / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == sft_weights.keys() and {str(w.dtype) for w in weights.values()} == {"torch.float32"}
    assert any(not (weights[k] == sft_weights[k]).all() for k in weights)  # it trained the SFT adapter on

    from hpclora.results.evaluate import evaluate
    from hpclora.results.generate import speakers

    assert evaluate(run.run_dir, n=0)["before_is"] == "starting adapter"  # before = the SFT adapter, not the bare base
    assert [title for title, _ in speakers(run.run_dir, "compare")] == ["starting adapter", "with adapter"]


def test_model_adapter_names_what_is_wrong(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match=r"model.adapter: .*empty holds no adapter \(adapter_config.json\): give a finished run's directory"):
        config_module.load(None, ["data.path=x/y", f"model.adapter={empty}"])
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "config.yaml").write_text("model:\n  name: owner/other-model\n")
    with pytest.raises(Exception, match=r"was trained on owner/other-model, and model.name is smollm2-135m: set model.name=owner/other-model"):
        config_module.load(None, ["data.path=x/y", f"model.adapter={run}"])


def test_method_settings_are_checked_with_their_key_paths(tmp_path):
    from hpclora.errors import ConfigError

    def problems(*overrides):
        with pytest.raises(ConfigError) as caught:
            config_module.load(None, ["data.path=x/y", *overrides])
        return dict(caught.value.problems)

    assert problems("method.beta=0.2") == {"method.beta": "applies to method.name dpo or orpo or simpo or kto, not sft: drop it"}
    assert problems("method.name=orpo", "method.simpo_gamma=1") == {"method.simpo_gamma": "applies to method.name simpo, not orpo: drop it"}
    assert "(did you mean sigmoid?)" in problems("method.name=dpo", "method.loss_type=sigmod")["method.loss_type"]
    assert problems("method.name=dpo", "method.loss_type=[sigmoid,sft]", "method.loss_weights=[1.0]") == {
        "method.loss_weights": "1 weights for 2 loss types: give one per method.loss_type"}
    assert "never the prompt" in problems("method.name=dpo", "data.train_on_prompt=true")["data.train_on_prompt"]
    assert "at least 2 rows" in problems("method.name=kto", "train.micro_batch_size=1")["train.micro_batch_size"]
    assert "(did you mean apo_zero_unpaired?)" in problems("method.name=kto", "method.loss_type=apo_zero")["method.loss_type"]
    assert problems("method.name=dpo", "method.desirable_weight=2") == {"method.desirable_weight": "applies to method.name kto, not dpo: drop it"}
    both = problems("method.name=dpo", "method.beta=0", "method.label_smoothing=0.7")  # all at once
    assert {"method.beta", "method.label_smoothing"} <= both.keys()


def dpo_ranks_config(tmp_path: Path, model_dir: Path) -> Path:
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:23])
    config = tmp_path / "dpo.yaml"
    config.write_text(json.dumps({
        "model": {"name": str(model_dir)}, "method": {"name": "dpo"}, "lora": {"dropout": 0.0},
        "data": {"path": str(data), "val_size": 7, "max_length": 64, "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "micro_batch_size": 4, "lr": 5e-3, "log_every": 1, "eval_every": 0, "save_every": 0},
        "run": {"output_root": str(tmp_path / "runs")}, "slurm": {"gpus": 0},
    }))
    return config


# The tests of the 2-rank DPO run on one xdist worker, which makes that run once.
DPO_RANKS_GROUP = pytest.mark.xdist_group("dpo-ranks")


@pytest.fixture(scope="module")
def dpo_two_ranks(tmp_path_factory, tiny_llama_dir):
    """DPO under torchrun with DDP over 2 gloo ranks x 4 pairs, 2 steps (an epoch of 16 pairs: at an epoch's uneven end
    DDP would pad its last batch with repeated pairs)."""
    from test_distributed import harness, two_ranks

    tmp = tmp_path_factory.mktemp("dpo-ranks")
    out, done = harness(tmp, dpo_ranks_config(tmp, tiny_llama_dir), tmp / "run", "out", two_ranks())
    return tmp / "run", out, done.stdout


def held_out(run_dir: Path) -> list:
    return [(e["pairs"], e["pref_accuracy"], round(e["pref_margin"], 3)) for e in entries(run_dir) if "eval" in e]


@DPO_RANKS_GROUP
def test_two_gloo_ranks_train_the_dpo_adapter_of_one_rank_over_the_same_global_batch(tmp_path, tiny_llama_dir, dpo_two_ranks):
    """The 2 ranks train the adapter one process trains on 4 pairs x 2 accumulated, and the held-out pairs (7: 4 + 3
    over the ranks) are each counted once."""
    from test_distributed import harness, max_difference, weights

    two_run, two, stdout = dpo_two_ranks
    one, _ = harness(tmp_path, dpo_ranks_config(tmp_path, tiny_llama_dir), tmp_path / "one", "one-out", [sys.executable], "train.grad_accum=2")
    assert max_difference(weights(two / "rank0.safetensors"), weights(two / "rank1.safetensors")) == 0.0
    assert max_difference(weights(two / "rank0.safetensors"), weights(one / "rank0.safetensors")) <= 1e-6
    assert held_out(two_run) == held_out(tmp_path / "one") and held_out(tmp_path / "one")[0][0] == 7
    assert "world 2 ranks (gloo)" in stdout and stdout.count("adapter saved to") == 1


@DPO_RANKS_GROUP
def test_a_stop_signal_to_one_dpo_rank_stops_both_and_the_resume_is_exact(tmp_path, tiny_llama_dir, dpo_two_ranks):
    """A stop signal to rank 1 at step 1 of 2: both ranks checkpoint there, and the resume trains the uninterrupted
    2-rank adapter bit for bit, the reference's passes and the held-out evaluations included."""
    from test_distributed import harness, max_difference, two_ranks, weights

    reference, _, _ = dpo_two_ranks
    config, run_dir = dpo_ranks_config(tmp_path, tiny_llama_dir), tmp_path / "run"
    out, done = harness(tmp_path, config, run_dir, "stopped", two_ranks(), stop_rank_at=(1, 1))
    assert [json.loads((out / f"result{r}.json").read_text()) for r in (0, 1)] == [{"finished": False, "steps": 1}] * 2
    assert [p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")] == ["checkpoint-1"]
    harness(tmp_path, config, run_dir, "resumed", two_ranks())
    assert max_difference(weights(run_dir / "adapter" / "adapter_model.safetensors"),
                          weights(reference / "adapter" / "adapter_model.safetensors")) == 0.0
    assert held_out(run_dir) == held_out(reference)


@DPO_RANKS_GROUP
def test_dpo_under_fsdp_over_two_gloo_ranks_trains_the_adapter_of_ddp(tmp_path, tiny_llama_dir, dpo_two_ranks):
    """FSDP (full shard per decoder layer over a CPU mesh): TRL's loss and the reference's passes (the adapter switched
    off inside the sharded model) give the DDP adapter, and the saved adapter is the trained one alone."""
    from test_distributed import harness, max_difference, two_ranks, weights

    reference, _, _ = dpo_two_ranks
    _, done = harness(tmp_path, dpo_ranks_config(tmp_path, tiny_llama_dir), tmp_path / "run", "out", two_ranks(), "train.distributed=fsdp")
    assert "FSDP (train.distributed)" in done.stdout
    saved = weights(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert max_difference(saved, weights(reference / "adapter" / "adapter_model.safetensors")) <= 1e-5
    assert [(n, a) for n, a, _ in held_out(tmp_path / "run")] == [(n, a) for n, a, _ in held_out(reference)]


def test_qlora_dpo_keeps_the_trained_weights_in_fp32(tmp_path, tiny_llama_dir, capsys):
    """A 4-bit base (bitsandbytes' CPU kernels): TRL casts a quantized model's trainable weights to bf16, which a V100
    cannot compute in; they train and are saved in fp32, and the reference is the 4-bit base with the adapter off."""
    from safetensors.torch import load_file

    run = train_here(pair_config(tmp_path, tiny_llama_dir, PAIRS, "quant.bits=4", "train.max_steps=2"), tmp_path / "qlora")
    assert run.finished and "reference: the base model (the adapter switched off)" in capsys.readouterr().out
    assert {str(w.dtype) for w in load_file(run.run_dir / "adapter" / "adapter_model.safetensors").values()} == {"torch.float32"}
    assert all(math.isfinite(e["loss"]) for e in entries(run.run_dir) if "loss" in e)


def test_the_plan_of_a_dpo_run_counts_both_answers_of_each_pair_and_the_references_pass():
    """On a GPU (no CPU-only terms): a dpo micro-batch of pairs is twice the rows of SFT's, kto's one answer per row;
    the reference's forward (and kto's two more for its KL term) and TRL's head slow both down."""
    from hpclora.plan import make_plan

    common = ["data.path=owner/data", "train.micro_batch_size=2", "data.max_length=512", "data.packing=false", "slurm.gpus=1",
              "train.gradient_checkpointing=false"]
    sft, dpo, kto = (make_plan(config_module.load(None, [*common, f"method.name={m}"]), "a100-80gb") for m in ("sft", "dpo", "kto"))
    assert dpo.breakdown["activations_gb"] == pytest.approx(2 * sft.breakdown["activations_gb"], rel=1e-3)  # chosen and rejected rows
    assert kto.breakdown["activations_gb"] == pytest.approx(sft.breakdown["activations_gb"], rel=1e-3)
    assert kto.tokens_per_s < dpo.tokens_per_s < sft.tokens_per_s / 2
    assert not dpo.packing and "not packed: method.name=dpo" in dpo.packing_reason


def test_the_known_failure_signs_are_named_once_they_show():
    from hpclora.job.preference import failure_signs

    first = {"step": 1, "max_steps": 40, "loss": 0.69, "reward_accuracy": 0.0, "logps_chosen": -40.0, "logps_rejected": -45.0}
    healthy = {**first, "step": 20, "loss": 0.4, "reward_accuracy": 0.8, "logps_chosen": -38.0, "logps_rejected": -60.0}
    assert failure_signs(first, healthy) == []
    too_easy = {**first, "step": 3, "loss": 0.01, "reward_accuracy": 1.0}
    assert "separated at once" in failure_signs(first, too_easy)[0]
    assert failure_signs(first, {**too_easy, "step": 30}) == []  # late in the run a won pair is no sign
    unlearning = {**healthy, "logps_chosen": -90.0, "logps_rejected": -120.0}
    assert "both fall fast (chosen -40.0 -> -90.0, rejected -45.0 -> -120.0)" in failure_signs(first, unlearning)[0]


def test_ktos_loss_is_computed_from_the_models_own_log_probabilities(tmp_path, tiny_llama_dir, tokenizer):
    """KTO on pairs split into 16 labelled answers, all in step 2's one micro-batch: its logged loss against the formula
    on the summed log-probabilities under step 1's checkpoint and the base (the reference): z = the batch's mean
    log-ratio of each prompt with its neighbour's answer (at least 0), good answers 1 - sigmoid(beta (ratio - z)), bad
    ones 1 - sigmoid(beta (z - ratio)), weighted and averaged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hpclora.data import prepare
    from hpclora.job.preference import answer_logps, as_reference, kl_rows, unpaired_collator

    cfg = pair_config(tmp_path, tiny_llama_dir, PAIRS[:10], "method.name=kto", "method.beta=0.5", "method.undesirable_weight=1.5",
                      "data.val_size=2", "train.micro_batch_size=16", "train.max_steps=2", "train.save_every=1", "train.warmup_ratio=0")
    run = train_here(cfg, tmp_path / "run")
    logged = next(e for e in entries(run.run_dir) if e.get("step") == 2 and "loss" in e)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run.run_dir / "checkpoints" / "checkpoint-1").eval()
    answers = kl_rows(prepare(cfg.data, tokenizer, cfg.run.seed, method="kto").train, 16, cfg.run.seed)
    assert len(answers) == 16 and sum(answers["label"]) == 8
    batch = unpaired_collator(tokenizer.pad_token_id)([answers[i] for i in range(16)])
    mismatched = {k[3:]: v for k, v in batch.items() if k.startswith("KL_")}
    ratio = answer_logps(model, batch)
    z = answer_logps(model, mismatched)
    with as_reference(model):
        ratio -= answer_logps(model, batch)
        z -= answer_logps(model, mismatched)
    z = z.mean().clamp(min=0)
    good = batch["label"].bool()
    losses = torch.cat([1 - torch.sigmoid(0.5 * (ratio[good] - z)), 1.5 * (1 - torch.sigmoid(0.5 * (z - ratio[~good])))])
    assert logged["loss"] == pytest.approx(losses.mean().item(), rel=1e-5, abs=1e-6)
    assert logged["reward_chosen"] == pytest.approx(0.5 * ratio[good].mean().item(), rel=1e-4, abs=1e-6)


def test_kto_on_labelled_answers_raises_their_margin_and_resumes_exactly(tmp_path, tiny_llama_dir, capsys):
    """Unpaired rows (prompt/completion/label, some prompts with one answer only): stopped at step 3 of 8 and resumed,
    the adapter of an uninterrupted run, bit for bit (the KL answers are made from the same shuffled order each time);
    the held-out answers move toward their labels, and eval and report say so without an accuracy."""
    from test_resume import assert_same_adapter

    rows = [one for i, pair in enumerate(PAIRS) for one in
            ({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
             {"prompt": pair["prompt"], "completion": pair["rejected"], "label": "false"})[: 1 + (i % 3 > 0)]]
    cfg = pair_config(tmp_path, tiny_llama_dir, rows, "method.name=kto", "data.val_size=8", "train.max_steps=8",
                      "train.save_every=3", "train.lr=1e-2")
    whole = train_here(cfg, tmp_path / "whole")
    assert not train_here(cfg, tmp_path / "parts", stop_at=3).finished
    resumed = train_here(cfg, tmp_path / "parts")
    assert resumed.finished
    assert_same_adapter(whole.run_dir, resumed.run_dir)

    log = capsys.readouterr().out
    assert "method kto | beta 0.1 | loss kto, weights good 1 / bad 1 | reference: the base model" in log
    assert "eval base @ step 0 | margin good - bad answers" in log and "(8 labelled answers)" in log
    base, final = whole.summary["base_preference"], whole.summary["final_preference"]
    assert final["pref_margin"] > base["pref_margin"] and final["reward_accuracy"] > 0.5 and "pref_accuracy" not in final
    assert {"kl", "reward_chosen", "reward_margin"} <= next(e for e in entries(whole.run_dir) if "loss" in e).keys()

    from hpclora.results.evaluate import describe_evaluation, evaluate
    from hpclora.results.report import report

    result = evaluate(whole.run_dir, n=1, max_new_tokens=3)
    assert result["unit"] == "labelled answers" and result["pairs"] == 8 and result["preference"]["adapter"]["accuracy"] is None
    assert result["margin_finding"]["mean_change"] > 0 and "toward its label" in describe_evaluation(result, whole.run_dir)
    assert "| given answer (" in (whole.run_dir / "eval.md").read_text()
    assert "Held-out margin base" in report(str(whole.run_dir)).read_text() and (whole.run_dir / "preference.png").exists()


def test_pairs_and_labelled_answers_read_the_same_from_json_csv_and_parquet(tmp_path, tokenizer):
    """The tabular forms people publish preference sets in: a JSON array, CSV (labels as words) and parquet give the
    tokens of the same JSON Lines rows."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from hpclora.data import prepare

    def tokens(path, method):
        cfg = config_module.load(None, [f"data.path={path}", f"method.name={method}", "data.val_size=0", f"data.cache_dir={tmp_path}"])
        train = prepare(cfg.data, tokenizer, 0, method=method).train
        return [train[c] for c in train.column_names if c.endswith("_ids") or c == "label"]

    pairs = PAIRS[:5]
    answers = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i % 2 == 0} for i, p in enumerate(pairs)]
    for rows, method in ((pairs, "dpo"), (answers, "kto")):
        expected = tokens(write_jsonl(tmp_path / f"{method}.jsonl", rows), method)
        (tmp_path / f"{method}.json").write_text(json.dumps(rows))
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{method}.parquet")
        with open(tmp_path / f"{method}.csv", "w", newline="") as fh:
            table = csv.DictWriter(fh, list(rows[0]))
            table.writeheader()
            table.writerows({k: str(v).lower() if isinstance(v, bool) else v for k, v in row.items()} for row in rows)
        for suffix in ("json", "parquet", "csv"):
            assert tokens(tmp_path / f"{method}.{suffix}", method) == expected, suffix


def test_kto_over_two_gloo_ranks_trains_one_adapter_and_counts_each_held_out_pair_once(tmp_path, tiny_llama_dir):
    """KTO under torchrun with DDP: each rank's micro-batch holds its own rows and their KL answers (the batches are
    handed to the ranks in the order kl_rows made them), both ranks end with the same adapter, and the 7 held-out pairs
    over 2 ranks are each counted once. (TRL averages its KL estimate over the ranks, so one rank is not the reference.)"""
    from test_distributed import harness, max_difference, two_ranks, weights

    config = dpo_ranks_config(tmp_path, tiny_llama_dir)
    out, done = harness(tmp_path, config, tmp_path / "run", "out", two_ranks(), "method.name=kto")
    assert "method kto" in done.stdout and "world 2 ranks (gloo)" in done.stdout
    assert max_difference(weights(out / "rank0.safetensors"), weights(out / "rank1.safetensors")) == 0.0
    evaluations = held_out(tmp_path / "run")
    assert [pairs for pairs, _, _ in evaluations] == [7, 7] and all(math.isfinite(e["loss"]) for e in entries(tmp_path / "run") if "loss" in e)


def test_a_dpo_run_from_an_sft_run_merges_exports_and_chats_as_its_own_adapter(tmp_path, tokenizer):
    """The result of SFT -> DPO (model.adapter: the run's model also holds TRL's frozen copy of the SFT adapter): the
    merge holds the DPO adapter's weights (its logits, not the SFT adapter's), the f16 GGUF answers with the merged
    model's greedy tokens, and chat's /compare sets it beside the SFT adapter it started from. A tiny llama whose weights
    are drawn wide, so that greedy answers are not ties."""
    pytest.importorskip("llama_cpp", reason="llama.cpp is not installed: `make llama-cpp` (part of `make test`) builds it")
    import io

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config, tiny_run_yaml
    from hpclora.data import encode, render
    from hpclora.results import llamacpp
    from hpclora.results.chat import chat
    from hpclora.results.export import export
    from hpclora.results.generate import Sampling
    from hpclora.results.merge import merge

    model_config = tiny_config("llama", vocab_size=len(tokenizer))
    model_config.initializer_range = 0.4
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config, dtype=torch.float32).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sft = train_here(config_module.load(tiny_run_yaml(tmp_path, tmp_path / "model", train={"max_steps": 2, "lr": 1e-2})), tmp_path / "sft")
    cfg = pair_config(tmp_path, tmp_path / "model", PAIRS[:10], f"model.adapter={sft.run_dir}", "data.val_size=2", "train.max_steps=2")
    run = train_here(cfg, tmp_path / "dpo").run_dir

    merged = AutoModelForCausalLM.from_pretrained(merge(run, tmp_path / "merged", "fp32"), dtype=torch.float32).eval()
    ids = encode(render(cfg.data.template, [{"role": "user", "content": "Is 3 a number?", "input": ""}], tokenizer), tokenizer,
                 cfg.data.template)[0]
    last_logits = lambda model: model(torch.tensor([ids])).logits[0, -1]  # noqa: E731
    fresh = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        dpo = last_logits(PeftModel.from_pretrained(fresh(), str(run / "adapter")).eval())
        sft_logits = last_logits(PeftModel.from_pretrained(fresh(), str(sft.run_dir / "adapter")).eval())
        assert (last_logits(merged) - dpo).abs().max() < 1e-3 < (dpo - sft_logits).abs().max()
        expected = merged.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]

    out = export(run, "f16", tmp_path / "gguf")
    record = json.loads((out / "EXPORTED_FROM.json").read_text())
    assert record["checked"]["template_tokens_equal"] is True
    answer = [t for t in expected.tolist() if t != tokenizer.eos_token_id]
    assert answer and llamacpp.greedy(llamacpp.load(out / record["gguf"], n_ctx=256), ids, 12) == answer

    said = io.StringIO()
    assert chat(run, Sampling(max_new_tokens=4), stdin=io.StringIO("Is 3 a number?\n/compare\n"), out=said) == 0
    assert "starting adapter" in said.getvalue() and "base model" not in said.getvalue()

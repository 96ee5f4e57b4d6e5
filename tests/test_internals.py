"""What hpclora takes from libraries beyond their public API (src/hpclora/internals.py), each checked for real, so
that a release that changes it fails here, by name, rather than somewhere in training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def test_transformers_sdpa_attention_and_its_mask_function_are_where_varlen_calls_them():
    from hpclora.internals import sdpa_attention, sdpa_mask_function

    attention, mask = sdpa_attention(), sdpa_mask_function()
    query = key = value = torch.randn(1, 2, 5, 8)  # batch, heads, positions, head width
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    out, _ = attention(module, query, key, value, None, dropout=0.0, scaling=None, is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-6) and callable(mask)


def test_the_tensorboard_callback_writes_into_the_directory_it_is_given(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from hpclora.internals import tensorboard_callback

    callback = tensorboard_callback(str(tmp_path / "tb"))
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # put back as it was
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=True)
    callback.on_train_begin(args, state, TrainerControl())
    callback.on_log(args, state, TrainerControl(), logs={"loss": 1.0})
    callback.on_train_end(args, state, TrainerControl())
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))


def test_4bit_layers_have_the_switch_that_keeps_them_trainable_after_an_evaluation(tiny_llama_dir):
    from hpclora import config
    from hpclora.internals import keep_4bit_layers_trainable
    from hpclora.job.model import load_base

    cfg = config.load(None, [f"model.name={tiny_llama_dir}", "data.path=x.jsonl", "quant.bits=4"], check_files=False)
    model = load_base(cfg, "fp32", "cpu")
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers  # bitsandbytes' Linear4bit still has the switch
    keep_4bit_layers_trainable(model)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)


def test_the_hub_libraries_read_hf_home_when_first_imported(tmp_path):
    code = ("from hpclora.internals import use_hub_cache; import sys; use_hub_cache(sys.argv[1]); "
            "import huggingface_hub.constants as c; print(c.HF_HOME)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf")], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(tmp_path / "hf")


def test_accelerate_scales_steps_and_unscales_with_the_scaler_given_for_fp16_on_a_cpu():
    """The loss is scaled in backward, clipping sees unscaled gradients, and a step with an overflow is skipped."""
    from accelerate import Accelerator

    from hpclora.internals import fp16_loss_scaling_on_cpu

    accelerator = Accelerator(cpu=True)
    fp16_loss_scaling_on_cpu(accelerator)
    layer = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.ones_(layer.weight)
    optimizer = accelerator.prepare(torch.optim.SGD(layer.parameters(), lr=0.1))
    accelerator.backward(layer(torch.ones(1, 4)).sum())
    assert layer.weight.grad[0, 0].item() == accelerator.scaler.get_scale()  # scaled: 65536 x 1
    accelerator.clip_grad_norm_(layer.parameters(), 1e9)
    assert layer.weight.grad[0, 0].item() == 1.0  # unscaled before clipping
    optimizer.step()
    assert layer.weight[0, 0].item() == pytest.approx(0.9) and not accelerator.optimizer_step_was_skipped
    optimizer.zero_grad()
    accelerator.backward(layer(torch.full((1, 4), float("inf"))).sum())
    optimizer.step()
    assert accelerator.optimizer_step_was_skipped and layer.weight[0, 0].item() == pytest.approx(0.9)


FSDP_ON_CPU = """
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from transformers import Trainer, TrainingArguments
from hpclora.internals import fsdp_on_cpu
from hpclora.job.trainer import fsdp_arguments

args = TrainingArguments(output_dir="out", use_cpu=True, report_to="none", bf16=True, **fsdp_arguments())
trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
assert trainer.accelerator.distributed_type != DistributedType.FSDP  # accelerate's own choice off a GPU
fsdp_on_cpu(trainer)
assert trainer.accelerator.is_fsdp2 and trainer.is_fsdp_enabled
assert AcceleratorState().distributed_type == DistributedType.FSDP  # a later AcceleratorState() keeps it
assert trainer.accelerator.state.fsdp_plugin.mixed_precision_policy.param_dtype == torch.bfloat16
print("ok")
"""


def test_accelerate_takes_the_fsdp_plugin_set_for_cpu_ranks(tmp_path):
    """One rank under torchrun (the Trainer takes FSDP settings in distributed runs only), in a process of its own:
    accelerate's state is process-wide and would make later trainers FSDP ones."""
    (tmp_path / "check.py").write_text(FSDP_ON_CPU)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "check.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant_with_warmup"])
def test_transformers_schedules_are_lambda_factors_and_warmup_starts_above_zero(schedule):
    import torch
    from transformers import get_scheduler

    from hpclora.internals import warmup_from_the_first_step

    def learning_rates(shift: bool) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        made = get_scheduler(schedule, optimizer=optimizer, num_warmup_steps=4, num_training_steps=20)
        scheduler = warmup_from_the_first_step(made, 4) if shift else made
        rates = []
        for _ in range(20):
            rates.append(optimizer.param_groups[0]["lr"])  # the rate this step trains at
            optimizer.step()
            scheduler.step()
        return rates

    plain, shifted = learning_rates(False), learning_rates(True)
    assert plain[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]  # transformers' own: the first step at 0
    assert shifted[:4] == [0.25, 0.5, 0.75, 1.0] and shifted[4:] == plain[4:]


def test_trl_prepares_preference_datasets_in_the_method_hpclora_replaces():
    """DPOTrainer's and KTOTrainer's __init__ hand each dataset to `_prepare_dataset(dataset, processing_class, args,
    dataset_name)`, which TokenizedPreferenceData replaces; a release that renamed either would tokenize hpclora's pairs
    again (test_preference's runs would then fail on the missing text columns)."""
    import inspect

    from trl import DPOTrainer, KTOTrainer

    from hpclora.internals import TokenizedPreferenceData

    for trainer in (DPOTrainer, KTOTrainer):
        assert list(inspect.signature(trainer._prepare_dataset).parameters) == ["self", "dataset", "processing_class", "args", "dataset_name"]
        assert "self._prepare_dataset(train_dataset" in inspect.getsource(trainer.__init__)
    assert TokenizedPreferenceData._prepare_dataset(None, ["tokenized"], None, None, "train") == ["tokenized"]


def test_trls_preference_head_reads_its_tile_width_where_hpclora_narrows_it_and_scores_the_same(tiny_llama_dir):
    """TRL's fused head takes the tile width from trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE at each call, which
    narrower_preference_head_tiles sets: the log-probabilities and the gradients reaching the model are those of
    TRL's own width (the 49k vocabulary in 6 tiles instead of 2), to float rounding."""
    import inspect

    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from hpclora.internals import TRL_HEAD_COLUMNS, narrower_preference_head_tiles

    assert "_CHUNKED_LOGPROB_CHUNK_SIZE" in inspect.getsource(trl_utils.add_fused_lm_head)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(24) < 8, -100)

    def scored():
        model.zero_grad()
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logps = model(inputs_embeds=embeds, labels=labels, fused_lm_head=True).log_probs
        logps.sum().backward()
        return logps.detach(), embeds.grad

    original = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    try:
        wide = scored()
        narrower_preference_head_tiles()
        assert trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == TRL_HEAD_COLUMNS < model.config.vocab_size
        narrow = scored()
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = original
    largest = lambda x: x.abs().max().item()  # noqa: E731
    assert largest(narrow[0] - wide[0]) <= 1e-6 * largest(wide[0]) and largest(narrow[1] - wide[1]) <= 1e-5 * largest(wide[1])
    assert largest(wide[1]) > 1  # gradients that reach the model, compared

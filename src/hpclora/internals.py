"""Where hpclora leans on what a library does not promise as public API: each such use is here, and only here,
and tests/test_internals.py fails loudly when a library release changes it.

- transformers' own sdpa attention and its mask function, which `sdpa_varlen` calls per packed example (the
  AttentionInterface documentation shows exactly this use, but the module paths are not a stable API);
- TensorBoardCallback's log directory, which it reads from TENSORBOARD_LOGGING_DIR when it is constructed;
- bitsandbytes' 4-bit layers on CPUs with AVX512-BF16, which repack their weights for inference on the
  first no-grad forward unless told not to;
- the Hugging Face hub libraries, which read HF_HOME once, when they are first imported;
- accelerate's loss scaler, given to the Trainer for fp16 on a CPU, where accelerate refuses fp16 itself;
- accelerate's distributed type and FSDP plugin, set for FSDP over CPU ranks, where accelerate would train DDP;
- the factor functions of transformers' learning-rate schedules (a torch LambdaLR's `lr_lambdas`), shifted so
  that warmup does not give the first step a learning rate of 0;
- bitsandbytes' import, which compiles kernels whether or not a run uses them, and which peft and transformers
  skip where bitsandbytes is absent;
- TRL's preference trainers' dataset preparation, which tokenizes text columns its own way: hpclora hands them pairs
  its data stage tokenized already (the prompt exactly as `generate` renders it).

Heavy libraries are imported inside the functions: importing this module costs nothing on a login node.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def sdpa_attention():
    """transformers' sdpa attention function (the one `attn_implementation="sdpa"` runs)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def sdpa_mask_function():
    """transformers' mask function for sdpa, registered for `sdpa_varlen` so that unpacked rows get sdpa's mask."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask


@contextmanager
def _environment(**values: str):
    """Set variables for the block only, and put back what was there."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tensorboard_callback(log_dir: str):
    """A TensorBoardCallback that writes into `log_dir`, also for the writer it opens again after training (for the
    final evaluation): it takes the directory from TENSORBOARD_LOGGING_DIR when constructed, its only setting for it."""
    from transformers.integrations import TensorBoardCallback

    with _environment(TENSORBOARD_LOGGING_DIR=log_dir):
        return TensorBoardCallback()


def keep_4bit_layers_trainable(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for fast inference the first time the layer runs
    in eval mode without gradients, and that layout has no backward: training after an evaluation would silently
    lose the gradients flowing through the frozen layers. A model being trained keeps the trainable layout
    (inference-only loads, as in `generate`, still get the fast one)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def use_hub_cache(hf_home: str | None) -> None:
    """Point the hub libraries (huggingface_hub, transformers, datasets) at `hf_home`: they read HF_HOME once, when
    first imported, so this runs at the start of a command, before any of them is imported."""
    if hf_home:
        os.environ["HF_HOME"] = hf_home


def fp16_loss_scaling_on_cpu(accelerator) -> None:
    """fp16 on a CPU, the V100/T4 path tried before the queue: accelerate refuses mixed-precision fp16 off a GPU, so
    the Trainer runs without it, under torch's CPU autocast, and gets torch's GradScaler for the CPU here. Once
    `Accelerator.scaler` is set, accelerate scales the loss in `backward` with it and steps the optimizers through
    it (skipping a step whose gradients overflowed, which the Trainer then sees), and the Trainer saves it into
    each checkpoint and loads it on resume. `unscale_gradients`, which gradient clipping calls first, asks the
    mixed-precision setting instead and would clip the scaled gradients: it unscales with the scaler here."""
    import torch
    from accelerate.optimizer import AcceleratedOptimizer

    accelerator.scaler = torch.amp.GradScaler("cpu")

    def unscale_gradients(optimizer=None):
        optimizers = accelerator._optimizers if optimizer is None else optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
        for opt in optimizers:
            while isinstance(opt, AcceleratedOptimizer):
                opt = opt.optimizer
            accelerator.scaler.unscale_(opt)

    accelerator.unscale_gradients = unscale_gradients


def fsdp_on_cpu(trainer) -> None:
    """FSDP over CPU ranks (gloo), the GPU path tried before the queue: accelerate takes its FSDP plugin only for
    GPU-like devices and trains CPU ranks with DDP, though torch's `fully_shard` shards over a CPU mesh. The
    accelerator is made an FSDP one with the plugin the Trainer built from its arguments, before anything is
    prepared, so that the Trainer and accelerate then take their FSDP path as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # Both shared states, as accelerate sets them for GPUs: each later AcceleratorState() copies the partial one's.
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def warmup_from_the_first_step(scheduler, warmup_steps: int):
    """transformers' schedule with its warmup one step earlier: its warmup factor is step / warmup_steps, so the first
    step trains at a learning rate of 0 (with 20 steps and a warmup ratio of 0.05, the only warmup step is wasted).
    Step s < warmup_steps takes the factor of s + 1 (the first at lr / warmup_steps); from then on the schedule is
    unchanged. A schedule that is not a LambdaLR is returned as it is."""
    import torch

    if not warmup_steps or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return scheduler

    def shifted(factor):
        return lambda step: factor(step + 1) if step < warmup_steps else factor(step)

    # The optimizer's `initial_lr`, set by the first scheduler, is the base of this one too.
    return torch.optim.lr_scheduler.LambdaLR(scheduler.optimizer, [shifted(f) for f in scheduler.lr_lambdas])


def without_bitsandbytes() -> None:
    """Mark bitsandbytes absent for the rest of this process: importing it runs torch.compile on its default
    kernels (torch._dynamo and torch._inductor, about 2 s and 45 MB on every rank of every job), and peft and
    transformers import it whenever it is installed. A None in sys.modules makes `import` raise ImportError and
    find_spec answer None, so both take their path without it. Only for a process that trains one run that neither
    quantizes nor steps a bitsandbytes optimizer, and then ends: transformers remembers the answer."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None


# TRL 1.16 scores the answers of preference methods through a fused head that never holds the [positions, vocabulary]
# logits, only tiles of up to TRL_HEAD_POSITIONS positions by its _CHUNKED_LOGPROB_CHUNK_SIZE (32768) vocabulary
# columns, with as large temporaries beside each tile where there is no Triton (CPU). hpclora's tiles are
# TRL_HEAD_COLUMNS wide: the same log-probabilities (a log-sum-exp folded over more, narrower tiles), about 1 GB less
# peak RSS in DPO with SmolLM2-135M's 49k vocabulary on a CPU, and no slower
# (benchmarks/results/preference_throughput.txt).
TRL_HEAD_POSITIONS, TRL_HEAD_COLUMNS = 4096, 8192


def narrower_preference_head_tiles() -> None:
    import trl.trainer.utils

    trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = TRL_HEAD_COLUMNS


class TokenizedPreferenceData:
    """A mixin for TRL 1.16's DPOTrainer and KTOTrainer: their training and evaluation sets are taken as they are,
    already holding the prompt_ids, chosen_ids and rejected_ids (or completion_ids, label and KTO's KL_completion_ids)
    their collators read (data/preference.py and job/preference.kl_rows made them). TRL's `_prepare_dataset` would
    extract prompts, append EOS text and tokenize prompt and answer together, which merges tokens across their border
    and renders the prompt unlike `hpclora generate`."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset

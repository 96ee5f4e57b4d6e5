"""Preference tuning through TRL's trainers: which trainer and arguments a method takes, what hpclora changes in
them, and the held-out preference evaluation of every preference run.

TRL computes the losses and their logged rewards; hpclora gives it the pairs its own data stage tokenized (the prompt
exactly as `generate` renders it), the precision the run chose, and the reference the run means:
- a new adapter: the base with the adapter switched off (TRL's copy of an untrained adapter is dropped: with LoRA's
  B at zero it is the base, at the cost of a second adapter's compute in every reference pass);
- model.adapter (SFT -> DPO): a frozen copy of the starting adapter, which TRL makes ("ref"), also under QLoRA.
TRL casts a quantized model's trainable weights to bf16, which a V100 cannot compute in and whose small updates round
away: they go back to fp32, as in every hpclora run.
"""

from __future__ import annotations

from ..config.rules import with_kl_term
from ..errors import UserError

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of a starting adapter
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
WITH_REFERENCE = ("dpo", "kto")  # methods that score against a reference


def trainer_class(method: str):
    """TRL's trainer for `method`, and its arguments class."""
    try:
        import trl
    except ImportError:
        import sys

        raise UserError(f"method.name={method} trains with TRL 1.16, which needs Python 3.11 or newer and is not installed in "
                        f"this Python ({sys.version.split()[0]}): run the job with a Python that has it (pip install trl==1.16.0)") from None
    if method == "dpo":
        return trl.DPOTrainer, trl.DPOConfig
    if method == "kto":
        return trl.KTOTrainer, trl.KTOConfig
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # SimPO is CPO's loss "simpo" without its SFT term

    return CPOTrainer, CPOConfig


def beta(method_cfg) -> float:
    return method_cfg.beta if method_cfg.beta is not None else DEFAULT_BETA[method_cfg.name]


def method_arguments(cfg) -> dict:
    """The TRL config's own arguments for the run's method (the TrainingArguments ones are the trainer's)."""
    m = cfg.method
    args = {
        "beta": beta(m),
        "max_length": cfg.data.max_length,  # the data stage has cut every pair to it already
        "disable_dropout": True,  # TRL's choice: policy and reference see the same network
        # TRL turns gradient checkpointing on by default; hpclora decides it (train.gradient_checkpointing). The new name:
        # the old one, TRL's default, warns of its removal in every job log
        "activation_checkpointing": False,
        "dataset_num_proc": None,
    }
    if m.name == "dpo":
        losses = ["sigmoid"] if m.loss_type == "auto" else [m.loss_type] if isinstance(m.loss_type, str) else list(m.loss_type)
        args.update(loss_type=losses, loss_weights=m.loss_weights, label_smoothing=m.label_smoothing, precompute_ref_log_probs=False)
    if m.name == "kto":
        # kto's KL term pairs each row with its neighbour's answer (kl_rows), so the rows are read in their order
        args.update(loss_type="kto" if m.loss_type == "auto" else m.loss_type, desirable_weight=m.desirable_weight,
                    undesirable_weight=m.undesirable_weight, precompute_ref_log_probs=False,
                    train_sampling_strategy="sequential" if with_kl_term(m) else "random")
    if m.name == "simpo":
        args.update(loss_type="simpo", simpo_gamma=m.simpo_gamma, cpo_alpha=0.0, label_smoothing=m.label_smoothing)
    return args


def kl_rows(dataset, batch_size: int, seed: int):
    """KTO's training rows for its KL term, which the trainer reads in this order: shuffled once with the run's seed
    (a pair split in two would otherwise sit in one batch, each half the other's mismatched answer), then each row given
    the answer of the row before it within its micro-batch (TRL's construction: the batch's own answers, each after
    another prompt)."""
    def rotated(batch):
        return {"KL_completion_ids": batch["completion_ids"][-1:] + batch["completion_ids"][:-1]}

    shuffled = dataset.shuffle(seed=seed).flatten_indices()
    return shuffled.map(rotated, batched=True, batch_size=batch_size)


def starting_reference(model, fresh_adapter: bool) -> None:
    """The reference the run means (see the module's docstring): a new adapter's copy goes, the base is the reference."""
    if fresh_adapter and REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)


def trained_weights_in_fp32(model) -> None:
    """Undo TRL's cast of a quantized model's trainable weights to bf16."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def as_reference(model):
    """A context in which the model is the run's reference: the frozen starting adapter, or the base (adapters off);
    TRL's own switch, as its loss uses it."""
    from trl.trainer.utils import use_adapter

    unwrapped = model.module if hasattr(model, "module") else model
    return use_adapter(unwrapped, REFERENCE_ADAPTER if REFERENCE_ADAPTER in unwrapped.peft_config else None)


def pair_collator(pad_token_id: int):
    """Batches of tokenized pairs as TRL's DPO collator makes them (chosen rows first, then rejected, with a completion
    mask): what the evaluation scores, whichever trainer the method trains with."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=pad_token_id)


def unpaired_collator(pad_token_id: int):
    """Batches of labelled answers as TRL's KTO collator makes them (input_ids, attention_mask, completion_mask, label;
    the KL_ ones from a KL_completion_ids column)."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    return DataCollatorForUnpairedPreference(pad_token_id=pad_token_id)


def answer_logps(model, batch: dict):
    """Each sequence's summed log-probability of its answer tokens (completion_mask) under `model`, in fp32."""
    import torch

    from .loss import HeadInputs, output_head

    ids, mask, answer = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    targets, keep = ids[:, 1:], answer[:, 1:].bool()
    head = output_head(model)
    with torch.no_grad():
        if head is None:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            rows = logits[keep].float()
        else:
            with HeadInputs(head) as seen:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            rows = torch.nn.functional.linear(seen.hidden[:, :-1][keep], head.weight, head.bias).float()
        token_logps = rows.log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    owner = keep.nonzero()[:, 0]  # the sequence each answer token belongs to
    return torch.zeros(ids.shape[0], dtype=torch.float32, device=ids.device).index_add_(0, owner, token_logps)


def pair_scores(model, batch: dict, with_reference: bool):
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probabilities of a collated
    batch of pairs (chosen rows first, as TRL's collator puts them); the reference's are None without one."""
    policy = answer_logps(model, batch).chunk(2)
    if not with_reference:
        return (*policy, None, None)
    with as_reference(model):
        reference = answer_logps(model, batch).chunk(2)
    return (*policy, *reference)


def preference_metrics(totals: dict, beta_value: float, prefix: str) -> dict:
    """The logged evaluation of summed per-pair numbers: pref_accuracy and pref_margin (the model's own preference:
    how often, and by how much in log-probability, it puts the chosen answer above the rejected one; comparable
    between the base, an SFT adapter and the tuned one), and, against the reference, reward_accuracy and
    reward_margin (DPO's implicit reward, beta x the log-ratio to the reference)."""
    pairs = max(totals["pairs"], 1)
    metrics = {f"{prefix}_pref_accuracy": totals["pref_right"] / pairs, f"{prefix}_pref_margin": totals["pref_margin"] / pairs,
               f"{prefix}_pairs": int(totals["pairs"])}
    if "reward_right" in totals:
        metrics[f"{prefix}_reward_accuracy"] = totals["reward_right"] / pairs
        metrics[f"{prefix}_reward_margin"] = beta_value * totals["reward_margin"] / pairs
    return metrics


ANSWER_KEYS = ("good", "bad", "good_logps", "bad_logps", "reward_right", "good_ratio", "bad_ratio")


def summed_answer_numbers(model, batch: dict) -> list[float]:
    """The ANSWER_KEYS sums of a collated batch of labelled answers (unpaired_collator): how many good and bad, their
    summed log-probabilities under the model, how many have a log-ratio to the reference of the label's sign, and the
    summed log-ratios of each kind."""
    good = batch["label"].bool()
    logps = answer_logps(model, batch)
    with as_reference(model):
        ratio = logps - answer_logps(model, batch)
    right = (ratio[good] > 0).sum() + (ratio[~good] < 0).sum()
    return [float(good.sum()), float((~good).sum()), float(logps[good].sum()), float(logps[~good].sum()), float(right),
            float(ratio[good].sum()), float(ratio[~good].sum())]


def answer_metrics(totals: dict, beta_value: float, prefix: str) -> dict:
    """The logged evaluation of held-out labelled answers (kto's unpaired rows), which pair no two answers: pref_margin
    is the mean log-probability of the good answers minus that of the bad ones (the model's own preference; comparable
    between the base and the tuned adapter), reward_accuracy the share of answers whose log-ratio to the reference has
    the label's sign, reward_margin beta x the mean log-ratio of the good answers minus that of the bad ones."""
    good, bad, answers = max(totals["good"], 1), max(totals["bad"], 1), int(totals["good"] + totals["bad"])
    return {f"{prefix}_pref_margin": totals["good_logps"] / good - totals["bad_logps"] / bad, f"{prefix}_answers": answers,
            f"{prefix}_reward_accuracy": totals["reward_right"] / max(answers, 1),
            f"{prefix}_reward_margin": beta_value * (totals["good_ratio"] / good - totals["bad_ratio"] / bad)}


def held_out_words(numbers: dict) -> str:
    """A held-out evaluation (preference_metrics or answer_metrics, without prefix) in words."""
    reward = (f" | reward accuracy {numbers['reward_accuracy']:.2f}, margin {numbers['reward_margin']:+.3f}"
              if "reward_accuracy" in numbers else "")
    if "pref_accuracy" in numbers:
        return f"preference accuracy {numbers['pref_accuracy']:.2f}, margin {numbers['pref_margin']:+.2f} ({int(numbers['pairs'])} pairs){reward}"
    return f"margin good - bad answers {numbers['pref_margin']:+.2f} ({int(numbers['answers'])} labelled answers){reward}"


def held_out_change(base: dict, final: dict) -> str:
    """The held-out pairs (or labelled answers) before and after: how often, and by how much, the model prefers the
    chosen (good) answers."""
    if "pref_accuracy" in final:
        return (f"held-out preference accuracy base {base['pref_accuracy']:.2f} -> adapter {final['pref_accuracy']:.2f} "
                f"({int(final['pairs'])} pairs) | margin {base['pref_margin']:+.2f} -> {final['pref_margin']:+.2f} "
                "(log-probability, chosen minus rejected)")
    return (f"held-out margin base {base['pref_margin']:+.2f} -> adapter {final['pref_margin']:+.2f} ({int(final['answers'])} "
            "labelled answers: mean log-probability of the good ones minus the bad ones)")


def evaluation_numbers(metrics: dict, prefix: str) -> dict:
    """A logged evaluation without its prefix and runtime: what metrics.jsonl, the summary and the checkpoints keep."""
    return {k[len(prefix) + 1:]: v for k, v in metrics.items() if k.startswith(prefix + "_") and not k.endswith("_runtime")}


def summed_pair_numbers(scores) -> list[float]:
    """[pairs, pref_right, pref_margin(, reward_right, reward_margin)] summed over a batch's pairs (pair_scores)."""
    chosen, rejected, ref_chosen, ref_rejected = scores
    numbers = [float(chosen.numel()), float((chosen > rejected).sum()), float((chosen - rejected).sum())]
    if ref_chosen is not None:
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        numbers += [float((margin > 0).sum()), float(margin.sum())]
    return numbers


TOTAL_KEYS = ("pairs", "pref_right", "pref_margin", "reward_right", "reward_margin")


def failure_signs(first: dict, now: dict) -> list[str]:
    """What users of DPO watch for in the logged numbers (progress.REWARD_KEYS), from the first logged step to `now`:
    pairs won outright within the first quarter of the run (too easy, or the answers give themselves away), and the
    log-probabilities of chosen and rejected answers both falling fast (the model unlearns the answers it should
    keep: a smaller train.lr or a larger method.beta holds it closer to the reference)."""
    signs = []
    if now.get("reward_accuracy") == 1.0 and now["loss"] < 0.05 and now["step"] <= max(1, now["max_steps"] // 4):
        signs.append(f"reward accuracy 1.00 with loss {now['loss']:.3f} at step {now['step']} of {now['max_steps']}: the pairs are "
                     "separated at once; check that the rejected answers are not told apart by form alone (length, an end "
                     "token, a marker), or lower train.lr")
    if "logps_chosen" in first and now["step"] > first["step"]:
        fell = [(first[k], now[k]) for k in ("logps_chosen", "logps_rejected")]
        if all(after < before - max(5.0, 0.5 * abs(before)) for before, after in fell):
            signs.append(f"the log-probabilities of chosen and rejected answers both fall fast (chosen {fell[0][0]:.1f} -> "
                         f"{fell[0][1]:.1f}, rejected {fell[1][0]:.1f} -> {fell[1][1]:.1f}): the model unlearns the answers; "
                         "lower train.lr or raise method.beta")
    return signs

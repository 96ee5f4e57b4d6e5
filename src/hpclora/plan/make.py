"""`hpclora plan`: will this run fit, with which precision, micro-batch and time, on which GPU? One Plan from the
memory model (memory.py), the speed estimate (speed.py) and the strategy rule (strategy.py), with what a probe
measured on this cluster where there is such a measurement (calibration.py). No torch: login nodes run it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

from ..catalog.devices import Device, gpu_aliases, gpus_file, known_devices
from ..catalog.dims import find_dims, parameter_counts
from ..catalog.models import packing_choice
from ..catalog.precision import choose_precision, fsdp_problem
from ..config import RunConfig, ranks_per_node, world_size
from ..config.slurm_syntax import slurm_mem_gb, slurm_mem_mib, slurm_time
from ..errors import UserError
from . import calibration
from .memory import GB, lora_parameters, memory_gb, recomputed_layers, rows_per_micro_batch
from .speed import CPU_REFERENCE_CORES, cpu_speedup, matmul_tflops, rank_tokens_per_s, scaling
from .steps import planned_steps
from .strategy import choose_strategy

# Selective checkpointing (auto) recomputes as few layers as keep the peak within this share of the usable
# memory: the planner's peaks are within ~10% of measured ones, and a job that runs out of memory has waited
# in the queue for nothing. Where no partial count fits that, every layer recomputes.
SELECTIVE_HEADROOM = 0.9


def precision_for(cfg: RunConfig, device: Device) -> tuple[str, str]:
    return choose_precision(cfg.train.precision, "cpu" if device.name == "cpu" else "cuda", device.bf16)


@dataclass
class Plan:
    model: str
    dims_source: str
    device: str
    params_total: int
    params_trainable: int
    precision: str
    precision_reason: str
    micro_batch: int  # what the config asks for (per rank)
    weights_gb: float
    optimizer_gb: float  # LoRA weights, gradients and optimizer states
    activations_gb: float  # activations and logits at the configured micro-batch
    peak_gb: float  # per GPU (per rank), with the chosen strategy
    capacity_gb: float
    fits: bool
    max_micro_batch: int  # the largest that fits (0: not even one row)
    grad_accum: int  # keeps micro_batch x grad_accum when the micro-batch has to shrink
    steps: int | None
    steps_note: str  # how the steps were counted (plan.steps.planned_steps)
    tokens_per_s: float  # the whole world's
    tokens_per_s_note: str
    time: str | None  # estimated wall time of the training, HH:MM:SS
    recommended: dict
    breakdown: dict
    nodes: int = 1
    ranks_per_node: int = 1
    world_size: int = 1
    strategy: str = "single"  # single (one rank), ddp or fsdp
    strategy_reason: str = ""
    strategy_problem: str = ""  # why the strategy cannot train this run on this device (catalog.precision.fsdp_problem)
    peak_by_strategy_gb: dict = field(default_factory=dict)  # per-GPU peak under ddp and fsdp (several ranks)
    scaling_efficiency: float = 1.0
    quantized_4bit: bool = False
    gradient_checkpointing: bool = False  # train.gradient_checkpointing, `auto` resolved
    checkpointed_layers: int | None = None  # train.checkpointed_layers, `auto` resolved (None: all)
    checkpointing_reason: str = ""
    packing: bool = False  # data.packing, `auto` resolved for the architecture
    packing_reason: str = ""
    memory_note: str = ""  # the config's slurm.mem beside the recommendation
    memory_short: bool = False  # slurm.mem is below the recommendation (a warning: doctor's slurm.mem line)
    precision_advice: str = ""  # for a GPU run that does not fit in fp32: train.precision=auto, where that fits
    peak_note: str = ""  # where a measured peak replaced the estimate (hpclora probe)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def device_for(cfg: RunConfig, name: str | None) -> Device:
    devices = known_devices()
    if name is None:
        if cfg.slurm.gpus == 0:
            name = "cpu"
        elif cfg.slurm.gpu_type:  # the smallest card of that type: a plan that fits there fits on all
            wanted = cfg.slurm.gpu_type.lower()
            matches = sorted((d for d in devices.values() if d.name.split("-")[0] == wanted or gpu_aliases().get(wanted) == d.name),
                             key=lambda d: d.memory_gb)
            if not matches:
                raise UserError(f"slurm.gpu_type: no planner data for '{cfg.slurm.gpu_type}': pass --gpu NAME ({', '.join(devices)}), "
                                f"or describe it in {gpus_file()}")
            name = matches[0].name
        else:
            raise UserError(f"plan: which GPU? pass --gpu NAME ({', '.join(devices)}) or set slurm.gpu_type")
    if name not in devices:
        raise UserError(f"--gpu: unknown '{name}': one of {', '.join(devices)}, or describe it in {gpus_file()}")
    return devices[name]


def with_checkpointing(cfg: RunConfig, on: bool, layers: int | None = None) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, gradient_checkpointing=on, checkpointed_layers=layers))


def make_plan(cfg: RunConfig, gpu: str | None = None, device: Device | None = None, capacity_gb: float | None = None,
              calibrated: bool = False) -> Plan:
    """The plan for `cfg` on the GPU named `gpu` (or slurm.gpu_type, or the CPU for slurm.gpus: 0); a training
    process passes the `device` it runs on and the memory it has (`capacity_gb`) instead. `calibrated`: use
    what a probe job measured for this device and model (calibration.py) instead of the built-in estimate."""
    device = device or device_for(cfg, gpu)
    dims, source = find_dims(cfg)
    packing, packing_why = packing_choice(cfg.data.packing, dims.model_type, cfg.data.max_length, cfg.method.name)
    precision, why = precision_for(cfg, device)
    counts = parameter_counts(dims)
    trainable = lora_parameters(dims, cfg.lora.r, cfg.lora.target_modules)
    if capacity_gb is not None:
        capacity = capacity_gb
    elif device.name != "cpu":
        capacity = device.memory_gb
    else:  # CPU: the job's RAM; slurm.mem: 0 asks for all of a node's
        capacity = slurm_mem_gb(cfg.slurm.mem)
        if not capacity:  # the caller passes the node's memory (capacity_gb) where Slurm can say it
            raise UserError("slurm.mem: 0 asks for all of a node's memory, and no Slurm answered here to say how much that is: "
                            "give slurm.mem as a size (e.g. 32G) to plan")
    usable = capacity * 0.95
    world, per_node = world_size(cfg), ranks_per_node(cfg)
    if device.name == "cpu" and world > 1:
        capacity = usable = capacity / per_node  # the ranks of a node share the job's memory

    def layout(c: RunConfig) -> tuple[str, str, dict, dict]:
        """(strategy, why, its parts at the configured micro-batch, per-strategy peaks) for config `c`."""
        peaks = {s: memory_gb(dims, c, device, precision, c.train.micro_batch_size, s, world)["peak_gb"] for s in ("ddp", "fsdp")} if world > 1 else {}
        smallest = {s: memory_gb(dims, c, device, precision, 1, s, world)["peak_gb"] for s in peaks}
        strategy, strategy_why = choose_strategy(c, device, precision, smallest, usable)
        return strategy, strategy_why, memory_gb(dims, c, device, precision, c.train.micro_batch_size, strategy, world), peaks

    setting = cfg.train.gradient_checkpointing
    if setting == "auto":  # off wherever the run fits without it: recomputing a layer costs a third more of its compute
        plain = layout(with_checkpointing(cfg, False))
        checkpointing, layers = plain[2]["peak_gb"] > usable, None
        checkpointing_why = f"auto: the run fits in {capacity:.1f} GB without it ({plain[2]['peak_gb']:.1f} GB)"
        if checkpointing:  # as few recomputing layers as fit with headroom: each one more saves a layer's activations
            target = usable * SELECTIVE_HEADROOM
            layers = next((n for n in range(1, dims.layers) if layout(with_checkpointing(cfg, True, n))[2]["peak_gb"] <= target), None)
            checkpointing_why = (f"auto: without it the run needs {plain[2]['peak_gb']:.1f} GB, more than the {usable:.1f} GB it may use "
                                 f"(95% of {capacity:.1f} GB); {layers or dims.layers} of {dims.layers} layers recompute")
        cfg = with_checkpointing(cfg, checkpointing, layers)
    else:
        checkpointing_why = f"train.gradient_checkpointing={str(bool(setting)).lower()}"
        if setting and cfg.train.checkpointed_layers:
            checkpointing_why += f", {recomputed_layers(cfg, dims)} of {dims.layers} layers recompute"
    checkpointing = cfg.train.gradient_checkpointing is True
    strategy, strategy_why, parts, peaks = layout(cfg)
    problem = fsdp_problem(precision, cfg.quant.bits, cfg.train.optimizer) if strategy == "fsdp" else None

    def peak(strategy: str, micro: int) -> dict[str, float]:
        return memory_gb(dims, cfg, device, precision, micro, strategy, world)

    max_micro = 0
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        if peak(strategy, b)["peak_gb"] <= usable:
            max_micro = b
    micro = min(cfg.train.micro_batch_size, max_micro) if max_micro else 0
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum
    accum = math.ceil(effective / micro) if micro else cfg.train.grad_accum

    rank_tokens, efficiency = rank_tokens_per_s(cfg, dims, device, per_node, precision)
    world_scaling = scaling(strategy, cfg.slurm.nodes, world)
    tokens_per_s = rank_tokens * world * world_scaling
    measured = calibration.find(device.name, cfg.model.name) if calibrated else None
    steps, steps_note = planned_steps(cfg, packing)
    note = (f"estimate: {device.name}'s data-sheet {matmul_tflops(device, cfg, precision)[1]} x {efficiency:.2f}, the share of "
            "peak a LoRA fine-tune reached on an H100 (bf16, Llama-2-7B shape), less for smaller models; not measured on this "
            "GPU type (`hpclora probe` measures it here)")
    if device.name == "cpu":
        note = (f"estimate: {device.tflops} TFLOP/s of {CPU_REFERENCE_CORES} cores x {cpu_speedup(cfg.slurm.cpus_per_task):.2f} for "
                f"{cfg.slurm.cpus_per_task} cores x {efficiency:.2f} efficiency (cores scaling fitted on one report; `hpclora probe` measures)")
    if world > 1:
        note += f"; {world} ranks x {world_scaling:.2f} scaling ({strategy.upper()} {'within a node' if cfg.slurm.nodes == 1 else 'across nodes'}: assumed, not measured)"
    peak_gb, peak_note = parts["peak_gb"], ""
    if parts.get("loading_gb") == parts["peak_gb"]:
        peak_note = "while loading: each GPU holds the whole quantized model until FSDP shards it"
    if measured is not None:  # this cluster's own numbers: speed as a ratio, memory where the settings are the probe's
        note = (f"measured by {measured.by()} on {measured.node}: {measured.tokens_per_s:,.1f} tokens/s where the estimate said "
                f"{measured.planned_tokens_per_s:,.1f}, so the estimate x {measured.speed_ratio:.2f}")
        tokens_per_s *= measured.speed_ratio
        if measured.settings == calibration.memory_settings(cfg, checkpointing, cfg.train.checkpointed_layers if checkpointing else None):
            peak_gb = measured.peak_gb
            peak_note = f"measured by {measured.by()}; the estimate was {parts['peak_gb']:.2f} GB"
    seconds = None
    if steps is not None and tokens_per_s > 0:  # a device described without its speed (a job's own GPU) gives no time
        tokens = steps * rows_per_micro_batch(cfg, effective) * world * cfg.data.max_length  # full rows: an upper bound
        seconds = tokens / tokens_per_s + 300  # plus loading the model and evaluations
    recommended = resources(cfg, device, counts, parts, seconds)
    memory_note, memory_short = asked_memory(cfg.slurm.mem, recommended["mem"], device.name, peak_gb <= usable)
    precision_advice = ""
    if peak_gb > usable and device.name != "cpu" and precision == "fp32":  # half the weights' memory, and tensor cores
        half = make_plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="auto")), device=device,
                         capacity_gb=capacity_gb, calibrated=calibrated)
        if half.fits:
            precision_advice = f"train.precision=auto ({half.precision} on {device.name}: peak {half.peak_gb:.1f} GB, fits)"
        elif half.max_micro_batch:
            precision_advice = (f"train.precision=auto train.micro_batch_size={half.max_micro_batch} train.grad_accum={half.grad_accum} "
                                f"({half.precision} on {device.name} fits at that micro-batch)")
    return Plan(
        model=cfg.model.name, dims_source=source, device=device.name, params_total=counts["total"], params_trainable=trainable,
        precision=precision, precision_reason=why, micro_batch=cfg.train.micro_batch_size,
        weights_gb=parts["weights_gb"], optimizer_gb=round(parts["lora_gb"] + parts["optimizer_gb"], 3),
        activations_gb=round(parts["activations_gb"] + parts["logits_gb"], 3), peak_gb=peak_gb, capacity_gb=round(capacity, 3),
        fits=peak_gb <= usable, max_micro_batch=max_micro, grad_accum=accum, steps=steps, steps_note=steps_note,
        tokens_per_s=round(tokens_per_s, 1), tokens_per_s_note=note,
        time=slurm_time(seconds) if seconds else None, recommended=recommended, breakdown=parts,
        memory_note=memory_note, memory_short=memory_short, precision_advice=precision_advice,
        nodes=cfg.slurm.nodes, ranks_per_node=per_node, world_size=world, strategy=strategy, strategy_reason=strategy_why,
        strategy_problem=problem or "",
        peak_by_strategy_gb=peaks, scaling_efficiency=world_scaling, quantized_4bit=cfg.quant.bits == 4, gradient_checkpointing=checkpointing,
        checkpointed_layers=cfg.train.checkpointed_layers if checkpointing else None, checkpointing_reason=checkpointing_why, packing=packing, packing_reason=packing_why, peak_note=peak_note,
    )


def asked_memory(asked: str | None, recommended: str, device: str, fits: bool) -> tuple[str, bool]:
    """The config's slurm.mem beside the recommended mem, in words that agree with the plan's verdict (`plan` and
    `doctor` both say it): "" where it asks for a whole node; "... is enough"; or how it falls short of the
    recommendation, which keeps a margin: on CPU 30% over the estimated peak (the job's memory is the run's), on a
    GPU what loading the model passes through host memory. With it, whether slurm.mem falls short."""
    if not asked or asked == "0" or not asked[0].isdigit():
        return "", False
    if slurm_mem_mib(asked) >= slurm_mem_mib(recommended):
        return f"slurm.mem={asked} is enough", False
    if device == "cpu" and fits:
        return f"slurm.mem={asked} holds the estimated peak, with less than the 30% margin of the recommended mem={recommended}", True
    if device == "cpu":
        return f"slurm.mem={asked} is less than the estimated peak: mem={recommended} holds it with a 30% margin", True
    return (f"slurm.mem={asked} is less than the recommended mem={recommended} for loading the model through host memory "
            "(fp16 weights x 1.2 + 8 GB)", True)


def resources(cfg: RunConfig, device: Device, counts: dict, parts: dict, seconds: float | None) -> dict:
    """The sbatch resources the plan suggests: per node, for its ranks (each loads the model into host RAM first)."""
    per_node = (cfg.slurm.gpus or 1) if device.name != "cpu" else cfg.train.cpu_ranks
    weights_fp16 = counts["total"] * 2 / GB
    if device.name == "cpu":
        mem = math.ceil(parts["peak_gb"] * 1.3 * per_node)
    else:
        mem = math.ceil(per_node * weights_fp16 * 1.2 + 8)
    recommended = {
        "nodes": cfg.slurm.nodes,
        "ntasks_per_node": 1,  # one torchrun (or one training process) per node
        "gres": "none (CPU job)" if device.name == "cpu" else f"gpu:{device.name.split('-')[0]}:{per_node}",
        "mem": f"{max(8, mem)}G",
        "cpus_per_task": 8 * per_node if device.name != "cpu" else cfg.slurm.cpus_per_task,
        "time": slurm_time(seconds * 1.3) if seconds else None,
    }
    return recommended

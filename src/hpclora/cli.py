"""`hpclora` command line: a table of subcommands, each parsing its arguments and calling one function.

Heavy libraries (torch, transformers, peft) are imported inside the commands that train or generate,
so that login-node commands such as `validate` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .config.credentials import redact
from .errors import FILE_SYSTEM_REFUSALS, USER_ERROR_EXIT, ConfigError, UserError, file_system_refusal
from .results import llamacpp  # its type names only: no llama.cpp is loaded
from .stops import CANCEL_WAIT_S

PLAN_DOES_NOT_FIT = 3  # `hpclora plan`'s exit status for a run that does not fit, so that scripts can test for it


def cmd_validate(args) -> int:
    from . import config
    from .plan import preflight

    if args.explain:
        print(config.explain() if args.explain == "text" else config.reference_markdown(), end="\n" if args.explain == "text" else "")
        return 0
    if not args.config:
        raise UserError("validate: give a config file (or --explain to list every key)")
    cfg = config.load(args.config, args.overrides)
    data = preflight.check(cfg)
    print(config.to_yaml(cfg), end="")
    rows = f" ({data['rows']:,} rows of {data['format']} data read, {data['held_out']:,} held out for validation)" if data else ""
    said = [*([data["warning"]] if data and data["warning"] else []), *preflight.notes(cfg)]
    print("\n".join([f"# {args.config}: valid{rows}", *said]), file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from .job.entry import train_command

    return train_command(args.config, args.overrides, args.run_dir, args.fresh, own_process=args.own_process)


def cmd_generate(args) -> int:
    from .results.generate import Sampling, generate_command

    return generate_command(args.run_dir, args.prompt, Sampling.from_args(args), compare=args.compare, no_adapter=args.no_adapter,
                            width=shutil.get_terminal_size((110, 24)).columns)


def cmd_chat(args) -> int:
    from .results.chat import chat
    from .results.generate import Sampling

    return chat(args.target, Sampling.from_args(args))


def cmd_submit(args) -> int:
    from . import config
    from .launch import launchers, submit
    from .site import cluster

    if Path(args.config).is_dir():  # a run or sweep directory: its own job again, resuming it
        from .launch.resubmit import resubmit
        return resubmit(Path(args.config), args.overrides)
    launcher = launchers.launcher(args.launcher, args.cluster)
    cfg = config.load(args.config, args.overrides)
    job = submit.prepare_job(cfg, args.force, whole_node_gb=cluster.job_whole_node_gb(cfg.slurm))
    return _launch(job, launcher, args)


def cmd_sweep(args) -> int:
    from . import config
    from .launch import launchers, submit
    from .site import cluster

    launcher = launchers.launcher(args.launcher, args.cluster)
    whole_node = cluster.job_whole_node_gb(config.load(args.config, args.overrides, check_files=False).slurm)  # the grid keeps slurm.*
    job = submit.prepare_sweep(args.config, args.overrides, args.grid, args.max_parallel, force=args.force,
                               trials_per_node=args.trials_per_node, whole_node_gb=whole_node)
    return _launch(job, launcher, args)


def _launch(job, launcher, args) -> int:
    from .launch import submit
    from .site import cluster

    beyond_nodes = cluster.what_no_node_has(job.cfg.slurm) if launcher.queues else []
    if beyond_nodes and not args.dry_run:
        raise ConfigError(beyond_nodes)
    for line in [*job.plan_lines, *filter(None, [submit.staging_warning(job.cfg, args.config)])]:
        print(line, file=sys.stderr)
    if args.dry_run:
        for key, problem in beyond_nodes:
            print(f"warning: {key}: {problem}", file=sys.stderr)
        print(submit.describe_dry_run(job, launcher))
        return 0
    entry, code = submit.launch(job, launcher)
    print(submit.describe_launched(entry, job))
    return code


def cmd_plan(args) -> int:
    from . import config, plan
    from .plan import preflight
    from .site import cluster

    world = [f"slurm.{key}={value}" for key, value in (("nodes", args.nodes), ("gpus", args.gpus)) if value is not None]
    cfg = config.load(args.config, [*args.overrides, *world], check_files=False)
    preflight.check(cfg)  # the data only where the file is on this node
    result = plan.make_plan(cfg, args.gpu, capacity_gb=cluster.job_whole_node_gb(cfg.slurm), calibrated=True)
    print(result.to_json() if args.json else plan.format_plan(result))
    return 0 if result.fits else PLAN_DOES_NOT_FIT


def cmd_eval(args) -> int:
    from .results.evaluate import describe_evaluation, evaluate

    if args.n < 0:
        raise UserError("eval: --n must be 0 or more")
    print(describe_evaluation(evaluate(args.run_dir, args.data, args.n, args.max_new_tokens), args.run_dir))
    return 0


def cmd_merge(args) -> int:
    from .results.merge import merge

    print(f"merged {args.run_dir}/adapter into its base: {merge(args.run_dir, args.out, args.dtype)} ({args.dtype} safetensors)")
    return 0


def cmd_export(args) -> int:
    if args.submit:
        from .results import export_job

        print(export_job.submit_export(export_job.prepare(args.run_dir, args.quant, args.out, args.adapter_only, args.overrides), args.dry_run))
        return 0
    if args.overrides or args.dry_run:
        raise UserError("export: --dry-run and slurm.* settings go with --submit (the export as a job)")
    from .results.export import export_command

    return export_command(args.run_dir, args.quant, args.out, args.adapter_only)


def cmd_report(args) -> int:
    from .results.report import report
    from .rundir import SWEEP_FILE

    states = None
    if (Path(args.target).expanduser() / SWEEP_FILE).is_file():  # the trials' job states, from Slurm
        from .launch import watch

        states = watch.states_by_run_dir(args.target)
    print(f"wrote {report(args.target, states)}")
    return 0


def cmd_stage(args) -> int:
    from .job.stage import stage_command

    print(stage_command(args.config, args.overrides))
    return 0


def cmd_status(args) -> int:
    from .launch import watch

    print(watch.status_text(args.target))
    return 0


def cmd_logs(args) -> int:
    from .launch import watch

    watch.show_log(args.job, args.follow)
    return 0


def cmd_cancel(args) -> int:
    from .launch.cancel import cancel

    print("\n".join(cancel(args.target, now=args.now, wait_s=args.wait)))
    return 0


def cmd_container(args) -> int:
    from .launch.image_build import BuildOptions, build, check

    options = BuildOptions(args.sandbox, args.notest, args.bind, args.base)
    return build(args.definition, args.out, options, args.dry_run) if args.action == "build" else check(args.image, args.dry_run)


def cmd_doctor(args) -> int:
    from .site.doctor import diagnose

    report = diagnose(args.config, args.overrides, args.partition, args.probe)
    print(report.json() if args.json else report.text())
    return 1 if report.failed else 0


def cmd_probe(args) -> int:
    from .site import probe

    if args.forget:
        return probe.forget(args.forget, args.config, args.overrides)
    if args.read:
        return probe.read_probe(args.read, accept=args.accept)
    if not args.config:
        raise UserError("probe: give a config file (or --read RUN_DIR of a probe that has ended)")
    return probe.run_probe(args.config, args.overrides, args.steps, args.launcher, args.force, wait=not args.no_wait, accept=args.accept)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpclora", description="LoRA/QLoRA fine-tuning as batch jobs on HPC clusters, and on CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_sampling(p):
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=None, help="sampling temperature (implies --sample; 0 = greedy)")
        p.add_argument("--top-p", type=float, default=0.9)
        p.add_argument("--top-k", type=int, default=50)
        p.add_argument("--repetition-penalty", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=0, help="sampling seed")

    def with_config(p, required=True):
        p.add_argument("config", nargs=None if required else "?", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. lora.r=16 train.lr=1e-4")

    p = sub.add_parser("validate", help="check a config and print it resolved; every error at once")
    with_config(p, required=False)
    p.add_argument("--explain", nargs="?", const="text", choices=("text", "markdown"),
                   help="list every config key with its default and meaning (markdown: docs/configuration.md)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune in this process (what a Slurm job runs)")
    with_config(p)
    p.add_argument("--run-dir", help="run directory (default: <run.output_root>/<run.name>-<job id or time>)")
    p.add_argument("--fresh", action="store_true", help="start over: remove what hpclora wrote in the run directory (refused where it holds anything else)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer prompts with a run's adapter (or base, or both), or an exported GGUF")
    p.add_argument("run_dir", help="a run directory with adapter/, or a GGUF (file or `hpclora export` directory)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--compare", action="store_true", help="show base and adapter answers side by side (a GGUF's: beside the adapter's)")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base model only")
    with_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a run's adapter (or a merged model or GGUF), answers streamed; /compare, /reset, /sample")
    p.add_argument("target", help="a run directory with adapter/, a merged model directory, or a GGUF (file or export directory)")
    with_sampling(p)
    p.set_defaults(func=cmd_chat)

    from .launch.launchers import LAUNCHERS
    from .site.probe import DEFAULT_STEPS, FAR_OFF

    def with_launcher(p):
        p.add_argument("--dry-run", action="store_true", help="print the job script and what would be run; submit nothing")
        p.add_argument("--launcher", choices=tuple(LAUNCHERS), default="sbatch",
                       help="sbatch (default): the rendered script; submitit: its AutoExecutor; local: the job's command here, now")
        p.add_argument("--force", action="store_true", help="submit even when the planner predicts that it does not fit")
        p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                       help="submitit's backend (default: Slurm when srun is on PATH); local and debug need no Slurm")

    p = sub.add_parser("submit", help="validate, write the run directory and its job script, submit it; given a run (or sweep) "
                       "directory instead of a config: submit its job again, resuming from its newest checkpoint")
    with_config(p)
    with_launcher(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("sweep", help="submit the cartesian product of --grid values as ONE job array")
    with_config(p)
    p.add_argument("--grid", action="append", default=[], metavar="key=v1,v2", help="a key and its values; repeat for more keys")
    p.add_argument("--max-parallel", type=int, default=None, metavar="P", help="run at most P array tasks at once (--array=...%%P)")
    p.add_argument("--trials-per-node", type=int, default=1, metavar="K",
                   help="pack K one-GPU trials into each array task, side by side, one GPU each (for clusters that hand out whole nodes)")
    with_launcher(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("status", help="state, exit code, node, log and last progress line of jobs")
    p.add_argument("target", nargs="?", help="a job id, run directory or sweep directory (default: your recent jobs)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="print (or follow) a job's log")
    p.add_argument("job", help="JOB or JOB_TASK id, or a run directory")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job leaves the queue")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("plan", help="memory, precision, micro-batch and time of a run on a GPU type, before submitting",
                       epilog=f"exit status: 0 when the run fits, {PLAN_DOES_NOT_FIT} when it does not, 2 for an error in the config")
    with_config(p)
    p.add_argument("--gpu", help="v100-16gb, v100-32gb, t4-16gb, a100-40gb, a100-80gb, h100-80gb, l4-24gb, rtx3060-12gb or cpu "
                                 "(default: from slurm.gpu_type / slurm.gpus)")
    p.add_argument("--nodes", type=int, metavar="N", help="plan for N nodes (slurm.nodes=N)")
    p.add_argument("--gpus", type=int, metavar="G", help="plan for G GPUs per node (slurm.gpus=G): per-GPU memory under DDP and FSDP")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="loss and perplexity of base vs adapter on held-out rows, and their answers side by side")
    p.add_argument("run_dir", help="a run directory with adapter/")
    p.add_argument("--data", help="held-out rows in the run's data format (default: the run's own validation split)")
    p.add_argument("--n", type=int, default=5, help="how many held-out prompts to answer with both models (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold a run's adapter into its (unquantized) base and save a plain HF model")
    p.add_argument("run_dir", help="a run directory with adapter/")
    p.add_argument("--out", default=None, help="new directory for the merged model (never overwritten; default: RUN_DIR/merged)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="dtype of the saved weights (default: %(default)s)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a run's model (or its adapter alone) as GGUF for llama.cpp and Ollama, checked by llama.cpp")
    p.add_argument("run_dir", help="a finished run directory with adapter/")
    p.add_argument("--format", choices=("gguf",), default="gguf", help="the format to write (default: %(default)s)")
    p.add_argument("--quant", choices=llamacpp.QUANT_TYPES, default="q8_0", help="GGUF type (default: %(default)s; an adapter: f32, f16, bf16 or q8_0)")
    p.add_argument("--adapter-only", action="store_true", help="the LoRA adapter alone, for `llama-cli --lora` and Ollama's ADAPTER")
    p.add_argument("--out", help="new directory for the GGUF, Modelfile and EXPORTED_FROM.json (default: RUN_DIR/gguf-[lora-]TYPE)")
    p.add_argument("--submit", action="store_true", help="as a CPU job (sbatch) with the memory the merge needs; --dry-run prints it")
    p.add_argument("--dry-run", action="store_true", help="with --submit: print the job script; submit nothing")
    p.add_argument("overrides", nargs="*", metavar="slurm.KEY=VALUE", help="with --submit: the job's settings, e.g. slurm.partition=cpu")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="loss curves (PNG) and a markdown summary of a run, or a ranking of a sweep's trials")
    p.add_argument("target", help="a run directory or sweep directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("stage", help="on a node with internet: fetch model and dataset into the shared cache, tokenize")
    with_config(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("container", help="build a Singularity/Apptainer image, or run its self-test")
    p.add_argument("action", choices=("build", "check"))
    p.add_argument("image", nargs="?", help="check: the image (.sif) to test")
    p.add_argument("--def", dest="definition", default="containers/hpclora.def", help="build: definition file (default: %(default)s)")
    p.add_argument("--out", default="hpclora.sif", help="build: image to write, once built and tested (default: %(default)s)")
    p.add_argument("--from", dest="base", metavar="BASE", help="build: on another base (.sif, sandbox, docker-archive:FILE, oras://...)")
    p.add_argument("--sandbox", action="store_true", help="build: a directory instead of a .sif (no squashfs step)")
    p.add_argument("--notest", action="store_true", help="build: skip the image's %%test")
    p.add_argument("-B", "--bind", action="append", default=[], metavar="SRC[:DST]", help="build: a host path for %%post only")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_container)

    p = sub.add_parser("probe", help="a short real job on the target partition: measure tokens/s and memory for plan and slurm.time: auto")
    with_config(p, required=False)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps to measure (default: %(default)s)")
    p.add_argument("--launcher", choices=("sbatch", "local"), default="sbatch", help="sbatch (default), or local: here, now")
    p.add_argument("--no-wait", action="store_true", help="submit and return; read the result later with --read RUN_DIR")
    p.add_argument("--read", metavar="RUN_DIR", help="record the result of a probe run that has ended")
    p.add_argument("--accept", action="store_true", help=f"keep a measurement even when it is more than x{FAR_OFF:g} off the estimate")
    p.add_argument("--forget", metavar="DEVICE", help="drop the measurements of DEVICE (cpu, v100-16gb, ...; with CONFIG: of its model only)")
    p.add_argument("--force", action="store_true", help="submit even when the planner predicts that it does not fit")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("doctor", help="check this cluster (Slurm, GPUs, container, storage, network) and a config before the queue")
    with_config(p, required=False)
    p.add_argument("--partition", help="the partition to check the run against (default: slurm.partition, else the default one)")
    p.add_argument("--probe", action="store_true", help="also run a one-minute srun job there: network, GPUs and runtime of a compute node")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("cancel", help="cancel a job (or a whole sweep), keeping its work: a training job saves a checkpoint first")
    p.add_argument("target", help="a job id (123 or 123_4), run directory or sweep directory")
    p.add_argument("--now", action="store_true", help="scancel at once, without a checkpoint (the steps since the last one are lost)")
    p.add_argument("--wait", type=float, default=CANCEL_WAIT_S, metavar="S",
                   help=f"seconds to wait for the checkpoints before leaving the jobs to finish the cancel themselves (default {CANCEL_WAIT_S})")
    p.set_defaults(func=cmd_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`hpclora ARGV`; argv None: the `hpclora` program itself (sys.argv), a process that runs one command and ends."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # argparse exits 2 on a usage error
    args.own_process = argv is None
    # `key=value` overrides may also come after options: `train CFG --run-dir D lora.r=4`.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as exc:
        for line in map(redact, exc.lines()):  # indented lines continue the error above them; no credential repeated
            print(line if line.startswith(" ") else f"error: {line}", file=sys.stderr)
        return USER_ERROR_EXIT
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_REFUSALS:
            raise
        print(f"error: {file_system_refusal(exc)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

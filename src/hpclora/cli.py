"""`hpclora` command line: a table of subcommands, each parsing its arguments and calling one function.

Heavy libraries (torch, transformers, peft) are imported inside the commands that train or generate,
so that login-node commands such as `validate` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .errors import USER_ERROR_EXIT, UserError


def cmd_validate(args) -> int:
    from . import config
    from .plan import preflight

    if args.explain:
        print(config.explain())
        return 0
    if not args.config:
        raise UserError("validate: give a config file (or --explain to list every key)")
    cfg = config.load(args.config, args.overrides)
    data = preflight.check(cfg)
    print(config.to_yaml(cfg), end="")
    rows = f" ({data['rows']:,} rows of {data['format']} data read)" if data else ""
    print(f"# {args.config}: valid{rows}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from . import config
    from .catalog import hub
    from .plan import preflight
    from .job.preempt import CHECKPOINTED_EXIT, StopRequest
    from .job.quiet import quiet_libraries

    with StopRequest() as stop:  # listen for Slurm's stop signals before the slow imports
        cfg = config.load(args.config, args.overrides)
        hub.use_cache(cfg)  # before check_context asks the cache: the hub libraries read HF_HOME once
        preflight.check_context(cfg)
        hub.require_staged(cfg, args.config)  # offline and not staged: say so now, not after loading
        quiet_libraries()  # before train.py pulls in transformers (and with it bitsandbytes)
        from .job.train import train

        run = train(cfg, run_dir=args.run_dir, fresh=args.fresh, stop=stop)
    if run.finished:
        return 0
    from .job.distributed import world

    # Under torchrun an exit code 75 reads as a failed rank (a traceback in the log): the ranks end with 0,
    # and the .stopped marker rank 0 left says "checkpointed, not finished" to the job script.
    return 0 if world().size > 1 else CHECKPOINTED_EXIT


def cmd_generate(args) -> int:
    from .results.generate import Sampling, generate, side_by_side

    if not args.prompt:
        raise UserError("generate: give at least one --prompt TEXT")
    if args.compare and args.no_adapter:
        raise UserError("generate: --compare and --no-adapter exclude each other")
    sampling = Sampling.from_flags(  # checked here, before anything is loaded
        args.max_new_tokens, args.sample, args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )
    mode = "compare" if args.compare else "base" if args.no_adapter else "adapter"
    width = shutil.get_terminal_size((110, 24)).columns
    for row in generate(args.run_dir, args.prompt, sampling, mode):
        print(f"\n>>> {row['prompt']}")
        if mode == "compare":
            print(side_by_side("base model", row["base"], "with adapter", row["adapter"], width))
        else:
            print(row[mode])
    return 0


def cmd_chat(args) -> int:
    from .results.chat import chat
    from .results.generate import Sampling

    sampling = Sampling.from_flags(args.max_new_tokens, args.sample, args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   repetition_penalty=args.repetition_penalty, seed=args.seed)
    return chat(args.target, sampling)


def cmd_submit(args) -> int:
    from . import config, plan
    from .plan import preflight
    from .launch import launchers, submit

    cfg = config.load(args.config, args.overrides)
    preflight.check(cfg)  # every data row, before anything is queued
    _print_plan(plan.check_before_submit([cfg], args.force))
    job = submit.prepare_run(cfg)
    _warn_if_not_staged(cfg, args.config)
    launcher = launchers.launcher(args.launcher, args.cluster)
    if args.dry_run:
        print(job.script)
        print(f"# dry run: would write {job.directory}/{{config.yaml,{submit.SCRIPT}}} and run: {launcher.describe(job)}")
        return 0
    return _launch(job, launcher)


def cmd_sweep(args) -> int:
    from . import plan
    from .plan import preflight
    from .launch import launchers, submit

    def check(cfgs):  # every trial's data rows and model context, then the planner, before anything is written
        for cfg in cfgs:
            preflight.check(cfg)
        _print_plan(plan.check_before_submit(cfgs, args.force))

    launcher = launchers.launcher(args.launcher, args.cluster)
    job = submit.prepare_sweep(args.config, args.overrides, args.grid, args.max_parallel, check=check, trials_per_node=args.trials_per_node)
    _warn_if_not_staged(job.cfg, args.config)
    trials = "\n".join(f"#   task {job.array_task(i)}: trial {i}: {' '.join(extra)}" for i, extra in enumerate(job.trial_overrides))
    if args.dry_run:
        print(job.script)
        print(f"# dry run: {len(job.trial_cfgs)} trials as one job array in {job.directory}:\n{trials}")
        print(f"# would run: {launcher.describe(job)}")
        return 0
    return _launch(job, launcher)


def _print_plan(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _warn_if_not_staged(cfg, config_path) -> None:
    from .catalog import hub

    missing = hub.missing_from_cache(cfg) if cfg.cache.offline_jobs else []
    if missing:
        print(
            f"warning: jobs run offline, and the Hugging Face cache at {hub.hf_home(cfg)} lacks {', '.join(missing)}: "
            f"run `{hub.stage_command(config_path)}` on a node with internet first, or the job will stop at once",
            file=sys.stderr,
        )


def cmd_plan(args) -> int:
    from . import config, plan
    from .plan import preflight

    world = [f"slurm.{key}={value}" for key, value in (("nodes", args.nodes), ("gpus", args.gpus)) if value is not None]
    cfg = config.load(args.config, [*args.overrides, *world], check_files=False)
    preflight.check(cfg)  # the data only where the file is on this node
    result = plan.make_plan(cfg, args.gpu, calibrated=True)
    print(result.to_json() if args.json else plan.format_plan(result))
    return 0


def cmd_eval(args) -> int:
    from .results.evaluate import evaluate
    from .rundir import verdict

    if args.n < 0:
        raise UserError("eval: --n must be 0 or more")
    result = evaluate(args.run_dir, args.data, args.n, args.max_new_tokens)
    base, adapter = result["base"], result["adapter"]
    print(f"held out: {result['held_out']} ({result['examples']} examples, {result['response_tokens']:,} response tokens)")
    print(f"loss base {base['loss']:.4f} (ppl {base['perplexity']:.2f}) -> adapter {adapter['loss']:.4f} (ppl {adapter['perplexity']:.2f}), "
          f"{result['loss_change']:+.4f}: {verdict(base['loss'], adapter['loss'])}")
    print(f"wrote {Path(args.run_dir) / 'eval.json'} and eval.md ({len(result['samples'])} answers side by side)")
    return 0


def cmd_merge(args) -> int:
    from .results.merge import merge

    print(f"merged {args.run_dir}/adapter into its base: {merge(args.run_dir, args.out, args.dtype)} ({args.dtype} safetensors)")
    return 0


def cmd_report(args) -> int:
    from .results.report import report
    from .rundir import SWEEP_FILE

    states = None
    if (Path(args.target).expanduser() / SWEEP_FILE).is_file():  # the trials' job states, from Slurm
        from .launch import watch

        target = watch.resolve(args.target)
        watch.fill_states(target)
        states = {row.run_dir: row.state for row in target.rows}
    print(f"wrote {report(args.target, states)}")
    return 0


def cmd_stage(args) -> int:
    from . import config
    from .catalog import hub
    from .site import stage
    from .job.quiet import quiet_libraries

    cfg = config.load(args.config, args.overrides)
    hub.use_cache(cfg)  # before any hub library is imported
    quiet_libraries()
    manifest = stage.stage(cfg, args.config)
    for part in ("model", "dataset"):
        if part in manifest:
            print(f"{part}: {manifest[part]['id']} at commit {manifest[part]['commit']}")
    tokenized = manifest["tokenized"]
    print(f"tokenized data: {tokenized['cache_dir']} ({tokenized.get('train_examples', 0)} train examples)")
    print(f"manifest: {manifest['manifest']}")
    print(f"jobs with HF_HOME={manifest['hf_home']} (cache.hf_home) can now run offline")
    return 0


def _launch(job, launcher) -> int:
    from .launch import submit

    entry, code = submit.launch(job, launcher)
    _print_launched(entry, job)
    return code


def _print_launched(entry: dict, job) -> None:
    what = "sweep" if job.kind == "sweep" else "run"
    if entry["job_id"] is not None:
        print(f"submitted {what} as job {entry['job_id']} ({entry['launcher']})")
    print(f"{what} directory: {entry['dir']}")
    if entry.get("log"):
        print(f"log: {entry['log']}")
    for trial in entry.get("trials", []):
        print(f"  task {trial['task']}" + (f", trial {trial['trial']}" if job.trials_per_task > 1 else "") + f": {' '.join(trial['overrides'])} -> {trial['run_dir']}" + (f"\n      log: {trial['log']}" if trial["log"] else ""))
    if entry["job_id"] is not None and entry["launcher"] == "sbatch":
        first = entry["job_id"] if job.kind == "run" else f"{entry['job_id']}_0"
        print(f"watch it: hpclora status {entry['job_id']}   |   hpclora logs {first} -f")


def cmd_status(args) -> int:
    from .launch import watch

    target = watch.resolve(args.target)
    watch.fill_states(target)
    watch.require_known(target)
    print(watch.format_status(target))
    return 0


def cmd_logs(args) -> int:
    from .launch import watch

    row, path = watch.find_log(args.job)
    if args.follow:
        watch.follow(path, row.job_id)
        return 0
    try:
        sys.stdout.write(path.read_text(encoding="utf-8", errors="replace"))
    except FileNotFoundError:
        raise UserError(f"{path}: the log does not exist yet (a pending job has not started); try again with -f to wait for it") from None
    return 0


def cmd_cancel(args) -> int:
    from .launch import slurm, watch

    target = watch.resolve(args.target)
    ids = watch.cancel_ids(target)
    if not ids:
        raise UserError(f"{args.target}: no Slurm job to cancel (it ran in-process)")
    watch.fill_states(target)
    watch.require_known(target)
    if watch.ended(target):
        print(f"{args.target}: already ended ({', '.join(sorted({r.state for r in target.rows}))}): nothing to cancel")
        return 0
    for job_id in ids:
        slurm.cancel(job_id)
        print(f"cancelled {job_id}")
    return 0


def cmd_container(args) -> int:
    import shlex
    import subprocess

    from .launch import container

    runtime = container.find_runtime() or ("apptainer" if args.dry_run else container.require_runtime())
    if args.action == "build":
        definition = Path(args.definition).resolve()
        if not definition.is_file():
            raise UserError(f"{definition}: definition file not found (run from the repository root, or pass --def)")
        root = definition.parent.parent  # %files paths are relative to the project root
        argv = container.build_command(runtime, definition, Path(args.out).resolve())
    else:
        if not args.image:
            raise UserError("container check: give the image to test, e.g. hpclora container check hpclora.sif")
        root = Path.cwd()
        argv = container.check_command(runtime, Path(args.image).resolve(), gpu=shutil.which("nvidia-smi") is not None)
    print(f"(cd {shlex.quote(str(root))} && {shlex.join(argv)})")
    if args.dry_run:
        return 0
    return subprocess.run(argv, cwd=root).returncode


def cmd_doctor(args) -> int:
    from .site.doctor import diagnose

    report = diagnose(args.config, args.overrides, args.partition, args.probe)
    print(report.json() if args.json else report.text())
    return 1 if report.failed else 0


def cmd_probe(args) -> int:
    from .plan import calibration, preflight
    from . import config, plan
    from .site import probe
    from .launch import launchers, submit

    if args.read:
        record = json.loads((Path(args.read) / "job.json").read_text()) if (Path(args.read) / "job.json").is_file() else {}
        return _report_probe(probe.record(Path(args.read), record.get("job_id")), calibration.path())
    if not args.config:
        raise UserError("probe: give a config file (or --read RUN_DIR of a probe that has ended)")
    cfg = config.load(args.config, [*args.overrides, *probe.probe_overrides(args.steps)])
    cfg.run.name = f"{cfg.run.name}-probe"
    preflight.check(cfg)
    _print_plan(plan.check_before_submit([cfg], args.force))
    job = submit.prepare_run(cfg)
    entry, code = submit.launch(job, launchers.launcher(args.launcher, None))
    _print_launched(entry, job)
    job_id = entry["job_id"]
    if job_id is not None:
        if args.no_wait:
            print(f"when it has ended: hpclora probe --read {job.directory}")
            return 0
        state = probe.wait(job_id, job.directory)
        if state != "COMPLETED":
            raise UserError(f"probe job {job_id} ended {state}: its log says why (`hpclora logs {job_id}`)")
    elif code != 0:
        return code
    return _report_probe(probe.record(job.directory, job_id), calibration.path())


def _report_probe(found, kept: Path) -> int:
    from .site.probe import describe

    measurement, facts = found
    for line in describe(measurement, facts):
        print(line)
    print(f"kept in {kept}: `hpclora plan` and slurm.time: auto now use it for {measurement.model} on {measurement.device}")
    return 0


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
    p.add_argument("--explain", action="store_true", help="list every config key with its default and meaning")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="fine-tune in this process (what a Slurm job runs)")
    with_config(p)
    p.add_argument("--run-dir", help="run directory (default: <run.output_root>/<run.name>-<job id or time>)")
    p.add_argument("--fresh", action="store_true", help="start over: remove what hpclora wrote in the run directory (refused where it holds anything else)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer prompts with a run's adapter (or base, or both)")
    p.add_argument("run_dir", help="a run directory with adapter/")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--compare", action="store_true", help="show base and adapter answers side by side")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base model only")
    with_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a run's adapter (or a merged model), answers streamed; /compare, /reset, /sample")
    p.add_argument("target", help="a run directory with adapter/, or a merged model directory")
    with_sampling(p)
    p.set_defaults(func=cmd_chat)

    from .launch.launchers import LAUNCHERS

    def with_launcher(p):
        p.add_argument("--dry-run", action="store_true", help="print the job script and what would be run; submit nothing")
        p.add_argument("--launcher", choices=tuple(LAUNCHERS), default="sbatch",
                       help="sbatch (default): the rendered script; submitit: its AutoExecutor; local: the job's command here, now")
        p.add_argument("--force", action="store_true", help="submit even when the planner predicts that it does not fit")
        p.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                       help="submitit's backend (default: Slurm when srun is on PATH); local and debug need no Slurm")

    p = sub.add_parser("submit", help="validate, write the run directory and its job script, submit it")
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

    p = sub.add_parser("plan", help="memory, precision, micro-batch and time of a run on a GPU type, before submitting")
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
    p.add_argument("--out", required=True, help="new directory for the merged model (never overwritten)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16", help="dtype of the saved weights (default: %(default)s)")
    p.set_defaults(func=cmd_merge)

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
    p.add_argument("--out", default="hpclora.sif", help="build: image to write (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the command only")
    p.set_defaults(func=cmd_container)

    p = sub.add_parser("probe", help="a short real job on the target partition: measure tokens/s and memory for plan and slurm.time: auto")
    with_config(p, required=False)
    p.add_argument("--steps", type=int, default=30, help="training steps to measure (default: %(default)s)")
    p.add_argument("--launcher", choices=("sbatch", "local"), default="sbatch", help="sbatch (default), or local: here, now")
    p.add_argument("--no-wait", action="store_true", help="submit and return; read the result later with --read RUN_DIR")
    p.add_argument("--read", metavar="RUN_DIR", help="record the result of a probe run that has ended")
    p.add_argument("--force", action="store_true", help="submit even when the planner predicts that it does not fit")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("doctor", help="check this cluster (Slurm, GPUs, container, storage, network) and a config before the queue")
    with_config(p, required=False)
    p.add_argument("--partition", help="the partition to check the run against (default: slurm.partition, else the default one)")
    p.add_argument("--probe", action="store_true", help="also run a one-minute srun job there: network, GPUs and runtime of a compute node")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("cancel", help="cancel a job (or a whole sweep) with scancel")
    p.add_argument("target", help="a job id (123 or 123_4), run directory or sweep directory")
    p.set_defaults(func=cmd_cancel)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # argparse exits 2 on a usage error
    # `key=value` overrides may also come after options: `train CFG --run-dir D lora.r=4`.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

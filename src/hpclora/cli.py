"""`hpclora` command line: a table of subcommands, each parsing its arguments and calling one function.

Heavy libraries (torch, transformers, peft) are imported inside the commands that train or generate,
so that login-node commands such as `validate` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from .errors import USER_ERROR_EXIT, UserError


def cmd_validate(args) -> int:
    from . import config

    if args.explain:
        print(config.explain())
        return 0
    if not args.config:
        raise UserError("validate: give a config file (or --explain to list every key)")
    cfg = config.load(args.config, args.overrides)
    print(config.to_yaml(cfg), end="")
    print(f"# {args.config}: valid", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from . import config
    from .quiet import quiet_libraries

    quiet_libraries()  # before train.py pulls in transformers (and with it bitsandbytes)
    from .train import train

    cfg = config.load(args.config, args.overrides)
    train(cfg, run_dir=args.run_dir, fresh=args.fresh)
    return 0


def cmd_generate(args) -> int:
    from .generate import Sampling, generate, side_by_side

    if not args.prompt:
        raise UserError("generate: give at least one --prompt TEXT")
    if args.compare and args.no_adapter:
        raise UserError("generate: --compare and --no-adapter exclude each other")
    sampling = Sampling(
        max_new_tokens=args.max_new_tokens, do_sample=args.sample or args.temperature is not None,
        temperature=args.temperature or 0.7, top_p=args.top_p, top_k=args.top_k,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpclora", description="LoRA/QLoRA fine-tuning as batch jobs on HPC clusters, and on CPU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    p.add_argument("--fresh", action="store_true", help="delete the run directory first if it exists")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer prompts with a run's adapter (or base, or both)")
    p.add_argument("run_dir", help="a run directory with adapter/")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--compare", action="store_true", help="show base and adapter answers side by side")
    p.add_argument("--no-adapter", action="store_true", help="answer with the base model only")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (implies --sample)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits 2 on a usage error
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

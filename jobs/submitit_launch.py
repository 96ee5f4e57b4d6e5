"""Submit an hpclora run from your own Python code with your own submitit AutoExecutor, wait for it and print
what it learned. The job function (hpclora.TrainingJob) keeps hpclora's checkpoint protocol: before a time
limit or on preemption it saves a checkpoint, requeues the job and resumes exactly.

    python jobs/submitit_launch.py configs/demo-cpu.yaml [key=value ...]
"""

from __future__ import annotations

import sys

import submitit

import hpclora


def main(config: str, overrides: list[str]) -> int:
    try:
        cfg = hpclora.load_config(config, overrides)  # every value and data row checked here, not in the job
    except hpclora.UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = hpclora.plan_run(cfg)
    print(f"plan: peak {plan.peak_gb:.1f} of {plan.capacity_gb:.1f} GB on {plan.device}, ~{plan.tokens_per_s:,.0f} tokens/s")

    run_dir = hpclora.prepare_run(cfg)  # config.yaml, planned (slurm.time: auto filled in)
    executor = submitit.AutoExecutor(folder=run_dir / "submitit", slurm_max_num_timeout=cfg.slurm.max_requeues)
    executor.update_parameters(**hpclora.executor_parameters(cfg))
    # Your own settings go here, e.g. executor.update_parameters(slurm_mail_type="END").
    job = executor.submit(hpclora.TrainingJob(), str(run_dir))
    print(f"submitted job {job.job_id}; run directory {run_dir}; log {job.paths.stdout}")

    summary = job.result()  # waits; the job's requeues are invisible here
    print(f"done: {summary['steps']} steps, val_loss {summary['base_val_loss']} -> {summary['final_val_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else print(__doc__) or 2)

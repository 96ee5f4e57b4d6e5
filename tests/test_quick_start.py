"""The quick start's own lines, as a new user follows them: copy configs/demo-cpu.yaml, point data.path at their own
data (here a small ShareGPT file, as many users have), validate it, and submit it with the README's Slurm line."""

from __future__ import annotations

import re
import shlex

from conftest import ROOT, write_jsonl


def sharegpt_rows(n: int) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"富士山の高さは？ ({i})"}, {"from": "gpt", "value": "3776 m です。"}]}
            for i in range(n)]


def copied_demo_config(tmp_path, rows: int = 45):
    data = write_jsonl(tmp_path / "mine.jsonl", sharegpt_rows(rows))
    text = (ROOT / "configs" / "demo-cpu.yaml").read_text(encoding="utf-8")
    my = tmp_path / "my.yaml"
    my.write_text(re.sub(r"path: data/demo-ja-en.jsonl", f"path: {data}", text), encoding="utf-8")
    return my, data


def test_a_copied_demo_config_reads_sharegpt_data_and_says_how_many_rows_it_holds_out(tmp_path, cli):
    my, _ = copied_demo_config(tmp_path)
    done = cli("validate", my)
    assert done.returncode == 0, done.stderr
    assert "45 rows of sharegpt data read, 20 held out for validation" in done.stderr
    assert ("warning: data.val_size=20 holds out 20 of the 45 rows (44%) for validation, and the adapter trains on 25: "
            "data.val_size=0.1 would hold out 4") in done.stderr
    assert "warning" not in cli("validate", my, "data.val_size=0.1").stderr


def test_a_format_that_does_not_match_the_rows_names_what_they_look_like_and_the_fix(tmp_path, cli):
    my, data = copied_demo_config(tmp_path)
    done = cli("validate", my, "data.format=alpaca")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: {data}:1: the rows look like sharegpt data (conversations), but data.format is alpaca: "
                                   "set data.format=auto (detects it) or data.format=sharegpt")


def test_the_readmes_slurm_line_works_on_the_copied_config_and_a_gpu_type_alone_names_slurm_gpus(tmp_path, cli):
    my, _ = copied_demo_config(tmp_path, rows=200)
    line = next(l for l in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if l.startswith("hpclora submit my.yaml"))
    words = shlex.split(line, comments=True)[3:]
    assert "slurm.gpus=1" in words
    done = cli("submit", my, *words, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --gres=gpu:v100:1" in done.stdout
    alone = cli("submit", my, "slurm.gpu_type=v100", "--dry-run")
    assert alone.returncode == 2 and "slurm.gpu_type: is set but slurm.gpus is 0 (a CPU-only job" in alone.stderr
    assert "add slurm.gpus=1 for a GPU job" in alone.stderr

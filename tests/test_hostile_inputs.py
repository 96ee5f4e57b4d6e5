"""Hostile values in every key of the schema, through the login-node commands (`validate`, and `submit --dry-run`,
which plans as `plan` does): each ends with exit 0 (a value that is fine), 2 (a user error naming the key) or 3 (`plan`: does not
fit), never a traceback, a hang or a secret repeated. The keys come from the schema itself, so that a key added
later is in the matrix too."""

from __future__ import annotations

import dataclasses

import pytest

from hpclora.config.schema import SECTIONS

from conftest import ROOT, alpaca_rows, write_jsonl

TOKEN = "hf_" + "Qw3rTy" * 6  # a made-up hub token
HOSTILE = {
    "huge integer": "9" * 400,
    "negative": "-1",
    "zero": "0",
    "not a number": "nan",
    "infinity": ".inf",
    "empty": "''",
    "long text": "x" * 5000,
    "token": TOKEN,
    "shell": "'$(touch /tmp/hpclora-owned); `id`'",
    "control characters": "'a\\tb\\x1bc'",
    "a list": "[1, 2]",
    "a mapping": "{a: 1}",
    "null": "null",
    "path out of the tree": "../../../../etc/passwd",
}
# Keys whose values are mappings or lists of entries: set as a whole, hostile entries inside.
SKIP = {"run.decided"}
KEYS = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f"{section}.{f.name}" not in SKIP]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hostile") / "data.jsonl", alpaca_rows(30))


@pytest.mark.parametrize("key", KEYS)
def test_every_key_takes_every_hostile_value_with_a_named_error_or_not_at_all(key, data_file, cli, tmp_path):
    base = [f"data.path={data_file}", "slurm.gpus=0", f"run.output_root={tmp_path / 'runs'}", f"slurm.log_dir={tmp_path / 'logs'}"]
    for name, value in HOSTILE.items():
        for command in (("validate",), ("submit", "--dry-run")):  # submit plans as `plan` does
            done = cli(*command, ROOT / "configs" / "demo-cpu.yaml", *base, f"{key}={value}")
            said = done.stdout + done.stderr
            assert done.returncode in (0, 2, 3), (command, key, name, said[-2000:])
            assert "Traceback" not in said and TOKEN not in said, (command, key, name)
            if done.returncode == 2:
                errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
                assert errors, (command, key, name, done.stderr)
                assert len(done.stderr) < 20_000, (command, key, name, "an error that repeats the value at length")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # --dry-run wrote nothing


@pytest.mark.parametrize("argv", [
    ["status", "../../../etc"], ["status", "123abc"], ["status", ""], ["logs", ""], ["logs", "99999999"], ["cancel", "1;id"],
    ["generate", "/nonexistent-run", "--prompt", "hi"], ["generate", "/tmp", "--prompt", "hi"], ["chat", "/nonexistent-run"],
    ["eval", "/nonexistent-run", "--n", "-5"], ["merge", "/nonexistent-run"], ["export", "/nonexistent-run"],
    ["report", "/nonexistent-run"], ["plan", "configs/demo-cpu.yaml", "--gpu", "no-such-gpu"], ["container", "check", "/nonexistent.sif"],
    ["probe", "--read", "/nonexistent-run"], ["train", "configs/demo-cpu.yaml", "--run-dir", ""], ["submit", "/nonexistent-run-dir/"],
    ["validate", "/nonexistent.yaml"], ["validate", "configs"], ["sweep", "configs/demo-cpu.yaml", "--grid", "lora.r"],
])
def test_every_command_answers_a_hostile_argument_with_a_named_error(argv, cli, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HPCLORA_STATE_DIR", str(tmp_path / "state"))
    done = cli(*argv)
    assert done.returncode == 2, (argv, done.stdout, done.stderr)
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_train_into_an_existing_file_says_so_and_exits(tmp_path):
    import subprocess
    import sys

    file = tmp_path / "not-a-directory"
    file.write_text("mine")
    done = subprocess.run([sys.executable, "-m", "hpclora", "train", str(ROOT / "configs" / "demo-cpu.yaml"), "--fresh", "--run-dir", str(file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "a file of that name exists" in done.stderr and file.read_text() == "mine"

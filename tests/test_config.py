"""Config: schema errors with full key paths, all reported together, exit code 2, no traceback."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpclora.rundir import run_dir_slug
from hpclora import config
from hpclora.errors import ConfigError

from conftest import ROOT, alpaca_rows, write_jsonl

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", alpaca_rows(3))


def problems_of(tmp_path, text, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config.load(path, list(overrides))
    return dict(err.value.problems)


def test_unknown_key_names_the_full_path_and_suggests_the_nearest(tmp_path, data_file):
    found = problems_of(tmp_path, f"lora:\n  rnak: 8\n  alpah: 3\ndata:\n  path: {data_file}\n  max_lenght: 9\n")
    assert found["lora.rnak"] == "unknown key (did you mean 'lora.r'?)"
    assert found["lora.alpah"] == "unknown key (did you mean 'lora.alpha'?)"
    assert found["data.max_lenght"] == "unknown key (did you mean 'data.max_length'?)"


def test_key_in_the_wrong_section_points_to_the_right_one(tmp_path, data_file):
    found = problems_of(tmp_path, f"data:\n  path: {data_file}\ntrain:\n  max_length: 128\n")
    assert found == {"train.max_length": "unknown key (did you mean 'data.max_length'?)"}


def test_all_errors_are_reported_together(tmp_path, data_file):
    text = (
        f"data:\n  path: {data_file}\n  template: alpca\nlora:\n  r: eight\n  dropout: 1.5\n"
        "train:\n  micro_batch_size: 0\nmodle:\n  name: x\n"
    )
    found = problems_of(tmp_path, text, ["quant.bits=5", "train.lr=-1"])
    assert set(found) == {
        "data.template", "lora.r", "lora.dropout", "train.micro_batch_size", "modle", "quant.bits", "train.lr",
    }
    assert found["lora.r"] == "expected an integer, got 'eight'"
    assert "did you mean 'alpaca'" in found["data.template"]
    assert found["modle"] == "unknown section (did you mean 'model'?)"
    assert found["quant.bits"].startswith("must be one of null, 4, 8")


def test_missing_required_and_missing_file(tmp_path):
    assert problems_of(tmp_path, "run:\n  name: x\n") == {"data.path": "required, but not set"}
    assert "file not found" in problems_of(tmp_path, "data:\n  path: nope.jsonl\n")["data.path"]


def test_incompatible_combinations(tmp_path, data_file):
    found = problems_of(tmp_path, f"data:\n  path: {data_file}\n  format: text\n  template: alpaca\nquant:\n  type: fp4\n")
    assert "data.template=none" in found["data.template"]
    assert "quant.bits" in found


def test_overrides_and_types(data_file):
    cfg = config.load(None, [f"data.path={data_file}", "lora.r=16", "train.lr=3e-4", "lora.target_modules=[q_proj,v_proj]", "quant.bits=4"])
    assert (cfg.lora.r, cfg.train.lr, cfg.lora.target_modules, cfg.quant.bits) == (16, 3e-4, ["q_proj", "v_proj"], 4)
    assert isinstance(cfg, config.RunConfig) and type(cfg.lora).__name__ == "LoraSection"  # plain dataclasses
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", "lora.r"])
    assert err.value.problems[0][0] == "lora.r"


def test_relative_data_path_resolves_next_to_the_config(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", alpaca_rows(2))
    (tmp_path / "sub" / "c.yaml").write_text("data:\n  path: d.jsonl\n")
    cfg = config.load(tmp_path / "sub" / "c.yaml")
    assert cfg.data.path == str(tmp_path / "sub" / "d.jsonl")
    assert Path(cfg.run.output_root).is_absolute()


def test_resolved_yaml_round_trips(tmp_path, data_file):
    cfg = config.load(None, [f"data.path={data_file}", "run.name=x y", "lora.target_modules=[a,b]"])
    (tmp_path / "r.yaml").write_text(config.to_yaml(cfg))
    assert config.load(tmp_path / "r.yaml") == cfg


def test_run_dir_slug_cannot_escape_or_inject():
    assert run_dir_slug('x"; touch pwned; echo "') == "x-touch-pwned-echo"
    assert run_dir_slug("../../etc") == "etc"
    assert run_dir_slug("日本語 テスト") == "日本語-テスト"
    assert run_dir_slug("...") == "run"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = config.load(path)
    assert cfg.data.path
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#"), "each shipped config starts with a comment showing how to run it"
    assert "hpclora" in path.read_text(encoding="utf-8").split("\n\n")[0] or "make demo" in first


def test_cli_prints_every_error_and_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rnak: 8\ntrain:\n  lr: fast\n")
    proc = subprocess.run([sys.executable, "-m", "hpclora", "validate", str(bad), "train.epochs=-1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "error: lora.rnak: unknown key (did you mean 'lora.r'?)" in lines
    assert "error: train.lr: expected a number, got 'fast'" in lines
    assert "error: train.epochs: must be > 0, got -1.0" in lines
    assert "error: data.path: required, but not set" in lines


def test_cli_validate_prints_resolved_yaml_and_invalid_yaml_is_a_user_error(tmp_path, data_file):
    good = subprocess.run([sys.executable, "-m", "hpclora", "validate", str(ROOT / "configs" / "demo-cpu.yaml"), "lora.r=4"],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "  r: 4\n" in good.stdout and "template: chat" in good.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("lora: [\n")
    proc = subprocess.run([sys.executable, "-m", "hpclora", "validate", str(broken)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_does_not_import_heavy_libraries():
    code = "import sys; from hpclora import cli, config; print(sorted(m for m in ('torch','transformers','peft','datasets') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_explain_documents_every_key():
    text = config.explain()
    for key in ("lora.r", "quant.double_quant", "data.train_on_prompt", "train.gradient_checkpointing"):
        section, name = key.split(".")
        assert f"  {name}: " in text
    assert "one of: alpaca, alpaca_ja, calm, chat, none" in text


def test_values_are_literal_text_without_interpolation(tmp_path, data_file):
    """Shell lines and paths keep `${...}` exactly as written, through config.yaml and back."""
    setup = ['export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK}', 'echo \\${x} ${oc.env:HOME}']
    source = tmp_path / "source.yaml"
    source.write_text(json.dumps({"data": {"path": str(data_file)}, "slurm": {"setup": setup}}))  # JSON is YAML
    cfg = config.load(source, ["run.name=a${b}"])
    assert cfg.slurm.setup == setup and cfg.run.name == "a${b}"
    path = tmp_path / "config.yaml"
    path.write_text(config.to_yaml(cfg))
    again = config.load(path)
    assert again.slurm.setup == setup and config.to_yaml(again) == config.to_yaml(cfg)


@pytest.mark.parametrize(
    "override, key, message",
    [
        ("slurm.extra=foo", "slurm.extra", "expected a list such as [a, b], got 'foo'"),
        ("slurm.setup=[[1]]", "slurm.setup", "expected a list such as [a, b], got [[1]]"),
        ("train.lr=null", "train.lr", "must be a number, not null"),
        ("lora.r=null", "lora.r", "must be an integer, not null"),
        ("data.train_on_prompt=2", "data.train_on_prompt", "expected true or false, got 2"),
        ("train.gradient_checkpointing=2", "train.gradient_checkpointing", "must be one of auto, true, false; got 2"),
        ("data.packing=sometimes", "data.packing", "must be one of auto, true, false; got 'sometimes'"),
        ("data.columns.instruction=null", "data.columns.instruction", "expected text, got null"),
        ("data.columns={instruction: [a]}", "data.columns.instruction", "expected text, got ['a']"),
        ("data.columns=foo", "data.columns", "expected a mapping such as {name: value}, got 'foo'"),
        ("container.env=3", "container.env", "expected a mapping such as {name: value}, got 3"),
        ("lora.r=${x}", "lora.r", "expected an integer, got '${x}'"),
    ],
)
def test_type_errors_are_in_our_words_with_the_full_key(data_file, override, key, message):
    """OmegaConf's own words (AnyNode, ListConfig, 'Incompatible value', 'is not Optional') never reach users,
    and values it would let through or crash on later (a list into a mapping of text) are caught here."""
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", override])
    assert dict(err.value.problems) == {key: message}


@pytest.mark.parametrize("override", ["lora.r=${x}", "data.columns={instruction: [a]}", "lora.r=`4`", "slurm.extra=foo"])
def test_cli_never_shows_a_traceback_for_a_bad_value(tmp_path, data_file, override):
    proc = subprocess.run([sys.executable, "-m", "hpclora", "validate", str(ROOT / "configs" / "demo-cpu.yaml"), override],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {override.split('=')[0]}")  # the key the user typed
    for words in ("AnyNode", "ListConfig", "Incompatible value", "is not Optional", "full_key", "object_type"):
        assert words not in proc.stderr


def test_non_finite_and_absurd_numbers_are_refused(data_file):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", "train.lr=nan", "train.epochs=inf", "train.max_steps=1000000000000000000000",
                           "data.max_length=1000000000", "train.micro_batch_size=100000", "train.preempt_grace_s=70000"])
    found = dict(err.value.problems)
    assert found["train.lr"] == "must be a finite number, got nan"
    assert found["train.epochs"] == "must be a finite number, got inf"
    assert found["train.max_steps"] == "must be <= 10000000, got 1000000000000000000000"
    assert found["data.max_length"].startswith("must be <= ")
    assert found["train.micro_batch_size"].startswith("must be <= ")
    assert found["train.preempt_grace_s"] == "must be <= 65535, got 70000"  # Slurm keeps --signal's lead in 16 bits


def test_overrides_that_cannot_be_read_name_their_key(data_file):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", "lora.r=`4`", "slurm.partition=gpu\nrm -rf ~", "`lora.r`=4", "lora.alpha=8"])
    found = dict(err.value.problems)
    assert found["lora.r"].startswith("cannot read the value '`4`' (found character") and "put it in quotes" in found["lora.r"]
    assert found["slurm.partition"].startswith("an override is one line")  # not silently cut at the line break
    assert "not a key path" in found["`lora.r`"]
    assert "lora.alpha" not in found  # the good override in the same call still applies


def test_a_directory_given_as_config_says_so(tmp_path):
    (tmp_path / "my.yaml").write_text("data:\n  path: x.jsonl\n")
    proc = subprocess.run([sys.executable, "-m", "hpclora", "validate", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {tmp_path}: is a directory; give a config file such as {tmp_path / 'my.yaml'}" in proc.stderr


@pytest.mark.parametrize(
    "option, problem",
    [
        ("--mail-type END", "expected one sbatch option as --name or --name=value"),
        ('--comment="two words"', "expected one sbatch option"),
        ("--comment=a\nb", "expected one sbatch option"),
        ("-p gpu", "expected one sbatch option"),
        ("--wrap=hostname", "--wrap cannot be used"),
        ("--time=10:00", "--time is set by hpclora from slurm.time"),
        ("--gres=gpu:2", "--gres is set by hpclora from slurm.gpus and slurm.gpu_type"),
        ("--array=0-3", "--array is set by hpclora from `hpclora sweep`"),
        ("--export=NONE", "only --export=ALL"),
    ],
)
def test_slurm_extra_is_checked_as_the_sbatch_line_it_becomes(data_file, option, problem):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", "slurm.extra=[--mail-type=END]"] + [f"slurm.extra=[--mail-type=END, {json.dumps(option)}]"])
    found = dict(err.value.problems)
    assert list(found) == ["slurm.extra[1]"] and problem in found["slurm.extra[1]"]


def test_good_sbatch_extras_pass(data_file):
    cfg = config.load(None, [f"data.path={data_file}", "slurm.extra=[--mail-type=END, --mail-user=me@uni.ac.jp, --exclusive, '--export=ALL,X=1']"])
    assert cfg.slurm.extra == ["--mail-type=END", "--mail-user=me@uni.ac.jp", "--exclusive", "--export=ALL,X=1"]


def test_the_preemption_signal_must_leave_time_to_train(data_file):
    with pytest.raises(ConfigError) as err:  # the default 120 s in a 2-minute job: signalled at once, requeued forever
        config.load(None, [f"data.path={data_file}", "slurm.time=2"])
    assert dict(err.value.problems) == {"train.preempt_grace_s": (
        "120 s before the limit of slurm.time=2 (120 s) leaves no time to train (Slurm may signal up to 60 s early): "
        "use at most 30, or more slurm.time")}
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", "slurm.time=1", "train.preempt_grace_s=10"])
    assert "too short to train" in dict(err.value.problems)["train.preempt_grace_s"]
    assert config.load(None, [f"data.path={data_file}", "slurm.time=2", "train.preempt_grace_s=20"]).slurm.time == "2"
    assert config.load(None, [f"data.path={data_file}", "slurm.time=0"]).slurm.time == "0"  # no limit, no signal


def test_the_configuration_reference_in_docs_is_the_schemas_own():
    """docs/configuration.md is generated from the schema's help texts; a key added, removed or documented anew
    without regenerating it fails here (`hpclora validate --explain markdown > docs/configuration.md`)."""
    from conftest import ROOT

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == config.reference_markdown(), "docs/configuration.md is out of date: regenerate it"
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in page


@pytest.mark.parametrize("overrides, refused", [
    (["lora.bias=all", "quant.bits=4", "train.precision=fp16"], True),
    (["lora.bias=lora_only", "quant.bits=8", "train.precision=fp16"], True),
    (["lora.bias=all", "quant.bits=4", "train.precision=fp16", "quant.compute_dtype=fp32"], False),
    (["lora.bias=all", "quant.bits=4", "train.precision=bf16"], False),
    (["lora.bias=all", "train.precision=fp16"], False),  # not quantized: the biases train in fp32
])
def test_biases_that_bitsandbytes_would_cast_to_fp16_are_refused_with_the_ways_out(tmp_path, overrides, refused):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 30)
    try:
        config.load(None, [f"data.path={data}", "slurm.gpus=1", *overrides])
        problem = None
    except ConfigError as exc:
        problem = str(exc)
    assert (problem is not None and "lora.bias" in problem and "quant.compute_dtype=fp32" in problem) is refused, problem


def test_slurm_times_with_colons_stay_the_text_written_though_yaml_reads_them_as_base_60(tmp_path, data_file):
    """YAML 1.1 reads `time: 1:30:00` as 5400 and `30:00` as 1800, which as Slurm minutes would be 90 hours and 30
    hours: the text written is kept, in a file and in an override; where a number belongs, `1:30` is refused."""
    from hpclora.config.slurm_syntax import slurm_seconds

    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  path: {data_file}\nslurm:\n  time: 1:30:00\n")
    assert config.load(path).slurm.time == "1:30:00"
    assert config.load(path, ["slurm.time=30:00"]).slurm.time == "30:00"
    assert config.load(path, ["slurm.time=90"]).slurm.time == "90"  # minutes, as Slurm reads it
    assert slurm_seconds(config.load(path).slurm.time) == 90 * 60
    path.write_text(f"data:\n  path: {data_file}\ntrain:\n  max_steps: 1:30\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert dict(err.value.problems)["train.max_steps"] == "expected an integer, got '1:30'"


TOKEN = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"  # hub-token-shaped, made up


@pytest.mark.parametrize("override, key", [
    (f"slurm.setup=[export HF_TOKEN={TOKEN}]", "slurm.setup[0]"),
    (f"slurm.extra=['--export=ALL,HF_TOKEN={TOKEN}']", "slurm.extra[0]"),
    (f"container.env={{MY_HF: {TOKEN}}}", "container.env.MY_HF"),
    ("container.env={WANDB_KEY: 0123456789abcdef0123456789abcdef01234567}", "container.env.WANDB_KEY"),
    ("container.env={GITHUB_PAT: ghp_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab}", "container.env.GITHUB_PAT"),
    (f"run.name=run-{TOKEN}", "run.name"),
])
def test_values_that_look_like_credentials_are_refused_whatever_key_holds_them_and_never_repeated(data_file, override, key):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", override])
    problems = dict(err.value.problems)
    assert "looks like a" in problems[key] and "export it in your shell" in problems[key]
    assert TOKEN not in str(err.value) and "0123456789abcdef0123456789abcdef" not in str(err.value)


# Made-up values in the shapes of real credentials.
TOKEN_SHAPES = {
    "hub": TOKEN, "openai": "sk-proj-" + "Ab1" * 16, "wandb": "0123456789abcdef" * 2 + "01234567", "github": "ghp_" + "aB3" * 12,
    "aws key id": "AKIA" + "ABCDEFGHIJ234567", "gitlab": "glpat-" + "xY7" * 7, "base62": "Zx9" * 14,
}
TOKEN_PLACES = {  # every kind of key, path keys included, with the token as a whole value or as a part of one
    "run.name": "{}", "run.output_root": "/srv/runs/{}", "data.cache_dir": "/srv/{}/tokenized", "slurm.log_dir": "logs/{}",
    "cache.hf_home": "/shared/{}", "container.binds": "[/data/{}:/data]", "model.name": "owner/{}", "slurm.account": "{}",
    "run.wandb_project": "{}", "slurm.partition": "{}", "model.revision": "v-{}", "container.image": "/srv/{}.sif",
}


@pytest.mark.parametrize("shape", TOKEN_SHAPES)
def test_every_token_shape_is_refused_in_every_key_paths_included(data_file, shape):
    token = TOKEN_SHAPES[shape]
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", *(f"{key}={place.format(token)}" for key, place in TOKEN_PLACES.items())],
                    check_files=False)
    flagged = {key.split("[")[0] for key, message in err.value.problems if "looks like a token or key" in message}
    assert flagged == set(TOKEN_PLACES), set(TOKEN_PLACES) - flagged
    assert token not in str(err.value)


def test_a_submission_with_a_token_in_a_path_writes_nothing(data_file, tmp_path, cli):
    root = tmp_path / f"runs-{TOKEN_SHAPES['wandb']}"
    done = cli("submit", ROOT / "configs" / "demo-cpu.yaml", f"data.path={data_file}", f"run.output_root={root}", "--launcher", "local")
    assert done.returncode == 2 and "run.output_root: holds what looks like a token or key" in done.stderr
    assert not root.exists() and TOKEN_SHAPES["wandb"] not in done.stderr + done.stdout


def test_paths_and_names_with_hashes_in_them_are_no_credentials(data_file):
    snapshot = "/shared/hf/hub/models--org--m/snapshots/0123456789abcdef0123456789abcdef01234567"
    cfg = config.load(None, [f"data.path={data_file}", f"model.name={snapshot}", "run.name=ja-sweep_2026-12-01-lr2e-4",
                             "model.revision=0123456789abcdef0123456789abcdef01234567",
                             "run.output_root=/home/u/My_Experiment_Runs_Version2_with_many_words_here_2026"], check_files=False)
    assert cfg.model.name == snapshot and cfg.model.revision == "0123456789abcdef0123456789abcdef01234567"


LONG_NAME = "n" * 300


@pytest.mark.parametrize("override, key, message", [
    ("data.packing=0", "data.packing", "must be one of auto, true, false; got 0"),
    ("train.gradient_checkpointing=1", "train.gradient_checkpointing", "must be one of auto, true, false; got 1"),
    ("slurm.time='00:99:99'", "slurm.time", "minutes or seconds past 59"),
    ("slurm.time='1-24:00:00'", "slurm.time", "hours past 23"),
    ("slurm.time='25:00:00:00'", "slurm.time", "not a Slurm time"),
    ("train.cpu_ranks=2", "train.cpu_ranks", "slurm.gpus=1 trains a rank per GPU"),
    ("data.path=owner/../x", "data.path", "neither a data file here nor a hub id"),
    ("model.name=org--x/m", "model.name", "neither a model directory here nor a hub id"),
    ("data.path=/dev/null", "data.path", "not a regular file"),
    (f"data.path=/tmp/{LONG_NAME}.jsonl", "data.path", "too long for a file system"),
    (f"run.output_root=/tmp/{LONG_NAME}", "run.output_root", "too long for a file system"),
    ("slurm.extra=[--outp=x.log]", "slurm.extra[0]", "sbatch reads --outp as --output"),
    ("slurm.extra=[--arr=1-3]", "slurm.extra[0]", "sbatch reads --arr as --array"),
    ("slurm.extra=[--open-m=truncate]", "slurm.extra[0]", "sbatch reads --open-m as --open-mode"),
    ("slurm.extra=[--job-nam=x]", "slurm.extra[0]", "sbatch reads --job-nam as --job-name"),
    ("slurm.extra=[--test-only]", "slurm.extra[0]", "it queues no job"),
])
def test_wrong_inputs_are_refused_with_their_key(data_file, override, key, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", "slurm.gpus=0" if key != "train.cpu_ranks" else "slurm.gpus=1", override])
    problems = dict(err.value.problems)
    assert message in problems[key], problems


def test_empty_paths_and_data_directories_are_refused(tmp_path, data_file):
    problems = problems_of(tmp_path, f"run:\n  output_root: ''\ndata:\n  path: {data_file}\ncontainer:\n  image: ' '\ncache:\n  hf_home: ''\n")
    assert problems == {"run.output_root": "is empty: give a path", "container.image": "is empty: give a path, or null",
                        "cache.hf_home": "is empty: give a path, or null"}
    problems = problems_of(tmp_path, f"data:\n  path: {tmp_path}\n")
    assert "is a directory: give one data file in it" in problems["data.path"]
    assert "NUL byte" in problems_of(tmp_path, 'data:\n  path: "/tmp/a\\0b.jsonl"\n')["data.path"]


def test_the_gpu_type_rules_out_bf16_and_fsdp_in_fp16_on_the_login_node(tmp_path, data_file, cli):
    """validate and submit --dry-run both refuse what a V100 cannot train, by the planner's and the job's rules."""
    for overrides, key, message in ((["train.precision=bf16"], "train.precision", "bf16 is not supported on this GPU"),
                                     (["train.distributed=fsdp", "slurm.gpus=2"], "train.distributed", "not fp16 (V100 and T4 have no bf16)")):
        for command in (["validate"], ["submit", "--dry-run"]):
            done = cli(*command, str(ROOT / "configs" / "demo-cpu.yaml"), "slurm.gpu_type=v100", "slurm.gpus=1", *overrides)
            assert done.returncode == 2 and f"error: {key}: " in done.stderr and message in done.stderr, (command, done.stderr)
    assert cli("validate", ROOT / "configs" / "demo-cpu.yaml", "slurm.gpu_type=a100", "slurm.gpus=1", "train.precision=bf16").returncode == 0


def test_a_validation_split_that_takes_every_row_is_refused_before_the_queue(data_file, cli):
    for overrides in (["data.val_size=3"], ["data.val_size=0.9"], ["data.max_rows=2", "data.val_size=2"]):
        done = cli("validate", ROOT / "configs" / "demo-cpu.yaml", f"data.path={data_file}", *overrides)
        assert done.returncode == 2 and "error: data.val_size: " in done.stderr and "to train on" in done.stderr, done.stderr


def test_target_modules_the_model_lacks_are_refused_before_the_queue(cli):
    done = cli("validate", ROOT / "configs" / "demo-cpu.yaml", "lora.target_modules=[q_proj,query_key_value]")
    assert done.returncode == 2 and "['query_key_value'] not found in smollm2-135m, a llama model" in done.stderr
    assert cli("validate", ROOT / "configs" / "demo-cpu.yaml", "lora.target_modules=[q_proj,lm_head]").returncode == 0


@pytest.mark.parametrize("content, why", [
    ("", "not valid JSON"), ("[1, 2]", "a JSON list, not an object"), ("\x00\x01", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"), ('{"model_type": "llama", "hidden_size": "big", "num_hidden_layers": 2}', "hidden_size is 'big'"),
    ("[" * 100_000, "not valid JSON"),
])
def test_a_broken_config_json_of_a_local_model_is_named_not_a_traceback(tmp_path, cli, content, why):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    for command in ("validate", "plan"):
        done = cli(command, ROOT / "configs" / "demo-cpu.yaml", f"model.name={model}")
        assert done.returncode == 2 and f"error: model.name: {model}/config.json: {why}" in done.stderr, done.stderr


def test_what_yaml_would_turn_into_numbers_stays_the_text_written(tmp_path, data_file):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  path: {data_file}\nmodel:\n  revision: 1.10\nslurm:\n  account: 0777\n  time: 1:30:00\n")
    cfg = config.load(path)
    assert (cfg.model.revision, cfg.slurm.account, cfg.slurm.time) == ("1.10", "0777", "1:30:00")
    cfg = config.load(None, [f"data.path={data_file}", "model.revision=1.10", "slurm.account=0777"])
    assert (cfg.model.revision, cfg.slurm.account) == ("1.10", "0777")


@pytest.mark.parametrize("overrides, key, message", [
    (["slurm.time=00:00:00"], "slurm.time", "is zero, which Slurm reads as no limit"),
    (["slurm.time=0:00"], "slurm.time", "is zero, which Slurm reads as no limit"),
    (["model.name=''"], "model.name", "is empty: give a hub id"),
    (["run.wandb_project=" + "p" * 129], "run.wandb_project", "at most 128 characters; this one has 129"),
    (["run.wandb_project='team/proj'"], "run.wandb_project", "W&B refuses '/'"),
    (["train.max_steps=" + "9" * 400], "train.max_steps", "must be <= 10000000, got an integer of about 401 digits"),
    (["train.lr=" + "9" * 400], "train.lr", "too large for a number: an integer of about 401 digits"),
])
def test_values_that_were_accepted_in_silence_are_refused_by_name(data_file, overrides, key, message):
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"data.path={data_file}", *overrides])
    assert message in dict(err.value.problems)[key]


@pytest.mark.parametrize("root, message", [
    ("{file}", "is a file: give a directory"), ("{file}/runs", "is a file: give a directory"),
    ("/dev/null", "is under /dev"), ("/proc/hpclora", "is under /proc"), ("/sys/runs", "is under /sys"),
])
def test_an_output_root_that_cannot_be_a_directory_is_refused_before_anything_is_written(tmp_path, data_file, root, message):
    file = tmp_path / "a-file"
    file.write_text("mine")
    for key in ("run.output_root", "slurm.log_dir", "data.cache_dir", "cache.hf_home"):
        with pytest.raises(ConfigError) as err:
            config.load(None, [f"data.path={data_file}", f"{key}={root.format(file=file)}"])
        assert message in dict(err.value.problems)[key]
    assert config.load(None, [f"data.path={data_file}", "data.cache_dir=/dev/shm/hpclora"]).data.cache_dir == "/dev/shm/hpclora"


def test_a_mix_of_plain_file_names_is_named_as_such_and_not_as_a_missing_data_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sources: [a.jsonl, b.jsonl]\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    problems = dict(err.value.problems)
    assert "data.path" not in problems and "expected a mapping such as {path: a.jsonl, weight: 1}, got 'a.jsonl'" in problems["data.sources[0]"]


def test_a_file_of_thousands_of_values_given_as_the_config_is_named_as_such(tmp_path, cli):
    path = tmp_path / "data.yaml"
    path.write_text("rows:\n" + "".join(f"  r{i}: {i}\n" for i in range(12_000)))
    done = cli("validate", path)
    assert done.returncode == 2 and "holds more than 10,000 YAML values, where a config has a few dozen keys: is it a data file?" in done.stderr


def test_plain_text_files_are_read_one_example_per_line(tmp_path, cli):
    text = tmp_path / "corpus.txt"
    text.write_text("first example\n\nsecond example\nthird\n", encoding="utf-8")
    done = cli("validate", ROOT / "configs" / "demo-cpu.yaml", f"data.path={text}", "data.template=none", "data.val_size=1")
    assert done.returncode == 0 and "3 rows of text data read, 1 held out" in done.stderr


def test_a_grid_with_a_value_twice_or_too_many_trials_is_refused_at_once(cli):
    twice = cli("sweep", ROOT / "configs" / "demo-cpu.yaml", "--grid", "lora.r=8,16,8", "--dry-run")
    assert twice.returncode == 2 and "lora.r: 8 given twice: each trial would run twice" in twice.stderr
    many = cli("sweep", ROOT / "configs" / "demo-cpu.yaml", "--grid", "lora.r=" + ",".join(map(str, range(1, 101))),
               "--grid", "train.lr=" + ",".join(f"{i}e-5" for i in range(1, 51)), "--dry-run")
    assert many.returncode == 2 and "100 x 50 = 5,000 trials; one job array holds at most 1,000" in many.stderr


@pytest.mark.parametrize("overrides, key, message", [
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation", "runs on GPUs only, and this is a CPU job"),
    (["model.attn_implementation=flash_attention_2", "slurm.gpus=1", "slurm.gpu_type=v100"], "model.attn_implementation",
     "needs an Ampere or newer GPU (sm_80+), and v100-16gb is sm_70"),
    (["train.gradient_checkpointing=true", "train.checkpointed_layers=99"], "train.checkpointed_layers",
     "99 layers recompute, but smollm2-135m has 30"),
])
def test_settings_the_device_or_the_model_cannot_run_are_refused_on_the_login_node(cli, overrides, key, message):
    done = cli("validate", ROOT / "configs" / "demo-cpu.yaml", *overrides)
    assert done.returncode == 2 and f"error: {key}: " in done.stderr and message in done.stderr


def test_gpu_settings_in_a_cpu_job_say_what_they_mean_there(cli):
    done = cli("validate", ROOT / "configs" / "demo-cpu.yaml", "quant.bits=4", "train.optimizer=paged_adamw_8bit")
    assert done.returncode == 0
    assert "note: quant.bits=4 in a CPU job: bitsandbytes quantizes and computes on the CPU" in done.stderr
    assert "note: train.optimizer=paged_adamw_8bit in a CPU job: paging moves optimizer states" in done.stderr
    fsdp = cli("validate", ROOT / "configs" / "demo-cpu.yaml", "train.distributed=fsdp", "train.cpu_ranks=2")
    assert "note: train.distributed=fsdp in a CPU job: the ranks shard the weights over gloo" in fsdp.stderr

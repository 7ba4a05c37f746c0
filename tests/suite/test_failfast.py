"""Fail fast, lose nothing, say what happened.

Every bad input is refused before anything heavy loads (no torch import), one line per problem that
names the key, the value and what is valid; divergence is a status with the step, the loss and a
hint; a record that cannot be written is not lost silently; the screen says where W&B's offline run
went and what a child killed by a signal means.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import subprocess
import sys

import pytest
from suite_fixtures import REPO, data_files_override

from experiments.finetune import resolve
from sparsegrad.suite.errors import ConfigError, SuiteError, hub_model_message, signal_message
from sparsegrad.suite.run import runner
from sparsegrad.suite.run.settings import check_data_files, check_override_keys, closest, settings_from_config
from sparsegrad.suite.run.trainer import divergence


def _problems(compose, overrides, tmp_path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        settings_from_config(resolve(compose(overrides)), str(tmp_path))
    message = str(info.value)
    assert "Traceback" not in message
    return message.splitlines()


# --------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("overrides,expected", [
    (["trainer.batch_size=abc"], "trainer.batch_size=abc: must be an integer >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size=0: must be an integer >= 1"),
    (["trainer.batch_size=-4"], "trainer.batch_size=-4: must be an integer >= 1"),
    (["trainer.lr=0"], "trainer.lr=0: must be a number > 0"),
    (["trainer.precision=fp16"], "trainer.precision=fp16: must be one of fp32, bf16"),
    (["trainer.eval_every=0"], "trainer.eval_every=0: must be null or an integer >= 1"),
    (["method.k=0"], "method.k=0: must be a count >= 1 (entries per MLP matrix) or a fraction in (0, 1]"),
    (["method.k=-1"], "method.k=-1: must be a count >= 1"),
    (["method.k=2.0"], "method.k=2.0: must be a count >= 1 (entries per MLP matrix) or a fraction in (0, 1] "
                       "(e.g. 0.05); write method.k=2 for a count"),
    (["method.k=100000"], "method.k=100000: above the 2048 entries of each MLP matrix of tiny_bert (32 x 64), i.e. "
                          "dense training; use method.k <= 2048 or a fraction, or method.allow_dense=true"),
    (["method=lora", "method.rank=0"], "method.rank=0: must be null or an integer >= 1"),
    (["logger.mode=onlin"], "logger.mode=onlin: must be one of offline, online, disabled"),
    (["task.direction=minimize"], "contradicts the main metric"),
    (["trainer.device=gpu"], "trainer.device=gpu: must be one of auto, cpu, mps, cuda, cuda:N"),
    (["seed=-1"], "seed=-1: must be an integer >= 0 and <= 4294967295"),
    (["seed=4294967296"], "seed=4294967296: must be an integer >= 0 and <= 4294967295"),
])
def test_each_bad_value_is_one_line_naming_key_value_and_valid_range(compose, tmp_path, overrides, expected):
    lines = _problems(compose, ["model=tiny_bert", *overrides], tmp_path)
    assert len(lines) == 1 and expected in lines[0], lines


def test_every_problem_of_a_config_is_reported_at_once(compose, tmp_path):
    lines = _problems(compose, ["model=tiny_bert", "trainer.batch_size=-4", "trainer.lr=0", "method.k=2.0"], tmp_path)
    assert [line.split(":")[0] for line in lines] == ["trainer.batch_size=-4", "trainer.lr=0", "method.k=2.0"]


@pytest.mark.parametrize("k", ["0.05", "1.0", "1", "2048"])
def test_valid_budgets_pass(compose, tmp_path, k):
    settings = settings_from_config(resolve(compose(["model=tiny_bert", f"method.k={k}"])), str(tmp_path))
    assert settings.method.k == (float(k) if "." in k else int(k))


def test_a_budget_above_the_matrix_is_dense_only_when_asked(compose, tmp_path):
    cfg = resolve(compose(["model=tiny_bert", "method.k=100000", "method.allow_dense=true"]))
    assert settings_from_config(cfg, str(tmp_path)).method.allow_dense


def test_a_budget_above_a_pretrained_matrix_reads_its_config_json(compose, tmp_path):
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8,
                                                       "intermediate_size": 16}))
    lines = _problems(compose, [f"model.pretrained={model_dir}", "method.k=200"], tmp_path)
    assert lines == ["method.k=200: above the 128 entries of each MLP matrix of minilm (8 x 16), i.e. dense "
                     "training; use method.k <= 128 or a fraction, or method.allow_dense=true if dense is meant"]


def test_a_missing_model_folder_is_said_so(compose, tmp_path):
    lines = _problems(compose, ["model.pretrained=/no/such/folder"], tmp_path)
    assert len(lines) == 1 and lines[0].startswith("model.pretrained=/no/such/folder: the folder does not exist")
    (tmp_path / "empty_model").mkdir()
    lines = _problems(compose, [f"model.pretrained={tmp_path / 'empty_model'}"], tmp_path)
    assert lines == [f"model.pretrained={tmp_path / 'empty_model'}: the folder has no config.json, so it is not a "
                     "saved Hugging Face model"]


@pytest.mark.parametrize("offline,expected,absent", [
    ("0", "could not be reached (offline mode is off: HF_HUB_OFFLINE=0)", "offline mode is on"),
    ("1", "offline mode is on (HF_HUB_OFFLINE=1)", "could not be reached"),
])
def test_the_hub_message_says_which_offline_state_holds(monkeypatch, offline, expected, absent):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    message = hub_model_message("bert-base-uncased", OSError("no"))
    assert expected in message and absent not in message


# ------------------------------------------------------------------------------------- key typos
@pytest.mark.parametrize("arg,expected", [
    ("trainer.lr_rate=1", "trainer.lr_rate=1: unknown key; did you mean trainer.lr?"),
    ("+trainer.lr_rate=1", "trainer.lr_rate=1: unknown key; did you mean trainer.lr?"),
    ("trainer.bach_size=8", "trainer.bach_size=8: unknown key; did you mean trainer.batch_size?"),
    ("method.kk=3", "method.kk=3: unknown key; did you mean method.k?"),
    ("modle=tiny_bert", "modle=tiny_bert: unknown key; did you mean model?"),
    ("paths.output=x", "paths.output=x: unknown key; did you mean paths.output_root?"),
])
def test_key_typos_name_the_closest_valid_key(arg, expected):
    assert check_override_keys([arg]) == [expected]


def test_valid_overrides_pass_the_key_check():
    assert check_override_keys([
        "--multirun", "model=tiny_bert", "trainer.lr=1e-3", "seed=1,2", "+experiment=kept_fraction",
        "method.options.block_factor=3", "+method.options.storage=rotated", "hydra.run.dir=x",
        "+reproduce.profile=smoke", "task.data_files={train: a.csv}", "~trainer.threads",
    ]) == []


def test_unknown_keys_inside_the_composed_config_are_refused_too(compose, tmp_path):
    lines = _problems(compose, ["model=tiny_bert", "+trainer.lr_rate=1"], tmp_path)
    assert lines == ["trainer.lr_rate=1: unknown key; did you mean trainer.lr?"]


def test_closest():
    assert closest("lr_rate", ["lr", "lr_schedule_x", "seed"]) == "lr"
    assert closest("zzz", ["lr", "seed"]) is None


# ------------------------------------------------------------------------------------- data files
def test_bad_data_files_are_one_line_each_naming_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header = tmp_path / "header.csv"
    header.write_text("sentence,label\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    good = tmp_path / "good.csv"
    good.write_text("sentence,label\na fine film,1\n")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n\n")
    assert check_data_files({"train": str(empty), "validation": str(good)}) == [
        f"task.data_files.train={empty}: the file is empty (0 bytes)"]
    assert check_data_files({"train": str(header), "validation": str(good)}) == [
        f"task.data_files.train={header}: the file has a header line but no rows"]
    assert check_data_files({"train": str(folder), "validation": str(good)}) == [
        f"task.data_files.train={folder}: is a directory; give one file per split (.csv, .tsv, .json, .jsonl, "
        ".parquet)"]
    assert check_data_files({"train": str(jsonl)}) == [f"task.data_files.train={jsonl}: the file holds only blank lines"]
    assert check_data_files({"train": str(tmp_path / "nope.csv")}) == [
        f"task.data_files.train={tmp_path / 'nope.csv'}: no such file"]
    assert check_data_files({"train": str(good), "validation": str(good)}) == []


def test_a_data_file_without_the_tasks_columns_is_named_before_anything_loads(tmp_path):
    from sparsegrad.suite.run.tasks import TASKS

    good = tmp_path / "dev.csv"
    good.write_text("sentence,label\na fine film,1\n")
    renamed = tmp_path / "train.csv"
    renamed.write_text("\ufefftext,label\na fine film,1\n")  # a BOM, as spreadsheets write, is no column name
    assert check_data_files({"train": str(renamed), "validation": str(good)}, TASKS["sst2"]) == [
        f"task.data_files.train={renamed}: missing column(s) sentence; sst2 needs the columns sentence, label "
        "(found text, label)"]
    rows = tmp_path / "train.jsonl"
    rows.write_text('\n{"sentence1": "a", "label": 0}\n')
    parquet = tmp_path / "train.parquet"
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"premise": ["a"], "label": [0]}), parquet)
    assert check_data_files({"train": str(rows)}, TASKS["rte"]) == [
        f"task.data_files.train={rows}: missing column(s) sentence2; rte needs the columns sentence1, sentence2, "
        "label (found sentence1, label)"]
    assert check_data_files({"train": str(parquet)}, TASKS["mnli"]) == [
        f"task.data_files.train={parquet}: missing column(s) hypothesis; mnli needs the columns premise, "
        "hypothesis, label (found premise, label)"]
    assert check_data_files({"train": str(good), "validation": str(good)}, TASKS["sst2"]) == []


def test_the_cli_names_the_one_file_with_wrong_columns_before_torch_loads(tmp_path, glue_files):
    train = tmp_path / "train.csv"
    train.write_text(open(glue_files["sst2"]["train"]).read().replace("sentence,label", "text,label", 1))
    proc = subprocess.run([sys.executable, "-c", CHECK_ONLY, "model=tiny_bert", "task=sst2", "logger=none",
                           data_files_override({"train": str(train), "validation": glue_files["sst2"]["validation"]}),
                           f"hydra.run.dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: task.data_files.train={train}: missing column(s) sentence; sst2 needs the columns sentence, label "
        "(found text, label)", "torch imported: False"], proc.stderr[-2000:]


CPU_ONLY_TORCH = ("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n")


def test_a_gpu_on_a_cpu_only_torch_is_one_line_read_from_its_build_without_importing_it(tmp_path):
    fake = tmp_path / "site" / "torch"  # a CPU-only torch first on the path; importing it would fail loudly
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('the check imported torch')\n")
    (fake / "version.py").write_text(CPU_ONLY_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHECK_ONLY, "model=tiny_bert", "logger=none", "trainer.device=cuda",
                           f"hydra.run.dir={tmp_path}/run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: trainer.device=cuda: this torch (2.13.0+cpu) is built for the CPU only, without CUDA; use "
        "trainer.device=auto (the CPU here) or cpu, or install a CUDA build of torch",
        "torch imported: False"], proc.stderr[-2000:]


def test_the_installed_torch_build_decides_the_gpu_check():
    import torch

    from sparsegrad.suite.run.settings import check_device

    cpu_only = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
    assert bool(check_device("cuda")) == cpu_only and check_device("cpu") == [] and check_device("auto") == []
    if sys.platform != "darwin":
        assert check_device("mps") == ["trainer.device=mps: Apple's MPS exists on macOS only; use trainer.device=auto "
                                       "or cpu"]


def test_a_gpu_that_is_not_there_is_one_line_where_torch_loads(monkeypatch):
    """A CUDA build on a machine without a visible GPU (or with fewer than named): the device step says so."""
    import torch

    from sparsegrad.suite.run.trainer import resolve_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda: torch sees no CUDA GPU here \(no driver, or none "
                                          r"visible: CUDA_VISIBLE_DEVICES=\); use trainer.device=auto or cpu$"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^trainer.device=cuda:2: only 2 CUDA device\(s\) are visible \(cuda:0 to "
                                          r"cuda:1\); use one of those, or trainer.device=cuda$"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cpu") == torch.device("cpu")


def test_training_data_of_a_single_class_warns_with_the_label_counts(run_tiny, glue_files, tmp_path, capsys):
    from sparsegrad.suite.run.tasks import TASKS, label_warning

    one_class = tmp_path / "train.csv"
    lines = open(glue_files["sst2"]["train"]).read().splitlines()
    one_class.write_text("\n".join([lines[0], *(ln.rsplit(",", 1)[0] + ",1" for ln in lines[1:])]) + "\n")
    record = run_tiny(["model=tiny_bert", "method=full", "task=sst2", "trainer.max_steps=1", "trainer.eval_every=1",
                       data_files_override({"train": str(one_class), "validation": glue_files["sst2"]["validation"]})])
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == ["[finetune] warning: the sst2 training data has a single class (label 0: 0, label 1: 43; 43 "
                        "examples): the model cannot learn to tell the 2 classes apart; check the labels of "
                        "task.data_files.train (or task.max_train_samples)"]
    assert record["status"] == "completed"  # a warning: the run goes on
    three = [{"label": 0}, {"label": 2}, {"label": 2}]
    assert label_warning(TASKS["mnli"], three).startswith("the mnli training data has no example of label 1 "
                                                          "(label 0: 1, label 1: 0, label 2: 2; 3 examples)")
    assert label_warning(TASKS["mnli"], [*three, {"label": 1}]) is None
    assert label_warning(TASKS["stsb"], [{"label": 3.2}]) is None  # regression: no classes


def test_data_file_problems_come_through_the_config_check(compose, tmp_path):
    header = tmp_path / "header.csv"
    header.write_text("sentence,label\n")
    lines = _problems(compose, ["model=tiny_bert", "task=sst2",
                                data_files_override({"train": str(header), "validation": str(header)})], tmp_path)
    assert lines == [f"task.data_files.{split}={header}: the file has a header line but no rows"
                     for split in ("train", "validation")]


# ------------------------------------------------------------------------- the entry point itself
CHECK_ONLY = ("import atexit, sys\n"
              "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
              "from experiments.finetune import cli\n"
              "cli(sys.argv[1:])\n")


@pytest.mark.parametrize("args,expected", [
    (["trainer.batch_size=abc"], "error: trainer.batch_size=abc: must be an integer >= 1"),
    (["trainer.lr_rate=1"], "error: trainer.lr_rate=1: unknown key; did you mean trainer.lr?"),
    (["method.k=100000"], "error: method.k=100000: above the 2048 entries"),
    (["model=minilm", "model.pretrained=/no/such/folder"],
     "error: model.pretrained=/no/such/folder: the folder does not exist"),
    (["seed=-1"], "error: seed=-1: must be an integer >= 0 and <= 4294967295"),
])
def test_cli_refuses_bad_input_with_one_line_exit_2_before_torch_loads(tmp_path, args, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-c", CHECK_ONLY, "model=tiny_bert", *args, "logger=none",
                           f"hydra.run.dir={tmp_path}/run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(expected) and lines[1:] == ["torch imported: False"], lines


# ------------------------------------------------------------------------------------ divergence
def test_divergence_rule():
    assert divergence(0.7, 0.69, 100, 3) is None
    assert divergence(68.0, 0.69, 100, 3) is None
    assert divergence(9307.0, 0.69, 100, 3) == ("loss 9307 at step 3 is above 100 x the first step's 0.69 "
                                                "(trainer.divergence_factor); lower trainer.lr")
    assert divergence(9307.0, 0.69, None, 3) is None
    assert divergence(math.nan, 0.69, None, 5) == "non-finite loss (nan) at step 5; lower trainer.lr"


def test_a_loss_far_above_the_first_is_diverged(run_tiny, glue_files):
    record = run_tiny(["model=tiny_bert", "method=full", "task=sst2", "trainer.lr=1e3", "trainer.max_steps=8",
                       "trainer.eval_every=8", data_files_override(glue_files["sst2"])])
    assert record["status"] == "diverged", record["training"]
    assert "is above 100 x the first step's" in record["error"] and "lower trainer.lr" in record["error"]
    assert record["training"]["stop_reason"] == record["error"] and record["training"]["optimizer_steps"] < 8
    assert record["objective"] is None and math.isnan(runner.objective_value(record))


def test_cli_prints_the_divergence_and_exits_3(tmp_path, glue_files):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "experiments.finetune", "model=tiny_bert", "method=full", "task=sst2",
                           data_files_override(glue_files["sst2"]), "trainer=smoke", "trainer.threads=1",
                           "trainer.lr=1e3", "logger=none", f"hydra.run.dir={tmp_path}/run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("[finetune] diverged:"))
    assert "at step" in line and "lower trainer.lr" in line and "now trainer.lr=1000.0" in line


# ------------------------------------------------------------------------------- writing records
def test_a_full_disk_still_prints_the_metrics_and_keeps_the_record(run_tiny, glue_files, monkeypatch, capsys,
                                                                   tmp_path):
    original = runner.record_lib.write

    def full_disk(record, output_dir, validate_first=True):
        if str(output_dir) == str(tmp_path / "run"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(record, output_dir, validate_first)

    monkeypatch.setattr(runner.record_lib, "write", full_disk)
    with pytest.raises(runner.RecordWriteError, match="No space left on device.*saved to (.*) instead") as info:
        run_tiny(["model=tiny_bert", "method=full", "task=sst2", data_files_override(glue_files["sst2"])],
                 out=tmp_path / "run")
    record = info.value.record
    assert record["status"] == "completed"
    err = capsys.readouterr().err
    assert f"[finetune] completed: accuracy = {record['best']['score']}" in err and "record NOT written" in err
    saved = str(info.value).split("saved to ")[1].split(" instead")[0]
    assert json.loads(open(saved).read())["run_id"] == record["run_id"]


def test_with_nowhere_to_write_the_record_goes_to_the_screen(run_tiny, glue_files, monkeypatch, capsys, tmp_path):
    def no_disk(record, output_dir, validate_first=True):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runner.record_lib, "write", no_disk)
    with pytest.raises(runner.RecordWriteError, match="Read-only file system.*printed to standard output"):
        run_tiny(["model=tiny_bert", "method=full", "task=sst2", data_files_override(glue_files["sst2"])],
                 out=tmp_path / "run")
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["status"] == "completed"


def test_an_unwritable_run_folder_is_one_message(compose, glue_files, tmp_path):
    from experiments.finetune import run_from_config

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = compose(["model=tiny_bert", "task=sst2", "logger=none", data_files_override(glue_files["sst2"])])
    with pytest.raises(SuiteError, match=f"cannot write to the run folder {blocker}/run: .*paths.output_root="):
        run_from_config(cfg, blocker / "run")


# ------------------------------------------------------------------------------------ the screen
def test_wandb_offline_run_location_and_sync_command_are_printed(run_tiny, glue_files, tmp_path, monkeypatch,
                                                                 capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_tiny(["model=tiny_bert", "method=full", "task=sst2", "logger=wandb", "logger.mode=offline",
              data_files_override(glue_files["sst2"])], out=tmp_path / "run")
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "W&B offline run" in ln)
    folder = line.split("saved in ")[1].split(";")[0]
    assert folder.startswith(str(tmp_path / "run" / "wandb" / "offline-run-")) and os.path.isdir(folder)
    assert line.endswith(f"upload it with: wandb sync {folder}")


def test_signal_messages():
    assert signal_message(0) is None and signal_message(2) is None
    assert "SIGKILL" in signal_message(-9) and "out of memory" in signal_message(-9)
    assert signal_message(-11) == "killed by SIGSEGV"


def test_the_sweep_driver_reports_a_sigkilled_child_as_a_likely_oom(tmp_path):
    from sparsegrad.suite.sweep import driver as sweep

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -9 $$\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    profile = sweep.Profile(name="t", models=["tiny_bert"], methods=["full"], tasks=["movie_sentiment"], seeds=[1],
                            sweep={"search": "lr_batch_narrow", "n_trials": 1, "seed": 1})
    layout = sweep.Layout(results=tmp_path / "results", work=tmp_path / "work")
    driver = sweep.Driver(profile, layout, sweep.Options(quiet=True, python=str(fake)))
    assert driver.run(["model=tiny_bert"], "seeds tiny_bert-full", "seeds") == -9
    assert len(driver.failures) == 1 and "killed by SIGKILL" in driver.failures[0]
    assert "out of memory" in driver.failures[0]
    fake.write_text("#!/bin/sh\nkill -INT $$\n")
    with pytest.raises(KeyboardInterrupt):
        driver.run(["model=tiny_bert"], "seeds tiny_bert-full", "seeds")


def test_cli_refuses_a_run_folder_that_cannot_be_written_before_hydra_writes_there(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "experiments.finetune", "model=tiny_bert", "logger=none",
                           f"hydra.run.dir={blocker}/run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: hydra.run.dir={blocker}/run: {blocker} is a file, not a folder; choose a "
                                   "writable folder with paths.output_root=/some/folder")


def test_a_read_only_output_root_is_one_line(tmp_path, monkeypatch):
    import tempfile

    from experiments.finetune import check_output_location

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    assert check_output_location([f"paths.output_root={tmp_path}/out"]) == [
        f"paths.output_root={tmp_path}/out: cannot write in {tmp_path} (Read-only file system); choose a writable "
        "folder with paths.output_root=/some/folder"]
    monkeypatch.undo()
    assert check_output_location([f"paths.output_root={tmp_path}/out", "hydra.run.dir=${paths.output_root}/x"]) == []


def test_an_unknown_method_kind_is_refused_before_any_data_loads(run_tiny, glue_files, tmp_path):
    with pytest.raises(ConfigError, match="method.kind=adapter: must be one of full, lora, meprop, sparsegrad, "
                                          "leading_block"):
        run_tiny(["model=tiny_bert", "method=full", "method.kind=adapter", "task=sst2",
                  data_files_override(glue_files["sst2"])], out=tmp_path / "run")
    assert not (tmp_path / "run" / "record.json").exists()


def test_the_settings_check_imports_no_torch_and_the_method_layer_still_loads_whole():
    code = ("import sys\n"
            "import sparsegrad.suite.run.settings, sparsegrad.suite.run.runner\n"
            "assert 'torch' not in sys.modules\n"
            "import sparsegrad\n"
            "assert sparsegrad.apply_method is not None and 'torch' in sys.modules\n"
            "assert tuple(sparsegrad.METHODS) == ('full', 'lora', 'meprop', 'sparsegrad', 'leading_block', 'shira')\n"
            "assert {'hydra', 'omegaconf', 'wandb', 'pandas', 'optuna'}.isdisjoint(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=300)


def test_the_choices_in_the_settings_match_what_the_code_accepts():
    """Choices written as Literal types (checked before torch loads) must follow the modules that use them."""
    import typing

    from sparsegrad import optim
    from sparsegrad.suite.run.data import CHAT_TEMPLATES
    from sparsegrad.suite.run.models import ModelSettings
    from sparsegrad.suite.run.settings import TrainerSettings

    def literals(hint) -> set:
        if typing.get_origin(hint) is typing.Literal:
            return set(typing.get_args(hint))
        return set().union(*(literals(a) for a in typing.get_args(hint)))

    def choices(cls, name) -> set:
        return literals(typing.get_type_hints(cls)[name])

    assert choices(TrainerSettings, "schedule") == set(optim.SCHEDULES)
    assert choices(ModelSettings, "chat_template") == set(CHAT_TEMPLATES)

"""Everyday mistakes end a command with one line naming the culprit, before any work starts:
paths that cannot be written, a device that is not there, guidance a model cannot give, settings
outside the range the math allows, counts of zero, and config files that are empty or not YAML."""

import shutil
import stat

import pytest
import torch

from helpers import TINY, assert_one_line_error, soflow, soflow_inproc
from soflow.nets import build
from soflow.sampling import ode_sample, sample
from soflow.solution import SolutionFlow
from soflow.run.config import ConfigError, load
from test_data import fake_fmnist



@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished two-step toy run (unconditional, 2-D points)."""
    run = tmp_path_factory.mktemp("toy") / "run"
    soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=2", check=True)
    return run


def read_only(path):
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)


# ---------------------------------------------------------------- folders that cannot be written

def test_run_dir_that_cannot_be_written(tmp_path, toy_run):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for run_dir in (a_file, a_file / "run"):  # the folder is a file / lies under a file
        proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", run_dir, *TINY)
        assert_one_line_error(proc, f"--run-dir {run_dir}", f"{a_file} is a file, not a folder")

    # An existing run whose checkpoints/ cannot take a file: refused before the first step, not at the
    # first save after training.
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=4")
    assert_one_line_error(proc, f"{run / 'checkpoints'} is a file, not a folder")
    assert "step" not in proc.stdout  # nothing was trained
    (run / "checkpoints").unlink()
    shutil.copytree(toy_run / "checkpoints", run / "checkpoints")
    read_only(run / "checkpoints")
    proc = soflow("train", "--config", "toy2d", "--run-dir", run, *TINY, "--set", "train.total_steps=4",
                  unprivileged=True)
    assert_one_line_error(proc, f"{run / 'checkpoints'} is not writable")


def test_sample_out_that_cannot_be_written(tmp_path, toy_run):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file / "x.png", a_file / "deeper" / "x.npy"):
        proc = soflow_inproc("sample", "--checkpoint", toy_run, "--num", 4, "--out", out)
        assert_one_line_error(proc, f"--out {out}", f"{a_file} is a file, not a folder")
    assert list(tmp_path.iterdir()) == [a_file]
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(locked)
    proc = soflow("sample", "--checkpoint", toy_run, "--num", 4, "--out", locked / "x.png", unprivileged=True)
    assert_one_line_error(proc, f"{locked} is not writable")


# ---------------------------------------------------------------- devices and argument values

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_asked_for_without_a_gpu(tmp_path, toy_run):
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", tmp_path / "run", *TINY,
                         "--set", "train.device=cuda")
    assert_one_line_error(proc, "no CUDA device", "use cpu or auto")
    assert not (tmp_path / "run" / "checkpoints").exists()
    proc = soflow_inproc("sample", "--checkpoint", toy_run, "--device", "cuda", "--out", tmp_path / "x.png")
    assert_one_line_error(proc, "no CUDA device")


@pytest.mark.parametrize("args, needle", [
    (["--device", "tpu"], "--device tpu: choose one of auto, cpu, cuda"),  # used to run on the CPU silently
    (["--num", "0"], "--num must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--nfe", "0"], "--nfe must be >= 1, got 0"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--guidance", "3"], "the model is unconditional"),  # used to be ignored silently
])
def test_sample_arguments(tmp_path, toy_run, args, needle):
    proc = soflow_inproc("sample", "--checkpoint", toy_run, *args, "--out", tmp_path / "x.png")
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "x.png").exists()


def test_eval_arguments(tmp_path, toy_run):
    for args, needle in [(["points", "--num", "0"], "--num must be >= 1, got 0"),
                         (["points", "--nfe", "0"], "--nfe must be >= 1, got 0"),
                         (["fmnist", "--per-class", "0"], "--per-class must be >= 1, got 0"),
                         (["points", "--json", tmp_path / "a-file" / "x.json"], "cannot write there")]:
        (tmp_path / "a-file").write_text("x")
        assert_one_line_error(soflow_inproc("eval", *args[:1], "--checkpoint", toy_run, *args[1:]), needle)
    # A folder where the JSON file goes: the OS error, for a path the user gave, is one line too.
    (tmp_path / "out.json").mkdir()
    proc = soflow_inproc("eval", "points", "--checkpoint", toy_run, "--num", 8, "--json", tmp_path / "out.json")
    assert_one_line_error(proc, f"{tmp_path / 'out.json'}: Is a directory")


# ---------------------------------------------------------------- guidance without a null class

def test_guidance_of_a_model_trained_without_label_dropout(tmp_path):
    data = fake_fmnist(tmp_path / "fm", n=20)
    run = tmp_path / "run"
    soflow_inproc("train", "--config", "fmnist", "--run-dir", run, "--set", f"data.path={data}",
                  "--set", "train.batch_size=4",
                  "--set", "train.total_steps=1", "--set", "train.sample_nfe=[1]",
                  "--set", "model.net_args={patch_size: 7, hidden_size: 16, depth: 1, num_heads: 2}",
                  "--set", "objective.cfg_scale=1", "--set", "objective.mix_ratio=1",
                  "--set", "objective.cfg_drop_rate=0",
                  check=True)
    proc = soflow_inproc("sample", "--checkpoint", run, "--num", 4, "--guidance", 3, "--out", tmp_path / "x.png")
    assert_one_line_error(proc, "--guidance 3.0", "no unconditional (null) class")


def test_sampling_api_refuses_guidance_it_cannot_give():
    no_null = SolutionFlow(build("mlp", dim=2, hidden=8, depth=1, num_classes=3, null_class=False))
    for draw in (lambda **kw: sample(no_null, 2, **kw), lambda **kw: ode_sample(no_null, 2, 1, **kw)):
        with pytest.raises(ValueError, match="null"):
            draw(labels=1, guidance=2.0)
        assert draw(labels=1).shape == (2, 2)  # unguided sampling is fine
    unconditional = SolutionFlow(build("mlp", dim=2, hidden=8, depth=1))
    with pytest.raises(ValueError, match="unconditional"):
        sample(unconditional, 2, guidance=2.0)


# ---------------------------------------------------------------- settings and config files

@pytest.mark.parametrize("override, needle", [
    ("objective.eps=-1", "objective.eps: must be positive"),  # negative adaptive weights
    ("objective.p=-1", "objective.p: must be 0 or more"),
    ("objective.r_init=-3", "objective.r_init: must lie in [0, 1]"),  # a complex-tensor error at step 1
    ("objective.r_end=2", "objective.r_end: must lie in [0, 1]"),
    ("objective.time_std=[0, 0.8, 0.8]", "objective.time_std: the logit-normal spreads must be positive"),
    ("train.sample_num=0", "train.sample_num: must be positive"),  # failed after the whole run
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
    ("train.betas=[1.5, 0.9]", "train.betas: Adam's decay rates must lie in [0, 1)"),
    ("train.betas=[0.9, 1.0]", "train.betas: Adam's decay rates must lie in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be 0 or more"),
    ("train.keep_every=-1", "train.keep_every: must be 0 or more"),
    ("objective.time_mean=[.nan, 0, 0]", "objective.time_mean[0]: must be a finite number"),
    ("model.net_args.hidden=.inf", "model.net_args.hidden: must be a finite number"),
    ("meanflow.time_std=0", "meanflow.time_std: must be positive"),
    ("flow_matching.eps=0", "flow_matching.eps: must be positive"),
])
def test_settings_outside_their_range(override, needle):
    with pytest.raises(ConfigError) as e:
        load("toy2d", [override])
    assert needle in str(e.value)


def test_exponent_schedule_needs_positive_ratios():
    with pytest.raises(ConfigError, match="objective.r_end: the exponent schedule needs"):
        load("toy2d", ["objective.schedule=exponent", "objective.r_end=0"])
    load("toy2d", ["objective.schedule=linear", "objective.r_end=0"])  # a linear schedule may reach r = 0


def test_bad_value_and_bad_config_files_through_the_cli(tmp_path):
    run = tmp_path / "run"
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", run, "--set", "train.lr=.nan", "--dry-run")
    assert_one_line_error(proc, "train.lr: must be a finite number")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    assert_one_line_error(soflow_inproc("train", "--config", empty, "--run-dir", run, "--dry-run"),
                          str(empty), "is empty")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    assert_one_line_error(soflow_inproc("train", "--config", binary, "--run-dir", run, "--dry-run"),
                          str(binary), "not UTF-8")
    assert not run.exists()


# ---------------------------------------------------------------- the errors printed as one line

def _raised_names() -> set[str]:
    """The class names after `raise` anywhere in soflow's source."""
    import re
    from pathlib import Path

    import soflow

    names = set()
    for path in Path(soflow.__file__).parent.rglob("*.py"):
        names.update(re.findall(r"\braise\s+([A-Z]\w*)\(", path.read_text()))
    return names


def test_every_project_error_is_a_soflow_error():
    import builtins

    import soflow.cli
    from soflow import errors
    from soflow.data import DataError
    from soflow.errors import EvalError
    from soflow.reference import CheckpointError as ReferenceCheckpointError
    from soflow.safeload import UnreadableFile
    from soflow.run.checkpoint import CheckpointError
    from soflow.train.loop import TrainingError

    # one class per kind, still importable from where it was defined before
    assert ReferenceCheckpointError is CheckpointError is errors.CheckpointError
    assert soflow.SoflowError is errors.SoflowError  # users catch the base class at the top level
    assert (ConfigError, DataError, EvalError, UnreadableFile, TrainingError) == (
        errors.ConfigError, errors.DataError, errors.EvalError, errors.UnreadableFile, errors.TrainingError)
    for kind in (ConfigError, DataError, EvalError, CheckpointError):
        assert issubclass(kind, (errors.SoflowError, ValueError)), kind
    assert issubclass(TrainingError, errors.SoflowError) and issubclass(TrainingError, RuntimeError)
    assert issubclass(UnreadableFile, errors.SoflowError)
    # a project class raised anywhere in soflow is one of these (no second definition elsewhere)
    own = {n for n in _raised_names() if not hasattr(builtins, n)}
    assert own <= {"SoflowError", "ConfigError", "DataError", "CheckpointError", "EvalError", "TrainingError",
                   "UnreadableFile"}, own
    for name in own:
        assert issubclass(getattr(errors, name), errors.SoflowError), name
    assert not hasattr(soflow.cli, "_errors")  # the command line catches SoflowError, not a list of classes


def test_the_command_line_prints_soflow_errors_and_lets_faults_through(monkeypatch, capsys):
    import soflow.cli
    from soflow.errors import DataError

    def bad_input(args):
        raise DataError("data.path: first line\n  second line")

    monkeypatch.setattr(soflow.cli.parser, "cmd_eval", bad_input)  # what the parser dispatches to
    monkeypatch.delenv("SOFLOW_DEBUG", raising=False)
    assert soflow.cli.main(["eval", "points", "--checkpoint", "run"]) == 2
    assert capsys.readouterr().err == "soflow eval: error: data.path: first line second line\n"
    # any other exception, a plain ValueError included, is a fault in soflow and keeps its traceback
    for fault in (KeyError("net"), ValueError("internal"), ImportError("internal")):
        def crash(args, fault=fault):
            raise fault

        monkeypatch.setattr(soflow.cli.parser, "cmd_eval", crash)
        with pytest.raises(type(fault)):
            soflow.cli.main(["eval", "points", "--checkpoint", "run"])

import pytest
import yaml

from helpers import DATA, assert_one_line_error, soflow_inproc
from soflow.run.config import ConfigError, load


def test_presets_and_overrides():
    cfg = load("toy2d", ["train.total_steps=1000", "train.batch_size=128", "train.seed=3", "train.checkpoint_every=50",
                         "model.net_args.hidden=64", "objective.time_mean=[0, -1, 1]"])
    assert (cfg.train.total_steps, cfg.train.batch_size, cfg.train.seed, cfg.train.checkpoint_every) == (1000, 128, 3, 50)
    assert cfg.model.net_args["hidden"] == 64
    assert cfg.objective.time_mean == (0, -1, 1)
    assert isinstance(load("toy2d", ["train.lr=1"]).train.lr, float)


@pytest.mark.parametrize("override,needle", [
    ("train.totl_steps=5", "unknown config key 'train.totl_steps'"),
    ("trian.seed=1", "unknown config key 'trian'"),
    ("train.total_steps=abc", "train.total_steps: expected an integer, got 'abc'"),
    ("train.precision=fp8", "train.precision: 'fp8' is not one of fp32, bf16, fp16"),
    ("objective.schedule=step", "objective.schedule: unknown middle-time schedule 'step'"),
    ("train.sample_mode=euler", "train.sample_mode: method soflow samples with chain | renoise, not 'euler'"),
    ("objective.total_steps=5", "objective.total_steps: follows train.total_steps; set that key instead"),
    ("shortcut.max_steps=12", "shortcut.max_steps: must be a power of 2"),
    ("model.net=dit-q9", "model.net: unknown network 'dit-q9'"),
    ("objective.time_mean=[1, 2]", "objective.time_mean: expected 3 numbers"),
    ("data.name=mnist", "data.name: unknown dataset 'mnist'"),
    ("train.batch_size=0", "train.batch_size: must be positive"),
    ("notakeyvalue", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load("toy2d", [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_misspelt_key_is_one_line_without_traceback(tmp_path):
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", tmp_path / "run", "--set", "train.totl_steps=5")
    assert_one_line_error(proc, "train.totl_steps")
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_prints_resolved_config(tmp_path):
    proc = soflow_inproc("train", "--config", "toy2d", "--run-dir", tmp_path / "run", "--dry-run",
                         "--set", "train.seed=9", check=True)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["seed"] == 9 and cfg["method"] == "soflow"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["reference_cifar.yaml", "reference_imagenet.yaml"])
def test_reference_yaml_files_pass_dry_run(name, tmp_path):
    proc = soflow_inproc("train", "--config", DATA / name, "--run-dir", tmp_path / "run", "--dry-run", check=True)
    cfg = yaml.safe_load(proc.stdout)
    if "cifar" in name:
        assert cfg["model"]["net"] == "unet-cifar10" and cfg["data"]["name"] == "cifar10"
        assert cfg["train"]["optimizer"] == "radam" and cfg["train"]["ema_every"] == 16 and cfg["train"]["ema_float64"]
        assert cfg["objective"]["velocity_loss_ratio"] == 0.0 and cfg["objective"]["r_init"] == 1.0
        assert cfg["train"]["betas"] == [0.9, 0.999] and cfg["train"]["batch_size"] == 1024
    else:
        assert cfg["model"]["net"] == "dit-b4" and cfg["data"]["name"] == "imagenet-latents"
        assert cfg["objective"]["cfg_scale"] == 3.0 and cfg["objective"]["mix_ratio"] == 0.25
        assert cfg["objective"]["schedule"] == "exponent" and cfg["train"]["total_steps"] == 400000
    assert cfg["train"]["seed"] == 42


def test_reference_yaml_with_unknown_key_is_rejected(tmp_path):
    text = (DATA / "reference_cifar.yaml").read_text() + "\nwarmup_steps: 10\n"
    (tmp_path / "c.yaml").write_text(text)
    proc = soflow_inproc("train", "--config", tmp_path / "c.yaml", "--run-dir", tmp_path / "run", "--dry-run")
    assert_one_line_error(proc, "unknown key 'warmup_steps'")



@pytest.mark.parametrize("size,steps", [("b4", 400_000), ("b2", 1_200_000), ("m2", 1_200_000), ("l2", 1_200_000),
                                        ("xl2", 1_200_000)])
def test_imagenet_presets_come_from_one_template(size, steps):
    from soflow.run.presets import preset_names

    cfg = load(f"imagenet-dit-{size}")
    assert (cfg.model.net, cfg.train.total_steps) == (f"dit-{size}", steps)
    # the shared recipe of the template (the reference's imagenet.yaml)
    assert (cfg.data.name, cfg.train.batch_size, cfg.train.lr, cfg.objective.cfg_scale) == ("imagenet-latents", 256,
                                                                                           1e-4, 3.0)
    assert cfg.objective.time_mean == (-0.2, -1.0, 0.2) and cfg.train.betas == [0.9, 0.99]
    assert f"imagenet-dit-{size}" in preset_names() and "imagenet-dit" not in preset_names()


def test_template_alone_is_one_line_error(tmp_path):
    proc = soflow_inproc("train", "--config", "imagenet-dit", "--run-dir", tmp_path / "run", "--dry-run")
    assert_one_line_error(proc, "a template of presets (imagenet-dit-b4")

def test_unknown_preset_lists_presets(tmp_path):
    proc = soflow_inproc("train", "--config", "toy3d", "--run-dir", tmp_path / "run")
    assert_one_line_error(proc, "toy3d", "toy2d")

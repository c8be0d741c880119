"""Config files as untrusted input: YAML aliases (billion laughs, an anchor that holds itself) are
refused before anything expands, and a method in the wrong case names the choices."""

import time

import pytest

from soflow.cli import main
from soflow.errors import ConfigError
from soflow.methods import METHODS
from soflow.run.config import load

BILLION_LAUGHS = """\
method: soflow
model:
  net: mlp
  net_args:
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""

RECURSIVE = "train:\n  betas: &x [1, *x]\n"
MERGE = "base: &base {lr: 0.1}\ntrain:\n  <<: *base\n"


def dry_run(capsys, tmp_path, *args) -> tuple[int, str]:
    code = main(["train", "--run-dir", str(tmp_path / "run"), "--dry-run", *map(str, args)])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("text, alias, line", [(BILLION_LAUGHS, "a", 6), (RECURSIVE, "x", 2), (MERGE, "base", 3)])
def test_aliases_in_a_config_file_are_refused_in_one_line(tmp_path, capsys, text, alias, line):
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    start = time.perf_counter()
    code, err = dry_run(capsys, tmp_path, "--config", path)
    assert time.perf_counter() - start < 5
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{path}: line {line}: YAML aliases (*{alias}) are not accepted" in err
    assert not (tmp_path / "run").exists()


def test_aliases_in_a_saved_run_config_and_in_set_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(RECURSIVE)  # a shared run folder: resumed without --config
    code, err = dry_run(capsys, tmp_path)
    assert code == 2 and "config.yaml: line 2: YAML aliases (*x)" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match=r"--set train.betas: line 1: YAML aliases \(\*x\)"):
        load("toy2d", ["train.betas=&x [1, *x]"])
    assert load("toy2d", ["train.betas=&y [0.5, 0.9]"]).train.betas == [0.5, 0.9]  # an anchor alone is harmless


@pytest.mark.parametrize("value", ["SHORTCUT", "Shortcut", "soflow2"])
def test_a_method_in_another_case_names_the_choices(tmp_path, capsys, value):
    with pytest.raises(ConfigError) as e:
        load("toy2d", [f"method={value}"])
    assert f"method: {value!r} is not one of {', '.join(METHODS)}" in str(e.value)
    code, err = dry_run(capsys, tmp_path, "--config", "toy2d", "--set", f"method={value}")
    assert code == 2 and len(err.splitlines()) == 1 and "method:" in err

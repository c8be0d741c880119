"""Presets (src/soflow/configs/*.yaml) and reading a YAML config file.

A preset file with a `variants` mapping is a template, not a preset: each entry NAME is the preset
`<file stem>-NAME`, that is the file's other keys with the entry's keys laid over them.  A preset
with `extends: OTHER` is the preset OTHER with its own keys laid over it (`fmnist-from-fm` is
`fmnist` set up to start from a flow-matching model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
VARIANTS = "variants"
EXTENDS = "extends"


class _NoAliases(yaml.SafeLoader):
    """yaml.SafeLoader that refuses aliases (`*name`) as it meets them, before anything is expanded:
    aliases let a few lines grow into billions of values (billion laughs) or a list that holds itself."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not accepted in "
                              "a config, since they can expand without bound; write the value out in full")
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    """yaml.safe_load without aliases (a ConfigError naming the line when the text has one)."""
    return yaml.load(text, Loader=_NoAliases)  # noqa: S506 (a SafeLoader)


def _variants(path: Path) -> dict:
    data = safe_yaml(path.read_text(encoding="utf-8"))
    return data.get(VARIANTS) or {} if isinstance(data, dict) else {}


def preset_names() -> list[str]:
    """The names `--config` accepts as presets, variants included, sorted."""
    names = []
    for path in PRESET_DIR.glob("*.yaml"):
        variants = _variants(path)
        names += [f"{path.stem}-{v}" for v in variants] if variants else [path.stem]
    return sorted(names)


def _template_of(name: str) -> tuple[Path, str] | None:
    """(template file, variant) of a preset made from a template, else None."""
    for path in PRESET_DIR.glob("*.yaml"):
        variant = name[len(path.stem) + 1:]
        if name.startswith(path.stem + "-") and variant in _variants(path):
            return path, variant
    return None


def _laid_over(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _laid_over(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(source: str, _seen: tuple = ()) -> dict:
    """The mapping of a YAML file or preset (with its base files and variant applied)."""
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"--config {source}: is a folder; give a YAML file or a preset name")
    variant = None
    if not path.is_file():
        if (PRESET_DIR / f"{source}.yaml").is_file():
            path = PRESET_DIR / f"{source}.yaml"
        elif _template_of(source) is not None:
            path, variant = _template_of(source)
        else:
            raise ConfigError(f"--config {source!r}: no such file or preset; presets: {', '.join(preset_names())}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text); give a YAML config or a preset name") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        data = safe_yaml(text)
    except ConfigError as e:  # an alias
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:  # an empty file (or only comments) would silently train on every default
        raise ConfigError(f"{path}: the file is empty; a config is a YAML mapping of keys (see the presets)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if VARIANTS in data:
        variants = data.pop(VARIANTS)
        if variant is None or not isinstance(variants, dict):
            names = ", ".join(f"{path.stem}-{v}" for v in variants) if isinstance(variants, dict) else "none"
            raise ConfigError(f"{path}: a template of presets ({names}); give one of them to --config")
        data = _laid_over(data, variants[variant])
    if EXTENDS in data:
        parent = data.pop(EXTENDS)
        if not isinstance(parent, str) or parent in _seen or len(_seen) > 8:
            raise ConfigError(f"{path}: {EXTENDS}: expected the name of another preset, got {parent!r}")
        data = _laid_over(read_yaml(parent, (*_seen, str(source))), data)
    return data

"""Typed run configuration: dataclass defaults <- YAML preset or file <- dotted `--set` overrides.

Every error names the offending key and says what it accepts (ConfigError, one line).  The
sections and their types: `schema` (re-exported here); presets and templates: `presets`; value
checks: `validate`; the reference implementation's flat YAML: `reference_yaml`.
"""

from __future__ import annotations

import dataclasses
import typing

import yaml

from ..errors import ConfigError
from .presets import read_yaml, safe_yaml
from .reference_yaml import from_reference, is_reference
from .schema import Config, DataConfig, ModelConfig, TrainConfig, _derived, describe, type_ok
from .validate import validate

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "TrainConfig", "apply", "dump", "load",
           "parse_override"]


# ---------------------------------------------------------------- merging

def _set(obj, dotted: str, value, prefix: str = "") -> None:
    head, _, rest = dotted.partition(".")
    key = prefix + head
    hints = typing.get_type_hints(type(obj))
    settable = [k for k in hints if k not in _derived(type(obj))]
    if head not in settable:
        if head in hints:
            raise ConfigError(f"{key}: follows {_derived(type(obj))[head]}; set that key instead")
        raise ConfigError(f"unknown config key {key!r}; known keys here: {', '.join(prefix + k for k in settable)}")
    tp = hints[head]
    if dataclasses.is_dataclass(tp):
        if rest:
            return _set(getattr(obj, head), rest, value, key + ".")
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of its keys, got {value!r}")
        for k, v in value.items():
            _set(getattr(obj, head), str(k), v, key + ".")
        return
    if rest and tp is dict:
        getattr(obj, head)[rest] = value  # free-form mapping, e.g. model.net_args.hidden
        return
    if rest:
        raise ConfigError(f"unknown config key {key + '.' + rest!r}: {key} has no sub-keys")
    if not type_ok(value, tp):
        raise ConfigError(f"{key}: expected {describe(tp)}, got {value!r}")
    if tp is float or (typing.get_origin(tp) is not None and float in typing.get_args(tp) and isinstance(value, int)):
        value = float(value)
    setattr(obj, head, tuple(value) if tp is tuple else value)


def apply(cfg: Config, values: dict) -> Config:
    """Set the dotted or nested keys of `values` on `cfg` (each checked); returns `cfg`."""
    if not isinstance(values, dict):
        raise ConfigError(f"expected a mapping of config keys, got {type(values).__name__}")
    for k, v in values.items():
        _set(cfg, str(k), v)
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    """'train.total_steps=1000' -> ('train.total_steps', 1000); values are parsed as YAML scalars."""
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.total_steps=1000")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except ConfigError as e:  # an alias
        raise ConfigError(f"--set {key.strip()}: {e}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _fill_derived(cfg) -> None:
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        for name, source in _derived(type(section)).items():
            head, _, key = source.partition(".")
            setattr(section, name, getattr(getattr(cfg, head), key))


def load(source: str | None = None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` (e.g. a saved run config) <- preset/YAML `source` <- overrides.

    The guidance checks apply when a preset, YAML or override is given: a saved run config alone
    (opening a finished run for sampling) is taken as it was trained.
    """
    cfg = Config()
    if base:
        apply(cfg, base)
    if source is not None:
        data = read_yaml(source)
        apply(cfg, from_reference(data) if is_reference(data) else data)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    _fill_derived(cfg)
    return validate(cfg, guidance=source is not None or bool(overrides))


def dump(cfg: Config) -> str:
    """`cfg` as the YAML of config.yaml."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

"""Frozen-dataclass configs from YAML files, presets by name and `section.field=value` overrides.

This module knows nothing of what the fields mean: `jackpot/train/config.py` is the schema and binds these
functions to it, `jackpot/train/config_checks.py` checks the values. A config is built in three layers,
each merged over the one before:

    the dataclasses' defaults  <-  a YAML file or a preset by name  <-  command-line overrides

A YAML file may name a `preset` (a name or a path relative to it) that it extends. Override values are
parsed as YAML scalars; every value is then coerced to its field's type (YAML reads '1e-4' as a string and
'2' as an int where a float is meant), and an unknown key or a value of the wrong type is an InputError
(a ValueError) that names the field. The listing (`jackpot config`, `jackpot train --help`) reads each field's docstring
from the schema's source, so the docstrings are written once.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from jackpot.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"  # presets ship inside the package
LEAF_MAPPINGS = ("options",)  # fields holding free-form mappings: a layer replaces them whole, never merges

T = TypeVar("T")


# ----------------------------------------------------------------------------- building
def build(cls: type[T], config_file: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of `cls` <- the YAML file or preset (and the preset it names) <- overrides; not checked."""
    data = load_yaml(config_file) if config_file else {}
    data = merge(merge(to_dict(cls()), data), parse_overrides(overrides or []))
    return from_dict(cls, data)


def to_dict(cfg: Any) -> dict:
    """The config as nested plain dicts (what config.yaml of a run holds and `from_dict` reads back)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """An instance of dataclass `cls` from a nested dict, each value coerced to its field's type."""
    if not isinstance(data, dict):
        raise InputError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise InputError(f"unknown config key {where + key!r}; known keys: {sorted(known)}")
        if is_dataclass(hints[key]):
            kwargs[key] = from_dict(hints[key], value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(where + key, hints[key], value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """`value` as the type `hint` asks for: numbers to float where the field is a float, else checked."""
    args = set(getattr(hint, "__args__", ()) or (hint,))
    if value is None:
        if type(None) not in args:
            raise InputError(f"{name} may not be null")
        return None
    if float in args and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise InputError(f"{name} must be a number, got {value!r}") from None
    if int in args and not isinstance(value, int):
        raise InputError(f"{name} must be an integer, got {value!r}")
    if bool in args and not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r}")
    if str in args and not isinstance(value, str):
        raise InputError(f"{name} must be a string, got {value!r}")
    return value


def merge(base: dict, update: dict) -> dict:
    """`update` merged into `base`, section by section (the mappings of LEAF_MAPPINGS are replaced whole)."""
    out = dict(base)
    for k, v in update.items():
        nested = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in LEAF_MAPPINGS
        out[k] = merge(out[k], v) if nested else v
    return out


# ----------------------------------------------------------------------------- YAML files, presets, overrides
def presets() -> list[str]:
    """Names of the presets shipped with the package (jackpot/configs/*.yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(name: str | Path) -> Path:
    """A preset name ('tis-reverse-kl') or a path to a YAML file -> the file; a clear error otherwise."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix not in (".yaml", ".yml") and (CONFIG_DIR / f"{name}.yaml").is_file():  # "qwen3-1.7b-to-8b"
        return CONFIG_DIR / f"{name}.yaml"
    raise FileNotFoundError(f"config file not found: {path} (not a file, and not a preset; presets: "
                            f"{', '.join(presets())})")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config (a file or a preset name); `preset: NAME` in it is merged underneath it."""
    path = preset_path(path)
    data = _yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping at the top level")
    preset = data.pop("preset", None)
    if preset is not None:
        base = Path(preset)
        relative = path.parent / base
        data = merge(load_yaml(relative if base.suffix and not base.is_absolute() and relative.is_file()
                               else preset), data)
    return data


def parse_overrides(items: list[str]) -> dict:
    """['train.steps=5', 'correction.name=tis'] -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _yaml(raw, f"override {item!r}") if raw != "" else None
    return out


def _yaml(text: str, what: str):
    """`text` parsed as YAML; a syntax error is the user's input rejected, named by `what`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from e


# ----------------------------------------------------------------------------- listing
def field_docs(cfg: Any) -> dict[str, tuple[Any, str]]:
    """'section.field' -> (value in `cfg`, docstring) for every leaf field of the dataclass `cfg`, the docstrings
    read from the attribute docstrings in the source of its classes (the single place they are written)."""
    out: dict[str, tuple[Any, str]] = {}

    def walk(obj: Any, prefix: str) -> None:
        docs = _attribute_docstrings(type(obj))
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = (value, " ".join(docs.get(f.name, "").split()))

    walk(cfg, "")
    return out


def _attribute_docstrings(cls: type) -> dict[str, str]:
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def describe_fields(cfg: Any, choices: dict[str, tuple] | None = None, width: int = 100) -> str:
    """Every field of `cfg` as `section.field = value` and its docstring (plus its choices, where `choices`
    names them), wrapped."""
    lines = []
    for name, (value, doc) in field_docs(cfg).items():
        if name in (choices or {}):
            doc += f" Choices: {', '.join(map(str, choices[name]))}."
        lines.append(f"  {name} = {_yaml_scalar(value)}")
        lines.extend(textwrap.wrap(doc, width=width, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def preset_descriptions() -> dict[str, str]:
    """Preset name -> the comment block at the top of its YAML file, as one line."""
    out = {}
    for name in presets():
        comment = []
        for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("#").strip())
        out[name] = " ".join(comment)
    return out


def describe_presets(width: int = 100) -> str:
    """Every preset by name with its description, wrapped, the descriptions in one column after the longest name."""
    descriptions = preset_descriptions()
    column = max(map(len, descriptions), default=0) + 2
    lines = []
    for name, text in descriptions.items():
        lines.extend(textwrap.wrap(text, width=width, initial_indent=f"  {name:<{column}s}",
                                   subsequent_indent=" " * (column + 2)))
    return "\n".join(lines)

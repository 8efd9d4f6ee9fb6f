"""Load a YAML config, apply dotted ``key=value`` overrides (the CLI wins), build typed objects."""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from fedrec import registry
from fedrec.config.schema import ExperimentConfig, ModelSection, PreprocConfig
from fedrec.config.typed import build, coerce, unknown_key_error
from fedrec.errors import ConfigError, RegistryError


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML keeps the last silently) and aliases.

    An alias (``*name``) re-uses an anchored node; nested aliases expand exponentially (the "billion
    laughs" alias bomb: a few hundred bytes that take all memory). No config of this project needs them.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"YAML alias *{event.anchor} is not allowed in a config (write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # an unhashable key: SafeLoader raises its own error below
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (YAML would keep only the last)",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def safe_load_strict(stream: Any) -> Any:
    """``yaml.safe_load`` without duplicate keys or aliases (see StrictLoader)."""
    loader = StrictLoader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping with one-line errors naming the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a YAML config file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = safe_load_strict(fh)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is parsed as YAML (numbers, lists, null, true/false)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = safe_load_strict(raw) if raw.strip() else ""
    except yaml.constructor.ConstructorError as err:  # a duplicate key or an alias: never a plain string
        raise ConfigError(f"override {text!r}: {err.problem}") from None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each override applied (later ones win)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {text!r}: '{'.'.join(parts[: i + 1])}' is {child!r}, not a section"
                )
            node = child
        node[parts[-1]] = value
    return data


def build_model_section(data: Any, path: str = "model") -> ModelSection:
    """Build ``model:``: look up the model by name, type its params, check them against the data."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{path}' = {data!r}: expected a mapping with a 'name'")
    if "name" not in data:
        raise ConfigError(
            f"config key '{path}.name' is required (known models: {', '.join(registry.names('model'))})"
        )
    name = coerce(data["name"], str, f"{path}.name")
    try:
        model_cls = registry.lookup("model", name)
    except RegistryError as err:
        raise ConfigError(f"config key '{path}.name': {err}") from None
    preproc = build(PreprocConfig, data.get("preproc") or {}, f"{path}.preproc")
    try:
        dataset_cls = registry.lookup("dataset", preproc.dataset)
    except RegistryError as err:
        raise ConfigError(f"config key '{path}.preproc.dataset': {err}") from None
    rest = {k: v for k, v in data.items() if k not in ("name", "preproc")}
    known = [f.name for f in dataclasses.fields(model_cls.Config)] + ["name", "preproc"]
    for key in rest:
        if key not in known:
            raise unknown_key_error(path, str(key), known)
    params = build(model_cls.Config, rest, path)
    model_cls.check_config(params, dataset_cls, path)
    return ModelSection(name=name, preproc=preproc, params=params)


def import_config_modules(modules: Sequence[str]) -> None:
    """Import the config's ``import_modules`` (they register models, datasets, algorithms) before the
    rest is validated. The working directory is on the path, as for ``python -m``."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # after site-packages: a local file never shadows an installed package
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(
                f"config key 'import_modules': cannot import {module!r} ({err}; the working directory "
                f"{cwd} and PYTHONPATH are searched)"
            ) from None


def build_experiment(data: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    """Typed ExperimentConfig from a plain mapping."""
    known = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for key in data:
        if key not in known:
            raise unknown_key_error("", str(key), known)
    if "model" not in data:
        raise ConfigError(f"{source}: config key 'model' is required")
    import_config_modules(coerce(data.get("import_modules") or [], list[str], "import_modules"))
    rest = dict(data)
    rest["model"] = build_model_section(rest["model"])
    return build(ExperimentConfig, rest)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read ``path``, apply ``overrides`` and return the validated config."""
    data = apply_overrides(read_yaml(path), overrides)
    try:
        return build_experiment(data, os.fspath(path))
    except ConfigError as err:
        raise ConfigError(f"{os.fspath(path)}: {err}") from None


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain-data form of the config, in the YAML's shape (model params flattened back)."""
    from fedrec.config.typed import to_dict

    out = to_dict(cfg)
    model = out.pop("model")
    out["model"] = {"name": model["name"], **model["params"], "preproc": model["preproc"]}
    return out

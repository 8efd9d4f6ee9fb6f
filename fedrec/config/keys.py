"""Every config key, its type, default and meaning, generated from the typed schema.

One source for two readers: ``--help`` of every script prints :func:`keys_markdown`, and the
"All config keys" section of configs/flags.md is the same text, rewritten by
``python -m fedrec.config.keys --write configs/flags.md`` (a test checks the two agree). The meaning
of a key is the comment beside its field in the schema (``fedrec/config/schema.py``, a model's
``Config``), so a new key documented there is documented everywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from fedrec import registry
from fedrec.config.schema import ExperimentConfig, PreprocConfig

BEGIN_MARK = "<!-- BEGIN generated config keys: python -m fedrec.config.keys --write configs/flags.md -->"
END_MARK = "<!-- END generated config keys -->"

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:\s*[^=#]+?(?:=.*?)?(?:#\s*(?P<comment>.*))?$")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One documented config key."""

    key: str
    type: str
    default: str
    meaning: str


def _type_text(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_text(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list[{_type_text(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _value_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _field_comments(cls: type) -> dict[str, str]:
    """``name -> comment`` from the class source: the comment on the field's line (or the lines of
    its default, for a default wrapped over several lines)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    current = None
    above: list[str] = []  # comment lines right above a field
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith(("def ", "@")):
            current = None
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = _FIELD_LINE.match(line)
        if match and match.group(1) in names and line.startswith("    ") and not line.startswith("     "):
            current = match.group(1)
            if match.group("comment"):
                comments[current] = match.group("comment").strip()
            elif above:
                comments[current] = " ".join(above)
            above = []
            continue
        above = []
        if current and current not in comments and "#" in line:
            comments[current] = line.split("#", 1)[1].strip()
    return comments


def _optional_dataclass(tp: Any) -> Any:
    """The dataclass inside ``X | None`` (or ``X`` itself), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def _walk(cls: Any, prefix: str) -> Iterator[KeyDoc]:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        tp = hints[field.name]
        meaning = comments.get(field.name, "")
        nested = _optional_dataclass(tp)
        list_args = get_args(tp) if get_origin(tp) is list else ()
        if nested is not None:
            optional = nested is not tp
            yield KeyDoc(
                key, "mapping \\| null" if optional else "mapping", "null" if optional else "", meaning
            )
            yield from _walk(nested, f"{key}.")
        elif list_args and dataclasses.is_dataclass(list_args[0]):
            yield KeyDoc(key, "list[mapping]", "[]", meaning)
            yield from _walk(list_args[0], f"{key}[].")
        else:
            if field.default is not dataclasses.MISSING:
                default = _value_text(field.default)
            elif field.default_factory is not dataclasses.MISSING:
                default = _value_text(field.default_factory())
            else:
                default = "required"
            yield KeyDoc(key, _type_text(tp), default, meaning)


def config_keys() -> dict[str, list[KeyDoc]]:
    """Section title -> its keys, for the top level, every registered model and every section."""
    sections: dict[str, list[KeyDoc]] = {}
    top = [d for d in _walk(ExperimentConfig, "") if d.key != "model"]
    sections["top level and sections"] = [d for d in top if "." not in d.key]
    sections["model"] = [
        KeyDoc("model.name", "str", "required", "registered model: " + ", ".join(registry.names("model")))
    ]
    for name in registry.names("model"):
        sections[f"model keys of `{name}`"] = list(_walk(registry.lookup("model", name).Config, "model."))
    sections["model.preproc"] = list(_walk(PreprocConfig, "model.preproc."))
    for section in ("train", "fl", "communications", "privacy", "syft"):
        sections[section] = [d for d in top if d.key.startswith(f"{section}.")]
    return sections


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def keys_markdown() -> str:
    """The key tables as Markdown (configs/flags.md's generated section, and ``--help``'s epilog)."""
    out = []
    for title, docs in config_keys().items():
        out += [f"### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{d.key}` | {d.type} | {d.default} | {_escape(d.meaning)} |" for d in docs]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def replace_generated(text: str, generated: str) -> str:
    """``text`` with the part between the markers replaced by ``generated``."""
    if BEGIN_MARK not in text or END_MARK not in text:
        raise ValueError(f"markers not found (expected {BEGIN_MARK!r} ... {END_MARK!r})")
    head, rest = text.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    return f"{head}{BEGIN_MARK}\n\n{generated}\n{END_MARK}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FLAGS_MD", help="rewrite the generated section of this file")
    args = parser.parse_args(argv)
    generated = keys_markdown()
    if args.write:
        try:
            with open(args.write, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as err:
            print(f"error: --write {args.write}: {err.strerror}", file=sys.stderr)
            return 2
        tmp = f"{args.write}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(replace_generated(text, generated))
        os.replace(tmp, args.write)
    else:
        sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validating a raw config: a dict (from a preset, config.yaml or `--set`) to a `Config`, or a `ConfigError` with
one line per problem, each naming its source (the file, or the `--set` that caused it) and the field path as users
write it (`assigner.k`, not pydantic's `assigner.knn.k`), with the accepted fields or choices where that helps.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .methods import ASSIGNER_NAMES, ASSIGNER_SECTIONS, OBJECTIVE_SECTIONS
from .schema import Config
from .sections import DataConfig, EvalConfig, ModelConfig, SampleConfig, TrainConfig


class ConfigError(UserError):
    """A config problem, with a one-line message naming the file (or `--set`) and the field path."""


_UNION_MEMBERS: dict[str, type[BaseModel]] = {**OBJECTIVE_SECTIONS, **ASSIGNER_SECTIONS}
_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig,
}


def _accepted_fields(loc: tuple) -> list[str]:
    """Field names accepted where an unknown field was found (loc without its last part)."""
    parent = loc[:-1]
    if not parent:
        return list(Config.model_fields)
    if len(parent) >= 2 and parent[1] in _UNION_MEMBERS:
        return list(_UNION_MEMBERS[parent[1]].model_fields)
    section = _SECTIONS.get(parent[0])
    return list(section.model_fields) if section and len(parent) == 1 else []


def _field_path(loc: tuple) -> str:
    """pydantic's location as users write it: discriminated unions add the tag (assigner.knn.k), drop it."""
    parts = [str(p) for i, p in enumerate(loc)
             if not (i == 1 and loc[0] in ("objective", "assigner") and p in _UNION_MEMBERS)]
    return ".".join(parts)


def _format_error(err: dict[str, Any]) -> tuple[str, str]:
    """(field path, message) for one pydantic error."""
    loc = tuple(err["loc"])
    path, kind, msg = _field_path(loc), err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        accepted = _accepted_fields(loc)
        hint = f" (accepted here: {', '.join(accepted)})" if accepted else ""
        return path, f"unknown field '{path}'{hint}"
    if kind == "union_tag_invalid":
        tag = "kind" if path == "objective" else "name"
        choices = ", ".join(OBJECTIVE_SECTIONS if tag == "kind" else ASSIGNER_NAMES)
        return f"{path}.{tag}", f"{path}.{tag}: unknown choice {err['ctx']['tag']!r} (accepted: {choices})"
    if kind == "union_tag_not_found":
        tag = "kind" if path == "objective" else "name"
        return f"{path}.{tag}", f"{path}: missing '{tag}' field, which picks the variant"
    if kind == "finite_number":
        return path, (f"{path}: expected a finite number, got {err.get('input')!r} (YAML reads .inf, .nan and "
                      f"numbers beyond 1.8e308 such as 1e400 as non-finite); give a plain number")
    if not path:  # a cross-field rule of Config: its message starts with the field path already
        return msg.split(":", 1)[0], msg
    shown = err.get("input")
    got = "" if isinstance(shown, (dict, list)) or shown is None else f", got {shown!r}"
    return path, f"{path}: {msg}{got}"


def validate(raw: dict[str, Any], source: str | Callable[[str], str]) -> Config:
    """Validate a raw dict; on failure raise ConfigError, one line per problem, each naming its source."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path, message = _format_error(err)
            origin = source(path) if callable(source) else source
            lines.append(f"{origin}: {message}")
        raise ConfigError("\n".join(lines)) from None

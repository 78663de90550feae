"""Loading a config: preset lookup, YAML reading, `--set section.field=value` overrides; validation.py turns the
result into a `Config` or a `ConfigError` naming the file (or `--set`) and the field path. `load_config` is the one
entry point: preset name or path, plus overrides, to a validated `Config` or a `ConfigError`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import yaml

from .methods import ASSIGNER_SECTIONS, OBJECTIVE_SECTIONS, SAMPLERS
from .schema import DEFAULT_PRESET, Config
from .validation import ConfigError, validate


# Fields `immiscible train --resume RUN --set ...` may change: none of them alters the training math, so a run
# extended this way is the same run as one configured with the new values from the start.
RESUMABLE_OVERRIDES = ("train.total_kimg", "train.tick_kimg", "train.snapshot_kimg", "train.keep_last",
                       "train.keep_every_kimg", "train.keep_network", "train.batch_gpu", "train.loggers", "sample.",
                       "eval.", "data.vae")  # data.vae: another folder holding the same VAE (checked by sha256)
# Fields `immiscible sample` and `immiscible eval` may change with `--set` when they use a trained run: how images
# are drawn and scored, never what was trained. An FID row records every one of them that changes the images.
SAMPLING_OVERRIDES = ("sample.", "eval.")


def is_listed(field: str, allowed: tuple[str, ...]) -> bool:
    """Whether `section.field` is in `allowed`: named, or under a section prefix ending in '.'."""
    return any(field == a or (a.endswith(".") and field.startswith(a)) for a in allowed)


def resumable(field: str) -> bool:
    """Whether `section.field` is one of RESUMABLE_OVERRIDES (a field a started run may change)."""
    return is_listed(field, RESUMABLE_OVERRIDES)


def changed_fields(old: Config, new: Config) -> list[str]:
    """The `section.field` paths whose values differ between two configs."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    a, b = flat(old.to_dict()), flat(new.to_dict())
    return sorted(key.rstrip(".") for key in a.keys() | b.keys() if a.get(key) != b.get(key))


def preset_dir() -> Path:
    """The shipped presets: immiscible_cli/presets in an installed wheel, the top-level presets/ in a checkout."""
    package = Path(str(importlib.resources.files("immiscible_cli")))
    installed = package / "presets"
    return installed if installed.is_dir() else package.parent / "presets"


def list_presets() -> dict[str, str]:
    """name -> one-line description (the first header-comment line) of every shipped preset."""
    out = {}
    for path in sorted(preset_dir().glob("*.yaml"), key=lambda p: p.stem):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "# ")
        out[path.stem] = first.lstrip("#").strip()
    return out


def resolve_preset(preset: str | None) -> Path:
    """A preset name (shipped) or a path to a YAML file."""
    name = preset or DEFAULT_PRESET
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") or "/" in name or candidate.is_file():
        if not candidate.is_file():
            raise ConfigError(f"{name}: no such preset file; give a YAML file or one of the names from "
                              f"`immiscible presets`")
        return candidate
    shipped = preset_dir() / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"preset '{name}': unknown preset (accepted: {', '.join(list_presets())}, "
                          f"or a path to a .yaml file)")
    return shipped


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the last one silently)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:  # the keys written here (a key merged in with << may be overridden)
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"found the key {key!r} twice; keep one",
                                                    key_node.start_mark)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing duplicate keys (a yaml.YAMLError). Nesting past Python's recursion limit raises
    RecursionError: callers name their file (`read_yaml`) or option."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = load_yaml(path.read_text())
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep to read; give a YAML file of sections and fields") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); give a YAML file") from None
    except yaml.reader.ReaderError as e:  # valid UTF-8 with control characters (a NUL byte, say)
        raise ConfigError(f"{path}: not a text file (character {e.position + 1} is a control character YAML "
                          f"does not allow); give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping of sections (data, model, ...), "
                          f"got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `section.field=value` (value parsed as YAML) to a raw config dict, in place."""
    if "=" not in override:
        raise ConfigError(f"--set {override}: expected section.field=value, e.g. train.lr=1e-4")
    path, text = override.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {override}: bad field path '{path}', expected section.field=value")
    try:
        value = load_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise ConfigError(f"--set {path}=...: the value is nested too deep; give a number, word or short "
                          f"list") from None
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override}: '{'.'.join(keys[:i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset (name or path; default quickstart) + `--set` overrides -> validated Config."""
    path = resolve_preset(preset)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    source = f"preset {path.stem} ({path})" if path.parent == preset_dir() else str(path)
    config = validate(raw, source)  # a broken file is reported as the file's problem, before any --set
    return with_overrides(config, overrides) if overrides else config


_VARIANTS = {"objective": ("kind", OBJECTIVE_SECTIONS), "assigner": ("name", ASSIGNER_SECTIONS)}


def _drop_fields_of_the_old_variant(base: dict[str, Any], raw: dict[str, Any], overrides) -> None:
    """`--set objective.kind=ddpm` on a flow preset, or `assigner.name=linear` on a knn one: the section's fields
    that only the old variant has (from the preset or its defaults, not from this --set) are dropped, so the new
    variant starts from its own defaults instead of refusing a field the user never set."""
    given = {item.split("=", 1)[0].strip() for item in overrides}
    for section, (tag, variants) in _VARIANTS.items():
        old, new = (base.get(section) or {}).get(tag), raw.get(section)
        if not isinstance(new, dict) or new.get(tag) == old or new.get(tag) not in variants:
            continue
        accepted = variants[new[tag]].model_fields
        for key in [k for k in new if k not in accepted and f"{section}.{k}" not in given]:
            del new[key]


def with_overrides(config: Config, overrides: list[str] | tuple[str, ...],
                   allowed: tuple[str, ...] | None = None, where: str = "in a run that has started") -> Config:
    """A copy of config with `--set section.field=value` overrides applied and validated.

    `allowed`: field paths (or section prefixes ending in '.') that may be overridden; others are refused with a
    message saying they cannot change `where`."""
    raw = config.to_dict()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if allowed is not None and not is_listed(key, allowed):
            raise ConfigError(f"--set {item}: '{key}' cannot change {where} (changeable: "
                              f"{', '.join(a + '*' if a.endswith('.') else a for a in allowed)})")
        apply_override(raw, item)
    _drop_fields_of_the_old_variant(config.to_dict(), raw, overrides)

    def blame(field: str) -> str:
        for item in reversed(overrides):
            key = item.split("=", 1)[0].strip()
            if field == key or field.startswith(key + ".") or key.startswith(field + "."):
                return f"--set {item}"
        return f"--set {' '.join(overrides)}"

    return validate(raw, blame)


def check_sampler(kind: str, sampler: str, option: str = "--sampler") -> None:
    """ConfigError unless `sampler` belongs to the objective `kind` (SAMPLERS)."""
    if sampler not in SAMPLERS[kind]:
        raise ConfigError(f"{option} {sampler}: this run trains a {kind} objective "
                          f"(accepted: {', '.join(SAMPLERS[kind])})")


def check_steps(cfg: Config, steps: int, option: str = "--steps") -> None:
    """ConfigError unless a sampler of this run can take `steps` steps (ddpm: at most objective.timesteps)."""
    if cfg.objective.kind == "ddpm" and steps > cfg.objective.timesteps:
        raise ConfigError(f"{option} {steps}: this run has objective.timesteps {cfg.objective.timesteps}; use at "
                          f"most that many steps")


def load_run_config(path: Path) -> Config:
    """The resolved config.yaml of a run directory; an empty one is an error, not the default config (a run's
    config is always written whole)."""
    raw = read_yaml(path)
    if not raw:
        raise ConfigError(f"{path}: empty; a run's config.yaml holds its resolved config: restore it (the snapshots "
                          f"hold a copy)")
    return validate(raw, str(path))

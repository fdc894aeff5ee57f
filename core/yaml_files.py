"""Config files as layered YAML: defaults <- a YAML file <- overrides, for the model configs and the pipeline
settings alike. Reading refuses what a config file never needs (anchors and aliases) and turns every failure
into one line naming the file; merging refuses keys the defaults do not have.
"""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any

import yaml

from core.errors import UserError, first_line


def merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge `update` over a copy of `base`, refusing keys `base` does not have. A section left empty
    (`model:` with every key commented out) keeps its defaults."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            known = ", ".join(sorted(base))
            raise UserError(f"unknown config key '{path}' (known here: {known})")
        if isinstance(base[key], dict):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"'{path}' must be a mapping of settings ({', '.join(base[key])}), "
                                f"got {reprlib.repr(value)}")
            out[key] = merge(base[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _AliasFound(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark):
        super().__init__()
        self.mark = mark


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases as it meets them, before composing anything: a few
    hundred bytes of nested aliases ("billion laughs") stand for billions of values, which whatever walks
    the result (a deep copy, a JSON dump) expands; a config file has no need for them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if getattr(event, "anchor", None) is not None:  # an anchor (&name) or an alias (*name)
            raise _AliasFound(event.start_mark)
        return super().compose_node(parent, index)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except _AliasFound as exc:
        raise UserError(f"{path}: line {exc.mark.line + 1}: YAML anchors and aliases (&name, *name, <<: *name) "
                        "are not accepted in config files; write the values out") from None
    except RecursionError:
        raise UserError(f"{path}: not valid YAML (nested too deeply)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def layered(defaults: dict[str, Any], path: str | Path | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """defaults <- YAML file <- overrides; an unknown key in the file is reported with the file's name."""
    config = defaults
    if path is not None:
        data = read_yaml(path)
        try:
            config = merge(config, data)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    return merge(config, overrides or {})

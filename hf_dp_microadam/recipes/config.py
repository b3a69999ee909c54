"""Recipe configuration: a YAML file of flat keys, any of which the command line can override.

    python recipes/text_classification.py configs/text_classification/cpu.yaml --target_epsilon 3

The YAML keys and the command-line options are the fields of the recipe's argument
dataclasses, parsed by `transformers.HfArgumentParser`. The YAML values become the
parser's defaults, so an option given on the command line wins. Booleans are written
`--key true` / `--key false` (a bare `--key` means true), lists as `--key a b c`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser

USAGE = "{script} CONFIG.yaml [--option value ...]"


def usage() -> str:
    """Return the usage line with the name of the running script."""
    return USAGE.format(script=Path(sys.argv[0]).name or "RECIPE.py")


class ConfigError(ValueError):
    """A recipe configuration that cannot be used: missing file, bad YAML, unknown key or bad value."""


class _RecipeArgumentParser(HfArgumentParser):
    """HfArgumentParser that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str):
        raise ConfigError(message)


def load_yaml_config(path: str | Path) -> dict:
    """Read a flat mapping of option names to values from a YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in {path}: {error}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must contain a mapping of option names to values, got {type(config).__name__}")
    return config


def suggest_option(name: str, known: Iterable[str]) -> str:
    """Return " (did you mean 'a' or 'b'?)" with up to three close option names, or ''."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    if not close:
        return ""
    return f" (did you mean {' or '.join(repr(option) for option in close)}?)"


def build_parser(dataclass_types: Sequence[type]) -> HfArgumentParser:
    """Return the argument parser of `dataclass_types`, with prefix abbreviations turned off.

    Abbreviations are off so that a misspelled option is reported instead of silently
    matching a longer one.
    """
    return _RecipeArgumentParser(dataclass_types, allow_abbrev=False, usage=usage())


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


def _normalize_yaml_values(parser: argparse.ArgumentParser, config: dict) -> dict:
    """Wrap a scalar YAML value of a list option into a one-element list.

    argparse converts a string default with the option's type, so `key: value` for a list
    option would otherwise reach the dataclass as a bare string.
    """
    list_options = {action.dest for action in parser._actions if action.nargs in ("+", "*")}
    return {
        key: [value] if key in list_options and value is not None and not isinstance(value, list) else value
        for key, value in config.items()
    }


def _check_yaml_values(parser: argparse.ArgumentParser, config: dict, config_path: str) -> None:
    """Raise ConfigError for a YAML string that the option's type cannot convert.

    argparse converts string defaults only when it parses, and would report a bad one as
    if it came from the command line.
    """
    for action in parser._actions:
        if action.dest not in config or not callable(action.type):
            continue
        values = config[action.dest] if isinstance(config[action.dest], list) else [config[action.dest]]
        for value in values:
            if not isinstance(value, str):
                continue
            try:
                action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise ConfigError(
                    f"invalid value for {action.dest!r} in {config_path}: {value!r} is not {_expected(action)}"
                ) from None


def _expected(action: argparse.Action) -> str:
    """Describe the values an option accepts, for an error message."""
    if action.choices:
        return "one of " + ", ".join(str(choice) for choice in action.choices)
    names = {int: "an integer", float: "a number", "string_to_bool": "a boolean (true or false)"}
    return names.get(action.type, names.get(getattr(action.type, "__name__", None), "a valid value"))


def parse_recipe_args(dataclass_types: Sequence[type], argv: list[str] | None = None) -> tuple:
    """Parse `CONFIG.yaml [--key value ...]` into one instance per dataclass in `dataclass_types`.

    `argv` defaults to `sys.argv[1:]`. `-h` / `--help` as the only argument prints every
    option and exits. Raises `ConfigError` for a missing config argument or file, invalid
    YAML, an unknown key in the file or on the command line (with the closest known
    name), and a value that the option's type or the dataclass rejects.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(dataclass_types)
    if argv and argv[0] in ("-h", "--help"):
        parser.print_help()
        sys.exit(0)
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"usage: {usage()}: the first argument must be a YAML config file")
    config_path, overrides = argv[0], argv[1:]
    config = load_yaml_config(config_path)

    known = _option_names(parser)
    unknown = sorted(set(config) - known, key=str)
    if unknown:
        listed = ", ".join(f"{key!r}{suggest_option(str(key), known)}" for key in unknown)
        raise ConfigError(f"unknown keys in {config_path}: {listed}")

    config = _normalize_yaml_values(parser, config)
    _check_yaml_values(parser, config, config_path)
    parser.set_defaults(**config)
    for action in parser._actions:
        if action.dest in config:
            # A value from the YAML file satisfies a required option.
            action.required = False

    namespace, remaining = parser.parse_known_args(args=overrides)
    if remaining:
        problems = []
        after_unknown_option = False
        for token in remaining:
            if token.startswith("--"):
                name = token[2:].split("=", 1)[0]
                problems.append(f"{token!r}{suggest_option(name, known)}")
                after_unknown_option = "=" not in token
            elif not after_unknown_option:
                # The value of an unknown option is not listed again.
                problems.append(f"{token!r} (a value that no option takes)")
        raise ConfigError(f"unknown command-line arguments: {', '.join(problems)}")

    instances = []
    values = vars(namespace)
    for dataclass_type in parser.dataclass_types:
        names = {field.name for field in dataclasses.fields(dataclass_type) if field.init}
        try:
            instances.append(dataclass_type(**{name: values[name] for name in names if name in values}))
        except (TypeError, ValueError) as error:
            command_line_options = [token.split("=", 1)[0] for token in overrides if token.startswith("--")]
            if command_line_options:
                source = f"{config_path}, with {' '.join(command_line_options)} on the command line"
            else:
                source = config_path
            raise ConfigError(f"{error} (from {source})") from error
    return tuple(instances)

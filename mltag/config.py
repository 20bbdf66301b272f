"""Typed job configs resolved in layers: dataclass defaults, then a YAML file, then CLI flags.

Every stage (train, tag, index, ...) has one flat dataclass. The same dataclass drives the YAML
keys and the command-line flags (``epochs`` <-> ``--epochs``), so the two can never drift.
Unknown keys are errors and values keep their declared types.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Demo:
    ...     epochs: int = 3  # passes over the data
    >>> parse_config(Demo, ["--epochs", "5"]).epochs
    5
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type, missing required value."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Returns (type, optional) for ``X`` or ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Converts ``value`` (from YAML or a CLI string) to the field type ``tp`` or raises ConfigError."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null", ""}):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name}: expected an integer, got {value!r}")
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ConfigError(f"{name}: expected a number, got {value!r}")
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{name}: expected a string, got {value!r}")
            return str(value)
        if typing.get_origin(base) is list:
            (item_tp,) = typing.get_args(base)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [coerce(name, v, item_tp) for v in items if v != ""]
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(base, '__name__', base)}") from exc
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_from_dict(cls: type[C], values: dict[str, Any], base: C | None = None) -> C:
    """Builds ``cls`` from ``values`` over ``base`` (or the defaults); unknown keys are errors.
    A ``preset`` among the values (for a class with ``PRESETS``) sets its fields first, under the
    other values."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(types_))}")
    current = dataclasses.asdict(base) if base is not None else {}
    preset = values.get("preset") if "preset" in types_ else None
    if preset:  # defaults -> the preset -> the YAML file and flags (``values``)
        presets = getattr(cls, "PRESETS", {})
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} for {cls.__name__}; choose one of: {', '.join(presets)}")
        current.update({k: coerce(k, v, types_[k]) for k, v in presets[preset].items()})
    current.update({k: coerce(k, v, types_[k]) for k, v in values.items()})
    try:
        config = cls(**current)
    except TypeError as exc:  # a required field with no default was not given
        raise ConfigError(f"{cls.__name__}: {exc}") from exc
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's values, local or a URI. A provenance file (JSON is YAML) gives the config it
    records, so ``--config runs/eval/provenance.json`` repeats that run."""
    path = str(path)
    if "://" in path:
        from mltag.data import storage  # fsspec and pyarrow: only when a config lives remotely

        text = storage.read_bytes(path).decode()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of key: value")
    if isinstance(data.get("config"), dict) and "config_hash" in data:
        return data["config"]
    return data


def _field_help(cls: type) -> dict[str, str]:
    """The comment after each field in the dataclass source is its --help text (nanoGPT style)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    helps = {}
    for line in source.splitlines():
        stripped = line.strip()
        if ":" in stripped and "#" in stripped and not stripped.startswith(("#", "def", "class", '"')):
            name = stripped.split(":", 1)[0].strip()
            helps[name] = stripped.split("#", 1)[1].strip()
    return helps


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds ``--config FILE`` and one ``--field-name VALUE`` flag per dataclass field."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of config values (flags override it)")
    helps = _field_help(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=f"{helps.get(f.name, '')} (default: {default!r})",
        )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Resolves defaults -> ``args.config`` YAML -> explicit flags into a ``cls``."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_yaml(args.config))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_dict(cls, values)


def parse_config(cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None) -> C:
    """Parses a whole command line (``--config`` plus field flags) into ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    add_config_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(config: Any) -> str:
    """A short stable hash of the resolved config, recorded with every output."""
    blob = json.dumps(config_dict(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_config(config: Any, path: str | Path) -> None:
    """Saves the resolved config as YAML beside a stage's outputs, local or a URI (it loads back
    with --config)."""
    from mltag.data import storage  # fsspec and pyarrow: kept out of `mltag --help`

    storage.write_bytes_atomic(str(path), yaml.safe_dump(config_dict(config), sort_keys=False).encode())


PROVENANCE_FILE = "provenance.json"  # in an output directory; a file output gets <stem>.provenance.json beside it


def provenance(
    config: Any,
    *,
    model_version: str | None,
    tag_table: str | None = None,
    table_version: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an output records about how it was made: the resolved config and its hash, the model
    version whose scores or embeddings it holds, the tag table version it read (where it read one)
    and any other input it depends on (``inputs``, e.g. the index version). JSON-serialisable.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class Demo:
        ...     k: int = 5
        >>> record = provenance(Demo(), model_version="m1", table_version=3)
        >>> record["config"], record["model_version"], record["table_version"], len(record["config_hash"])
        ({'k': 5}, 'm1', 3, 12)
    """
    import datetime

    from mltag import __version__

    cls = type(config)
    return {
        "config_class": f"{cls.__module__}.{cls.__qualname__}",
        "config_hash": config_hash(config),
        "model_version": model_version,
        "tag_table": tag_table,
        "table_version": table_version,
        **(inputs or {}),
        "mltag_version": __version__,
        "written_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": json.loads(json.dumps(config_dict(config), default=str)),
    }


def provenance_beside(output: str) -> str:
    """Where the provenance of a single-file output goes: ``runs/anomalies.parquet`` ->
    ``runs/anomalies.provenance.json`` (a directory output holds ``PROVENANCE_FILE`` instead)."""
    head, _, name = output.rstrip("/").rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{head}/{stem}.provenance.json" if head else f"{stem}.provenance.json"


def save_provenance(uri: str, config: Any, **record: Any) -> str:
    """Writes ``provenance(config, **record)`` as JSON at ``uri`` (local or s3://, replaced whole);
    returns ``uri``. A stage calls it beside its outputs, once they are written.

    Example:
        >>> save_provenance("runs/eval/provenance.json", config, model_version=spec.version)  # doctest: +SKIP
    """
    from mltag.data import storage  # fsspec and pyarrow: kept out of `mltag --help`

    storage.write_bytes_atomic(uri, (json.dumps(provenance(config, **record), indent=2, default=str) + "\n").encode())
    return uri

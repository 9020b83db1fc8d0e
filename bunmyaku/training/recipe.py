"""Recipes: YAML files and CLI flags generated from the argument dataclasses, so neither repeats the fields.

A recipe is a flat YAML mapping whose keys are the fields of the dataclasses a verb takes (``TrainArgs`` and
the verb's own, e.g. ``PretrainArgs``). Flags are the same names with dashes (``--max-steps``); a flag given
on the command line overrides the recipe, which overrides the defaults.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bunmyaku.training.args import field_docs


@functools.cache
def _yaml_loader():
    """PyYAML's safe loader with YAML 1.2's floats. PyYAML follows YAML 1.1, where a float needs a dot: it reads
    ``1e-7`` and ``1e-07`` as strings, and so would turn every ``layer_norm_eps: 1e-07`` of a Hugging Face
    ``config.json`` (and ``lr: 1e-4`` in a recipe) into text. Here they are floats, as in JSON."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    number = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", number, list("-+0123456789."))
    return Loader


def load_yaml(stream) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats (:func:`_yaml_loader`): ``1e-7`` is a float."""
    import yaml

    return yaml.load(stream, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass: builds no objects)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) recipe: a flat mapping of field names to values."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        with path.open(encoding="utf-8") as f:  # from a file, YAML's messages name it with line and column
            data = load_yaml(f) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path}: invalid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def import_object(path: str, option: str) -> Any:
    """The object an import path ``package.module:name`` names (recipes name callbacks and functions this way).

    Raises:
        ValueError: a path without ``:``, a module that does not import, or a missing name; naming ``option``.
    """
    module_name, sep, name = str(path).partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{option}: {path!r} is not an import path of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{option}: cannot import {module_name!r} for {path!r} ({error})") from None
    found = module
    for part in name.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{option}: {module_name!r} has no {name!r}")
        found = getattr(found, part)
    return found


def build_args(classes: tuple[type, ...], values: dict[str, Any]) -> tuple[Any, ...]:
    """Instantiate each dataclass from the shared flat ``values``; unknown keys are an error naming them."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted(known)}")
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        out.append(cls(**{k: v for k, v in values.items() if k in names}))
    return tuple(out)


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """The type typer parses for a field annotation, and a note on allowed values for Literals."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _cli_type(inner[0])
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), " One of: " + ", ".join(map(str, choices)) + "."
    return annotation, ""


def typer_command(classes: tuple[type, ...], run: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
    """A function typer turns into a command with one option per dataclass field, plus ``--config`` and ``-v``.

    ``run`` receives the merged values (defaults < recipe < flags given) as a flat dict.
    """
    import typer

    parameters, annotations = [], {}
    config_option = typer.Option(None, "--config", help="A YAML recipe whose keys are these options' names.")
    parameters.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config_option))
    annotations["config"] = typing.Optional[str]  # noqa: UP045 - typer needs a typing object here
    verbose = typer.Option(False, "--verbose", "-v", help="Show debug logs.")
    parameters.append(inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=verbose))
    annotations["verbose"] = bool
    seen = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            kind, note = _cli_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            flag = "--" + f.name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
            help_text = f"{docs[f.name]}{note} [default: {default}]"
            option = typer.Option(None, *decls, help=help_text, show_default=False)
            parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option))
            annotations[f.name] = typing.Optional[kind]  # noqa: UP045

    def command(**kwargs: Any) -> None:
        config, verbose_flag = kwargs.pop("config"), kwargs.pop("verbose")
        values = load_recipe(config) if config else {}
        values.update({k: v for k, v in kwargs.items() if v is not None and v != [] and v != ()})
        run({"verbose": verbose_flag, **values})

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    return command


def keyword_signature(classes: tuple[type, ...], returns: Any) -> inspect.Signature:
    """The signature of a Python twin of a verb: one keyword-only parameter per option, its default from the
    dataclasses (the same defaults as the command's flags)."""
    parameters, seen = [], set()
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                kind = inspect.Parameter.KEYWORD_ONLY
                parameters.append(inspect.Parameter(f.name, kind, default=default, annotation=f.type))
    return inspect.Signature(parameters, return_annotation=returns)


def check_keywords(function: str, options: dict[str, Any], signature: inspect.Signature) -> None:
    """Refuse keyword arguments the verb does not have, suggesting the nearest names.

    Raises:
        TypeError: an unknown option, named with a "did you mean" hint where one is close.
    """
    import difflib

    known = set(signature.parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        hints = [m for name in unknown for m in difflib.get_close_matches(name, known, n=1)]
        raise TypeError(f"{function}() got unknown option(s) {unknown}" + (f"; did you mean {hints}?" if hints else ""))

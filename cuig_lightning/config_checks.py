"""Checks of a parsed config made before anything in it is instantiated: every ``class_path`` of
``trainer.callbacks`` / ``trainer.logger`` / ``model.method`` must name a subclass of what the key expects
(a config cannot make the CLI call an arbitrary function such as ``os.system``), and its ``init_args``
must be arguments the class accepts (a typo fails here, in one line, not after the run folder is claimed).
Callbacks are then built once (:func:`check_instances`), so that an argument a class refuses (``k: 0``) is a
one-line config error too, not an error inside Lightning.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser, Namespace


class ConfigError(ValueError):
    """A config names a class or an argument it may not use."""


def _import(class_path: str, where: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where}: cannot import {class_path!r} ({err})") from None


def accepted_arguments(cls: type) -> list[str] | None:
    """The keyword arguments ``cls(...)`` accepts (None: any, it takes ``**kwargs``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_classes(value: Any, base: type, key: str) -> None:
    """Raise :class:`ConfigError` unless every entry of ``value`` (a class_path entry or a list of them,
    as parsed) is a subclass of ``base`` given only arguments it accepts."""
    if value is None or isinstance(value, bool):
        return
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(value, list) else key
        if isinstance(item, base):  # an instance already (a default)
            continue
        if isinstance(item, str):
            class_path, init_args = item, {}
        elif isinstance(item, (Namespace, dict)):
            class_path, init_args = item.get("class_path"), item.get("init_args") or {}
            if isinstance(init_args, Namespace):
                init_args = init_args.as_dict()
        else:
            raise ConfigError(f"{where}: expected a class_path of a {base.__name__} subclass, got {item!r}")
        if not isinstance(class_path, str):
            raise ConfigError(f"{where}: missing class_path")
        cls = _import(class_path, where)
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise ConfigError(f"{where}: {class_path} is not a {base.__module__}.{base.__qualname__} subclass; "
                              "refusing to create it")
        accepted = accepted_arguments(cls)
        unknown = sorted(set(init_args) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ConfigError(f"{where} ({class_path}): unknown argument {', '.join(map(repr, unknown))}; "
                              f"accepted: {', '.join(accepted) or 'none'}")


def check_instances(value: Any, base: type, key: str) -> None:
    """Build every entry of ``value`` (checked by :func:`check_classes` first) as the CLI will, and raise
    :class:`ConfigError` naming the entry if its class refuses its arguments (e.g. a callback's own
    ``ValueError`` for ``k: 0``). Only for classes whose construction has no side effects (callbacks)."""
    if value is None or isinstance(value, bool):
        return
    items = value if isinstance(value, list) else [value]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--entry", type=base)
    for i, item in enumerate(items):
        if isinstance(item, base):
            continue
        where = f"{key}[{i}]" if isinstance(value, list) else key
        class_path = item if isinstance(item, str) else item.get("class_path")
        try:
            parser.instantiate(parser.parse_object({"entry": item.as_dict() if isinstance(item, Namespace) else item}))
        except (ValueError, TypeError, ArgumentError) as err:
            reason = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
            raise ConfigError(f"{where} ({class_path}): {reason}") from None

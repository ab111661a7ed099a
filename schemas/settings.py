"""One loader for every service's settings dataclass: env vars, a config mapping, flags.

Values are converted by the dataclass's type hints, in one place, with one boolean
grammar (``1/true/yes/on`` and ``0/false/no/off``, any case; anything else is an error,
never a silent ``False``). Supported hints: ``bool``, ``int``, ``float``, ``str``, ``Path``,
``Literal[...]`` (the value must be one of them), ``X | None`` (an empty string is
``None``), ``tuple[str, ...]`` (comma-separated); other hints pass the value through.
Every failure is a :class:`schemas.errors.SettingsError` whose ``code`` names the field
and whose message says what was wrong, in one line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union
from urllib.parse import urlparse

from schemas.errors import SettingsError

T = TypeVar("T")

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: object, name: str = "value") -> bool:
    """The one boolean grammar."""
    if isinstance(raw, bool):
        return raw
    low = str(raw).strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise SettingsError(name, f"not a boolean: {raw!r} (1/0, true/false, yes/no, on/off)")


def _optional(tp: Any) -> Any | None:
    """``X`` for a hint ``X | None``, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (a string from env/flags, or a config-file value) to hint ``tp``."""
    inner = _optional(tp)
    if inner is not None:
        if value is None or value == "":
            return None
        return coerce(name, inner, value)
    try:
        if tp is bool:
            return parse_bool(value, name)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if tp is str:
            return str(value)
        if tp is Path:
            return Path(value)
        if typing.get_origin(tp) is Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {', '.join(map(str, allowed))}")
            return value
        if typing.get_origin(tp) is tuple:
            if isinstance(value, str):
                return tuple(c.strip() for c in value.split(",") if c.strip())
            return tuple(str(c) for c in value)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(name, f"bad value {value!r}: {exc}") from None
    return value


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def load(
    cls: type[T],
    *,
    env: Mapping[str, str] | None = None,
    prefix: str = "",
    config: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from ``config`` < ``env[prefix + FIELD]`` < ``values`` (None ignored).

    Unknown keys in ``config`` or ``values`` are refused; a value that does not convert, or
    that the dataclass's own checks refuse, is a :class:`SettingsError`.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    merged: dict[str, Any] = dict(config or {})
    for name in fields:
        raw = (env or {}).get(prefix + name.upper())
        if raw is not None:
            merged[name] = raw
    merged.update({k: v for k, v in (values or {}).items() if v is not None})
    unknown = sorted(set(merged) - fields)
    if unknown:
        raise SettingsError("unknown", f"unknown settings {unknown}")
    types_ = hints(cls)
    kwargs = {k: coerce(k, types_[k], v) for k, v in merged.items()}
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError("settings", f"{cls.__name__}: {exc}") from None


def check(ok: bool, name: str, why: str) -> None:
    """Raise ``SettingsError(name, why)`` unless ``ok`` (for ``__post_init__`` checks)."""
    if not ok:
        raise SettingsError(name, why)


# URL schemes each server address may carry (``host:port`` alone is always fine)
SCHEMES = {"MQTT": ("mqtt", "tcp"), "Kafka": ("kafka", "tcp", "plaintext")}


def parse_address(url: str, default_port: int, what: str) -> tuple[str, int]:
    """``host:port`` or ``scheme://host:port`` -> ``(host, port)``; ``ValueError`` with a
    one-line reason otherwise. A scheme the client cannot speak is refused (``mqtts://``:
    TLS is not supported yet, and silently connecting in plain TCP would be worse)."""
    u = urlparse(url if "://" in url else f"x://{url}")
    allowed = SCHEMES.get(what)
    if "://" in url and allowed is not None and u.scheme.lower() not in allowed:
        hint = " (TLS is not supported yet)" if u.scheme.lower().endswith("s") else ""
        raise ValueError(
            f"{what}: scheme {u.scheme!r} in {url!r} is not one of {', '.join(allowed)}{hint}"
        )
    if not u.hostname:
        raise ValueError(f"{what}: cannot parse address {url!r} (expected host:port)")
    try:
        port = u.port or default_port
    except ValueError:
        raise ValueError(f"{what}: bad port in {url!r}") from None
    return u.hostname, port


def parse_mqtt_url(url: str, default_port: int = 1883) -> tuple[str, int, bool]:
    """``host:port``, ``mqtt://host:port`` or ``mqtts://host:port`` (TLS; default port
    8883) -> ``(host, port, tls)``; ``ValueError`` with a one-line reason otherwise. The
    caller that gets ``tls=True`` must connect with TLS or refuse: never plain TCP."""
    tls = url.lower().startswith(("mqtts://", "ssl://"))
    if tls:
        host, port = parse_address("mqtt://" + url.split("://", 1)[1], 8883, "MQTT")
        return host, port, True
    host, port = parse_address(url, default_port, "MQTT")
    return host, port, False

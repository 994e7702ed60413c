"""Serverless platforms as data: the built-in specs, spec files (JSON/YAML) and overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from funcpipe.errors import ConfigError
from funcpipe.platforms import alibaba_fc, aws_lambda, local
from funcpipe.platforms.base import Platform, Tier

__all__ = ["Platform", "Tier", "dump", "get", "load", "names", "resolve"]

_BUILTINS: dict[str, Platform] = {p.name: p for p in (aws_lambda.PLATFORM, alibaba_fc.PLATFORM, local.PLATFORM)}
_SPEC_SUFFIXES = (".json", ".yaml", ".yml")
_PLATFORM_FIELDS = tuple(f.name for f in dataclasses.fields(Platform))
_TIER_FIELDS = tuple(f.name for f in dataclasses.fields(Tier))
#: The tier fields without a default: a spec's tier must give them or take them from its base.
_TIER_REQUIRED = tuple(f.name for f in dataclasses.fields(Tier) if f.default is dataclasses.MISSING)
#: Platform-level keys that set the bandwidth of every tier.
_LINK_KEYS = ("uplink_mb_s", "downlink_mb_s")
_OVERRIDE_KEYS = (*_PLATFORM_FIELDS, *_LINK_KEYS)
_FILE_KEYS = ("base", *_OVERRIDE_KEYS)


def names() -> list[str]:
    """The names of the built-in platforms, sorted."""
    return sorted(_BUILTINS)


def get(name: str, **overrides: Any) -> Platform:
    """A built-in platform (or a spec file's, if ``name`` ends in .json/.yaml/.yml) with ``overrides``.

    ``overrides`` are ``Platform`` fields, plus ``uplink_mb_s`` / ``downlink_mb_s``
    for the bandwidth of every tier. ``tiers`` may list ``Tier`` objects or
    mappings with ``memory_mb`` whose missing fields come from the tier of that
    memory; the list replaces the platform's tiers. ``ConfigError`` on an unknown
    name, an unknown key or an invalid value.
    """
    if not isinstance(name, str):
        raise ConfigError(
            f"platform name must be a string, got {name!r}; hint: one of {names()} or a path to a .json/.yaml spec"
        )
    platform = load(name) if name.lower().endswith(_SPEC_SUFFIXES) else _builtin(name)
    if not overrides:
        return platform
    return _override(platform, overrides, f"get({name!r})")


def load(path: str | os.PathLike[str]) -> Platform:
    """The platform a JSON or YAML spec file describes.

    The file holds either every ``Platform`` field (``tiers`` as a list of
    mappings of ``Tier`` fields), or ``base: <built-in name>`` and the fields to
    change, as :func:`get` takes them. Platform-level ``uplink_mb_s`` /
    ``downlink_mb_s`` set the bandwidth of every tier. With ``base`` the name
    stays the base's unless the file gives ``name``.
    """
    where = os.fspath(path)
    suffix = Path(where).suffix.lower()
    if suffix not in _SPEC_SUFFIXES:
        raise ConfigError(f"platform spec {where!r} is not a .json, .yaml or .yml file; hint: rename it")
    try:
        text = Path(where).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read platform spec {where!r}: {exc.strerror or exc}; hint: check the path; built-in platforms "
            f"are {names()}"
        ) from exc
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise ConfigError(f"platform spec {where!r} is not valid {kind}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"platform spec {where!r} must hold a mapping of fields, got {type(data).__name__}; "
            "hint: e.g. `base: aws_lambda` and `latency_s: 0.02`"
        )
    _check_keys(where, data, _FILE_KEYS)
    if "base" in data:
        base_name = data["base"]
        if not isinstance(base_name, str) or base_name not in _BUILTINS:
            raise ConfigError(
                f"{where}: base must name a built-in platform, got {base_name!r}; known: {names()}"
            )
        return _override(_BUILTINS[base_name], {k: v for k, v in data.items() if k != "base"}, where)
    missing = [f for f in _PLATFORM_FIELDS if f not in data]
    if missing:
        raise ConfigError(
            f"{where}: a spec without `base` needs every field, missing {missing}; "
            f"hint: give them, or start from a built-in platform with `base: <name>` (one of {names()})"
        )
    link = {k: data[k] for k in _LINK_KEYS if k in data}
    fields = {f: data[f] for f in _PLATFORM_FIELDS}
    fields["tiers"] = _tiers(data["tiers"], None, link, where)
    return _build(fields, where)


def resolve(platform: Platform | str) -> Platform:
    """``platform`` itself if it is a :class:`Platform`, else ``get(platform)``."""
    if isinstance(platform, Platform):
        return platform
    if isinstance(platform, str):
        return get(platform)
    raise ConfigError(
        f"platform must be a Platform or a name, got {platform!r}; "
        f"hint: one of {names()} or a path to a .json/.yaml spec"
    )


def dump(platform: Platform | str) -> dict[str, Any]:
    """``platform`` as a JSON-able mapping; written to a .json/.yaml file, :func:`load` reads it back."""
    spec = resolve(platform)
    out: dict[str, Any] = {}
    for field in _PLATFORM_FIELDS:
        value = getattr(spec, field)
        out[field] = [dataclasses.asdict(t) for t in value] if field == "tiers" else value
    return out


def _builtin(name: str) -> Platform:
    try:
        return _BUILTINS[name]
    except KeyError:
        raise ConfigError(
            f"unknown platform {name!r}; known platforms: {names()}; hint: one of those, "
            "or a path to a .json/.yaml spec"
        ) from None


def _check_keys(where: str, data: Mapping[Any, Any], known: Sequence[str]) -> None:
    unknown = sorted(repr(k) if not isinstance(k, str) else k for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")


def _override(base: Platform, overrides: Mapping[str, Any], where: str) -> Platform:
    """``base`` with ``overrides`` (``Platform`` fields and platform-level links) applied."""
    _check_keys(where, overrides, _OVERRIDE_KEYS)
    link = {k: overrides[k] for k in _LINK_KEYS if k in overrides}
    fields = {f: overrides.get(f, getattr(base, f)) for f in _PLATFORM_FIELDS}
    if "tiers" in overrides:
        fields["tiers"] = _tiers(overrides["tiers"], base, link, where)
    elif link:
        try:
            fields["tiers"] = tuple(dataclasses.replace(t, **link) for t in base.tiers)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return _build(fields, where)


def _tiers(raw: Any, base: Platform | None, link: Mapping[str, Any], where: str) -> tuple[Tier, ...]:
    """Tiers from ``Tier`` objects or mappings; a mapping's missing fields come from ``base``'s tier of its memory."""
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence) or not raw:
        raise ConfigError(
            f"{where}: tiers must be a non-empty list, got {raw!r}; hint: e.g. [{{memory_mb: 2048, speed: 1.2}}]"
        )
    tiers = []
    for i, item in enumerate(raw):
        if isinstance(item, Tier):
            tiers.append(dataclasses.replace(item, **link) if link else item)
            continue
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: tiers[{i}] must be a mapping with memory_mb, got {item!r}")
        _check_keys(f"{where}: tiers[{i}]", item, _TIER_FIELDS)
        if "memory_mb" not in item:
            raise ConfigError(f"{where}: tiers[{i}] has no memory_mb; hint: every tier names its size, in MB")
        memory = item["memory_mb"]
        both = [k for k in link if k in item]
        if both:
            raise ConfigError(
                f"{where}: tiers[{i}] (memory_mb={memory!r}) sets {both} and so does the platform; "
                "hint: give the bandwidth either per tier or for the platform, not both"
            )
        fields = {**item, **link}
        if "speed" in item and "speed_half_batch" not in item:
            fields["speed_half_batch"] = 0.0  # a speed the user gives is theirs at every micro-batch size
        missing = [f for f in _TIER_REQUIRED if f not in fields]
        if missing:
            known = next((t for t in base.tiers if t.memory_mb == memory), None) if base is not None else None
            if known is None:
                source = (
                    f"{base.name} has no tier of {memory!r} MB to take them from (its tiers: "
                    f"{[t.memory_mb for t in base.tiers]} MB)"
                    if base is not None
                    else "a spec without `base` has no tier to take them from"
                )
                raise ConfigError(
                    f"{where}: tiers[{i}] (memory_mb={memory!r}) lacks {missing} and {source}; "
                    f"hint: give {missing} for this tier"
                )
            fields = {**dataclasses.asdict(known), **fields}
        try:
            tiers.append(Tier(**fields))
        except ConfigError as exc:
            raise ConfigError(f"{where}: tiers[{i}]: {exc}") from exc
    return tuple(tiers)


def _build(fields: dict[str, Any], where: str) -> Platform:
    try:
        return Platform(**fields)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc

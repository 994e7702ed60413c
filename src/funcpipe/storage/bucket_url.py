"""``<scheme>://bucket/prefix?name=value`` URLs of object stores: parsing and writing them.

The URL is what workers receive to re-open a storage, so it carries the
bucket, the key prefix and connection settings (endpoint, region, ...), and
never credentials: those come from each platform's own credential chain.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from funcpipe.errors import ConfigError
from funcpipe.storage.file import check_key

__all__ = [
    "BucketURL",
    "check_bucket",
    "compose_bucket_url",
    "int_param",
    "join_key",
    "normalize_prefix",
    "parse_bucket_url",
]

# Permissive on purpose: each service checks its own rules and answers with a
# clear error; we only refuse what could not be a bucket in any of them.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")

# Query names that would put a secret into a URL that is logged and sent to workers.
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")


@dataclass(frozen=True)
class BucketURL:
    """The parts of ``<scheme>://bucket/prefix?name=value``.

    Attributes:
        scheme: lower-case scheme, e.g. ``"s3"``.
        bucket: the bucket name.
        prefix: the key prefix inside the bucket without leading or trailing
            ``/`` (``""`` for the whole bucket).
        params: the query parameters, each given at most once.
    """

    scheme: str
    bucket: str
    prefix: str
    params: Mapping[str, str] = field(default_factory=dict)


def check_bucket(scheme: str, bucket: str) -> None:
    """Raise :class:`ConfigError` unless ``bucket`` could be a bucket name."""
    if not _BUCKET.fullmatch(bucket):
        raise ConfigError(
            f"invalid bucket name {bucket!r} for {scheme}://: use 3-255 letters, digits, '.', '_' "
            f"or '-', starting with a letter or digit (e.g. {scheme}://my-bucket/prefix)"
        )


def normalize_prefix(prefix: str) -> str:
    """``prefix`` without leading or trailing ``/``; raise :class:`ConfigError` if malformed."""
    prefix = prefix.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except ConfigError as exc:
            raise ConfigError(f"invalid key prefix {prefix!r} of a bucket storage: {exc}") from None
    return prefix


def parse_bucket_url(url: str, scheme: str, *, allowed: Collection[str]) -> BucketURL:
    """Split ``<scheme>://bucket/prefix?name=value&...``.

    Args:
        url: the URL.
        scheme: the scheme it must have (case-insensitive).
        allowed: the query parameter names the backend understands.

    Raises:
        ConfigError: wrong scheme, credentials in the URL (the message does not
            repeat them), a malformed bucket or prefix, a repeated or unknown
            parameter, or a fragment.
    """
    parts = urlsplit(url)
    if "@" in parts.netloc:
        # Never echo the URL: what precedes '@' is probably a secret.
        raise ConfigError(
            f"{scheme}:// URLs must not carry credentials (found 'user:password@' before the "
            f"bucket); write {scheme}://bucket/prefix and let the SDK's credential chain find them"
        )
    if parts.scheme.lower() != scheme:
        raise ConfigError(f"not an {scheme} URL: {url!r}; write {scheme}://bucket/prefix")
    if parts.fragment:
        raise ConfigError(f"{scheme}:// URLs take no fragment, got {url!r}")
    check_bucket(scheme, parts.netloc)
    params: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigError(f"malformed query in {url!r}: {exc}; write ?name=value&name=value") from None
    for name, value in pairs:
        if any(word in name.lower() for word in _SECRET_WORDS) and name not in allowed:
            raise ConfigError(
                f"{scheme}:// URLs must not carry credentials (parameter {name!r}); the URL is sent to "
                "every worker and may be logged. Use the SDK's environment variables or credential files"
            )
        if name not in allowed:
            raise ConfigError(
                f"unknown parameter {name!r} in {url!r}; {scheme}:// takes {', '.join(sorted(allowed))}"
            )
        if name in params:
            raise ConfigError(f"parameter {name!r} given twice in {url!r}")
        params[name] = value
    return BucketURL(scheme, parts.netloc, normalize_prefix(parts.path), params)


def compose_bucket_url(scheme: str, bucket: str, prefix: str, params: Mapping[str, str | None]) -> str:
    """Write the URL :func:`parse_bucket_url` reads back; ``None`` values are left out."""
    url = f"{scheme}://{bucket}"
    if prefix:
        url += "/" + quote(prefix, safe="/")
    present = [(name, value) for name, value in params.items() if value is not None]
    if present:
        url += "?" + urlencode(present, safe=":/")
    return url


def int_param(params: Mapping[str, str], name: str, default: int, url: str) -> int:
    """The integer query parameter ``name``, or ``default`` when absent."""
    text = params.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"parameter {name}={text!r} in {url!r} is not an integer") from None


def join_key(prefix: str, key: str) -> str:
    """The object name of ``key`` under ``prefix`` (``"p/key"``, or ``key`` without a prefix)."""
    return f"{prefix}/{key}" if prefix else key

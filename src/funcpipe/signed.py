"""Signed blobs: the one object a worker unpickles, and only with a valid HMAC.

The model definition (a stage's layers, the optimizer factory, the loss
function) is code, so it cannot travel as safetensors. It travels once per
job as a cloudpickle blob signed with HMAC-SHA256 under a per-job key that
only the invocation payload carries. A worker checks the signature *before*
unpickling and refuses anything unsigned or altered, so someone who can
write to the bucket but did not start the job cannot make a worker run code.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import cloudpickle

from funcpipe.errors import IntegrityError

__all__ = ["new_key", "seal", "unseal"]

_MAGIC = b"funcpipe-signed-v1\n"
_DIGEST = hashlib.sha256().digest_size


def new_key() -> str:
    """A fresh random per-job signing key, as hex."""
    return secrets.token_hex(32)


def seal(obj: object, key: str, *, name: str) -> bytes:
    """Pickle ``obj`` and sign it, binding the signature to ``name`` (its storage key)."""
    body: bytes = cloudpickle.dumps(obj)
    return _MAGIC + _mac(key, name, body) + body


def unseal(data: bytes, key: str, *, name: str) -> object:
    """Verify and unpickle a blob made by :func:`seal` for ``name``.

    Raises:
        IntegrityError: the blob is not a funcpipe blob, or its signature does
            not match (altered, signed with another job's key, or moved from
            another key). Nothing is unpickled in that case.
    """
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _DIGEST:
        raise IntegrityError(f"object {name!r} is not a signed funcpipe blob; refusing to load it")
    mac = data[len(_MAGIC) : len(_MAGIC) + _DIGEST]
    body = data[len(_MAGIC) + _DIGEST :]
    if not hmac.compare_digest(mac, _mac(key, name, body)):
        raise IntegrityError(
            f"object {name!r} has a bad signature (altered, or written by another job); "
            "refusing to load it"
        )
    return cloudpickle.loads(body)


def _mac(key: str, name: str, body: bytes) -> bytes:
    digest = hmac.new(bytes.fromhex(key), digestmod=hashlib.sha256)
    digest.update(name.encode() + b"\0")
    digest.update(body)
    return digest.digest()

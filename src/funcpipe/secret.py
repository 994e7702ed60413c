"""The driver's master secret, and the per-job key derived from it.

Every object a job writes is authenticated (:mod:`funcpipe.storage.authenticated`)
and its stage definitions signed (:mod:`funcpipe.signed`) under one key per job,
which the invocation payloads carry to the workers. The key is derived from a
master secret that never leaves the driver's machine, so a driver that resumes a
job after the first one died (a kernel restart, another process) derives the same
key and can verify the checkpoints the first one left, while nothing in storage
lets anyone else forge them.

The master secret comes from, in order:

1. the environment variable ``FUNCPIPE_SECRET`` (any string; set the same one on
   every machine that should resume the same jobs);
2. the file ``$FUNCPIPE_HOME/secret`` (default ``~/.config/funcpipe/secret``),
   created with 32 random bytes and mode 0600 the first time it is needed;
3. when that file cannot be created (a read-only home): a random secret for this
   process alone, with a warning — a job it starts cannot be resumed by another
   process.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

__all__ = ["ENV", "HOME_ENV", "data_key", "job_key", "master_secret", "secret_path"]

log = logging.getLogger(__name__)

#: The environment variable that holds the master secret.
ENV = "FUNCPIPE_SECRET"
#: The environment variable naming funcpipe's directory of per-user state.
HOME_ENV = "FUNCPIPE_HOME"


def secret_path() -> Path:
    """Where the master secret is kept when ``FUNCPIPE_SECRET`` is not set."""
    home = os.environ.get(HOME_ENV)
    base = Path(home) if home else Path.home() / ".config" / "funcpipe"
    return base / "secret"


def master_secret() -> bytes:
    """The driver's master secret (see the module's docstring for where it comes from)."""
    value = os.environ.get(ENV)
    if value:
        return hashlib.sha256(b"funcpipe-secret-env\0" + value.encode()).digest()
    return _file_secret(str(secret_path()))


@functools.lru_cache(maxsize=8)
def _file_secret(path: str) -> bytes:
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        return _ephemeral(f"cannot read {path} ({exc})")
    if len(data) >= 32:
        return data[:32]
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it just now
        data = file.read_bytes()
        return data[:32] if len(data) >= 32 else _ephemeral(f"{path} holds {len(data)} bytes, not 32")
    except OSError as exc:
        return _ephemeral(f"cannot create {path} ({exc})")
    fresh = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(fresh)
    return fresh


@functools.lru_cache(maxsize=1)
def _ephemeral(why: str) -> bytes:
    log.warning(
        "funcpipe: %s; using a secret for this process alone, so another process cannot resume the jobs it "
        "starts; hint: set %s (any string) or %s to a writable directory", why, ENV, HOME_ENV,
    )
    return secrets.token_bytes(32)


def job_key(job: str) -> str:
    """The key of ``job``, as hex: HMAC-SHA256 of its name under the master secret."""
    return hmac.new(master_secret(), b"funcpipe-job\0" + job.encode(), hashlib.sha256).hexdigest()


def data_key(name: str) -> str:
    """The key of the stored data set ``name`` (:mod:`funcpipe.data`), as hex: HMAC-SHA256 of its name
    under the master secret, apart from every job's key."""
    return hmac.new(master_secret(), b"funcpipe-data\0" + name.encode(), hashlib.sha256).hexdigest()

"""Reading a JSON file the user named, with every failure as a ``ConfigError``."""

from __future__ import annotations

import json
import os
from typing import Any

from funcpipe.errors import ConfigError

__all__ = ["read_json"]


def read_json(path: str | os.PathLike[str], what: str, *, missing_hint: str = "") -> Any:
    """The JSON value in ``path``, which holds a ``what`` (``"profile"``, ``"plan"``).

    Raises:
        ConfigError: the file is missing (``missing_hint`` appended), unreadable or not JSON.
    """
    where = os.fspath(path)
    try:
        with open(where, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"no {what} at {where!r}{missing_hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {where!r} is not JSON ({exc})") from None
    except OSError as exc:  # a directory, no permission...
        raise ConfigError(f"cannot read {what} {where!r} ({exc.strerror or exc})") from None

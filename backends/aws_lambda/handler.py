"""AWS Lambda entry of the funcpipe stage-worker function (handler ``handler.handler``).

Lambda decodes the JSON payload; everything else is
:func:`funcpipe.executors.serverless.handle`, which runs the call and
reports its result or failure through the job's storage.
"""

from __future__ import annotations

from typing import Any

# Imported at init, outside the billed, time-limited invocation: torch takes seconds to load.
import funcpipe.worker  # noqa: F401
from funcpipe.executors.serverless import handle


def handler(event: Any, context: Any) -> dict[str, Any]:
    return handle(event, remaining_s=lambda: context.get_remaining_time_in_millis() / 1000)

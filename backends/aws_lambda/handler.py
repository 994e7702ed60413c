"""AWS Lambda entry of the funcpipe stage-worker function (handler ``handler.handler``).

Lambda decodes the JSON payload; everything else is
:func:`funcpipe.function.handle`, which runs the call and
reports its result or failure through the job's storage.
"""

from __future__ import annotations

from typing import Any

import funcpipe.storage.s3  # noqa: F401 - boto3 and S3's service model, loaded at init
from funcpipe.function import handle, preload

# At init, outside the time-limited invocation: torch and its optimizers take seconds to load.
preload()


def handler(event: Any, context: Any) -> dict[str, Any]:
    return handle(event, remaining_s=lambda: context.get_remaining_time_in_millis() / 1000)

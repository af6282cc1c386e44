"""
JSON-lines logging beside twistd's text log.

twistd keeps writing its human-readable log (stdout with -n, or twistd.log);
with C{[logging] format = "json"} every event is also written as one JSON
object per line to C{[logging] file}, with its structured fields (C{event},
C{queue_id}, C{peer}, ...), for log shippers.
"""

from __future__ import annotations

import io

from twisted.logger import globalLogPublisher, jsonFileLogObserver


def install_json_log(path: str):
    stream = io.open(path, "a", encoding="utf-8", buffering=1)
    observer = jsonFileLogObserver(stream, recordSeparator="")
    globalLogPublisher.addObserver(observer)
    return observer

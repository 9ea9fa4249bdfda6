"""Where the daemon's log goes and how each line reads: text, or one JSON object a line
(`--log-format json`) with the fields a log pipeline indexes: time, level, logger, message and,
where known, remote, fingerprint, operation and errno. No line carries a credential: none is
ever logged (tokens, keys and cookies stay out of messages; urllib3's request lines stay off)."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import re
import sys
import time

LEVELS = ["debug", "info", "warning", "error"]
_FINGERPRINT = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-file", metavar="FILE",
                   help="log here (default: stderr in the foreground, syslog in the background)")
    p.add_argument("--log-level", choices=LEVELS, default=None,
                   help="what is logged (default: info; --debug: every request, never a credential)")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object a line (time, level, logger, message, remote, fingerprint, "
                        "operation, errno)")
    p.add_argument("--debug", action="store_true", help="--log-level debug")


class JSONFormatter(logging.Formatter):
    """One JSON object a line. `remote` is the mount's own when it serves one, else the record's
    (`extra=`); the fingerprint is the one the message names, if any."""

    def __init__(self, remote: str | None = None) -> None:
        super().__init__()
        self.remote = remote

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": message,
        }
        remote = getattr(record, "remote", None) or self.remote
        if remote:
            line["remote"] = remote
        found = getattr(record, "fingerprint", None) or _FINGERPRINT.search(message)
        if found:
            line["fingerprint"] = found if isinstance(found, str) else found.group(0)
        for field in ("operation", "errno"):
            if getattr(record, field, None) is not None:
                line[field] = getattr(record, field)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(args: argparse.Namespace, remote: str | None = None) -> None:
    """The root logger as the options ask; `remote`: the one remote the mount serves, if one."""
    level = getattr(logging, (args.log_level or ("debug" if args.debug else "info")).upper())
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
    elif args.foreground or not os.path.exists("/dev/log"):
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.handlers.SysLogHandler("/dev/log")
    if args.log_format == "json":
        handler.setFormatter(JSONFormatter(remote))
    elif isinstance(handler, logging.handlers.SysLogHandler):
        handler.setFormatter(logging.Formatter("lxdimagefs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    if level > logging.DEBUG:  # urllib3's debug lines would carry request details
        logging.getLogger("urllib3").setLevel(logging.WARNING)

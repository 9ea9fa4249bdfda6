"""Every error kind of the filesystem, and the errno each becomes: one table.

Modules raise these (or an OSError built by `fs_error`); only the FUSE
adapter turns them into return codes, through `errno_of`.
"""

from __future__ import annotations

import errno
import os

# LXD's HTTP status -> the errno a file operation reports for it.
STATUS_ERRNO = {
    400: errno.EINVAL,
    403: errno.EACCES,
    404: errno.ENOENT,
    409: errno.EEXIST,
    412: errno.ESTALE,
    507: errno.ENOSPC,
}

# What LXD says when the server it was told to pull from does not answer.
_UNREACHABLE = ("unable to connect", "connection refused", "no such host", "no route to host")

# Statuses a proxy or a restarting server answers with for a moment: worth a retry.
TRANSIENT_STATUS = frozenset({502, 503, 504})


class LXDError(Exception):
    """A refusal or failure from LXD, with LXD's own message."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def errno(self) -> int:
        text = self.message.lower()
        if "no space left" in text:
            return errno.ENOSPC
        if "already exists" in text:  # LXD says so with 400 or 409 depending on the call
            return errno.EEXIST
        if any(w in text for w in _UNREACHABLE):  # a server-side pull whose source the server cannot reach
            return errno.EHOSTUNREACH
        return STATUS_ERRNO.get(self.status, errno.EIO)

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUS


class LXDUnreachable(LXDError):
    """LXD did not answer: refused, timed out, or the connection dropped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0)

    @property
    def transient(self) -> bool:
        return True


class LXDTLSError(LXDError):
    """TLS with the server failed its checks: its certificate is not the pinned one or not signed
    by a CA we trust, or it refused ours. Not an outage: never retried, and `EACCES` (the server
    is not trusted, as LXD's 403 says we are not), with the reason in the log."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 0)

    @property
    def errno(self) -> int:
        return errno.EACCES


class IntegrityError(OSError):
    """Bytes read from LXD that do not hash to the image's fingerprint."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, f"bytes read do not match the fingerprint: {what}")


class ImportFailed(OSError):
    """An import LXD refused or that could not be sent; carries the message for the .error file."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.message = message


def fs_error(code: int, what: str, message: str | None = None) -> OSError:
    """An OSError carrying the errno the system call should return."""
    return OSError(code, message or os.strerror(code), what)


def errno_of(exc: BaseException) -> int | None:
    """The errno for an exception, or None for one nobody expected (a bug: EIO, logged)."""
    if isinstance(exc, LXDError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return None

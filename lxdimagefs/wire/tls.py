"""TLS as LXD's own client does it: the context (system CAs, a client certificate, or one pinned
server certificate), the pin check, and what a refused handshake is called.

A refusal is its own error (LXDTLSError -> EACCES), logged once per server and never retried:
certificates do not start agreeing by asking again.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from typing import Any

import requests.adapters

from lxdimagefs.errors import LXDTLSError
from lxdimagefs.wire.bounded import watch_pools

log = logging.getLogger("lxdimagefs.wire.transport")  # the name these lines have always had


def client_context(cert: tuple[str, str] | None, pinned: str | None) -> ssl.SSLContext:
    """The system's CAs (SSL_CERT_FILE honoured), with our certificate if we have one; with a pin,
    like lxc: exactly the server certificate given, whatever name it bears (checked by `pin_matches`)."""
    ctx = ssl.create_default_context()
    if cert:
        ctx.load_cert_chain(*cert)
    if pinned:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pin_matches(der: bytes | None, pinned: str) -> bool:
    return der is not None and hashlib.sha256(der).hexdigest() == pinned.replace(":", "").lower()


class ContextAdapter(requests.adapters.HTTPAdapter):
    """requests with the data path's TLS context: the system's CAs (SSL_CERT_FILE honoured, as
    Go's LXD honours it; not certifi's bundle), loaded once instead of once per connection. With
    `pinned`, exactly one server certificate instead, by fingerprint (urllib3's assert_fingerprint)."""

    def __init__(self, context: ssl.SSLContext | None, pinned: str | None = None, **kwargs: Any) -> None:
        self._tls: dict[str, Any] = {"assert_fingerprint": pinned} if pinned else {"ssl_context": context}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(self._tls)
        super().init_poolmanager(*args, **kwargs)
        watch_pools(self.poolmanager)


# What a failed certificate check says, on our side (verify, pin) or in the server's alert.
_TLS_REFUSALS = ("certificate verify failed", "fingerprints did not match", "not the pinned one",
                 "alert bad certificate", "alert certificate unknown", "alert unknown ca",
                 "certificate required", "alert access denied")
_tls_logged: set[str] = set()


def tls_refusal(exc: BaseException) -> str | None:
    """Why TLS refused the peer (or the peer us), from the innermost error that says; None for a
    connection that failed otherwise."""
    seen: BaseException | None = exc
    reason = None
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            reason = f"certificate verify failed: {seen.verify_message}"
        elif any(t in str(seen).lower() for t in _TLS_REFUSALS):
            reason = str(seen)
        nested = [a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)]
        seen = nested[0] if nested else (seen.__cause__ or seen.__context__)
    return reason


def tls_error(server: str, reason: str) -> LXDTLSError:
    """The error for a TLS refusal, logged once per server for the daemon's life."""
    err = LXDTLSError(f"TLS with {server} failed, so it is not trusted: {reason}")
    if server not in _tls_logged:
        _tls_logged.add(server)
        log.error("%s (not retried; EACCES until the certificates agree)", err.message)
    return err

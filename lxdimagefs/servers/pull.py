"""Server-side creation: images a server fetches itself, named by `ln -s` into its import/.

pylxd's `create_from_simplestreams`, `create_from_url` and `Image.copy` are
one request each: `POST /1.0/images` with a `source` the target server
pulls from, so the bytes never pass through the mount. Where the target
cannot reach the source (an LXD on a unix socket with no HTTPS address), the
export is streamed through the daemon instead: LXD's export of a split image
is the same multipart body its upload takes, so either kind is piped as is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lxdimagefs.errors import LXDError
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.servers.protocol import ImageServer

log = logging.getLogger(__name__)


@dataclass
class Source:
    """An image another server holds, and how a target server comes to hold it too."""

    describe: str
    request: Callable[[], dict[str, Any]] | None  # LXD's `source` object, made when it is needed
    public: bool = False
    # Through the daemon: (target, aliases) -> fingerprint.
    stream: Callable[[ImageServer, list[str]], str] | None = None

    def create(self, target: ImageServer, aliases: list[str]) -> str:
        """Have `target` hold the image (and the aliases); returns its fingerprint."""
        if self.request is not None:
            log.info("asking %s to pull %s", target.conn.describe(), self.describe)
            return target.create_from_source(self.request(), aliases, public=self.public)
        assert self.stream is not None
        log.info("copying %s to %s through the daemon", self.describe, target.conn.describe())
        return self.stream(target, aliases)


def from_url(url: str) -> Source:
    """pylxd's create_from_url: the server asks the URL where the image is (LXD-Image-URL)."""
    return Source(url, lambda: {"type": "url", "url": url})


def from_simplestreams(server: str) -> Callable[[str, str | None], Source]:
    """pylxd's create_from_simplestreams: by alias where one was named (so refresh follows it)."""
    def make(fp: str, alias: str | None) -> Source:
        which = {"alias": alias} if alias else {"fingerprint": fp}
        return Source(f"{alias or fp} from {server}", lambda: {
            "type": "image", "mode": "pull", "server": server, "protocol": "simplestreams", **which})
    return make


def from_lxd(client: LXDClient) -> Callable[[str, str | None], Source]:
    """pylxd's Image.copy: the target pulls from the source's HTTPS address, with a secret
    for a private image; a source with no HTTPS address is streamed through the daemon."""
    def make(fp: str, alias: str | None) -> Source:
        image = client.image(fp)
        public = bool(image.record.get("public"))
        address = client.https_address()
        if address is None:
            return Source(f"{fp} from {client.conn.describe()}", None, public,
                          lambda target, aliases: stream_copy(client, fp, target, aliases, image.record))

        def request() -> dict[str, Any]:
            body = {"type": "image", "mode": "pull", "server": address, "protocol": "lxd",
                    "fingerprint": fp, "certificate": client.server_certificate()}
            if client.conn.project != "default":
                body["project"] = client.conn.project
            if not public:
                body["secret"] = client.image_secret(fp)
            return body
        return Source(f"{fp} from {address}", request, public)
    return make


def stream_copy(source: LXDClient, fp: str, target: ImageServer, aliases: list[str],
                record: dict[str, Any]) -> str:
    """The export, piped from one server's GET into the other's POST; checked by fingerprint."""
    resp = source.export_stream(fp)
    headers = target.upload_headers(record.get("filename") or fp, bool(record.get("public")),
                                    record.get("properties") or None)
    ctype = resp.headers.get("Content-Type", "")
    if ctype.startswith("multipart/"):
        headers["Content-Type"] = ctype  # a split image's export is the body its upload takes
    post = None
    try:
        post = target.start_upload(headers)  # chunks sent as they come, no copy (chunked.py)
        for chunk in source.iter_chunks(resp):
            post.send(chunk)
        got = target.finish_upload(post)
    finally:
        if post is not None:
            post.close()
        resp.close()
    if got != fp:  # not the image asked for: it must not stay on the target
        if got:
            target.delete_image(got)
        raise LXDError(f"the copy of {fp} arrived as {got}: deleted it", 500)
    for alias in aliases:
        target.add_alias(alias, fp)
    return fp

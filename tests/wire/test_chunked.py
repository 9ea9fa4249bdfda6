"""An upload's body sent as it is written (servers/chunked.py), against a real LXD."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading
import time

import pytest
from lxd_sandbox import make_unified

from lxdimagefs.errors import LXDError
from lxdimagefs.servers.lxd import LXDClient
from lxdimagefs.wire.chunked import ChunkedPost, _sendmsg_all
from lxdimagefs.wire.transport import Connection


def test_a_partly_sent_message_is_sent_to_its_last_byte():
    """A socket with a timeout is non-blocking underneath: sendmsg may take part of the parts."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    a.settimeout(10)
    body = bytes(range(256)) * 12_000  # 3 MB, far more than the socket holds
    got = bytearray()

    def slow_reader() -> None:
        while chunk := b.recv(50_000):
            got.extend(chunk)
            time.sleep(0.001)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    _sendmsg_all(a, [b"head\r\n", memoryview(body), b"", b"\r\n"])
    a.close()
    reader.join(10)
    b.close()
    assert bytes(got) == b"head\r\n" + body + b"\r\n"


def test_closing_wakes_a_send_that_waits_for_room():
    """An import removed while its writer waits on a full socket (LXD busy) ends at once."""
    a, b = socket.socketpair()
    a.settimeout(30)  # what the writer would otherwise wait
    conn = http.client.HTTPConnection("localhost")
    conn.sock = a  # endheaders sends on it without connecting
    post = ChunkedPost(conn, "/1.0/images", {})
    failed: list[BaseException] = []

    def writer() -> None:
        try:
            for _ in range(1000):
                post.send(b"x" * (1 << 20))  # nobody reads b: fills the buffer, then waits
        except LXDError as e:
            failed.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.5)
    t = time.monotonic()
    post.close()
    thread.join(10)
    b.close()
    assert failed and time.monotonic() - t < 5


def fingerprints(client: LXDClient) -> set[str]:
    return {i.fingerprint for i in client.images()}


@pytest.mark.lxd
def test_an_image_sent_in_uneven_chunks_is_created(sandbox, tmp_path):
    data = make_unified(tmp_path / "c.tar", rootfs_bytes=(2 << 20) + 777).read_bytes()
    client = LXDClient(Connection(socket=sandbox.socket))
    post = client.start_upload(client.upload_headers("c.tar"))
    sizes = [1, 511, 0, 1 << 20, 3, 100_000]
    at = 0
    for n in [*sizes, len(data)]:
        post.send(memoryview(data)[at:at + n])  # an empty chunk is skipped, not the end
        at += n
    fp = client.finish_upload(post)
    post.close()
    try:
        assert fp == hashlib.sha256(data).hexdigest()
        assert sandbox.rest(f"/1.0/images/{fp}")["filename"] == "c.tar"
    finally:
        sandbox.lxc("image", "delete", fp, check=False)


@pytest.mark.lxd
def test_lxds_refusal_is_its_own_message_and_a_cut_body_creates_nothing(sandbox):
    client = LXDClient(Connection(socket=sandbox.socket))
    before = fingerprints(client)
    post = client.start_upload(client.upload_headers("junk.tar"))
    post.send(b"\x1f\x8b but not gzip at all" * 1000)
    with pytest.raises(LXDError) as refused:
        client.finish_upload(post)
    post.close()
    assert "metadata.yaml" in refused.value.message  # LXD's words, not a socket error
    cut = client.start_upload(client.upload_headers("cut.tar"))
    cut.send(b"x" * 100_000)
    cut.close()  # the writer broke off
    time.sleep(0.5)
    assert fingerprints(client) == before

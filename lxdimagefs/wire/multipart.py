"""Split exports arrive as one multipart stream; python-multipart parses it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from python_multipart.multipart import MultipartParser, parse_options_header

from lxdimagefs.errors import LXDError


class _Stop(Exception):
    pass


class PartStream:
    """Feeds a multipart body and reports each part's file name, bytes and end."""

    def __init__(self, content_type: str,
                 on_begin: Callable[[str], None],
                 on_data: Callable[[memoryview], None],
                 on_end: Callable[[], None]) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise LXDError("LXD sent a multipart export without a boundary")
        self._field = b""
        self._value = b""
        self._headers: dict[bytes, bytes] = {}
        self._on_begin, self._on_data, self._on_end = on_begin, on_data, on_end
        self.parts_ended = 0
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": lambda data, start, end: self._on_data(memoryview(data)[start:end]),
            "on_part_end": self._part_end,
        })

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"filename") or params.get(b"name") or b""
        self._on_begin(name.decode("utf-8", "replace"))

    def _part_end(self) -> None:
        self.parts_ended += 1
        self._on_end()

    def feed(self, chunks: Iterable[bytes]) -> None:
        try:
            for chunk in chunks:
                self._parser.write(chunk)
        except _Stop:
            return
        self._parser.finalize()

    @staticmethod
    def stop() -> None:
        """Called from a callback: ends `feed` early without an error."""
        raise _Stop


def first_part_and_next_name(content_type: str, chunks: Iterable[bytes]) -> tuple[str, int, str]:
    """Read a split export up to the second part's headers.

    Returns the metadata part's file name and size, and the rootfs part's
    file name, without downloading the rootfs.
    """
    names: list[str] = []
    size = 0

    def begin(name: str) -> None:
        names.append(name)
        if len(names) == 2:
            PartStream.stop()

    def data(chunk: memoryview) -> None:
        nonlocal size
        if len(names) == 1:
            size += len(chunk)

    PartStream(content_type, begin, data, lambda: None).feed(chunks)
    if len(names) != 2:
        raise LXDError("LXD's split export did not hold two parts")
    return names[0], size, names[1]

"""Alias names <-> file names, losslessly.

LXD accepts alias names a directory entry cannot hold (`debian/12`, `..`).
As rclone does, `/` is shown as FULLWIDTH SOLIDUS `／`, and the names `.`
and `..` as FULLWIDTH FULL STOPs. A name that really holds one of those
stand-in characters gets the escape `‛` (U+201B) before it, and `‛` itself
is doubled, so every alias maps to exactly one file name and back.
"""

from __future__ import annotations

SLASH = "/"
SLASH_SHOWN = "\uff0f"  # ／
DOT_SHOWN = "\uff0e"  # ．
ESCAPE = "\u201b"  # ‛

NAME_MAX = 255  # bytes, as Linux file names
METADATA = "metadata.json"  # an image's record, in its folder
HEX = frozenset("0123456789abcdef")


def is_fingerprint(name: str, min_length: int) -> bool:
    """A prefix a user typed: `min_length` or more lowercase hex digits (a server's is a keys.Fingerprint)."""
    return min_length <= len(name) <= 64 and not set(name) - HEX


def alias_to_filename(alias: str) -> str:
    if alias in (".", ".."):
        return DOT_SHOWN * len(alias)
    out = []
    for ch in alias:
        if ch in (ESCAPE, SLASH_SHOWN) or (ch == DOT_SHOWN and set(alias) <= {DOT_SHOWN}):
            out.append(ESCAPE + ch)
        elif ch == SLASH:
            out.append(SLASH_SHOWN)
        else:
            out.append(ch)
    return "".join(out)


def filename_to_alias(filename: str) -> str:
    if filename and len(filename) <= 2 and set(filename) == {DOT_SHOWN}:
        return "." * len(filename)
    out = []
    chars = iter(filename)
    for ch in chars:
        if ch == ESCAPE:
            out.append(next(chars, ESCAPE))
        elif ch == SLASH_SHOWN:
            out.append(SLASH)
        else:
            out.append(ch)
    return "".join(out)


def fits(filename: str) -> bool:
    """Whether a directory entry can hold this name."""
    return 0 < len(filename.encode("utf-8", "surrogateescape")) <= NAME_MAX and "\0" not in filename


def valid(name: str) -> bool:
    """Whether LXD can hold this name: UTF-8 (the kernel hands over any bytes), no control characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 32 for c in name)

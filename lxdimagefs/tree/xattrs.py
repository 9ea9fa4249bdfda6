"""An image's record as extended attributes: `user.lxd.*` on its folder and files.

`getfattr -d` shows an image at a glance, and tools that keep xattrs
(`rsync -X`, `cp -a`, backups) carry them along. Names mirror the record's
fields; what `metadata.json` can edit (public, auto_update, properties) can
be set and removed here too, through the same guarded save.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from lxdimagefs.errors import fs_error
from lxdimagefs.servers.records import Image

PREFIX = "user.lxd."
PROPERTY = PREFIX + "properties."
FLAGS = ("public", "auto_update")  # booleans: "true"/"false" (also taken: 1/0); removing one sets false
READ_ONLY = ("fingerprint", "architecture", "type", "uploaded_at", "aliases")

# setxattr(2)'s flags
XATTR_CREATE, XATTR_REPLACE = 1, 2

Change = Callable[[dict[str, Any]], None]


def attributes(image: Image) -> dict[str, bytes]:
    """Every attribute of an image, by full name; aliases one per line."""
    rec = image.record
    values = {
        "fingerprint": image.fingerprint,
        "architecture": rec.get("architecture") or "",
        "type": rec.get("type") or "container",
        "public": _flag(rec.get("public")),
        "auto_update": _flag(rec.get("auto_update")),
        "uploaded_at": rec.get("uploaded_at") or "",
        "aliases": "\n".join(image.aliases),
    }
    values.update({f"properties.{k}": str(v) for k, v in sorted((rec.get("properties") or {}).items())})
    return {PREFIX + k: v.encode("utf-8", "surrogateescape") for k, v in values.items()}


def change(image: Image, name: str, value: bytes | None, flags: int, path: str) -> Change:
    """What setting (or, with None, removing) `name` does to the record's editable fields.

    Raises the errno docs/SEMANTICS.md lists: ENOTSUP outside user.lxd.*,
    EPERM for a name that is not editable, EINVAL for a bad value, EEXIST
    and ENODATA for XATTR_CREATE and XATTR_REPLACE (and removing what is not there).
    """
    if not name.startswith(PREFIX):
        raise fs_error(errno.ENOTSUP, path, f"only {PREFIX}* attributes are kept here")
    present = name in attributes(image)
    if value is not None and flags & XATTR_CREATE and present:
        raise fs_error(errno.EEXIST, path)
    if (value is None or flags & XATTR_REPLACE) and not present:
        raise fs_error(errno.ENODATA, path)
    field = name[len(PREFIX):]
    if field in FLAGS:
        flag = False if value is None else _parse_flag(value, name, path)
        return lambda fields: fields.__setitem__(field, flag)
    if name.startswith(PROPERTY) and len(name) > len(PROPERTY):
        key = name[len(PROPERTY):]
        text = None if value is None else _text(value, name, path)

        def set_property(fields: dict[str, Any]) -> None:
            props = fields["properties"] = dict(fields.get("properties") or {})
            if text is None:
                props.pop(key, None)
            else:
                props[key] = text
        return set_property
    why = "read-only" if field in READ_ONLY else "not an attribute LXD keeps"
    raise fs_error(errno.EPERM, path, f"{name} is {why}")


def _flag(value: object) -> str:
    return "true" if value else "false"


def _parse_flag(value: bytes, name: str, path: str) -> bool:
    word = value.strip().lower()
    if word in (b"true", b"1"):
        return True
    if word in (b"false", b"0"):
        return False
    raise fs_error(errno.EINVAL, path, f"{name} is true or false")


def _text(value: bytes, name: str, path: str) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise fs_error(errno.EINVAL, path, f"{name} must be UTF-8 text") from None
    if "\0" in text:
        raise fs_error(errno.EINVAL, path, f"{name} must not hold NUL")
    return text



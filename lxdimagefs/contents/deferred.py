"""A source made on its first use: a split image's metadata tarball (contents/archives.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deferred:
    """A split image's metadata tarball as a source made on its first use (always under the
    archive's lock): a look only inside rootfs/ never imports ratarmountcore's tar source nor
    builds this index (80 ms of a VM's first `cat`). A fault in making it (a tarball over its
    bound, a zstd frame cut short) is that call's, kept: EIO there, rootfs/ still served; a
    block that failed its check is not kept (the next try reads another copy)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make, self._made, self._fault = make, None, ""

    def made(self) -> Any:
        if self._made is None:
            if self._fault:
                raise ValueError(self._fault)
            try:
                self._made = self._make()
            except OSError:
                raise
            except Exception as e:
                self._fault = f"the metadata tarball: {type(e).__name__}: {e}"
                raise ValueError(self._fault) from None
        return self._made

    def __getattr__(self, name: str) -> Any:
        return getattr(self.made(), name)

    def __exit__(self, *exc: object) -> None:
        if self._made is not None:
            self._made.__exit__(None, None, None)

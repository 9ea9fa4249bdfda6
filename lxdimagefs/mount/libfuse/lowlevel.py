"""libfuse's low-level API, for a connection whose files and folders never need a handle.

A file system gets an OPEN and a RELEASE for every file opened and an OPENDIR and a RELEASEDIR
for every folder listed, whatever it answers, unless it answers the first OPEN and OPENDIR with
ENOSYS (the kernel's `no_open` and `no_opendir`): the kernel then keeps the pages and listings it
was given until told to drop them. libfuse 3.14's high-level readdir cannot list without a handle,
so such a connection speaks the low-level API, through this module: the few calls a read-only
tree answers (`Handler`), a worker pool, and the kernel told what to drop.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import mfusepy

from lxdimagefs.mount.libfuse.threadstates import KEPT

_lib = mfusepy._libfuse
Req = ctypes.c_void_p
Ino = ctypes.c_uint64
ROOT = 1  # FUSE_ROOT_ID
CACHE_SYMLINKS = 1 << 23  # FUSE_CAP_CACHE_SYMLINKS: the kernel keeps a link's target as a page
_READDIRPLUS, _READDIRPLUS_AUTO = 1 << 13, 1 << 14


class EntryParam(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("generation", ctypes.c_uint64), ("attr", mfusepy.c_stat),
                ("attr_timeout", ctypes.c_double), ("entry_timeout", ctypes.c_double)]


class _ForgetData(ctypes.Structure):
    _fields_ = [("ino", ctypes.c_uint64), ("nlookup", ctypes.c_uint64)]


class _Args(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


# struct fuse_lowlevel_ops, libfuse 3.0 to 3.17: the entries in order (later versions add at the end).
_OPS = ("init", "destroy", "lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir",
        "unlink", "rmdir", "symlink", "rename", "link", "open", "read", "write", "flush", "release",
        "fsync", "opendir", "readdir", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr",
        "listxattr", "removexattr", "access", "create", "getlk", "setlk", "bmap", "ioctl", "poll",
        "write_buf", "retrieve_reply", "forget_multi", "flock", "fallocate", "readdirplus",
        "copy_file_range", "lseek")


class _Ops(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _OPS]


_FI = ctypes.c_void_p
_PROTOTYPES: dict[str, Any] = {
    "init": ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p),
    "lookup": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_char_p),
    "forget": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_uint64),
    "forget_multi": ctypes.CFUNCTYPE(None, Req, ctypes.c_size_t, ctypes.POINTER(_ForgetData)),
    "getattr": ctypes.CFUNCTYPE(None, Req, Ino, _FI),
    "readlink": ctypes.CFUNCTYPE(None, Req, Ino),
    "open": ctypes.CFUNCTYPE(None, Req, Ino, _FI),
    "opendir": ctypes.CFUNCTYPE(None, Req, Ino, _FI),
    "read": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_size_t, ctypes.c_int64, _FI),
    "readdir": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_size_t, ctypes.c_int64, _FI),
    "readdirplus": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_size_t, ctypes.c_int64, _FI),
    "statfs": ctypes.CFUNCTYPE(None, Req, Ino),
    "getxattr": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_char_p, ctypes.c_size_t),
    "listxattr": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_size_t),
    "access": ctypes.CFUNCTYPE(None, Req, Ino, ctypes.c_int),
}


def _declare() -> None:
    vp, size, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    for name, args, result in (
            ("fuse_reply_err", [Req, ctypes.c_int], ctypes.c_int), ("fuse_reply_none", [Req], None),
            ("fuse_reply_entry", [Req, ctypes.POINTER(EntryParam)], ctypes.c_int),
            ("fuse_reply_attr", [Req, ctypes.POINTER(mfusepy.c_stat), ctypes.c_double], ctypes.c_int),
            ("fuse_reply_readlink", [Req, ctypes.c_char_p], ctypes.c_int),
            ("fuse_reply_buf", [Req, vp, size], ctypes.c_int),
            ("fuse_reply_statfs", [Req, ctypes.POINTER(mfusepy.c_statvfs)], ctypes.c_int),
            ("fuse_add_direntry_plus", [Req, vp, size, ctypes.c_char_p, ctypes.POINTER(EntryParam), i64],
             size),
            ("fuse_session_new", [ctypes.POINTER(_Args), ctypes.POINTER(_Ops), size, vp], vp),
            ("fuse_session_mount", [vp, ctypes.c_char_p], ctypes.c_int),
            ("fuse_session_loop_mt_312", [vp, vp], ctypes.c_int), ("fuse_loop_cfg_create", [], vp),
            ("fuse_loop_cfg_set_max_threads", [vp, ctypes.c_uint], None),
            ("fuse_loop_cfg_set_idle_threads", [vp, ctypes.c_uint], None),
            ("fuse_session_unmount", [vp], None), ("fuse_session_destroy", [vp], None),
            ("fuse_lowlevel_notify_inval_entry", [vp, Ino, ctypes.c_char_p, size], ctypes.c_int),
            ("fuse_lowlevel_notify_inval_inode", [vp, Ino, i64, i64], ctypes.c_int)):
        function = getattr(_lib, name)
        function.argtypes, function.restype = args, result


_declare()


class Entry(NamedTuple):
    """A name's answer: its node id (0: none made, the kernel asks by name), stat, timeouts, and
    what the handler notes of it (handed back with the lookups the kernel took: `listed`)."""
    node: int
    stat: dict[str, int]
    attr_timeout: float
    entry_timeout: float
    ref: Any = None


class Handler(Protocol):
    """What a read-only tree answers; each raises OSError (or anything: EIO) to refuse."""

    def lookup(self, parent: int, name: bytes) -> Entry: ...
    def forget(self, node: int, count: int) -> None: ...
    def getattr(self, node: int) -> Entry: ...
    def readlink(self, node: int) -> bytes: ...
    def read(self, node: int, offset: int, size: int) -> bytes | memoryview: ...
    def listing(self, node: int, offset: int) -> Iterator[tuple[bytes, Entry, int]]: ...
    def listed(self, node: int, offset: int) -> None: ...
    def held(self, entries: list[Entry]) -> None: ...
    def statfs(self, node: int) -> dict[str, int]: ...
    def errno_of(self, op: str, node: int, exc: BaseException) -> int: ...


class Connection:
    """One low-level session: `mount` (before the daemon forks), `serve` (a thread, after),
    `stop`; `forget_name` and `drop` tell the kernel what changed."""

    def __init__(self, handler: Handler, options: list[str], max_threads: int = 16) -> None:
        self.handler, self.max_threads = handler, max_threads
        self._readdir = self._readdirplus  # the kernel asks READDIRPLUS (asked for at INIT)
        self._callbacks = {n: _PROTOTYPES[n](getattr(self, "_" + n, self._enosys)) for n in _PROTOTYPES}
        self._ops = _Ops(**{name: ctypes.cast(c, ctypes.c_void_p) for name, c in self._callbacks.items()})
        argv = [b"lxdimagefs"] + [word.encode() for word in options]
        self._argv = (ctypes.c_char_p * len(argv))(*argv)
        self._session: int | None = None
        self._thread: threading.Thread | None = None
        self._buffers = threading.local()

    def mount(self, mountpoint: str) -> bool:
        args = _Args(len(self._argv), self._argv, 0)
        session = _lib.fuse_session_new(ctypes.byref(args), ctypes.byref(self._ops), ctypes.sizeof(_Ops),
                                        None)
        if not session:
            return False
        if _lib.fuse_session_mount(session, mountpoint.encode()) != 0:
            _lib.fuse_session_destroy(session)
            return False
        self._session = session
        return True

    def serve(self) -> None:
        """Start answering (after the fork: threads do not survive it); the kernel has waited."""
        self._thread = threading.Thread(target=self._loop, name="inside", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        config = _lib.fuse_loop_cfg_create()
        _lib.fuse_loop_cfg_set_max_threads(config, self.max_threads)
        _lib.fuse_loop_cfg_set_idle_threads(config, 4)
        _lib.fuse_session_loop_mt_312(self._session, config)

    def stop(self) -> None:
        """Unmount (lazily: the kernel ends the connection once nothing holds it) and end the loop."""
        session, self._session = self._session, None
        if session is None:
            return
        _lib.fuse_session_unmount(session)
        if self._thread is not None:
            self._thread.join(5)
        if self._thread is None or not self._thread.is_alive():
            _lib.fuse_session_destroy(session)  # else its workers still use it: left to the exit

    def forget_name(self, parent: int, name: bytes) -> None:
        if self._session is not None:  # -ENOENT: the kernel does not hold it
            _lib.fuse_lowlevel_notify_inval_entry(self._session, parent, name, len(name))

    def drop(self, node: int) -> None:
        """The kernel drops a node's pages, listing and attributes (never from a request's thread)."""
        if self._session is not None:
            _lib.fuse_lowlevel_notify_inval_inode(self._session, node, 0, 0)

    # -- the kernel's calls -------------------------------------------------------------

    def _answer(self, op: str, req: int, node: int, call: Callable[[], Any]) -> None:
        KEPT.keep()
        try:
            call()
        except BaseException as exc:  # never into libfuse
            _lib.fuse_reply_err(req, self.handler.errno_of(op, node, exc))

    def _init(self, userdata: int, conn: int) -> None:
        """Links kept as pages; every listing with its names' attributes (READDIRPLUS, never its
        adaptive mode: a listing is asked once, so it may as well carry everything)."""
        info = ctypes.cast(conn, ctypes.POINTER(mfusepy.fuse_conn_info)).contents
        info.want = (info.want | (info.capable & (CACHE_SYMLINKS | _READDIRPLUS))) & ~_READDIRPLUS_AUTO

    @staticmethod
    def _enosys(req: int, *_: Any) -> None:
        """OPEN, OPENDIR: neither sent again, nor their RELEASEs (the kernel's no_open, no_opendir);
        GETXATTR, LISTXATTR: none again (images keep no xattrs here); ACCESS: granted from now on,
        the modes being the kernel's to check."""
        _lib.fuse_reply_err(req, 38)  # ENOSYS

    def _lookup(self, req: int, parent: int, name: bytes) -> None:
        def call() -> None:
            entry = self.handler.lookup(parent, name)
            if _reply_entry(req, entry) == 0 and entry.node:
                self.handler.held([entry])  # the kernel took it (an interrupted one did not)
        self._answer("lookup", req, parent, call)

    def _forget(self, req: int, node: int, count: int) -> None:
        KEPT.keep()
        self.handler.forget(node, count)
        _lib.fuse_reply_none(req)

    def _forget_multi(self, req: int, count: int, forgets: Any) -> None:
        KEPT.keep()
        for i in range(count):
            self.handler.forget(forgets[i].ino, forgets[i].nlookup)
        _lib.fuse_reply_none(req)

    def _getattr(self, req: int, node: int, fi: int) -> None:
        def call() -> None:
            entry = self.handler.getattr(node)
            _lib.fuse_reply_attr(req, ctypes.byref(_stat(entry.stat)), entry.attr_timeout)
        self._answer("getattr", req, node, call)

    def _readlink(self, req: int, node: int) -> None:
        self._answer("readlink", req, node,
                     lambda: _lib.fuse_reply_readlink(req, self.handler.readlink(node)))

    def _buffer(self, size: int) -> Any:
        """A listing's buffer, kept per worker (the kernel asks a page or a few at a time)."""
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._buffers.buffer = ctypes.create_string_buffer(max(size, 16 << 10))
        return buffer

    def _read(self, req: int, node: int, size: int, offset: int, fi: int) -> None:
        """From the handler's bytes (a cached block's view, mostly): no 1 MiB buffer kept per worker."""
        def call() -> None:
            data = self.handler.read(node, offset, size)
            reply: Any = data
            if isinstance(data, memoryview) and data.nbytes and not data.readonly:
                reply = (ctypes.c_char * data.nbytes).from_buffer(data.cast("B"))
            elif not isinstance(data, bytes):
                reply = bytes(data)
            _lib.fuse_reply_buf(req, reply, data.nbytes if isinstance(data, memoryview) else len(data))
        self._answer("read", req, node, call)

    def _readdirplus(self, req: int, node: int, size: int, offset: int, fi: int) -> None:
        def call() -> None:
            buffer, used, counted = self._buffer(size), 0, []  # the names the kernel now holds
            at, param = ctypes.addressof(buffer), EntryParam()
            for name, entry, after in self.handler.listing(node, offset):
                _fill(param, entry)
                need = _lib.fuse_add_direntry_plus(req, at + used, size - used, name, param, after)
                if need > size - used:
                    break  # the kernel asks again from this row's offset
                used += need
                if entry.node and name not in (b".", b".."):
                    counted.append(entry)
            self.handler.listed(node, offset)
            if _lib.fuse_reply_buf(req, buffer, used) == 0:
                self.handler.held(counted)
        self._answer("readdirplus", req, node, call)

    def _statfs(self, req: int, node: int) -> None:
        def call() -> None:
            st = mfusepy.c_statvfs()
            for key, value in self.handler.statfs(node).items():
                if hasattr(st, key):
                    setattr(st, key, value)
            _lib.fuse_reply_statfs(req, ctypes.byref(st))
        self._answer("statfs", req, node, call)



def _stat(attrs: dict[str, int]) -> mfusepy.c_stat:
    st = mfusepy.c_stat()
    mfusepy.set_st_attrs(st, attrs, use_ns=True)
    return st


def _fill(param: EntryParam, entry: Entry) -> None:
    ctypes.memset(ctypes.byref(param), 0, ctypes.sizeof(param))
    param.ino, param.attr_timeout, param.entry_timeout = entry.node, entry.attr_timeout, entry.entry_timeout
    mfusepy.set_st_attrs(param.attr, entry.stat, use_ns=True)


def _reply_entry(req: int, entry: Entry) -> int:
    param = EntryParam()
    _fill(param, entry)
    return int(_lib.fuse_reply_entry(req, ctypes.byref(param)))

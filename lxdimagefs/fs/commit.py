"""Commit on close: who writes an open file, and when what it wrote is taken as whole.

A file written through the mount (an import, a part of an import folder,
metadata.json) is committed at its writer's close, the FUSE `flush` (as
mountpoint-s3 does). The writer is the process that opened the file, by its
thread group: FUSE tells the calling thread, and Go, Java and Rust programs
and Python thread pools close on another thread than they opened on. A
forked child that closes an inherited descriptor is another process: its
close commits nothing, and the opener goes on writing.

A writer killed by a signal still has its files closed by the kernel; what
arrived may be cut short anywhere (LXD even accepts a tarball cut after its
metadata.yaml), so that close abandons the file instead. So does a release
(the last descriptor gone) that no close of the writer came before.

A close before the first write commits nothing: a shell's `>` and `dd of=`
open the file, `dup2` it onto the writer's descriptor and close the first
one before anything is written. A file closed for the last time without ever
being written is committed then, so an empty import still fails with its
reason in `import/NAME.error`.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

PF_EXITING = 0x4  # include/linux/sched.h: the task is in do_exit()


def process_of(tid: int) -> int:
    """The process (thread group id, `Tgid:` in /proc/<tid>/status) a thread belongs to."""
    try:  # asked at every open and close: one read of the file's head, no file object
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.read(fd, 512)  # Name (at most 64 bytes escaped), Umask, State, Tgid
        finally:
            os.close(fd)
        return int(head.split(b"\nTgid:", 1)[1].split(None, 1)[0])
    except (OSError, ValueError, IndexError):
        pass
    return tid  # gone already (or no /proc): the id is all there is


def killed_by(pid: int) -> int:
    """The signal a process is exiting on (its files are being closed by the kernel), else 0."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": field 3 onwards
        flags, exit_code = int(fields[6]), int(fields[49])  # proc(5): fields 9 and 52
    except (OSError, ValueError, IndexError):
        return 0
    return exit_code & 0x7F if flags & PF_EXITING else 0


class CommitOnClose:
    """An open file that its writer's close commits; subclasses say what commit and abandon do."""

    def __init__(self, writer: int) -> None:
        self.writer = writer  # the process that opened the file (see process_of)
        self.written = False  # set by the first write: closes before it commit nothing
        self._closing = threading.Lock()

    def pending(self) -> bool:
        """Whether there is anything to commit."""
        return False

    def commit(self) -> None:
        """The writer closed the file: make what it wrote count (an image, a saved record)."""

    def abandon(self, why: str) -> None:
        """The writer never closed the file: what it wrote may not be whole; keep nothing."""

    def flush(self, pid: int) -> None:
        """A close, by process `pid`: the writer's commits, once per change; others' do nothing."""
        with self._closing:
            if pid != self.writer or not self.written or not self.pending():
                return
            signal = killed_by(pid)
            if signal:
                log.warning("the writer (pid %d) of an open file was killed by signal %d: "
                            "what it wrote is dropped", pid, signal)
                self.abandon(f"its writer was killed (signal {signal}) before closing it")
                return
            self.commit()

    def release(self) -> None:
        """The last descriptor is gone: what was written and never committed is abandoned; a file
        never written is committed as it is (empty: an import's refusal says why)."""
        with self._closing:
            if not self.pending():
                return
            if self.written:
                self.abandon("released without its writer closing it")
                return
            try:
                self.commit()
            except OSError as e:  # no caller is left to tell: the refusal is kept where it belongs
                log.info("a file closed without being written was not taken: %s", e)

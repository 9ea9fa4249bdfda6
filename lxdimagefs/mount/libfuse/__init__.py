"""Beneath mfusepy: what the daemon does on libfuse and the kernel directly.

Each module here makes up for one thing libfuse 3.14's high-level API (Debian 12's) leaves out:
a Python thread state kept per worker (`threadstates`), and the kernel told what it may keep
and what it must drop (`kernelcache`). Nothing above `mount/` knows of it.
"""

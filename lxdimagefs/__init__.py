"""lxdimagefs: the images of an LXD server, mounted as files."""

__version__ = "0.1.0"

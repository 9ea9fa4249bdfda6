"""A hostile squashfs rootfs read by offset (contents/squashfs.py): each block's size word checked as
the kernel checks it, each block decoded to at most the block size, block lists kept within a bound
of words. Images mksquashfs makes, patched in place (inodes and data stored raw: -noI -noD -noF).
Fast (no LXD, no mount); tests/contents/test_kept.py reads a real split image through a mount."""

from __future__ import annotations

import io
import os
import stat
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lxdimagefs.contents import squashfs
from lxdimagefs.contents.archives import ExportFile
from lxdimagefs.contents.inodes import header
from lxdimagefs.contents.squashfs import SquashfsRootfs
from lxdimagefs.data.blocks import BlockCache
from lxdimagefs.data.diskparts import CheckedPart
from lxdimagefs.data.manifest import BlockSums

UNIT = 131072


def _make(tmp_path: Path, files: dict[str, bytes], *flags: str) -> Path:
    tree, image = tmp_path / "tree", tmp_path / "image.sqfs"
    tree.mkdir()
    for name, data in files.items():
        (tree / name).write_bytes(data)
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet", "-no-xattrs", *flags],
                   check=True, stdout=subprocess.DEVNULL)
    return image


def _open(image: Path, tmp_path: Path) -> SquashfsRootfs:
    """The image through a part's checked blocks, as contents/archives.py opens a split image's."""
    data = image.read_bytes()
    sums = BlockSums()
    sums.update(data)
    manifest = sums.manifest("0" * 64, len(data))
    part = CheckedPart(image, manifest, BlockCache(16 << 20), image.name, lambda: None)
    fobj = io.BufferedReader(ExportFile(part, len(data)), 1 << 16)
    index = tmp_path / f"index-{os.urandom(4).hex()}.sqlite"
    return SquashfsRootfs(fobj, indexFilePath=str(index), writeIndex=True)


def _read(src: SquashfsRootfs, name: str, offset: int = 0, size: int | None = None) -> bytes:
    info = src.lookup("/" + name)
    assert info is not None and stat.S_ISREG(info.mode)
    size = info.size - offset if size is None else min(size, info.size - offset)
    return b"".join(bytes(p) for p in src.pieces(info, offset, size))


def _reg_inode(buf: bytes, ref: int) -> int:
    """Where in the image a regular file's inode (type 2, the inode table stored raw) starts."""
    inode_table = struct.unpack_from("<Q", buf, 64)[0]
    block, offset = ref >> 16, ref & 0xFFFF
    pos = inode_table + block
    head = struct.unpack_from("<H", buf, pos)[0]
    assert head & 0x8000 and offset < head & 0x7FFF, "a raw inode table, the inode in one block"
    at = pos + 2 + offset
    assert struct.unpack_from("<H", buf, at)[0] == 2, "a regular file's basic inode"
    return at  # then start (+16), fragment (+20), offset (+24), size (+28), block list (+32)


def _patched(image: Path, name: str, tmp_path: Path, patch) -> SquashfsRootfs:
    src = _open(image, tmp_path)
    info = src.lookup("/" + name)
    assert info is not None
    buf = bytearray(image.read_bytes())
    patch(buf, _reg_inode(buf, header(info)))
    bad = image.with_name("patched.sqfs")
    bad.write_bytes(buf)
    return _open(bad, tmp_path)


@pytest.fixture
def image(tmp_path) -> Path:
    return _make(tmp_path, {"big": os.urandom(3 * UNIT + 100), "small": b"s" * 4000}, "-noI", "-noD", "-noF")


@pytest.mark.parametrize("word, why", [
    ((1 << 25) | 0x1000, "over the block size"),  # a bit above 24
    ((1 << 24) | (UNIT + 1), "over the block size"),  # a stored size over the block size
])
def test_a_size_word_the_kernel_refuses_is_eio_before_reading(image, tmp_path, word, why):
    src = _patched(image, "big", tmp_path, lambda buf, at: struct.pack_into("<I", buf, at + 32, word))
    with pytest.raises(ValueError, match=why):
        _read(src, "big", 0, 4096)


def test_a_block_reaching_past_bytes_used_is_eio_even_inside_the_padding(image, tmp_path):
    used = struct.unpack_from("<Q", image.read_bytes(), 40)[0]
    assert image.stat().st_size - used >= 100, "mksquashfs pads to 4 KiB"
    # the last block (100 bytes) moved to end past bytes_used, in the padding (zeros, stored)
    src = _patched(image, "big", tmp_path,
                   lambda buf, at: struct.pack_into("<I", buf, at + 16, used - 3 * UNIT - 50))
    with pytest.raises(ValueError, match="past the image's end"):
        _read(src, "big", 3 * UNIT, 100)


def _bomb(buf: bytearray, place: int, room: int) -> int:
    """A zlib stream at `place` of at most `room` bytes that inflates to 3 block sizes; its length."""
    z = zlib.compress(b"Q" * (3 * UNIT))
    assert len(z) <= room
    buf[place:place + len(z)] = z
    return len(z)


def test_a_data_block_decoding_past_the_block_size_is_eio_and_not_kept(image, tmp_path):
    def patch(buf, at):
        start = struct.unpack_from("<I", buf, at + 16)[0]
        struct.pack_into("<I", buf, at + 32, _bomb(buf, start, UNIT))  # compressed: bit 24 clear

    src = _patched(image, "big", tmp_path, patch)
    for _ in range(2):  # a failed block is never kept
        with pytest.raises(ValueError, match="decodes past the block size"):
            _read(src, "big", 0, 4096)
    assert src._block.cache_info().currsize == 0


def test_a_fragment_decoding_past_the_block_size_is_eio(image, tmp_path):
    buf = bytearray(image.read_bytes())
    table = struct.unpack_from("<Q", buf, 80)[0]  # the fragment table's index
    entry = struct.unpack_from("<Q", buf, table)[0] + 2  # its one raw metadata block, entry 0
    start, word = struct.unpack_from("<QI", buf, entry)
    struct.pack_into("<I", buf, entry + 8, _bomb(buf, start, word & ~(1 << 24)))
    image.write_bytes(buf)
    with pytest.raises(ValueError, match="decodes past the block size"):
        _read(_open(image, tmp_path), "small")


@pytest.mark.parametrize("kind", [1, 4, 6])  # zlib, xz, zstd
def test_each_compressor_decodes_at_most_the_block_size(kind):
    data = b"Z" * (UNIT + 1)
    import lzma

    import zstandard
    packed = {1: zlib.compress, 4: lzma.compress, 6: zstandard.ZstdCompressor().compress}[kind](data)
    assert squashfs.inflate(kind, packed[:], UNIT + 1) == data
    with pytest.raises(ValueError, match="decodes past the block size"):
        squashfs.inflate(kind, packed, UNIT)


def test_block_lists_are_kept_within_a_bound_of_words_and_read_right_past_it(tmp_path, monkeypatch):
    monkeypatch.setattr(squashfs, "WORDS_KEPT", 100)
    files = {f"f{i}": os.urandom(4096 * 40 + 7) for i in range(4)} | {"long": os.urandom(4096 * 150 + 3)}
    image = _make(tmp_path, files, "-b", "4096")
    src = _open(image, tmp_path)
    for name, data in sorted(files.items()):
        assert _read(src, name) == data
        assert _read(src, name, len(data) - 4100, 9000) == data[-4100:]
        assert src._words_kept <= 100
    assert len(src._layouts) == 1  # of the four 40-block files, the last; "long" (151 words) never kept


def test_a_long_block_list_is_read_in_pieces_keeping_few_metadata_blocks(tmp_path, monkeypatch):
    """A 64 MiB sparse file of 4 KiB blocks: 64 KiB of block list (8 metadata blocks), not kept."""
    monkeypatch.setattr(squashfs, "WORDS_KEPT", 100)
    monkeypatch.setattr(squashfs, "METADATA_KEPT", 2)
    tree = tmp_path / "tree"
    tree.mkdir()
    with open(tree / "sparse", "wb") as f:
        f.truncate(64 << 20)
        f.seek((64 << 20) - 1)
        f.write(b"x")
    image = tmp_path / "sparse.sqfs"
    subprocess.run(["mksquashfs", str(tree), str(image), "-noappend", "-quiet", "-b", "4096"],
                   check=True, stdout=subprocess.DEVNULL)
    src = _open(image, tmp_path)
    for _ in range(2):
        assert _read(src, "sparse", (64 << 20) - 5000) == bytes(4999) + b"x"
        assert _read(src, "sparse", 123456, 10) == bytes(10)
    assert len(src.image._inode_table_hash) <= 2 and not src._layouts


def test_a_small_file_all_in_one_fragment_is_read_from_its_index_row_without_its_inode(tmp_path, monkeypatch):
    """Its row places it in its fragment block: a read is one block lookup, no inode or block list
    read (a file with data blocks still reads its inode); the bytes are the file's at any offset."""
    files = {f"s{i}": os.urandom(500 + 37 * i) for i in range(40)} | {"big": os.urandom(UNIT + 9)}
    src = _open(_make(tmp_path, files), tmp_path)
    read_inodes: list[int] = []
    layout = src._read_layout
    monkeypatch.setattr(src, "_read_layout", lambda ref: read_inodes.append(ref) or layout(ref))
    for name, data in sorted(files.items()):
        info = src.lookup("/" + name)
        assert info is not None
        assert bool(info.userdata[-1].offset & squashfs.IN_FRAGMENT) == (name != "big")
        assert _read(src, name) == data
        assert _read(src, name, 7, 100) == data[7:107]
        assert _read(src, name, len(data) - 3, 100) == data[-3:]
        assert _read(src, name, len(data)) == b""
    assert len(read_inodes) == 1  # "big" alone


def test_a_fragment_shorter_than_a_file_in_it_says_is_eio(image, tmp_path):
    buf = bytearray(image.read_bytes())
    table = struct.unpack_from("<Q", buf, 80)[0]
    entry = struct.unpack_from("<Q", buf, table)[0] + 2  # entry 0: "small"'s (stored raw, -noF)
    struct.pack_into("<I", buf, entry + 8, (1 << 24) | 100)
    image.write_bytes(buf)
    with pytest.raises(ValueError, match="fragment of 100 bytes, not 4000"):
        _read(_open(image, tmp_path), "small", 10, 20)


def test_a_file_with_blocks_and_its_tail_in_a_fragment_reads_through_its_inode(tmp_path):
    """-always-use-fragments: a tail in a fragment block after whole blocks; only files all in a
    fragment are placed by their row."""
    files = {"tailed": os.urandom(2 * UNIT + 333), "small": os.urandom(999)}
    src = _open(_make(tmp_path, files, "-always-use-fragments"), tmp_path)
    for name, data in files.items():
        info = src.lookup("/" + name)
        assert info is not None
        assert bool(info.userdata[-1].offset & squashfs.IN_FRAGMENT) == (name == "small")
        assert _read(src, name) == data
        assert _read(src, name, 2 * UNIT - 5, 50) == data[2 * UNIT - 5:2 * UNIT + 45]

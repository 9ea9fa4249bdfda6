"""A split image's `.tar.zst` metadata tarball, decoded in memory (contents/archives.py `_in_memory`):
cut short inside a frame it is EIO, as the unified export's decode refuses one (data/exports.py).
Fast: no LXD, no mount."""

from __future__ import annotations

import io
import tarfile

import pytest
import zstandard

from lxdimagefs.contents.archives import ExportFile, _in_memory
from lxdimagefs.data.blocks import BlockCache
from lxdimagefs.data.diskparts import CheckedPart
from lxdimagefs.data.manifest import BlockSums


def _zst(tmp_path, cut: int):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("metadata.yaml")
        data = b"architecture: x86_64\ncreation_date: 1\n" * 50
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(buf.getvalue())
    packed = packed[:len(packed) - cut]
    path = tmp_path / f"meta-{cut}.tar.zst"
    path.write_bytes(packed)
    sums = BlockSums()
    sums.update(packed)
    manifest = sums.manifest("0" * 64, len(packed))
    part = CheckedPart(path, manifest, BlockCache(1 << 20), path.name, lambda: None)
    return io.BufferedReader(ExportFile(part, len(packed)), 1 << 16), buf.getvalue()


def test_a_whole_zst_metadata_tarball_decodes(tmp_path):
    raw, plain = _zst(tmp_path, 0)
    assert _in_memory(raw, "zst") == plain


@pytest.mark.parametrize("cut", [2, 4])  # inside the checksum; the checksum gone (the frame's end)
def test_a_zst_metadata_tarball_cut_short_inside_its_frame_is_eio(tmp_path, cut):
    raw, _ = _zst(tmp_path, cut)
    with pytest.raises(ValueError, match="ends inside a zstd frame"):
        _in_memory(raw, "zst")

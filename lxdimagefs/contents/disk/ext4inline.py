"""ext4 inline data (the INLINE_DATA feature): a small file's, symlink's or folder's bytes kept in its
inode, i_block's 60 bytes then the value of its in-inode extended attribute "system.data", as the
kernel's fs/ext4/inline.c reads them (a folder: its parent's inode number in i_block's first 4
bytes, then entries in the rest of i_block, then entries in the value).

The attribute area (after i_extra_isize) is untrusted: an entry running past the inode, a value
outside it or among the entries, a value in another inode (ea_inode) is a fault (EIO, Ext4Fault)
for that inode alone; every step moves forward by at least 16 bytes within the inode.
"""

from __future__ import annotations

import struct

from lxdimagefs.contents.disk.ext4map import Ext4Fault

MAGIC = 0xEA020000  # the in-inode attribute area's header (ext4_xattr_ibody_header)
SYSTEM = 7  # e_name_index of "system." names
I_BLOCK, I_BLOCK_SIZE = 0x28, 60
GOOD_OLD_INODE = 128


def system_data(number: int, inode: bytes) -> bytes | None:
    """The value of inode `number`'s "system.data" (`inode`: all its bytes), None without one."""
    extra = struct.unpack_from("<H", inode, 0x80)[0] if len(inode) > GOOD_OLD_INODE else 0
    start = GOOD_OLD_INODE + extra
    if extra % 4 or start + 4 > len(inode) or struct.unpack_from("<I", inode, start)[0] != MAGIC:
        return None  # no attribute in the inode
    first = at = start + 4  # values are at offsets from the first entry
    found: tuple[int, int] | None = None
    while True:
        if at + 4 > len(inode):
            raise Ext4Fault(f"inode {number}: its extended attributes run past the inode")
        if not struct.unpack_from("<I", inode, at)[0]:
            break  # the entries' end
        if at + 16 > len(inode):
            raise Ext4Fault(f"inode {number}: an extended attribute entry runs past the inode")
        name_len, index, offset, inum, length = struct.unpack_from("<BBHII", inode, at)
        following = at + ((16 + name_len + 3) & ~3)
        if following + 4 > len(inode):
            raise Ext4Fault(f"inode {number}: an extended attribute's name runs past the inode")
        if index == SYSTEM and inode[at + 16:at + 16 + name_len] == b"data":
            if inum:
                raise Ext4Fault(f"inode {number}: its inline data is in inode {inum} (not read here)")
            found = offset, length
        at = following
    if found is None:
        return None
    offset, length = found
    if length and (first + offset < at + 4 or first + offset + length > len(inode)):
        raise Ext4Fault(f"inode {number}: its system.data value ({length} bytes at {offset}) lies "
                        "outside the inode's attribute area")
    return inode[first + offset:first + offset + length] if length else b""


def file_bytes(number: int, inode: bytes, size: int) -> bytes:
    """An inline file's (or symlink's) `size` bytes: i_block's first, then system.data's."""
    data = inode[I_BLOCK:I_BLOCK + min(size, I_BLOCK_SIZE)]
    if size > I_BLOCK_SIZE:
        value = system_data(number, inode)
        if value is None or size > I_BLOCK_SIZE + len(value):
            raise Ext4Fault(f"inode {number}: {size} bytes of inline data, "
                            f"{I_BLOCK_SIZE + len(value or b'')} in the inode")
        data += value[:size - I_BLOCK_SIZE]
    return data


def folder_regions(number: int, inode: bytes) -> list[bytes]:
    """An inline folder's entries, in the two places that hold them (each read as a block is)."""
    return [inode[I_BLOCK + 4:I_BLOCK + I_BLOCK_SIZE], system_data(number, inode) or b""]

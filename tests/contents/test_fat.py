"""contents/disk/fat.py: the ESP's FAT read at once, the same table pyfatfs's own parse makes, and
no import of ratarmountcore's format detection (rapidgzip and the rest) to open it."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from ratarmountcore._external.pyfatfs import PyFATException
from ratarmountcore._external.pyfatfs.PyFat import PyFat

from lxdimagefs.contents.disk.fat import FatFs, _PyFat


def _fat(tmp_path: Path, bits: int, mib: int) -> Path:
    image = tmp_path / f"fat{bits}.img"
    subprocess.run(["mkfs.vfat", "-F", str(bits), "-s", "1", "-C", str(image), str(mib << 10)], check=True,
                   capture_output=True)
    (tmp_path / "EFI/BOOT").mkdir(parents=True, exist_ok=True)
    (tmp_path / "EFI/BOOT/BOOTX64.EFI").write_bytes(os.urandom(70_000))
    (tmp_path / "EFI/BOOT/grub.cfg").write_bytes(b"set timeout=5\n")
    subprocess.run(["mcopy", "-s", "-m", "-i", str(image), str(tmp_path / "EFI"), "::/"], check=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return image


@pytest.mark.filterwarnings("ignore:One or more FATs differ")  # pyfatfs, of the entry set below
@pytest.mark.parametrize(("bits", "mib"), [(16, 20), (32, 40)])
def test_the_fat_is_the_table_pyfatfs_parses_and_files_read_through_it(tmp_path: Path, bits: int,
                                                                       mib: int) -> None:
    """Entry by entry as pyfatfs's own parse (FAT32's reserved top four bits cleared), and a file
    of many clusters reads back whole through it."""
    image = _fat(tmp_path, bits, mib)
    if bits == 32:  # an entry past the used clusters with its reserved bits set: they are not its value
        with open(image, "r+b") as f:
            f.seek(32 * 512 + 4 * 1000)  # mkfs.vfat reserves 32 sectors before a FAT32's FAT
            f.write((0xF0000000 | 0x1234).to_bytes(4, "little"))
    theirs, ours = PyFat(), _PyFat()
    with open(image, "rb") as a, open(image, "rb") as b:
        theirs.set_fp(a)
        ours.set_fp(b)
        assert list(ours.fat) == theirs.fat and len(ours.fat) > 1000
        assert ours.bytes_per_cluster == theirs.bytes_per_cluster
        if bits == 32:
            assert ours.fat[1000] == 0x1234
    with open(image, "rb") as f:
        fs = FatFs(io.BufferedReader(f), {}, 0)
        info = fs.lookup("/EFI/BOOT/BOOTX64.EFI")
        assert info is not None and info.size == 70_000
        assert fs.read(info, 80_000, 0) == (tmp_path / "EFI/BOOT/BOOTX64.EFI").read_bytes()
        assert sorted(fs.list("/EFI/BOOT") or {}) == ["BOOTX64.EFI", "grub.cfg"]


def _capped(code: str, gib: int, timeout: float = 60) -> str:
    """What `code` prints, run in a child whose address space is capped at `gib` GiB (a loop or an
    unbounded read is a MemoryError or the timeout, not this machine's memory)."""
    probe = ("import errno, resource, warnings; warnings.simplefilter('ignore'); "
             "from lxdimagefs.contents.disk.fat import FatFs; "
             f"resource.setrlimit(resource.RLIMIT_AS, ({gib} << 30, {gib} << 30))\n" + code)
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=timeout).stdout
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s: a loop")


def test_opening_an_esp_imports_no_format_detection(tmp_path: Path) -> None:
    """ratarmountcore's FAT source module imports its format checks (rapidgzip, sqlcipher3 and the
    rest: 90 ms of a `find` with the page cache cold); the ESP is read without them."""
    image = _fat(tmp_path, 32, 40)
    probe = ("import sys; from lxdimagefs.contents.disk.fat import FatFs; "
             f"fs = FatFs(open({str(image)!r}, 'rb'), {{}}, 0); assert fs.list('/EFI/BOOT'); "
             "print(sorted(m for m in sys.modules if m.startswith(('rapidgzip', 'ratarmountcore.formats'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_fat_larger_than_is_read_here_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A boot sector claiming a FAT of 128 GiB (BPB_FATSz32, a hostile disk's): refused, nothing of
    it read (pyfatfs read up to the volume's end, once for each copy, and made an int of each entry)."""
    image = _fat(tmp_path, 32, 40)
    with open(image, "r+b") as f:
        f.seek(36)  # BPB_FATSz32
        f.write((1 << 28).to_bytes(4, "little"))
    tracemalloc.start()
    try:
        with open(image, "rb") as f, pytest.raises(PyFATException, match="over the"):
            FatFs(io.BufferedReader(f), {}, 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_a_folder_whose_cluster_chain_runs_past_the_fat_is_eio_not_shorter(tmp_path: Path) -> None:
    """A folder's chain pointing past the FAT's end: pyfatfs stopped there, the folder listed
    short with no error (Linux's vfat: EIO); here it is EIO (found by review)."""
    image = _fat(tmp_path, 32, 40)
    with open(image, "rb") as f:
        fs = _PyFat()
        fs.set_fp(f)
        folder = fs.root_dir.get_entry("/EFI/BOOT").get_cluster()
        past = len(fs.fat) + 16
        fat_at, fat_size = fs.bpb_header["BPB_RsvdSecCnt"] * 512, fs._fat_size * 512
    with open(image, "r+b") as f:
        for copy in range(2):
            f.seek(fat_at + copy * fat_size + 4 * folder)
            f.write(past.to_bytes(4, "little"))  # the folder's next cluster: past the FAT
    with open(image, "rb") as f:
        fat = FatFs(f, {}, 0)
        assert fat.lookup("/EFI") is not None
        with pytest.raises(OSError) as caught:
            fat.list("/EFI/BOOT")
        assert caught.value.errno == errno.EIO and "past the end" in str(caught.value)


def test_a_folder_whose_cluster_chain_loops_is_eio_not_a_loop(tmp_path: Path) -> None:
    """A hostile FAT whose folder's chain comes back to itself: pyfatfs followed it for ever (the
    listing's entries piling up in memory, the archive's lock held), whether the folder or the
    FAT32 root that is parsed at open; here it is EIO past 2 MiB of folder, as Linux's vfat
    writes no folder larger (65,536 entries)."""
    image = _fat(tmp_path, 32, 40)
    with open(image, "rb") as f:
        fs = _PyFat()
        fs.set_fp(f)
        folder = fs.root_dir.get_entry("/EFI/BOOT").get_cluster()
        root = fs.bpb_header["BPB_RootClus"]
        fat_at, fat_size = fs.bpb_header["BPB_RsvdSecCnt"] * 512, fs._fat_size * 512
    with open(image, "r+b") as f:
        for copy in range(2):
            for cluster in (folder, root):
                f.seek(fat_at + copy * fat_size + 4 * cluster)
                f.write(cluster.to_bytes(4, "little"))  # the cluster's next is itself
    out = _capped("try:\n"
                  f"    FatFs(open({str(image)!r}, 'rb'), {{}}, 0)\n"
                  "except Exception as e:\n"
                  "    print(type(e).__name__, e)\n", 2)
    assert "PyFATException" in out and "2097152" in out, out
    with open(image, "r+b") as f:  # the root's chain mended: the folder's own loop, at its listing
        for copy in range(2):
            f.seek(fat_at + copy * fat_size + 4 * root)
            f.write((0x0FFFFFFF).to_bytes(4, "little"))
    out = _capped(f"fs = FatFs(open({str(image)!r}, 'rb'), {{}}, 0)\n"
                  "assert fs.lookup('/EFI') is not None\n"
                  "try:\n"
                  "    fs.list('/EFI/BOOT')\n"
                  "except OSError as e:\n"
                  "    print(errno.errorcode[e.errno], e)\n", 2)
    assert out.startswith("EIO") and "2097152" in out, out


def test_a_fat12_claim_of_many_large_fats_is_refused_before_they_are_read(tmp_path: Path) -> None:
    """A boot sector with 255 FATs of 16 MiB each (BPB_NumFATs, BPB_FATSz16) over a 2 GiB volume
    (a qcow2's unallocated ESP costs its image nothing): its clusters then count as FAT12, left to
    pyfatfs's own parse, which read every copy (3.2 GB of memory for a 3 GiB volume). FAT12 covers
    at most 4,084 clusters (6 KiB of FAT): a larger one is refused before any of it is read."""
    image = _fat(tmp_path, 32, 40)
    with open(image, "r+b") as f:
        f.seek(16)  # BPB_NumFATs
        f.write(bytes([255]))
        f.seek(22)  # BPB_FATSz16, which wins over BPB_FATSz32 when set
        f.write((32768).to_bytes(2, "little"))
        f.truncate(2 << 30)
    out = _capped("try:\n"
                  f"    FatFs(open({str(image)!r}, 'rb'), {{}}, 0)\n"
                  "except Exception as e:\n"
                  "    print(type(e).__name__, e)\n", 1, timeout=120)
    assert out.startswith("PyFATException a FAT12"), out

"""
An encrypted image (L{cpushare.imagecrypt}) decrypted into memory for QEMU,
never onto the disk.

The seller's cache keeps the image as the market sent it: ciphertext.  When
the key arrives (released by the market to this seller's TPM only, and
unwrapped there), L{decryptToMemory} decrypts it a chunk at a time into an
anonymous memory file (memfd_create(2)), which no folder names.  Once
whole, the file is sealed (F_SEAL_WRITE, F_SEAL_GROW, F_SEAL_SHRINK and
F_SEAL_SEAL): nobody, QEMU included, can change it any more.  What is
handed to QEMU is a read-only descriptor of it (opened again through
/proc/self/fd), given as the VM's cdrom exactly as a cached ISO is (QEMU's
`-add-fd` and `/dev/fdset/1`, see L{cpushare.vm.qemu}); the memory is freed
when QEMU and the seller have closed it.  A chunk that does not
authenticate stops the decryption and the memory file is closed: no
partial image is ever booted.

The decrypted image takes memory (tmpfs pages, which may be swapped like
any other memory of the seller's, but are never written to a file of its
own): an image bigger than MEMORY_SHARE of the memory available now is
refused.
"""

import fcntl
import os

from cpushare import imagecrypt
from cpushare.imagecrypt import ImageCryptError

MEMORY_SHARE = 0.5
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def memoryAvailable(meminfo="/proc/meminfo"):
    """Bytes of memory available for new work (MemAvailable), or None when unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _writeAll(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def decryptToMemory(path, key, available=None):
    """
    Decrypt the encrypted image at C{path} with C{key} into sealed memory;
    returns a read-only file descriptor of it (the caller closes it once
    QEMU has its own).  Raises L{ImageCryptError} naming the problem (a
    wrong key, a damaged image, not enough memory).  Blocking: run it on a
    thread.
    """
    with open(path, "rb") as f:
        header = imagecrypt.readHeader(f)
        size = header.plainSize(os.fstat(f.fileno()).st_size)
    if available is None:
        available = memoryAvailable()
    if available is not None and size > available * MEMORY_SHARE:
        raise ImageCryptError(
            f"the decrypted image would take {size // 2**20} MiB of memory, more than "
            f"{int(MEMORY_SHARE * 100)}% of the {available // 2**20} MiB available here")
    fd = os.memfd_create("cpushare-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        imagecrypt.decryptFile(path, lambda data: _writeAll(fd, data), key)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)

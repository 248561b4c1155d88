"""Booting a stock Linux kernel: fetching it, unpacking it, giving it an initramfs.

Nothing here emulates anything; these are the steps a person with a Debian
machine would otherwise do by hand (``apt-get download``, ``ar x``,
``extract-vmlinux``, ``cpio -o -H newc``), written in Python so xenicorn
needs no toolchain:

* :mod:`.debian`: download a ``.deb`` and read files out of it;
* :mod:`.bzimage`: find the compressed kernel inside a bzImage and
  decompress it to the ELF ``vmlinux`` (which carries the PVH entry note);
* :mod:`.initramfs`: write a ``newc`` cpio archive (the initramfs format).
"""

"""Just enough of an ELF header to build an image for a binary: its platform and its loader.

Reads the identification bytes, `e_machine` and the program headers (for PT_INTERP, which
marks a dynamically linked program). Returns None for anything that is not ELF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3

# e_machine → GOARCH-style architecture names, as image configs spell them.
# Some depend on the class (32/64-bit) and byte order: (machine, is_64, little_endian).
_MACHINES: dict[int, str] = {
    3: "386",  # EM_386
    40: "arm",  # EM_ARM
    62: "amd64",  # EM_X86_64
    183: "arm64",  # EM_AARCH64
    258: "loong64",  # EM_LOONGARCH
}


def _arch(machine: int, is_64: bool, little: bool) -> str | None:
    if machine in _MACHINES:
        return _MACHINES[machine]
    if machine == 21:  # EM_PPC64
        return "ppc64le" if little else "ppc64"
    if machine == 22:  # EM_S390
        return "s390x" if is_64 else "s390"
    if machine == 243:  # EM_RISCV
        return "riscv64" if is_64 else "riscv32"
    if machine == 8:  # EM_MIPS
        return ("mips64" if is_64 else "mips") + ("le" if little else "")
    return None


@dataclass(frozen=True)
class ElfInfo:
    architecture: str | None  # None: a machine ocibox has no name for
    machine: int
    is_64: bool
    interpreter: str | None  # the PT_INTERP path: set for dynamically linked programs

    @property
    def dynamic(self) -> bool:
        return self.interpreter is not None


def read_elf(path: Path) -> ElfInfo | None:
    """The ELF facts of `path`, or None when it is not an ELF file. OSError when unreadable."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != ELF_MAGIC or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            return None
        is_64 = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"
        (machine,) = struct.unpack_from(order + "H", ident, 18)
        if is_64:
            if len(ident) < 64:
                return None
            (phoff,) = struct.unpack_from(order + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 54)
        else:
            phoff = struct.unpack_from(order + "I", ident, 28)[0]
            phentsize, phnum = struct.unpack_from(order + "HH", ident, 42)
        interpreter = _interpreter(f, order, is_64, phoff, phentsize, phnum)
    return ElfInfo(_arch(machine, is_64, order == "<"), machine, is_64, interpreter)


def _interpreter(f, order: str, is_64: bool, phoff: int, phentsize: int, phnum: int) -> str | None:
    """The PT_INTERP segment's path, if the program has one."""
    if not phoff or not phnum or phentsize < (56 if is_64 else 32):
        return None
    f.seek(phoff)
    table = f.read(phentsize * min(phnum, 4096))
    for i in range(len(table) // phentsize):
        entry = table[i * phentsize : (i + 1) * phentsize]
        if struct.unpack_from(order + "I", entry, 0)[0] != PT_INTERP:
            continue
        # Elf64_Phdr: p_offset at 8, p_filesz at 32; Elf32_Phdr: p_offset at 4, p_filesz at 16.
        word, at_offset, at_size = ("Q", 8, 32) if is_64 else ("I", 4, 16)
        (offset,) = struct.unpack_from(order + word, entry, at_offset)
        (size,) = struct.unpack_from(order + word, entry, at_size)
        f.seek(offset)
        return f.read(min(size, 4096)).split(b"\0", 1)[0].decode("utf-8", "replace") or "?"
    return None

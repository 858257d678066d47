"""Refuse this process the CPU's AMX tiles, so ggml computes on AVX-512 instead.

Some virtual machines report AMX (``amx_tile`` in ``/proc/cpuinfo``) but fault when it is
used: llama.cpp's AMX kernels then crash the process on the first batch of two or more
tokens. ggml asks Linux for the tile state with ``arch_prctl(ARCH_REQ_XCOMP_PERM)`` before
it uses AMX, and falls back to its AVX-512 kernels when that fails. A seccomp filter that
answers exactly that call with EPERM is the smallest change that makes such a machine work:
it touches no other system call, and it must be in place before llama.cpp loads a model.

A filter cannot be removed, and it holds for every thread of the process (``TSYNC``) and every
child it starts afterwards; the loader installs it only after a child process showed that
the engine crashes without it and works with it (``actors.engine.probe``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import struct
import sys
from pathlib import Path

_SYS_ARCH_PRCTL = 158
_SYS_SECCOMP = 317
_ARCH_REQ_XCOMP_PERM = 0x1023
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_EPERM = 1
# Classic BPF opcodes: load a word of ``struct seccomp_data``, jump if equal, return.
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
# Offsets in ``struct seccomp_data``: nr, arch, then args[0] (its low word on x86-64).
_NR, _ARCH, _ARG0 = 0, 4, 16

_installed = False


class AmxRefusalError(RuntimeError):
    """The kernel did not take the filter; the message says what it answered."""


def cpu_reports_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU says it has AMX tiles (the only case where refusing them matters)."""
    try:
        return "amx_tile" in cpuinfo.read_text().split()
    except OSError:
        return False


def can_refuse() -> bool:
    """Whether this platform can install the filter (Linux on x86-64)."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


def refused() -> bool:
    """Whether this process already refused itself AMX."""
    return _installed


def _filter() -> bytes:
    """The BPF program: EPERM for ``arch_prctl(ARCH_REQ_XCOMP_PERM, …)``, allow the rest."""
    insns = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 0, 5, _AUDIT_ARCH_X86_64),  # another ABI: allow
        (_LD_W_ABS, 0, 0, _NR),
        (_JEQ_K, 0, 3, _SYS_ARCH_PRCTL),  # another call: allow
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JEQ_K, 0, 1, _ARCH_REQ_XCOMP_PERM),  # another arch_prctl code: allow
        (_RET_K, 0, 0, _SECCOMP_RET_ERRNO | _EPERM),
        (_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


def refuse_amx() -> None:
    """Install the filter for every thread of this process and its future children."""
    global _installed
    if _installed:
        return
    if not can_refuse():
        raise AmxRefusalError(f"AMX can only be refused on Linux x86-64, not {platform.machine()}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    program = _filter()
    code = ctypes.create_string_buffer(program, len(program))

    class _SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _SockFprog(len(program) // 8, ctypes.cast(code, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise AmxRefusalError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: errno {ctypes.get_errno()}")
    rc = libc.syscall(
        _SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(fprog)
    )
    if rc != 0:
        raise AmxRefusalError(f"seccomp(SET_MODE_FILTER) failed: errno {ctypes.get_errno()}")
    _installed = True


def xcomp_perm_refused() -> bool:
    """Ask for the tile state as ggml does; True when the kernel now answers EPERM."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    xfeature_xtiledata = 18
    rc = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, xfeature_xtiledata)
    return rc != 0 and ctypes.get_errno() == _EPERM

# What every AMX kernel here does first: ask Linux for the tile state, configure tiles.

from std.ffi import external_call
from std.memory import alloc
from std.sys import llvm_intrinsic

# Linux: a process asks once for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM,
# XFEATURE_XTILEDATA); until then a tile instruction faults.
comptime SYS_ARCH_PRCTL = 158
comptime ARCH_REQ_XCOMP_PERM = 0x1023
comptime XFEATURE_XTILEDATA = 18


def request_tile_state() raises:
    if external_call["syscall", Int](SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        raise Error("the kernel refused this process the AMX tile state (arch_prctl)")


def configure_tiles():
    """Palette 1 on the calling thread: eight tiles of 16 rows x 64 bytes."""
    var cfg = alloc[UInt8](64)
    for i in range(64):
        cfg[i] = 0
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    llvm_intrinsic["llvm.x86.ldtilecfg", NoneType](cfg)
    cfg.free()

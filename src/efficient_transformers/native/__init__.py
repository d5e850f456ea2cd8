"""Native CPU kernels, built on first use with PyTorch's own extension builder (`torch.utils.cpp_extension`).

The Performer's FAVOR+ attention, forward and backward: bidirectional (`favor.cpp`) and the chunked
causal scan (`favor_causal.cpp`), sharing the row primitives of `rows.h`; `core.kernel_attention` uses
them for `PerformerAttention(features="positive")` on CPU in float32 and float64. They compute what the
portable Python forms compute (the same products, the same stabilisers, the same epsilon term; the
tests compare the two in float64 and float32) and fuse each row's elementwise work into one pass
right after the product that made it.

**Build.** The first use in a fresh environment compiles the kernels (about 10 s on two cores; it needs
a C++ compiler and `ninja`, a dependency of this package) into PyTorch's extension cache
(`~/.cache/torch_extensions`, or `$TORCH_EXTENSIONS_DIR`); later processes load it in milliseconds.
The vector width follows `torch.backends.cpu.get_cpu_capability()` (AVX512, AVX2, or portable code).
PyTorch's builder guards a build with a lock file that stays behind when the building process is killed
(a timed-out probe, Ctrl-C), and then every later build of the same extension waits on it forever. The
build here therefore runs under an `fcntl` lock of its own (released by the kernel when its holder dies),
and under it removes a lock file left by a builder that is gone. `build_directory()` says where the
library was built; `bench.memory` hands it to its probe processes, which load it instead of building
again (moving `XDG_CACHE_HOME` would otherwise move PyTorch's extension cache with it).

**Choosing the path.** `EFT_NATIVE=0` in the environment turns the native kernels off for the
process; `portable()` turns them off inside a `with` block (the ceiling recorder of `bench.products`
does this: it must see every matrix product, and a native kernel's products are inside C++). When the
build fails (no compiler), `available()` is False, one warning says why, and everything runs the
portable path: the results are the same, only slower.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path
from typing import Iterator

import torch

ENV_SWITCH = "EFT_NATIVE"
_SOURCES = [Path(__file__).with_name(name) for name in ("favor.cpp", "favor_causal.cpp", "matmul.cpp")]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {"built": None, "error": None, "directory": None}
_DISABLED = threading.local()


def _capability_flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    elif capability == "AVX2":
        isa = ["-mavx2", "-mfma"]
    else:
        return ["-O3"]  # ATen's portable vector type
    return ["-O3", *isa, f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]


@contextlib.contextmanager
def _exclusive_build(directory: str) -> Iterator[None]:
    """Hold an `fcntl` lock on `directory` for the build and remove PyTorch's lock file if a killed builder
    left it behind: whoever held it is gone, since every builder of this extension takes this lock first."""
    try:
        import fcntl
    except ImportError:  # not POSIX: PyTorch's own lock file only
        yield
        return
    with open(os.path.join(directory, "eft-build.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, "lock"))
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build() -> bool:
    from torch.utils import cpp_extension

    name = f"efficient_transformers_native_{torch.backends.cpu.get_cpu_capability().lower()}"
    try:
        directory = cpp_extension._get_build_directory(name, verbose=False)  # creates it
        with _exclusive_build(directory):
            cpp_extension.load(
                name=name, sources=[str(path) for path in _SOURCES], extra_cflags=_capability_flags(),
                build_directory=directory, is_python_module=False, verbose=False,
            )
        _STATE["directory"] = directory
        return hasattr(torch.ops.efficient_transformers, "favor_forward")
    except Exception as err:  # no compiler, no ninja, a failed build: the portable path runs instead
        _STATE["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        warnings.warn(f"efficient_transformers.native: the native kernels could not be built ({_STATE['error']}); "
                      "the portable (slower) path runs instead. Set EFT_NATIVE=0 to skip the build.", RuntimeWarning,
                      stacklevel=3)
        return False


def available() -> bool:
    """True when the native kernels are built (building them on the first call) and not switched off by
    `EFT_NATIVE=0`."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    with _LOCK:
        if _STATE["built"] is None:
            _STATE["built"] = _build()
    return bool(_STATE["built"])


def enabled() -> bool:
    """`available()` and not inside `portable()`."""
    return not getattr(_DISABLED, "depth", 0) and available()


def build_directory() -> str | None:
    """The directory the kernels were built in (None before a successful `available()`). Its parent is
    the `TORCH_EXTENSIONS_DIR` under which another process finds the built library."""
    return _STATE.get("directory")  # type: ignore[return-value]


def build_error() -> str | None:
    """Why the build failed, or None."""
    return _STATE["error"]  # type: ignore[return-value]


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Run the portable Python path inside the block (this thread), whether or not the kernels are built."""
    _DISABLED.depth = getattr(_DISABLED, "depth", 0) + 1
    try:
        yield
    finally:
        _DISABLED.depth -= 1

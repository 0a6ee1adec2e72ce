"""The few CUDA runtime calls that paged optimizer states need, through ctypes on the libcudart torch loaded.

Using the very library torch uses (found in /proc/self/maps) keeps one runtime state per process; another copy
(found by name) is the fallback. No extra package is needed. Calls: cudaMallocManaged, cudaFree,
cudaMemPrefetchAsync (CUDA 13 changed its signature from a device ordinal to a cudaMemLocation plus flags; the
runtime's version picks the form), cudaDeviceGetAttribute, cudaPointerGetAttributes, cudaRuntimeGetVersion.
Free memory comes from torch.cuda.mem_get_info, which is cudaMemGetInfo.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
from functools import lru_cache

from .errors import PagedMemoryError

CUDA_MEM_ATTACH_GLOBAL = 1
DEV_ATTR_MANAGED_MEMORY = 83
DEV_ATTR_CONCURRENT_MANAGED_ACCESS = 89
MEM_LOCATION_DEVICE = 1
MEM_LOCATION_HOST = 2
CPU_DEVICE_ID = -1
MEMORY_TYPES = {0: "unregistered", 1: "host", 2: "device", 3: "managed"}


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def _candidates() -> list[str]:
    found: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "libcudart.so" in os.path.basename(path) and path not in found:
                    found.append(path)
    except OSError:
        pass
    try:
        import nvidia  # the pip wheels' CUDA libraries (nvidia-cuda-runtime)

        for root in nvidia.__path__:
            found += sorted(glob.glob(os.path.join(root, "**", "lib", "libcudart.so*"), recursive=True), reverse=True)
    except ImportError:
        pass
    by_name = ctypes.util.find_library("cudart")
    return found + ([by_name] if by_name else []) + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]


class CudaRuntime:
    """Thin, checked wrappers; every failure raises PagedMemoryError naming the call and CUDA's message."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.lib, self.path = lib, path
        for name, args in {
            "cudaMallocManaged": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint],
            "cudaFree": [ctypes.c_void_p],
            "cudaRuntimeGetVersion": [ctypes.POINTER(ctypes.c_int)],
            "cudaDeviceGetAttribute": [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int],
            "cudaPointerGetAttributes": [ctypes.c_void_p, ctypes.c_void_p],
            "cudaSetDevice": [ctypes.c_int],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
        v = ctypes.c_int()
        self.check(lib.cudaRuntimeGetVersion(ctypes.byref(v)), "cudaRuntimeGetVersion")
        self.version = v.value
        if self.version >= 13000:
            # CUDA 13: (ptr, count, cudaMemLocation, flags, stream); 12.2-12.9 exported the same as *_v2.
            self._prefetch = getattr(lib, "cudaMemPrefetchAsync_v2", None) or lib.cudaMemPrefetchAsync
            self._prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint, ctypes.c_void_p]
            self.location_prefetch = True
        else:
            self._prefetch = lib.cudaMemPrefetchAsync
            self._prefetch.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            self.location_prefetch = False
        self._prefetch.restype = ctypes.c_int

    def check(self, err: int, what: str) -> None:
        if err != 0:
            msg = self.lib.cudaGetErrorString(err)
            raise PagedMemoryError(f"{what} failed: CUDA error {err} ({msg.decode() if msg else 'unknown'})")

    def set_device(self, index: int) -> None:
        self.check(self.lib.cudaSetDevice(index), f"cudaSetDevice({index})")

    def device_attribute(self, attr: int, index: int) -> int:
        v = ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(v), attr, index), f"cudaDeviceGetAttribute({attr})")
        return v.value

    def malloc_managed(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMallocManaged(ctypes.byref(ptr), nbytes, CUDA_MEM_ATTACH_GLOBAL),
                   f"cudaMallocManaged({nbytes} bytes)")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def prefetch(self, ptr: int, nbytes: int, device_index: int | None, stream: int) -> None:
        """Queue a migration of [ptr, ptr + nbytes) to GPU `device_index` (None: to host memory) on `stream`."""
        if self.location_prefetch:
            loc = (_MemLocation(MEM_LOCATION_HOST, 0) if device_index is None
                   else _MemLocation(MEM_LOCATION_DEVICE, device_index))
            err = self._prefetch(ctypes.c_void_p(ptr), nbytes, loc, 0, ctypes.c_void_p(stream))
        else:
            dst = CPU_DEVICE_ID if device_index is None else device_index
            err = self._prefetch(ctypes.c_void_p(ptr), nbytes, dst, ctypes.c_void_p(stream))
        self.check(err, "cudaMemPrefetchAsync")

    def pointer_kind(self, ptr: int) -> str:
        """'managed', 'device', 'host' (pinned/registered) or 'unregistered'."""
        attrs = ctypes.create_string_buffer(256)  # cudaPointerAttributes starts with {int type; int device; ...}
        self.check(self.lib.cudaPointerGetAttributes(attrs, ctypes.c_void_p(ptr)), "cudaPointerGetAttributes")
        return MEMORY_TYPES.get(ctypes.c_int.from_buffer(attrs, 0).value, "unknown")


@lru_cache(maxsize=1)
def cuda_runtime() -> CudaRuntime:
    """The CUDA runtime library of this process; PagedMemoryError if none loads."""
    errors = []
    for path in _candidates():
        try:
            return CudaRuntime(ctypes.CDLL(path), path)
        except (OSError, AttributeError, PagedMemoryError) as err:
            errors.append(f"{path}: {err}")
    raise PagedMemoryError("paged optimizer states need the CUDA runtime library (libcudart), and none could be "
                           "loaded: " + "; ".join(errors[:4]))

"""A raw allocation as a torch tensor that owns it, through a DLPack capsule built with ctypes.

torch.from_dlpack(capsule) makes a uint8 tensor over the memory without copying; when the last tensor (or view)
over it is freed, torch calls the capsule's deleter, which calls `free(ptr)`. This is how managed memory
(cudaMallocManaged) becomes ordinary CUDA tensors without a global allocator swap (torch's
CUDAPluggableAllocator replaces the allocator for the whole process) and without extra packages.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger("qlorakit.optim")

_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]

# Keeps each capsule's structs and free function alive until torch calls the deleter.
_live: dict[int, tuple[_DLManagedTensor, ctypes.Array, Callable[[], None]]] = {}
_lock = threading.Lock()


def _delete(managed: ctypes.POINTER(_DLManagedTensor)) -> None:  # type: ignore[valid-type]
    # Runs inside torch's tensor destructor (the GIL is taken by ctypes); it must never raise.
    try:
        with _lock:
            entry = _live.pop(ctypes.addressof(managed.contents), None)
        if entry is not None:
            entry[2]()
    except Exception as err:  # noqa: BLE001 - a failed free at interpreter exit must not crash it
        try:
            log.warning("qlorakit: freeing an optimizer-state buffer failed: %s", err)
        except Exception:  # noqa: BLE001
            pass


_DELETE_FN = _DELETER(_delete)

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def tensor_from_pointer(ptr: int, nbytes: int, device: torch.device, free: Callable[[], None]) -> torch.Tensor:
    """A uint8 tensor [nbytes] over `ptr` on `device` (cpu or cuda:i); `free()` runs once when the last tensor
    over the memory is gone. If wrapping fails, `free()` runs at once and the error propagates."""
    device = torch.device(device)
    if device.type == "cuda":
        dl_device = _DLDevice(_KDL_CUDA, device.index if device.index is not None else torch.cuda.current_device())
    elif device.type == "cpu":
        dl_device = _DLDevice(_KDL_CPU, 0)
    else:
        free()
        raise ValueError(f"tensor_from_pointer: device {device} is not supported (cpu or cuda)")
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    managed.dl_tensor = _DLTensor(ptr, dl_device, 1, _DLDataType(_KDL_UINT, 8, 1), shape, None, 0)
    managed.manager_ctx = None
    managed.deleter = _DELETE_FN
    key = ctypes.addressof(managed)
    with _lock:
        _live[key] = (managed, shape, free)
    try:
        # No capsule destructor: torch takes ownership when it consumes the capsule (it is consumed right here).
        return torch.from_dlpack(_capsule_new(key, b"dltensor", None))
    except Exception:
        with _lock:
            _live.pop(key, None)
        free()
        raise


def live_buffers() -> int:
    """How many wrapped allocations are still alive (for tests)."""
    return len(_live)

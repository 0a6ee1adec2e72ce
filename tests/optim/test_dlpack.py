"""A raw allocation wrapped as a torch tensor owns its memory: shared, and freed once after the last view."""

from __future__ import annotations

import ctypes
import gc

import torch

from qlorakit.optim.dlpack import live_buffers, tensor_from_pointer


def test_wrapped_memory_is_shared_and_freed_once_after_the_last_view():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    ptr = libc.malloc(4096)
    freed: list[int] = []

    def free() -> None:
        freed.append(ptr)
        libc.free(ptr)

    before = live_buffers()
    buf = tensor_from_pointer(ptr, 4096, torch.device("cpu"), free)
    assert buf.dtype == torch.uint8 and buf.shape == (4096,) and buf.data_ptr() == ptr
    floats = buf[256:512].view(torch.float32)
    floats.fill_(1.5)
    assert (ctypes.c_float * 64).from_address(ptr + 256)[0] == 1.5
    del buf
    gc.collect()
    assert freed == [] and live_buffers() == before + 1  # a view still holds it
    assert float(floats.sum()) == 96.0
    del floats
    gc.collect()
    assert freed == [ptr] and live_buffers() == before

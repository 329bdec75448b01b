"""Reading scattered rows of memory-mapped embeddings without the kernel's readahead.

A page fault on a memory-mapped file normally reads ahead of the page (up to a few hundred KB), which is what a
scan wants and what a lookup of a few scattered rows does not: re-ranking 500 candidate rows of a 51 GB set of fp16
rows that is not in the page cache took 1.3-1.5 s here with readahead and 30 ms with `MADV_RANDOM` (measured by
dropping the page cache between reads; see docs/retrieval.md). [`random_access`] sets that advice on the tensors'
pages for the duration of a gather and restores the default after, so block-by-block scans (exact search, adding
rows to a FAISS index) keep their readahead.
"""

import ctypes
import mmap
import sys
from contextlib import contextmanager

import torch


_MADV_RANDOM = getattr(mmap, "MADV_RANDOM", None)
_MADV_NORMAL = getattr(mmap, "MADV_NORMAL", None)
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else False
            if _LIBC is not False:
                _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def _span(tensor: torch.Tensor) -> tuple[int, int] | None:
    """The page-aligned address range of a CPU tensor's storage, or None."""
    if tensor.device.type != "cpu" or not tensor.numel():
        return None
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    start = begin // page * page
    return start, end - start


@contextmanager
def random_access(tensors: list[torch.Tensor]):
    """While the block lasts, page faults on these tensors' memory read only the page they need (Linux
    `madvise(MADV_RANDOM)`; the default advice is set back after). A no-op elsewhere and for non-CPU tensors; on memory
    that is not file-backed the advice changes nothing."""
    libc = _libc()
    spans = []
    if libc is not None and _MADV_RANDOM is not None:
        for tensor in tensors:
            span = _span(tensor)
            if span is not None and libc.madvise(span[0], span[1], _MADV_RANDOM) == 0:
                spans.append(span)
    try:
        yield
    finally:
        for start, length in spans:
            libc.madvise(start, length, _MADV_NORMAL)

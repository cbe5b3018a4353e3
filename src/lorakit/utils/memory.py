"""Process memory: give freed heap pages back to the OS, and read the process's peak resident set."""

from __future__ import annotations

import resource
import sys

_LIBC_TRIM: list = []  # [malloc_trim or None], looked up once


def release_freed_memory() -> None:
    """Hand heap pages that are already free back to the OS (glibc ``malloc_trim(0)``); a no-op
    where there is no glibc. Changes no tensor and no allocator setting.

    Why: quantizing layer after layer frees megabytes of temporaries between long-lived packed
    weights; glibc keeps such holes mapped, so the process grows by whatever fragmentation the
    allocation order happened to produce. On bench/bench_load.py's 336M-parameter model the
    chunked load peaked at 623-704 MB RSS over runs without this call, 621-623 MB with it after
    each layer (the model alone is 258 MB; importing torch + transformers + the model code 338 MB).
    """
    if not _LIBC_TRIM:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC_TRIM.append(getattr(libc, "malloc_trim", None))
        except OSError:
            _LIBC_TRIM.append(None)
    if _LIBC_TRIM[0] is not None:
        _LIBC_TRIM[0](0)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage ru_maxrss)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux /proc/self/statm; else the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()

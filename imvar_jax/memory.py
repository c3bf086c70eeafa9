"""Whether a compiled program fits the memory its devices have free, checked before it runs.

XLA's ``memory_analysis()`` of the compiled executable gives, per device, the bytes of its
arguments, outputs and temporaries. What the devices have free comes from their allocator
(``memory_stats()``: ``bytes_limit - bytes_in_use``, on GPUs and TPUs) or, for CPU devices, from
the host's available memory, which all CPU devices of the process share. The params are
already resident, so they count once in what is in use and not again in what is needed.
A program that does not fit is refused with ``InsufficientMemoryError`` instead of ending in
``RESOURCE_EXHAUSTED`` or ``std::bad_alloc`` halfway through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax

from .settings import SettingsError

GIB = 2**30


class InsufficientMemoryError(SettingsError):
    """A call that needs more device memory than is free; the message says what fits.

    ``needed`` and ``available`` are bytes per device; ``pictures_per_device`` is what the call
    asked for and ``fits`` the largest number of pictures per device estimated to fit at the same
    size (0 when not even one does: the size must come down).
    """

    def __init__(self, message: str, *, needed: int, available: int, pictures_per_device: int, fits: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available
        self.pictures_per_device = pictures_per_device
        self.fits = fits


def host_available_bytes() -> int | None:
    """The host memory the kernel can give without swapping (``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def device_free_bytes(device: jax.Device) -> int | None:
    """What ``device``'s allocator can still hand out, or None where it reports no limit (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without allocator stats raise rather than return None
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


@dataclass(frozen=True)
class Free:
    """The least free memory of a set of devices, per device, and where that is."""

    bytes: int
    where: str


def free_per_device(devices: Sequence[jax.Device]) -> Free | None:
    """The smallest free memory per device among ``devices``; None if no device reports any.

    CPU devices of one process draw on the same host memory, so each gets an equal share of it.
    """
    found: list[Free] = []
    cpus = 0
    for d in devices:
        free = device_free_bytes(d)
        if free is not None:
            found.append(Free(free, f"{d.platform}:{d.id}"))
        elif d.platform == "cpu":
            cpus += 1
    host = host_available_bytes() if cpus else None
    if host is not None:
        shared = f"host memory shared by {cpus} CPU devices" if cpus > 1 else "host memory"
        found.append(Free(host // cpus, f"each CPU device ({shared})"))
    return min(found, key=lambda f: f.bytes) if found else None


def needed_bytes(compiled: Any, resident: int) -> int | None:
    """Bytes per device that running ``compiled`` adds to what is in use, ``resident`` argument bytes being
    already there (the params); None where the backend gives no memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return None
    if stats is None:
        return None
    arguments = stats.argument_size_in_bytes - getattr(stats, "alias_size_in_bytes", 0)
    return (max(0, arguments - resident) + stats.output_size_in_bytes + stats.temp_size_in_bytes
            + stats.generated_code_size_in_bytes)


def size_text(n: int) -> str:
    if n >= GIB // 10:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 // 10 else f"{n} bytes"


def _is_free(n: int) -> str:
    return f"{size_text(n)} {'are' if size_text(n).endswith('bytes') else 'is'} free"


def check_fits(needed: int | None, pictures_per_device: int, size: tuple[int, int], devices: Sequence[jax.Device],
               setting: str, one_picture: Callable[[], int | None]) -> None:
    """``InsufficientMemoryError`` if ``needed`` bytes per device exceed what ``devices`` have free.

    ``one_picture()`` gives the bytes one picture per device needs at the same size; it is
    called only to say what fits when a call of several pictures per device does not (memory
    grows about linearly with the pictures, so two points estimate the largest count that fits).
    ``setting`` names the argument to lower.
    """
    if needed is None:
        return
    room = free_per_device(devices)
    if room is None or needed <= room.bytes:
        return
    height, width = size
    single = needed if pictures_per_device == 1 else one_picture()
    if single is None or single > room.bytes:
        raise InsufficientMemoryError(
            f"size: {height}x{width} needs {size_text(single or needed)} per device even for one picture per "
            f"device, but {_is_free(room.bytes)} on {room.where}; choose a smaller size",
            needed=needed, available=room.bytes, pictures_per_device=pictures_per_device, fits=0)
    per_picture = max(1, (needed - single) // (pictures_per_device - 1))
    fits = int(max(1, min(pictures_per_device - 1, 1 + (room.bytes - single) // per_picture)))
    raise InsufficientMemoryError(
        f"{setting}: {pictures_per_device} pictures per device at {height}x{width} need {size_text(needed)} per "
        f"device, but {_is_free(room.bytes)} on {room.where}; about {fits} per device fit at this size "
        f"(fewer pictures per call: inputs x num_images_per_prompt, --batch-size x --num-per-image in the CLI)",
        needed=needed, available=room.bytes, pictures_per_device=pictures_per_device, fits=fits)

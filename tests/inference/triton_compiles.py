"""What Triton specializes and compiles, read from a jitted kernel (compiled or interpreted)."""

from __future__ import annotations


def unspecialized(kernel) -> set[str]:
    """The arguments `kernel` leaves unspecialized (triton.jit's do_not_specialize)."""
    names = kernel.do_not_specialize if hasattr(kernel, "do_not_specialize") else \
        kernel.kwargs.get("do_not_specialize")
    return set(names or ())


def compiled_variants(kernel) -> int:
    """How many variants of `kernel` Triton has compiled in this process, on every device."""
    return sum(len(caches[0]) for caches in kernel.device_caches.values())

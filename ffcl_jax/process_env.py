"""The environment a CPU training process starts with: what only the process's owner may set.

XLA:CPU allocates each step's temporary buffers afresh, hundreds of MB for the demo pair, and
glibc hands allocations that large back to the kernel when freed: the next step touches new
pages and takes a page fault per 4 KiB (82,000 a step for the demo pair). With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages there (2 MiB each),
which removes nearly all of them (700 a step) and makes the demo step 1.15-1.35x faster
(docs/performance_log.md, "Huge pages for malloc"). glibc reads the tunable only when a process
starts, so the command line (`python -m ffcl_jax.main`, never `main.run()` called from Python)
restarts itself with it (`exec`, same PID and command line) and the benchmarks start their
workers with it; nothing in the library changes the environment. Only where it takes effect:
glibc 2.35 or later (older ones ignore the tunable) with transparent huge pages not `never`
(malloc asks for them with madvise, which `never` refuses). `--config.cpu.hugepage_malloc=false`
keeps the command line's process as it is, `FFCL_MALLOC_HUGEPAGES=0` any process (the
benchmarks' workers too).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FFCL_MALLOC_HUGEPAGES"
# The first glibc that reads glibc.malloc.hugetlb.
HUGETLB_GLIBC = (2, 35)
THP_ENABLED = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc as (major, minor); None under another C library."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a glibc, or no confstr at all
        return None
    match = re.fullmatch(r"glibc (\d+)\.(\d+)\S*", text.strip())
    return (int(match[1]), int(match[2])) if match else None


def transparent_hugepages() -> str | None:
    """The kernel's transparent huge page mode (`always`, `madvise` or `never`); None where the
    kernel has none."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    match = re.search(r"\[(\w+)\]", text)
    return match[1] if match else None


def hugepage_malloc_takes_effect() -> bool:
    """Whether `glibc.malloc.hugetlb=1` changes anything in a process started here."""
    if not sys.platform.startswith("linux"):
        return False
    version = glibc_version()
    if version is None or version < HUGETLB_GLIBC:
        return False
    return transparent_hugepages() in ("always", "madvise")


def with_hugepage_malloc(env: dict) -> dict | None:
    """`env` with glibc's huge-page tunable added, or None when there is nothing to add (the
    tunable would take no effect here, already set, opted out, or tunables of the user's own
    that name malloc's)."""
    if env.get(OPT_OUT, "1") == "0" or not hugepage_malloc_takes_effect():
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    joined = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    return {**env, "GLIBC_TUNABLES": joined}


def tunables_in_effect(tunables: str) -> str:
    """`GLIBC_TUNABLES` as a record of what applies: without its glibc.malloc.hugetlb setting
    where that takes no effect, so that no result claims huge-page malloc it did not have."""
    if hugepage_malloc_takes_effect():
        return tunables
    kept = [t for t in tunables.split(":") if t and not t.startswith("glibc.malloc.hugetlb")]
    return ":".join(kept)

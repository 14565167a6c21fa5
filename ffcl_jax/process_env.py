"""The environment a CPU training process starts with: what only the process's owner may set.

XLA:CPU allocates each step's temporary buffers afresh, hundreds of MB for the demo pair, and
glibc hands allocations that large back to the kernel when freed: the next step touches new
pages and takes a page fault per 4 KiB (82,000 a step for the demo pair). With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages there (2 MiB each),
which removes nearly all of them (700 a step) and makes the demo step 1.15-1.35x faster
(docs/performance.md, "Huge pages for malloc"). glibc reads the tunable only when a process
starts, so the CLI restarts itself with it (`exec`, same PID and command line) and the
benchmarks start their workers with it; nothing in the library changes the environment.
`FFCL_MALLOC_HUGEPAGES=0` keeps a process as it is.
"""

from __future__ import annotations

import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FFCL_MALLOC_HUGEPAGES"


def with_hugepage_malloc(env: dict) -> dict | None:
    """`env` with glibc's huge-page tunable added, or None when there is nothing to add (not
    Linux, already set, opted out, or tunables of the user's own that name malloc's)."""
    if not sys.platform.startswith("linux") or env.get(OPT_OUT, "1") == "0":
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    joined = f"{tunables}:{HUGEPAGE_TUNABLE}" if tunables else HUGEPAGE_TUNABLE
    return {**env, "GLIBC_TUNABLES": joined}

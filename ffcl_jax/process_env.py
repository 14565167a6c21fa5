"""The environment a CPU training process starts with: what only the process's owner may set.

XLA:CPU allocates each step's temporary buffers afresh as one block (221 MB for the demo pair,
1.4 GB for cifar100's) and frees it when the step ends. glibc serves a block that large with
its own `mmap` and returns it to the kernel on `free`, so every step faults its temporaries in
again: the kernel zeroes them page by page, and where they come on transparent huge pages it may
first compact memory to find 2 MiB pieces, which took 0.2-1.6 s of system time in some cifar100
steps and none in others (docs/performance.md, "Where a step's memory comes from").

`config.cpu.malloc` chooses how glibc serves the process (`MALLOC_CHOICES`):
- `retain` (the default): one arena, no `mmap` and no trimming, so a freed block stays with the
  process and the next step reuses it: no page faults in a step, the same step time each step.
  The process keeps its high-water mark of heap from then on.
- `hugepages`: transparent huge pages for large blocks (glibc >= 2.35, huge pages not `never`):
  512 times fewer faults than 4 KiB pages, but still faults and compaction every step.
- `system`: glibc as it comes.

glibc reads its tunables only when a process starts, so the command line (`python -m
ffcl_jax.main`, never `main.run()` called from Python) restarts itself with them (`exec`, the
same PID and command line), and the benchmarks start their workers with them (`$FFCL_MALLOC`
names the choice there, `retain` when unset); nothing in the library changes the environment.
Tunables the user set for malloc are kept as they are, and nothing is added to them.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

# Above any step's temporaries: freed memory at the top of the heap stays with the process.
_NEVER_TRIM = str(1 << 40)
MALLOC_TUNABLES = {
    "retain": (
        "glibc.malloc.arena_max=1",  # every thread's blocks from the heap that is never unmapped
        "glibc.malloc.mmap_max=0",  # no block on its own mmap, however large
        f"glibc.malloc.trim_threshold={_NEVER_TRIM}",
    ),
    "hugepages": ("glibc.malloc.hugetlb=1",),
    "system": (),
}
MALLOC_CHOICES = tuple(MALLOC_TUNABLES)
CHOICE_VARIABLE = "FFCL_MALLOC"  # the benchmarks' workers: the choice where no config says
# The first glibc that reads tunables at all, and the first that reads glibc.malloc.hugetlb.
TUNABLES_GLIBC = (2, 26)
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


def tunable_takes_effect(tunable: str) -> bool:
    """Whether glibc in a process started here reads `tunable` (`name=value`) and acts on it."""
    if not sys.platform.startswith("linux"):
        return False
    version = glibc_version()
    if version is None or version < TUNABLES_GLIBC:
        return False
    if tunable.startswith("glibc.malloc.hugetlb"):
        # malloc asks for huge pages with madvise, which `never` refuses.
        return version >= HUGETLB_GLIBC and transparent_hugepages() in ("always", "madvise")
    return True


def malloc_tunables(choice: str) -> tuple[str, ...]:
    """The tunables of `choice` (`MALLOC_CHOICES`) that take effect here; () for none."""
    if choice not in MALLOC_TUNABLES:
        raise ValueError(f"unknown malloc choice {choice!r}; valid: {', '.join(MALLOC_CHOICES)}")
    tunables = MALLOC_TUNABLES[choice]
    return tunables if all(map(tunable_takes_effect, tunables)) else ()


def with_malloc(env: dict, choice: str | None = None) -> dict | None:
    """`env` with the malloc tunables of `choice` (else `$FFCL_MALLOC`, else `retain`) added, or
    None when there is nothing to add: the choice takes no effect here, or `GLIBC_TUNABLES`
    already names a malloc tunable (the user's own, or those of the process that restarted)."""
    choice = choice or env.get(CHOICE_VARIABLE) or "retain"
    wanted = malloc_tunables(choice)
    tunables = env.get("GLIBC_TUNABLES", "")
    if not wanted or "glibc.malloc." in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, *wanted)))}


def tunables_in_effect(tunables: str) -> str:
    """`GLIBC_TUNABLES` as a record of what applies: without the settings that take no effect
    here, so that no result claims a malloc it did not have."""
    return ":".join(t for t in tunables.split(":") if t and tunable_takes_effect(t))


def malloc_choice(tunables: str) -> str:
    """Which `MALLOC_CHOICES` entry a `GLIBC_TUNABLES` string names (`system` when none): for a
    record, whose tunables were those in effect where it was made."""
    named = set(tunables.split(":"))
    for choice, wanted in MALLOC_TUNABLES.items():
        if wanted and named >= set(wanted):
            return choice
    return "system"


def malloc_in_effect(tunables: str) -> str:
    """Which `MALLOC_CHOICES` entry `GLIBC_TUNABLES` amounts to in a process started here."""
    return malloc_choice(tunables_in_effect(tunables))

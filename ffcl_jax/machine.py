"""The machine a run or benchmark ran on, as its records say it: the CPU model, its widest vector
extension and core count. This project's 2-core machines have come as AVX-512 and AVX2 EPYCs of
the same model name, whose step times differ 2x and whose fastest CPU settings differ too, so
results.json, the run's header line and every benchmark record it."""

from __future__ import annotations

import functools
import os
import platform

# /proc/cpuinfo's vendor_id, as records name the vendor.
VENDORS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}


def cpu_isa(cpu_flags: set[str], arch: str) -> str:
    """The widest vector extension among the CPU's flags ("AVX-512", "AVX2"; else the
    architecture)."""
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in cpu_flags:
            return name
    return arch


@functools.cache
def machine() -> dict:
    """{"cpu": model name, "vendor", "isa": cpu_isa, "cores", "system"} of this machine."""
    cpu, vendor, cpu_flags = platform.processor() or "cpu", "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    cpu = value.strip()
                elif key == "vendor_id":
                    vendor = VENDORS.get(value.strip(), value.strip())
                elif key in ("flags", "Features"):  # x86, arm
                    cpu_flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "vendor": vendor or platform.machine(),
        "isa": cpu_isa(cpu_flags, platform.machine()),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }

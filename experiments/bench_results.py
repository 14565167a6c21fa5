"""The benchmark's results: the machine description, one file name per setting, and the speed
table of docs/performance.md rebuilt from `experiments/results/bench_*.json`
(`python experiments/bench_step.py --readme`)."""

from __future__ import annotations

import glob
import json
import os

import readme_block  # experiments/, beside this module

from ffcl_jax.machine import cpu_isa, machine  # noqa: F401  (the benchmarks' machine record)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
README = os.path.join(ROOT, "docs", "performance.md")  # holds the bench table


def result_name(config, device: str, synthetic: bool, isa: str = "") -> str:
    """One file per pair, batch, device (a CPU by its ISA) and setting."""
    flags_tag = "_xlaflags" if os.environ.get("XLA_FLAGS") else ""
    if config.cpu.ynn_fusion != "auto":
        flags_tag += f"_ynn_{config.cpu.ynn_fusion}"
    if not config.cpu.flatten_after_fusion:
        flags_tag += "_noflatten"
    if config.cpu.kernels != "auto":
        flags_tag += f"_kernels_{config.cpu.kernels}"
    if config.cpu.batch_norm_backward != "auto":
        flags_tag += f"_bn_{config.cpu.batch_norm_backward}"
    if config.compute_dtype != "float32":
        flags_tag += f"_{config.compute_dtype}"
    if config.data_on_device:
        flags_tag += "_ondevice"
    if synthetic:
        flags_tag += "_synthetic"
    kind = "gpu" if "cpu" not in device.lower() else "cpu"
    from ffcl_jax.process_env import tunables_in_effect

    tunables = tunables_in_effect(os.environ.get("GLIBC_TUNABLES", ""))
    if kind == "cpu" and "glibc.malloc.hugetlb=1" in tunables:
        flags_tag += "_hugepages"
    if kind == "cpu" and isa:
        kind += "_" + isa.lower().replace("-", "")
    return f"bench_{config.teacher}_{config.student}_b{config.batch_size}_{kind}{flags_tag}"


def ynn_setting(compiler_options: dict | None) -> str:
    """The bench table's words for an XLA:CPU YNNPACK fusion list: "ynn eltwise+reduce"."""
    value = (compiler_options or {}).get("xla_cpu_experimental_ynn_fusion_type")
    if value is None:
        return "xla defaults"
    kinds = [kind.replace("LIBRARY_FUSION_TYPE_", "").lower() for kind in value.split(",") if kind]
    return "ynn " + "+".join(kinds) if kinds else "ynn off"


def write_readme(results: str = RESULTS, readme: str = README) -> None:
    """Rewrites the table between `readme`'s bench markers from the files in `results`."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results, "bench_*.json"))):
        with open(path) as f:
            r = json.load(f)
        j, t = r.get("jax", {}), r.get("pytorch", {})
        for mode in ("step", "epoch"):
            if mode not in j and mode not in t:
                continue
            key = "img_per_sec_median" if mode == "step" else "img_per_sec"
            speeds = [f"{side[mode][key]:.0f}" if mode in side else "-" for side in (j, t)]
            ratio = r.get("ratio", {}).get(mode)
            device = (j or t)["device"]
            settings = [r.get("compute_dtype", "float32")]
            if "cpu" in device.lower():
                m = r["machine"]
                device = f"{m['cores']}-core {m['cpu']}" + (f" ({m['isa']})" if "isa" in m else "")
                settings.append(ynn_setting(j.get("compiler_options")))
                if "xla_cpu_flatten_after_fusion" in j.get("xla_flags", ""):
                    settings.append("flatten after fusion")
            if j.get("closed_form_batch_norm"):
                settings.append("closed-form BN backward")
            if j.get("onednn_kernels"):
                settings.append("oneDNN convolutions")
            if "batch_norm_relu" in j.get("cpu_kernel_ops", []):
                settings.append("BatchNorm+ReLU kernel")
            if "glibc.malloc.hugetlb=1" in r.get("glibc_tunables", ""):
                settings.append("huge-page malloc")
            if mode == "epoch":
                settings.append("JAX data on device" if r.get("data_on_device") else "tf.data")
                if r.get("epoch_data") == "synthetic":
                    settings.append("synthetic images")
            setting = ", ".join(settings)
            rows.append(
                f"| {r['pair']} | {r['batch_size']} | {mode} | {device} | "
                f"{setting} | "
                f"{speeds[0]} | {speeds[1]} | "
                + (f"**{ratio:.2f}**" if ratio else "-")
                + f" | {r['date']} | `{r['command']}` |"
            )
    table = "\n".join(
        [
            "| pair | batch | mode | device | settings | JAX img/s | PyTorch img/s "
            "| JAX/PyTorch | date | command |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    readme_block.replace_block("bench", table, readme)
    print(f"README table: {len(rows)} rows from {results}/bench_*.json")

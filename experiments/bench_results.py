"""The benchmark's results: a run's turns summarised (ratios, the median turn, the step's fraction
of the machine's peak), the machine description, one file name per setting, and the tables
of docs/performance.md rebuilt from the committed results (`python experiments/bench_step.py
--readme`): the speed table from `experiments/results/bench_*.json`, and the table "Compiled for
TPU slices" from the reports of `python -m ffcl_jax.compile_for` in
`experiments/results/compile_for_*.json` (every time in it a compiler-based lower bound, never a
measurement)."""

from __future__ import annotations

import datetime
import glob
import json
import os
import statistics

from ffcl_jax.checkpoint import RENAMED_KEYS
from ffcl_jax.machine import cpu_isa, machine  # noqa: F401  (the benchmarks' machine record)
from ffcl_jax.process_env import malloc_choice, malloc_in_effect


def command_today(command: str) -> str:
    """A recorded command with the config keys renamed since under today's names, so that the
    table's commands run as shown (the JSON keeps the command as it ran)."""
    for old, new in RENAMED_KEYS.items():
        command = command.replace(f"--config.{old}=", f"--config.{new}=")
    return command


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
README = os.path.join(ROOT, "docs", "performance.md")  # holds the bench table
REPO_README = os.path.join(ROOT, "README.md")
# How the speed table names each cpu.malloc choice a record ran under (glibc's own: nothing).
MALLOC_SETTING = {"retain": "malloc keeps freed memory", "hugepages": "huge-page malloc"}


def result_name(config, device: str, synthetic: bool, isa: str = "") -> str:
    """One file per pair, batch, device (a CPU by its ISA) and setting."""
    flags_tag = "_xlaflags" if os.environ.get("XLA_FLAGS") else ""
    if config.cpu.ynn_fusion != "auto":
        flags_tag += f"_ynn_{config.cpu.ynn_fusion}"
    if not config.cpu.flatten_after_fusion:
        flags_tag += "_noflatten"
    if config.cpu.kernels != "auto":
        flags_tag += f"_kernels_{config.cpu.kernels}"
    if config.batch_norm_backward != "auto":
        flags_tag += f"_bn_{config.batch_norm_backward}"
    if config.compute_dtype != "float32":
        flags_tag += f"_{config.compute_dtype}"
    if config.data_on_device:
        flags_tag += "_ondevice"
    if synthetic:
        flags_tag += "_synthetic"
    kind = "gpu" if "cpu" not in device.lower() else "cpu"
    malloc = malloc_in_effect(os.environ.get("GLIBC_TUNABLES", ""))
    if kind == "cpu" and malloc != "system":
        flags_tag += f"_{malloc}"
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
            if "batch_norm_add_relu" in j.get("cpu_kernel_ops", []):
                settings.append("residual add+ReLU in it")
            malloc = malloc_choice(r.get("glibc_tunables", ""))
            if malloc != "system":
                settings.append(MALLOC_SETTING[malloc])
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
                + f" | {r['date']} | `{command_today(r['command'])}` |"
            )
    table = "\n".join(
        [
            "| pair | batch | mode | device | settings | JAX img/s | PyTorch img/s "
            "| JAX/PyTorch | date | command |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    replace_block("bench", table, readme)
    print(f"README table: {len(rows)} rows from {results}/bench_*.json")


COMPILE_FOR_HEADER = (
    "| report | slice | chips (hosts) | batch per chip | memory per chip (of HBM) | "
    "GFLOP per chip | GB accessed per chip | all-reduces: ops, MiB | step bound | "
    "epoch bound | compile |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def compile_for_row(name: str, report: dict) -> str:
    """One `ffcl_jax.compile_for` report as a row of the table "Compiled for TPU slices"."""
    step = report["train_step"]
    memory = step["memory_bytes"]
    split = report["training_split_on_chip_bytes"]
    reduces = step["collectives"].get("all-reduce", {"count": 0, "bytes": 0})
    others = [op for op in step["collectives"] if op != "all-reduce"]
    bound = step["roofline"]
    limiter = "HBM" if bound["limited_by"].startswith("HBM") else "compute"
    fraction = report["train_step_and_split_fraction_of_hbm"]
    other_ops = " + " + ", ".join(others) if others else ""
    # A step with loops (config.scan_blocks): XLA's cost analysis and the HLO's collectives
    # count each body once, so these cells undercount the step.
    once = " (loops once)" if step.get("while_loops") else ""
    return (
        f"| `{name}` | {report['topology']} | {report['chips']} ({report['hosts']}) | "
        f"{step['per_chip_batch']['image'][0]} | "
        f"{(memory['total'] + split) / 2**30:.2f} GiB ({fraction:.1%}) | "
        f"{step['flops'] / 1e9:.1f}{once} | {step['bytes_accessed'] / 1e9:.2f}{once} | "
        f"{reduces['count']}, {reduces['bytes'] / 2**20:.1f}{other_ops}{once} | "
        f"{bound['step_bound_seconds'] * 1e3:.2f} ms ({limiter}){once} | "
        f"{report['epoch_bound_seconds']['total']:.2f} s{once} | "
        f"{step['compile_seconds'] + report['eval_step']['compile_seconds']:.0f} s |"
    )


def write_compile_for_table(results: str = RESULTS, doc: str = README) -> None:
    """Rewrites the table between `doc`'s compile-for markers from `results`' compile_for_*.json."""
    reports = []
    for path in glob.glob(os.path.join(results, "compile_for_*.json")):
        with open(path) as f:
            report = json.load(f)
        reports.append((os.path.basename(path)[len("compile_for_") : -len(".json")], report))
    # One chip generation after another, smaller slices first, the preset before its variants.
    reports.sort(key=lambda r: (r[1]["chip"]["name"], r[1]["chips"], len(r[0]), r[0]))
    table = "\n".join([COMPILE_FOR_HEADER, *(compile_for_row(n, r) for n, r in reports)])
    replace_block("compile-for", table, doc)
    print(f"compile-for table: {len(reports)} rows from {results}/compile_for_*.json")


# Issue 61's levers slice by slice: each slice's report of the :tpu step as it was before them
# (unrolled, autodiff BatchNorm backward), as the preset compiles it now (scanned blocks, remat
# "auto", closed-form backward), and the same step unrolled (a full count of its bytes: XLA
# counts a loop's body once).
POD_SCALING_REPORTS = {
    "before": "compile_for_cifar100_tpu_{slice}.json",
    "scanned": "compile_for_cifar100_tpu_scanned_{slice}.json",
    "unrolled": "compile_for_cifar100_tpu_unrolled_closed_form_{slice}.json",
}
POD_SCALING_HEADER = (
    "| slice | batch per chip | compile s: before, scanned | compile CPU s: scanned, unrolled "
    "| generated code MiB: before, scanned | fixed MB | MB an image: before, now (unrolled) | "
    "step bound: before, now (unrolled) | scanned step bound (loops once) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def pod_scaling_reports(results: str = RESULTS) -> dict[str, dict[str, dict]]:
    """Each slice with all three reports (by its file-name tag, v5e_2x2): its reports by
    POD_SCALING_REPORTS' keys, in the order of the table "Compiled for TPU slices" (chip
    generation, then chips)."""
    slices = {}
    for path in glob.glob(os.path.join(results, "compile_for_cifar100_tpu_scanned_*.json")):
        tag = os.path.basename(path)[len("compile_for_cifar100_tpu_scanned_") : -len(".json")]
        paths = {
            key: os.path.join(results, pattern.format(slice=tag))
            for key, pattern in POD_SCALING_REPORTS.items()
        }
        if all(os.path.exists(p) for p in paths.values()):
            reports = {}
            for key, report_path in paths.items():
                with open(report_path) as f:
                    reports[key] = json.load(f)
            slices[tag] = reports
    order = sorted(
        slices, key=lambda t: (slices[t]["scanned"]["chip"]["name"], slices[t]["scanned"]["chips"])
    )
    return {tag: slices[tag] for tag in order}


def pod_scaling_row(reports: dict[str, dict]) -> str:
    """One slice's row of the before/after table, from its reports (`pod_scaling_reports`)."""
    steps = {key: report["train_step"] for key, report in reports.items()}
    batch = steps["scanned"]["per_chip_batch"]["image"][0]

    def compile_s(key):
        return steps[key]["compile_seconds"] + reports[key]["eval_step"]["compile_seconds"]

    def compile_cpu_s(key):  # recorded by compile_for since 2026-12-07
        seconds = [
            step.get("compile_cpu_seconds") for step in (steps[key], reports[key]["eval_step"])
        ]
        return f"{sum(seconds):.0f}" if None not in seconds else "-"

    def code_mib(key):
        return steps[key]["memory_bytes"]["generated_code"] / 2**20

    def mb_per_image(key):
        return steps[key]["bytes_accessed"] / batch / 1e6

    def bound_ms(key):
        return steps[key]["roofline"]["step_bound_seconds"] * 1e3

    return (
        f"| {reports['scanned']['topology']} | {batch} | "
        f"{compile_s('before'):.0f}, {compile_s('scanned'):.0f} | "
        f"{compile_cpu_s('scanned')}, {compile_cpu_s('unrolled')} | "
        f"{code_mib('before'):.1f}, {code_mib('scanned'):.1f} | "
        f"{reports['scanned']['fixed_bytes']['total'] / 1e6:.1f} | "
        f"{mb_per_image('before'):.1f}, {mb_per_image('unrolled'):.1f} | "
        f"{bound_ms('before'):.2f}, {bound_ms('unrolled'):.2f} ms | {bound_ms('scanned'):.2f} ms |"
    )


def write_pod_scaling_table(results: str = RESULTS, doc: str = README) -> None:
    """Rewrites the table between `doc`'s pod-scaling markers from the reports it names."""
    slices = pod_scaling_reports(results)
    table = "\n".join([POD_SCALING_HEADER, *map(pod_scaling_row, slices.values())])
    replace_block("pod-scaling", table, doc)
    print(f"pod-scaling table: {len(slices)} slices from {results}")


# The turns of a JAX-against-PyTorch benchmark (bench_step.py), summarised.


def summarize(times: list[float], batch_size: int) -> dict:
    median = statistics.median(times)
    return {
        "step_ms_min": round(1000 * min(times), 1),
        "step_ms_median": round(1000 * median, 1),
        "img_per_sec_median": round(batch_size / median, 1),
        "img_per_sec_best": round(batch_size / min(times), 1),
        "repeats": len(times),
    }


def timed_steps(before, after, times: list[float]) -> dict:
    """Every timed step's time and what the operating system charged them, from
    `resource.getrusage` before and after: page faults and system seconds a step, where an
    allocator that hands memory back to the operating system every step shows."""
    steps = max(len(times), 1)
    return {
        "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
        "system_seconds_per_step": round((after.ru_stime - before.ru_stime) / steps, 3),
        "times_ms": [round(1000 * t, 2) for t in times],
    }


def write_record(path: str, record: dict, argv: list[str]) -> None:
    """A measurement to commit, with its date and the command that made it."""
    record = {
        "date": datetime.date.today().isoformat(),
        "command": "python experiments/bench_step.py " + " ".join(argv),
        **record,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {path}")


def pair_ratios(sides: dict, modes: list[str]) -> dict[str, float]:
    """JAX/PyTorch throughput per mode, where both sides ran."""
    if not {"jax", "pytorch"} <= set(sides):
        return {}
    keys = {"step": "img_per_sec_median", "epoch": "img_per_sec"}
    return {
        mode: round(sides["jax"][mode][keys[mode]] / sides["pytorch"][mode][keys[mode]], 3)
        for mode in modes
    }


def fraction_of_peak(sides: dict) -> dict:
    """The machine's float32 peak (the faster framework's 4096 x 4096 matrix product on the same
    threads) and each side's step at its minimum as a fraction of it, the step's FLOPs counted
    by XLA (`train_gflop_per_step`); empty off the CPU or without a step."""
    gemms = [side["gemm_gflops"] for side in sides.values() if "gemm_gflops" in side]
    flops = sides.get("jax", {}).get("step", {}).get("train_gflop_per_step")
    if not gemms or not flops:
        return {}
    peak = max(gemms)
    result = {"gemm_gflops": peak}
    for name, side in sides.items():
        if "step" in side:
            achieved = flops / (side["step"]["step_ms_min"] / 1e3)
            result[f"{name}_step_min_gflops"] = round(achieved, 1)
            result[f"{name}_step_min_fraction"] = round(achieved / peak, 3)
    return result


def median_turn(ratios: list[dict[str, float]]) -> int:
    """The turn whose first mode's ratio is the median (the lower one for an even count)."""
    if not ratios[0]:
        return 0
    mode = next(iter(ratios[0]))
    order = sorted(range(len(ratios)), key=lambda i: ratios[i][mode])
    return order[(len(order) - 1) // 2]


def replace_block(name: str, content: str, path: str | None = None) -> None:
    """Rewrites the generated block NAME of a Markdown file (README.md unless `path`), between
    its start and end markers."""
    path = path or REPO_README
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with open(path) as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to fill")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    with open(path, "w") as f:
        f.write(f"{before}{start}\n{content}\n{end}{after}")

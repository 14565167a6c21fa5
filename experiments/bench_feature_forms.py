"""The cost of each feature form (`loss.feat_form`) against attention transfer, in one process.

    XLA_FLAGS=--xla_backend_extra_options=xla_cpu_flatten_after_fusion \
        python experiments/bench_feature_forms.py --config=configs/fashion_mnist.py

Times the jitted, donated FFCL train step of the config (random batch of its shape, as
`bench_step.py`'s step mode) for `attention`, `fused_map` and `stage_fusion`, in interleaved
rounds so that a machine's drift falls on all of them alike, and prints each form's median step
time and its ratio to attention's. Writes `experiments/results/feature_forms_<name>.json`.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_step  # noqa: E402  (experiments/, beside this script)

FORMS = ("attention", "fused_map", "stage_fusion")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per form and round.")
_WRITE = flags.DEFINE_bool("write", True, "Write the JSON result.")


def main(argv) -> None:
    del argv
    import jax

    from ffcl_jax import parallel, xla_cpu

    base = _CONFIG.value
    os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(base, os.environ.get("XLA_FLAGS", ""))
    mesh = parallel.DataParallel()
    steps = {}
    for form in FORMS:
        config = base.copy_and_resolve_references()
        config.loss.feat_form = form
        step, state, batch = bench_step.step_on_random_batch(config, mesh)
        with jax.set_mesh(mesh.mesh):
            for _ in range(2):  # compile and warm up
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        steps[form] = [step, state, batch]
    times = {form: [] for form in FORMS}
    with jax.set_mesh(mesh.mesh):
        for _ in range(_ROUNDS.value):
            for form in FORMS:
                step, state, batch = steps[form]
                for _ in range(_STEPS.value):
                    start = time.perf_counter()
                    state, metrics = step(state, batch)
                    jax.block_until_ready(metrics)
                    times[form].append(time.perf_counter() - start)
                steps[form][1] = state
    medians = {form: statistics.median(t) for form, t in times.items()}
    print(f"{base.teacher} + {base.student}, batch {base.batch_size}, {bench_step.machine()}")
    for form in FORMS:
        ratio = medians[form] / medians["attention"]
        print(f"{form:>13}: {1e3 * medians[form]:8.1f} ms/step  {ratio:.3f}x attention")
    if _WRITE.value:
        isa = bench_step.machine()["isa"].lower().replace("-", "")
        name = f"feature_forms_{base.teacher}_{base.student}_b{base.batch_size}_cpu_{isa}"
        path = os.path.join(bench_step.RESULTS, f"{name}.json")
        with open(path, "w") as f:
            json.dump(
                {
                    "date": datetime.date.today().isoformat(),
                    "command": " ".join(
                        ["python experiments/bench_feature_forms.py", *sys.argv[1:]]
                    ),
                    "machine": bench_step.machine(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "median_step_seconds": medians,
                    "ratio_to_attention": {f: medians[f] / medians["attention"] for f in FORMS},
                    "rounds": _ROUNDS.value,
                    "steps_per_round": _STEPS.value,
                },
                f,
                indent=2,
            )
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)

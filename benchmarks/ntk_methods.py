"""Time and peak memory of ntklib's three empirical-NTK methods.

Usage::

    python benchmarks/ntk_methods.py                 # full table (minutes)
    python benchmarks/ntk_methods.py --quick         # W <= 1024 only
    python benchmarks/ntk_methods.py --out FILE.json

Networks (float32, full kernel ``trace_axes=()``, ``x2 = x1``):

* MLP: input dim 32, three hidden ``Dense(W)`` + ReLU layers, ``Dense(10)``,
  N = 64, W in {256, 512, 1024, 2048, 4096};
* CNN: 3 × (Conv 3×3, 64 channels, SAME) + ReLU, GlobalAvgPool, Dense(10),
  16×16×3 inputs, N = 16.

Each (network, method) runs in its own subprocess, so the peak resident memory
(``ru_maxrss``) is that configuration's alone; the time is the median of
``--repeats`` calls after a compiling call. Configurations whose Jacobians
alone would exceed ``--memory-budget-gb`` (``N·O·P`` floats for JC and NTK-VP)
are skipped and reported as such. Ratios are taken within one run; absolute
seconds depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
SHORT = {"jacobian_contraction": "JC", "ntk_vector_products": "NTK-VP", "structured_derivatives": "SD"}


def build(kind: str, width: int):
    import jax

    import ntklib as nl

    if kind == "mlp":
        net, shape, n = nl.mlp([width] * 3, 10, "relu"), (32,), 64
    else:
        net, shape, n = nl.cnn([64] * 3, 10, "relu"), (16, 16, 3), 16
    _, params = net.init(jax.random.PRNGKey(0), (-1, *shape))
    x = jax.random.normal(jax.random.PRNGKey(1), (n, *shape))
    return net, params, x


def run_one(kind: str, width: int, method: str, repeats: int) -> dict:
    """Measure one configuration in this process; returns a JSON-able record."""
    import jax

    import ntklib as nl

    net, params, x = build(kind, width)
    t0 = time.perf_counter()
    k = nl.empirical_ntk(net, params, x, method=method, trace_axes=()).block_until_ready()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        nl.empirical_ntk(net, params, x, method=method, trace_axes=()).block_until_ready()
        times.append(time.perf_counter() - t0)
    costs = nl.method_costs(net, params, x, trace_axes=())
    return {
        "kind": kind, "width": width, "method": method, "median_s": statistics.median(times),
        "first_call_s": first, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kernel_norm": float(jax.numpy.linalg.norm(k)), "costs": costs,
        "n_params": int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))),
    }


def jacobian_gb(kind: str, width: int) -> float:
    n, o = (64, 10) if kind == "mlp" else (16, 10)
    p = 32 * width + 2 * width * width + 10 * width + 3 * width + 10 if kind == "mlp" else 9 * (3 + 64 + 64) * 64
    return n * o * p * 4 / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MLP widths up to 1024 only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-budget-gb", type=float, default=8.0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ntk_methods.json"))
    ap.add_argument("--one", nargs=3, metavar=("KIND", "WIDTH", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.one[2], args.repeats)))
        return

    widths = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    configs = [("mlp", w) for w in widths] + [("cnn", 64)]
    records = []
    for kind, width in configs:
        for method in METHODS:
            if method != "structured_derivatives" and jacobian_gb(kind, width) > args.memory_budget_gb:
                rec = {"kind": kind, "width": width, "method": method, "skipped":
                       f"Jacobians alone need ~{jacobian_gb(kind, width):.0f} GB > budget {args.memory_budget_gb} GB"}
            else:
                out = subprocess.run([sys.executable, __file__, "--one", kind, str(width), method,
                                      "--repeats", str(args.repeats)], capture_output=True, text=True)
                if out.returncode != 0:
                    rec = {"kind": kind, "width": width, "method": method,
                           "skipped": "failed: " + out.stderr.strip().splitlines()[-1][:200]}
                else:
                    rec = json.loads(out.stdout.strip().splitlines()[-1])
            records.append(rec)
            msg = rec.get("skipped") or f"{rec['median_s']:.4f} s, {rec['peak_rss_mb']:.0f} MB"
            print(f"  {kind} W={width:<5} {SHORT[method]:<7} {msg}", flush=True)

    print("\n| net | W | P | JC s | NTK-VP s | SD s | JC/SD | NTK-VP/SD | SD peak MB | auto picks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, width in configs:
        rows = {r["method"]: r for r in records if r["kind"] == kind and r["width"] == width}
        sd = rows["structured_derivatives"]

        def t(m, rows=rows):
            return "—" if "skipped" in rows[m] else f"{rows[m]['median_s']:.4f}"

        def ratio(m, rows=rows, sd=sd):
            return "—" if "skipped" in rows[m] or "skipped" in sd else f"{rows[m]['median_s'] / sd['median_s']:.1f}×"

        auto = min(sd["costs"], key=sd["costs"].get) if "costs" in sd else "?"
        print(f"| {kind} | {width if kind == 'mlp' else 64} | {sd.get('n_params', '?')} | {t('jacobian_contraction')} "
              f"| {t('ntk_vector_products')} | {t('structured_derivatives')} | {ratio('jacobian_contraction')} "
              f"| {ratio('ntk_vector_products')} | {sd.get('peak_rss_mb', 0):.0f} | {SHORT.get(auto, auto)} |")

    import jax

    meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "dtype": "float32", "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "records": records}, fh, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

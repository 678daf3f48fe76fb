"""ntklib's empirical NTK against its peers, on identical networks, weights and inputs.

Usage::

    python benchmarks/peers.py                  # everything (tens of minutes, plus a ~2.6 GB install once)
    python benchmarks/peers.py --quick          # MLP widths <= 1024 and the CNN; no large-N run
    python benchmarks/peers.py --skip-nt --skip-torch
    python benchmarks/peers.py --out FILE.json

Peers, each at its best documented settings:

* ``ntklib`` (this repo's venv): ``empirical_ntk(net, params, x, method=m, trace_axes=())`` for
  the three methods, called through the public API (its argument checks included);
* neural-tangents 0.6.5, which imports only with old JAX, so it runs in a venv this script
  creates, ``benchmarks/.venv-nt``: ``pip install neural-tangents==0.6.5 jax==0.4.25
  jaxlib==0.4.25 "numpy<2"`` (it pulls TensorFlow, ~2.6 GB).
  ``jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=...))`` for
  JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS and STRUCTURED_DERIVATIVES, ``f`` built with
  ``nt.stax`` (``Dense``/``Conv`` with ``parameterization='ntk', W_std=1, b_std=0``, ``Relu``,
  ``GlobalAvgPool``);
* PyTorch ``torch.func`` (``torch==2.13.0``, CPU) in ``benchmarks/.venv-torch``: the NTK
  tutorial's Jacobian contraction (``vmap(jacrev)`` + einsum) and NTK-vector products, the
  latter twice: as the tutorial writes it (``vmap(vmap(get_ntk))`` over example pairs, which
  materialises ``N²·O`` parameter-sized vectors) and batched like ntklib's and
  neural-tangents' (``J2ᵀe`` columns per example, each pushed by one ``jvp`` through the whole
  batch ``x1``; ``N·O`` parameter-sized vectors). The NTK parametrization is written into the
  torch modules' forward: ``c_w·(x @ W) + c_b·b``, ``c_w = W_std/√fan_in``, ``c_b = b_std``.

The parameters are drawn once by ``ntklib`` (``PRNGKey(0)``), the inputs by ``PRNGKey(1)``;
both are written to a ``.npz`` and loaded by every worker, so every library differentiates the
same function at the same point. Every kernel is compared with ntklib's structured-derivatives
kernel (relative Frobenius error, printed); so are the network outputs.

Configurations (float32, full kernel ``trace_axes=()``, ``x2 = x1``):

* MLP ``mlp([W]*3, 10, "relu")``: input dim 32, N = 64, W in {256, 512, 1024, 2048, 4096};
* CNN ``cnn([64]*3, 10, "relu")``: 3 × (Conv 3×3 SAME, 64 channels) + ReLU, GlobalAvgPool,
  Dense(10), 16×16×3 inputs, N = 16;
* large N (not with ``--quick``): N = 4096 traced kernel (``trace_axes=(-1,)``) of
  ``mlp([1024]*3, 10, "relu")`` with ``batch_size=512`` (ntklib) and ``nt.batch(...,
  batch_size=512)`` (neural-tangents), structured derivatives (the Jacobian methods' 512-row
  blocks alone would exceed the memory budget).

Interleaved (unless ``--no-interleave``): the headline ratio, ntklib SD / neural-tangents SD, is
measured a second time with one live worker per participant, timed in turns (ABC… CBA…) so that
all see the same machine load: ntklib's API call, the same call inside the user's ``jax.jit``
(no per-call argument checks), ntklib's own code run with neural-tangents' jax 0.4.25 (separates
the algorithms from the JAX/XLA versions), and neural-tangents; the median of per-round ratios is
reported. ``--interleave-only`` reruns just this part and merges it into an existing ``--out``.

Each (library, configuration, method) runs in its own subprocess, so the peak resident memory
(VmHWM, i.e. the subprocess's own ``ru_maxrss`` without what Linux carries over from the parent
at fork) is that configuration's own; it includes the library's import (TensorFlow for
neural-tangents), so ``rss_after_import_mb`` is recorded too. Times are medians of
``--repeats`` calls (more for fast calls: until 3 s of timed work, at most 50) after one
compiling / warm-up call. A configuration whose Jacobians alone would exceed
``--memory-budget-gb`` (``N·O·P·4`` bytes for JC and the NTK-VP methods; ``N²·O·P·4`` for the
tutorial's pairwise NTK-VP) is skipped and reported with the reason. Ratios are taken within one
run; absolute seconds depend on the machine and its load (the 1-minute load average is recorded
with every measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NT_VENV = os.path.join(HERE, ".venv-nt")
TORCH_VENV = os.path.join(HERE, ".venv-torch")
NT_PIP = ["neural-tangents==0.6.5", "jax==0.4.25", "jaxlib==0.4.25", "numpy<2"]
TORCH_VERSION = "2.13.0"

WIDTHS = (256, 512, 1024, 2048, 4096)
QUICK_WIDTHS = (256, 512, 1024)
D_IN, OUT, N_MLP = 32, 10, 64
CNN_CHANNELS, CNN_SHAPE, N_CNN = 64, (16, 16, 3), 16
LARGE_N, LARGE_W, LARGE_BS = 4096, 1024, 512

METHODS = {
    "ntklib": ("jacobian_contraction", "ntk_vector_products", "structured_derivatives"),
    "nt": ("JACOBIAN_CONTRACTION", "NTK_VECTOR_PRODUCTS", "STRUCTURED_DERIVATIVES"),
    "torch": ("jacobian_contraction", "ntk_vector_products", "ntk_vector_products_tutorial"),
}
SHORT = {"jacobian_contraction": "JC", "ntk_vector_products": "NTK-VP", "structured_derivatives": "SD",
         "JACOBIAN_CONTRACTION": "JC", "NTK_VECTOR_PRODUCTS": "NTK-VP", "STRUCTURED_DERIVATIVES": "SD",
         "ntk_vector_products_tutorial": "NTK-VP (tutorial, pairwise)",
         "structured_derivatives@jit": "SD inside jax.jit"}
# Interleaved participants; the last is the reference. "ntklib-jax0.4.25" is ntklib's own code run in the
# neural-tangents venv (jax 0.4.25, PYTHONPATH = this repo): it separates the algorithms from the JAX/XLA versions.
INTERLEAVED = (("ntklib", "structured_derivatives"), ("ntklib", "structured_derivatives@jit"),
               ("ntklib-jax0.4.25", "structured_derivatives"), ("nt", "STRUCTURED_DERIVATIVES"))
REFERENCE = ("ntklib", "structured_derivatives")


# --------------------------------------------------------------------------- configurations

def config_name(kind: str, width: int) -> str:
    return f"mlp-W{width}" if kind == "mlp" else ("cnn-C64" if kind == "cnn" else f"mlp-W{width}-N{LARGE_N}-traced")


def n_params(kind: str, width: int) -> int:
    if kind == "cnn":
        c, cin = CNN_CHANNELS, CNN_SHAPE[-1]
        return 9 * cin * c + c + 2 * (9 * c * c + c) + c * OUT + OUT
    return D_IN * width + width + 2 * (width * width + width) + width * OUT + OUT


def jacobian_gb(kind: str, width: int, method: str, n: int | None = None) -> float:
    """Bytes (GB) of the per-example Jacobians a JC / NTK-VP method materialises; 0 for SD."""
    if SHORT[method] == "SD":
        return 0.0
    n = n if n is not None else (N_MLP if kind == "mlp" else N_CNN)
    per = n * OUT * n_params(kind, width) * 4 / 1e9
    return per * n if method == "ntk_vector_products_tutorial" else per


# --------------------------------------------------------------------------- workers (run in subprocesses)

def _rss_mb() -> float:
    """Peak resident memory of this process (MB): VmHWM, else ru_maxrss.

    VmHWM is the high-water mark of this process's own address space; ru_maxrss on Linux also
    carries over the parent's resident size at fork time, which would floor every worker's
    figure at the orchestrator's.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MIN_TIME_S = 3.0     # fast calls are repeated until this much timed work (median less sensitive to load) ...
MAX_REPEATS = 50     # ... but at most this many times
SERVE = False        # worker in --serve mode: timed calls on request, one per "t" line on stdin


def _time(fn, repeats: int):
    """(first result, first-call seconds, timed seconds): at least ``repeats`` calls after the first.

    With ``SERVE`` the worker says READY after the first call and then times one call per ``t``
    line read from stdin (printing ``TIME seconds``) until any other line: the orchestrator
    alternates two such workers so that both see the same machine load.
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    if SERVE:
        print("READY", flush=True)
        for line in sys.stdin:
            if line.strip() != "t":
                break
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            print(f"TIME {times[-1]!r}", flush=True)
        return out, first, times
    while len(times) < repeats or (sum(times) < MIN_TIME_S and len(times) < MAX_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, first, times


def _load(data_path: str):
    import numpy as np

    with np.load(data_path) as z:
        d = {k: z[k] for k in z.files}
    n_layers = len([k for k in d if k.startswith("W")])
    return d["x"], [(d[f"W{i}"], d[f"b{i}"]) for i in range(n_layers)]


def worker_ntklib(kind, width, method, data_path, out_path, repeats, trace, batch_size):
    import jax
    import numpy as np

    import ntklib as nl

    rss_import = _rss_mb()
    x_np, weights = _load(data_path)
    net = nl.mlp([width] * 3, OUT, "relu") if kind != "cnn" else nl.cnn([CNN_CHANNELS] * 3, OUT, "relu")
    it = iter(weights)
    params = []
    for layer in net.layers:
        if layer.has_weights:
            w, b = next(it)
            params.append({"W": jax.numpy.asarray(w), "b": jax.numpy.asarray(b)})
        else:
            params.append(())
    params = tuple(params)
    x = jax.numpy.asarray(x_np)
    axes = (-1,) if trace else ()

    in_jit = method.endswith("@jit")
    method = method.removesuffix("@jit")
    jitted = jax.jit(lambda p, xx: nl.empirical_ntk(net, p, xx, method=method, trace_axes=axes))

    def call():
        if in_jit:
            return jitted(params, x).block_until_ready()
        return nl.empirical_ntk(net, params, x, method=method, trace_axes=axes,
                                batch_size=batch_size).block_until_ready()

    k, first, times = _time(call, repeats)
    rec = {"first_call_s": first, "times_s": times, "rss_after_import_mb": rss_import}
    if batch_size is None and method == "structured_derivatives" and not SERVE:
        # The same call inside the user's own jax.jit: no per-call argument checks (informational).
        _, _, jt = _time(lambda: jitted(params, x).block_until_ready(), repeats)
        rec["jit_wrapped_median_s"] = statistics.median(jt)
    costs = nl.method_costs(net, params, x[:LARGE_BS] if batch_size else x, trace_axes=axes)
    rec["auto_picks"] = min(costs, key=costs.get)
    f = np.asarray(net.apply(params, x[:64]))
    np.savez(out_path, kernel=np.asarray(k), f=f)
    rec.update(version=getattr(nl, "__version__", "?"), jax=jax.__version__, numpy=np.__version__,
               devices=[str(d) for d in jax.devices()])
    return rec


def worker_nt(kind, width, method, data_path, out_path, repeats, trace, batch_size):
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt
    import numpy as np
    from neural_tangents import stax

    rss_import = _rss_mb()
    x_np, weights = _load(data_path)
    kw = dict(W_std=1.0, b_std=0.0, parameterization="ntk")
    if kind == "cnn":
        layers = []
        for _ in range(3):
            layers += [stax.Conv(CNN_CHANNELS, (3, 3), padding="SAME", **kw), stax.Relu()]
        layers += [stax.GlobalAvgPool(), stax.Dense(OUT, **kw)]
    else:
        layers = []
        for _ in range(3):
            layers += [stax.Dense(width, **kw), stax.Relu()]
        layers += [stax.Dense(OUT, **kw)]
    init_fn, apply_fn, _ = stax.serial(*layers)
    x = jnp.asarray(x_np)
    _, template = init_fn(jax.random.PRNGKey(0), x.shape)
    it = iter(weights)
    params = []
    for p in template:  # (W, b) for Dense/Conv, () for the others
        if len(p) == 0:
            params.append(())
            continue
        w, b = next(it)
        if tuple(p[0].shape) != w.shape or p[1].size != b.size:
            raise ValueError(f"weight transfer: NT expects W{p[0].shape}, b{p[1].shape}; got W{w.shape}, b{b.shape}")
        params.append((jnp.asarray(w), jnp.asarray(b).reshape(p[1].shape)))
    params = tuple(params)

    impl = getattr(nt.NtkImplementation, method)
    kfn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,) if trace else (), vmap_axes=0,
                                      implementation=impl))
    if batch_size is not None:
        kfn = nt.batch(kfn, batch_size=batch_size, store_on_device=False)

    def call():
        return kfn(x, None, params).block_until_ready()

    k, first, times = _time(call, repeats)
    f = np.asarray(apply_fn(params, x[:64]))
    np.savez(out_path, kernel=np.asarray(k), f=f)
    return {"first_call_s": first, "times_s": times, "rss_after_import_mb": rss_import,
            "version": nt.__version__, "jax": jax.__version__, "numpy": np.__version__,
            "tensorflow_imported": "tensorflow" in sys.modules, "devices": [str(d) for d in jax.devices()]}


def worker_torch(kind, width, method, data_path, out_path, repeats, trace, batch_size):
    import math

    import numpy as np
    import torch
    from torch import nn
    from torch.func import functional_call, jacrev, jvp, vjp, vmap

    torch.set_num_threads(os.cpu_count() or 1)
    rss_import = _rss_mb()
    x_np, weights = _load(data_path)

    class Dense(nn.Module):
        """``c_w·(x @ W) + c_b·b`` with W stored (n_in, n_out) as in ntklib."""

        def __init__(self, w, b, W_std=1.0, b_std=0.0):
            super().__init__()
            self.W = nn.Parameter(torch.from_numpy(w))
            self.b = nn.Parameter(torch.from_numpy(b))
            self.c_w, self.c_b = W_std / math.sqrt(w.shape[0]), b_std

        def forward(self, x):
            return self.c_w * (x @ self.W) + self.c_b * self.b

    class Conv(nn.Module):
        """3×3 SAME convolution, NCHW; W transferred HWIO -> OIHW."""

        def __init__(self, w, b, W_std=1.0, b_std=0.0):
            super().__init__()
            self.W = nn.Parameter(torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))))
            self.b = nn.Parameter(torch.from_numpy(b))
            self.c_w, self.c_b = W_std / math.sqrt(w.shape[0] * w.shape[1] * w.shape[2]), b_std

        def forward(self, x):
            y = nn.functional.conv2d(x, self.W, padding="same")
            return self.c_w * y + self.c_b * self.b[None, :, None, None]

    class GlobalAvgPool(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    if kind == "cnn":
        mods = []
        for w, b in weights[:-1]:
            mods += [Conv(w, b), nn.ReLU()]
        mods += [GlobalAvgPool(), Dense(*weights[-1])]
        x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    else:
        mods = []
        for w, b in weights[:-1]:
            mods += [Dense(w, b), nn.ReLU()]
        mods += [Dense(*weights[-1])]
        x = torch.from_numpy(x_np)
    net = nn.Sequential(*mods)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def fnet(params, x):
        return functional_call(net, params, (x,))

    def fnet_single(params, x):
        return functional_call(net, params, (x.unsqueeze(0),)).squeeze(0)

    # --- the tutorial's Jacobian contraction
    def jacobian_contraction(params, x1, x2=None):
        jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
        jac1 = [j.flatten(2) for j in jac1.values()]
        if x2 is None:
            jac2 = jac1
        else:
            jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
            jac2 = [j.flatten(2) for j in jac2.values()]
        if trace:
            expr = "Naf,Maf->NM"
            return torch.stack([torch.einsum(expr, a, b) for a, b in zip(jac1, jac2)]).sum(0) / OUT
        return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jac1, jac2)]).sum(0)

    # --- the tutorial's NTK-vector products: vmap over every pair (x1_i, x2_j)
    def ntk_vector_products_tutorial(params, x1, x2=None):
        x2 = x1 if x2 is None else x2

        def get_ntk(x1, x2):
            def func_x1(params):
                return fnet_single(params, x1)

            def func_x2(params):
                return fnet_single(params, x2)

            output, vjp_fn = vjp(func_x1, params)

            def get_ntk_slice(vec):
                vjps = vjp_fn(vec)
                _, jvps = jvp(func_x2, (params,), vjps)
                return jvps

            basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
            return vmap(get_ntk_slice)(basis)

        result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)
        return torch.diagonal(result, dim1=-2, dim2=-1).mean(-1) if trace else result

    # --- NTK-vector products batched over x1: N2·O columns J2ᵀe, each pushed through all of x1 by one jvp
    def ntk_vector_products(params, x1, x2=None):
        x2 = x1 if x2 is None else x2

        def column(x2_m):
            out, vjp_fn = vjp(lambda p: fnet_single(p, x2_m), params)
            return vmap(vjp_fn)(torch.eye(out.numel(), dtype=out.dtype))[0]

        def products(v):
            return jvp(lambda p: fnet(p, x1), (params,), (v,))[1]

        cols = vmap(column)(x2)                       # {name: (N2, O_b, *shape)}
        k = vmap(vmap(products))(cols)                # (N2, O_b, N1, O_a)
        k = k.permute(2, 0, 3, 1)                     # (N1, N2, O_a, O_b)
        return torch.diagonal(k, dim1=-2, dim2=-1).mean(-1) if trace else k

    impl = {"jacobian_contraction": jacobian_contraction, "ntk_vector_products": ntk_vector_products,
            "ntk_vector_products_tutorial": ntk_vector_products_tutorial}[method]
    if batch_size is not None:
        raise ValueError("torch.func has no batching of its own; no large-N run for torch")
    k, first, times = _time(lambda: impl(params, x), repeats)
    with torch.no_grad():
        f = fnet(params, x[:64]).numpy()
    np.savez(out_path, kernel=k.detach().numpy(), f=f)
    return {"first_call_s": first, "times_s": times, "rss_after_import_mb": rss_import, "version": torch.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(), "numpy": np.__version__}


WORKERS = {"ntklib": worker_ntklib, "nt": worker_nt, "torch": worker_torch, "ntklib-jax0.4.25": worker_ntklib}


def run_worker(args):
    global SERVE
    SERVE = args.serve
    lib, kind, width, method, data_path, out_path = args.worker
    bs = args.batch_size if args.batch_size else None
    rec = WORKERS[lib](kind, int(width), method, data_path, out_path, args.repeats, args.trace, bs)
    rec["median_s"] = statistics.median(rec["times_s"])
    rec["peak_rss_mb"] = _rss_mb()
    rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(rec))


# --------------------------------------------------------------------------- environments

def _venv_python(venv: str) -> str:
    return os.path.join(venv, "bin", "python")


def _imports(venv: str, module: str) -> bool:
    py = _venv_python(venv)
    return os.path.exists(py) and subprocess.run([py, "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_nt_venv() -> str:
    if not _imports(NT_VENV, "neural_tangents"):
        print(f"creating {NT_VENV}: pip install {' '.join(NT_PIP)} (pulls TensorFlow, ~2.6 GB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", NT_VENV], check=True)
        subprocess.run([_venv_python(NT_VENV), "-m", "pip", "install", "-q", *NT_PIP], check=True)
    return _venv_python(NT_VENV)


def ensure_torch_venv() -> str:
    if not _imports(TORCH_VENV, "torch"):
        print(f"creating {TORCH_VENV}: torch=={TORCH_VERSION} (CPU build) + numpy ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", TORCH_VENV], check=True)
        pip = [_venv_python(TORCH_VENV), "-m", "pip", "install", "-q"]
        # The CPU wheel: from a local wheelhouse / configured index if it has it, else from PyTorch's CPU index.
        # (Plain `torch==X` from PyPI is the CUDA build, which drags in ~3 GB of nvidia-* wheels.)
        if subprocess.run([*pip, f"torch=={TORCH_VERSION}+cpu", "numpy"]).returncode != 0:
            subprocess.run([*pip, f"torch=={TORCH_VERSION}+cpu", "numpy",
                            "--extra-index-url", "https://download.pytorch.org/whl/cpu"], check=True)
    py = _venv_python(TORCH_VENV)
    cuda = subprocess.run([py, "-c", "import torch; print(torch.version.cuda)"], capture_output=True, text=True)
    if cuda.stdout.strip() != "None":
        print(f"warning: {TORCH_VENV} holds a CUDA build of torch (cuda {cuda.stdout.strip()})", flush=True)
    return py


# --------------------------------------------------------------------------- orchestration

def make_data(kind: str, width: int, n: int, path: str):
    """Parameters by ntklib's init (PRNGKey(0)), inputs N(0, 1) (PRNGKey(1)), to a .npz."""
    import jax
    import numpy as np

    import ntklib as nl

    if kind == "cnn":
        net, shape = nl.cnn([CNN_CHANNELS] * 3, OUT, "relu"), CNN_SHAPE
    else:
        net, shape = nl.mlp([width] * 3, OUT, "relu"), (D_IN,)
    _, params = net.init(jax.random.PRNGKey(0), (-1, *shape))
    x = jax.random.normal(jax.random.PRNGKey(1), (n, *shape))
    arrays = {"x": np.asarray(x)}
    for i, p in enumerate(p for p in params if p != ()):
        arrays[f"W{i}"], arrays[f"b{i}"] = np.asarray(p["W"]), np.asarray(p["b"])
    np.savez(path, **arrays)


def _make_data(kind: str, width: int, n: int, path: str):
    """make_data in a subprocess, so this orchestrating process stays small (see _rss_mb)."""
    subprocess.run([sys.executable, os.path.abspath(__file__), "--make-data", kind, str(width), str(n), path],
                   check=True)


def _env(lib: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    if lib == "ntklib-jax0.4.25":
        env["PYTHONPATH"] = os.path.dirname(HERE)
    return env


def measure(python: str, lib: str, kind: str, width: int, method: str, data: str, tmp: str, args,
            trace=False, batch_size=None) -> dict:
    out = os.path.join(tmp, f"{lib}-{config_name(kind, width)}-{method}.npz")
    cmd = [python, os.path.abspath(__file__), "--worker", lib, kind, str(width), method, data, out,
           "--repeats", str(args.repeats)]
    if trace:
        cmd.append("--trace")
    if batch_size:
        cmd += ["--batch-size", str(batch_size)]
    env = _env(lib)
    rec = {"library": lib, "config": config_name(kind, width), "kind": kind, "width": width, "method": method,
           "load_1min": os.getloadavg()[0]}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**rec, "skipped": f"timed out after {args.timeout} s"}
    rec["wall_s"] = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1][:300]
        why = f"killed by signal {-p.returncode} (out of memory?)" if p.returncode < 0 else f"failed: {tail}"
        return {**rec, "skipped": why}
    rec.update(json.loads(lines[-1][len("RESULT "):]))
    rec["_kernel_file"] = out
    return rec


def interleaved(pythons: dict, kind: str, width: int, data: str, tmp: str, args) -> dict:
    """ntklib SD (API call, and the same call inside ``jax.jit``) against neural-tangents SD, timed in turns.

    One live worker per participant (:data:`INTERLEAVED`); all compile and warm up first, then
    each round times one call of each, the order reversed every other round (ABC CBA …), so all
    see the same machine load. Reported: each participant's median and the median of the
    per-round ratios ntklib / NT (the number least sensitive to load drift).
    """
    parts = [(lib, method) for lib, method in INTERLEAVED if lib in pythons]
    who = [f"{lib} {method}" for lib, method in parts]
    rec = {"config": config_name(kind, width), "kind": kind, "width": width, "participants": who,
           "load_1min": os.getloadavg()[0]}
    procs = []
    try:
        for i, (lib, method) in enumerate(parts):
            out = os.path.join(tmp, f"il{i}-{lib}-{config_name(kind, width)}.npz")
            cmd = [pythons[lib], os.path.abspath(__file__), "--worker", lib, kind, str(width), method, data, out,
                   "--serve"]
            with open(os.path.join(tmp, f"il{i}-{lib}.err"), "w") as err:
                procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                              text=True, env=_env(lib)))

        def expect(p, prefix):
            for line in p.stdout:
                if line.startswith(prefix):
                    return line[len(prefix):].strip()
            raise RuntimeError(f"worker exited with {p.wait()} before {prefix.strip()}")

        for p in procs:
            expect(p, "READY")
        times = [[] for _ in procs]
        order = list(range(len(procs)))
        t_start = time.perf_counter()
        r = 0
        while r < args.rounds or (sum(map(sum, times)) < len(procs) * MIN_TIME_S and r < MAX_REPEATS):
            for i in (order if r % 2 == 0 else order[::-1]):
                procs[i].stdin.write("t\n")
                procs[i].stdin.flush()
                times[i].append(float(expect(procs[i], "TIME ")))
            r += 1
            if time.perf_counter() - t_start > args.timeout:
                break
        for p in procs:
            p.stdin.write("q\n")
            p.stdin.close()
        results = [json.loads(expect(p, "RESULT ")) for p in procs]
        for p in procs:
            p.wait(timeout=60)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
        for p in procs:
            if p.poll() is None:
                p.kill()
        return {**rec, "skipped": f"failed: {e}"}
    ref = times[-1]
    rec.update(rounds=r, times_s=times, median_s=dict(zip(who, map(statistics.median, times))),
               median_ratio_vs_nt={w: statistics.median([a / b for a, b in zip(t, ref)])
                                   for w, t in zip(who[:-1], times[:-1])},
               peak_rss_mb=dict(zip(who, [res["peak_rss_mb"] for res in results])),
               load_1min_end=os.getloadavg()[0])
    return rec


def _il_msg(rec) -> str:
    if "skipped" in rec:
        return rec["skipped"]
    med = ", ".join(f"{w.split()[0]} {SHORT[w.split()[1]]} {t:.4g} s" for w, t in rec["median_s"].items())
    rat = ", ".join(f"{w.split()[0]} {SHORT[w.split()[1]]} {v:.3g}" for w, v in rec["median_ratio_vs_nt"].items())
    return f"{med}; median per-round ratio ntklib/NT {rat} ({rec['rounds']} rounds)"


def compare(records: list, reference: dict | None):
    """Relative Frobenius errors of kernels and outputs against ntklib's SD."""
    import numpy as np

    if reference is None or "_kernel_file" not in reference:
        return
    with np.load(reference["_kernel_file"]) as z:
        k_ref, f_ref = z["kernel"].astype(np.float64), z["f"].astype(np.float64)
    for rec in records:
        if "_kernel_file" not in rec:
            continue
        with np.load(rec["_kernel_file"]) as z:
            k, f = z["kernel"].astype(np.float64), z["f"].astype(np.float64)
        if k.shape != k_ref.shape:
            rec["kernel_rel_err"] = None
            rec["kernel_shape_mismatch"] = [list(k.shape), list(k_ref.shape)]
            continue
        rec["kernel_rel_err"] = float(np.linalg.norm(k - k_ref) / np.linalg.norm(k_ref))
        rec["output_rel_err"] = float(np.linalg.norm(f - f_ref) / np.linalg.norm(f_ref))
        rec["kernel_shape"] = list(k.shape)


def fmt_t(rec):
    if rec is None:
        return "n/a"
    if "skipped" in rec:
        return "skip"
    return f"{rec['median_s']:.4g}"


def ratio(a, b):
    if a is None or b is None or "median_s" not in a or "median_s" not in b:
        return "—"
    return f"{a['median_s'] / b['median_s']:.3g}"


def best(recs):
    ok = [r for r in recs if r is not None and "median_s" in r]
    return min(ok, key=lambda r: r["median_s"]) if ok else None


def table(records, configs, inter=()):
    def il(cfg, who):
        r = next((r for r in inter if r["config"] == cfg and "median_ratio_vs_nt" in r), None)
        return "—" if r is None or who not in r["median_ratio_vs_nt"] else f"{r['median_ratio_vs_nt'][who]:.3g}"

    def get(lib, cfg, method):
        for r in records:
            if r["library"] == lib and r["config"] == cfg and r["method"] == method:
                return r
        return None

    lines = [
        "| config | P | ntklib JC | ntklib NTK-VP | ntklib SD | NT JC | NT NTK-VP | NT SD | torch JC | torch NTK-VP "
        "| torch NTK-VP tutorial | ntklib-SD / NT-SD | ntklib-SD / NT-SD interleaved "
        "| ntklib-SD in jax.jit / NT-SD interleaved | ntklib-SD on jax 0.4.25 / NT-SD interleaved "
        "| ntklib-best / NT-best | ntklib-SD / torch-JC | ntklib-SD / torch-NTKVP |",
        "|" + "---|" * 18,
    ]
    for kind, width in configs:
        cfg = config_name(kind, width)
        nl = [get("ntklib", cfg, m) for m in METHODS["ntklib"]]
        nt = [get("nt", cfg, m) for m in METHODS["nt"]]
        th = [get("torch", cfg, m) for m in METHODS["torch"]]
        th_vp = best(th[1:])
        cells = [cfg, str(n_params(kind, width))] + [fmt_t(r) for r in nl + nt + th]
        cells += [ratio(nl[2], nt[2]), il(cfg, "ntklib structured_derivatives"),
                  il(cfg, "ntklib structured_derivatives@jit"), il(cfg, "ntklib-jax0.4.25 structured_derivatives"),
                  ratio(best(nl), best(nt)), ratio(nl[2], th[0]), ratio(nl[2], th_vp)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def err_table(records):
    lines = ["| config | library | method | kernel rel. err vs ntklib SD | output rel. err | peak RSS MB "
             "| RSS after import MB | load | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['config']} | {r['library']} | {SHORT[r['method']]} | skipped: {r['skipped']} "
                         f"| | | | {r['load_1min']:.1f} | |")
            continue
        e = r.get("kernel_rel_err")
        o = r.get("output_rel_err")
        note = ""
        if "jit_wrapped_median_s" in r:
            note = f"inside jax.jit: {r['jit_wrapped_median_s']:.4g} s"
        if "batch_size" in r:
            note = f"N={r['n']}, batch_size={r['batch_size']}, traced; {r['median_s']:.4g} s"
        lines.append(f"| {r['config']} | {r['library']} | {SHORT[r['method']]} | "
                     f"{'n/a' if e is None else f'{e:.2e}'} | {'n/a' if o is None else f'{o:.2e}'} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_after_import_mb']:.0f} | {r['load_1min']:.1f} | {note} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="MLP widths <= 1024 and the CNN; no large-N run")
    ap.add_argument("--skip-nt", action="store_true", help="do not run neural-tangents (nor create its venv)")
    ap.add_argument("--skip-torch", action="store_true", help="do not run torch.func (nor create its venv)")
    ap.add_argument("--skip-large-n", action="store_true", help="no N=4096 traced run")
    ap.add_argument("--widths", type=int, nargs="+", help="MLP widths (overrides the default list and --quick)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call (median reported)")
    ap.add_argument("--memory-budget-gb", type=float, default=8.0,
                    help="skip JC / NTK-VP runs whose Jacobians alone (N·O·P·4 bytes) exceed this")
    ap.add_argument("--no-interleave", action="store_true",
                    help="skip the interleaved ntklib-SD vs neural-tangents-SD timing (ABBA rounds, same load)")
    ap.add_argument("--interleave-only", action="store_true",
                    help="only the interleaved SD timing; merged into an existing --out file (its table redrawn)")
    ap.add_argument("--rounds", type=int, default=11, help="minimum interleaved rounds (more for fast calls)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peers.json"))
    ap.add_argument("--worker", nargs=6, metavar=("LIB", "KIND", "WIDTH", "METHOD", "DATA", "OUT"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--make-data", nargs=4, metavar=("KIND", "WIDTH", "N", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args)
        return
    if args.make_data:
        make_data(args.make_data[0], int(args.make_data[1]), int(args.make_data[2]), args.make_data[3])
        return
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    pythons = {"ntklib": sys.executable}
    if not args.skip_nt:
        pythons["nt"] = pythons["ntklib-jax0.4.25"] = ensure_nt_venv()
    if not args.skip_torch:
        pythons["torch"] = ensure_torch_venv()

    widths = args.widths or (QUICK_WIDTHS if args.quick else WIDTHS)
    configs = [("mlp", w) for w in widths] + [("cnn", CNN_CHANNELS)]
    if args.interleave_only:
        interleave_only(pythons, configs, args)
        return
    tmp = tempfile.mkdtemp(prefix="ntk-peers-")
    records, inter = [], []
    meta_started = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        for kind, width in configs:
            data = os.path.join(tmp, f"data-{config_name(kind, width)}.npz")
            _make_data(kind, width, N_MLP if kind == "mlp" else N_CNN, data)
            cfg_records = []
            for lib in [lib for lib in METHODS if lib in pythons]:
                for method in METHODS[lib]:
                    gb = jacobian_gb(kind, width, method)
                    if gb > args.memory_budget_gb:
                        rec = {"library": lib, "config": config_name(kind, width), "kind": kind, "width": width,
                               "method": method, "load_1min": os.getloadavg()[0],
                               "skipped": f"Jacobians alone need ~{gb:.0f} GB > budget {args.memory_budget_gb:g} GB"}
                    else:
                        rec = measure(pythons[lib], lib, kind, width, method, data, tmp, args)
                    cfg_records.append(rec)
                    msg = rec.get("skipped") or f"{rec['median_s']:.4g} s, peak {rec['peak_rss_mb']:.0f} MB"
                    print(f"  {config_name(kind, width):<12} {lib:<7} {SHORT[method]:<28} {msg}", flush=True)
            ref = next((r for r in cfg_records if (r["library"], r["method"]) == REFERENCE), None)
            compare(cfg_records, ref)
            for r in cfg_records:
                if "kernel_rel_err" in r:
                    print(f"    agreement {r['library']:<7} {SHORT[r['method']]:<28} kernel {r['kernel_rel_err']:.2e}"
                          f"  outputs {r.get('output_rel_err', float('nan')):.2e}", flush=True)
            records += cfg_records
            if "nt" in pythons and not args.no_interleave:
                rec = interleaved(pythons, kind, width, data, tmp, args)
                inter.append(rec)
                msg = _il_msg(rec)
                print(f"    interleaved  {msg}", flush=True)

        large = []
        if not args.quick and not args.skip_large_n:
            data = os.path.join(tmp, "data-large.npz")
            _make_data("mlp", LARGE_W, LARGE_N, data)
            for lib in [lib for lib in ("ntklib", "nt") if lib in pythons]:
                method = "structured_derivatives" if lib == "ntklib" else "STRUCTURED_DERIVATIVES"
                rec = measure(pythons[lib], lib, "large", LARGE_W, method, data, tmp, args, trace=True,
                              batch_size=LARGE_BS)
                rec.update(n=LARGE_N, batch_size=LARGE_BS, trace_axes=[-1])
                large.append(rec)
                msg = rec.get("skipped") or f"{rec['median_s']:.4g} s, peak {rec['peak_rss_mb']:.0f} MB"
                print(f"  large-N      {lib:<7} {SHORT[method]:<28} {msg}", flush=True)
            compare(large, large[0] if large and large[0]["library"] == "ntklib" else None)
            records += large
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in records:
        r.pop("_kernel_file", None)

    versions = {}
    for r in records:
        if "version" in r:
            versions.setdefault(r["library"], r["version"])
            if r["library"] == "ntklib":
                versions.setdefault("ntklib_jax", r.get("jax"))
                versions.setdefault("ntklib_numpy", r.get("numpy"))
            if r["library"] == "nt":
                versions.setdefault("nt_jax", r.get("jax"))
                versions.setdefault("nt_numpy", r.get("numpy"))
            if r["library"] == "torch":
                versions.setdefault("torch_numpy", r.get("numpy"))
                versions.setdefault("torch_cuda", r.get("cuda"))
                versions.setdefault("torch_threads", r.get("threads"))
    meta = {"machine": platform.machine(), "processor": platform.processor() or _cpu_model(), "cpus": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "git": _git_describe(),
            "dtype": "float32", "repeats": args.repeats, "memory_budget_gb": args.memory_budget_gb,
            "started": meta_started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "reference": "ntklib structured_derivatives kernel (relative Frobenius errors)",
            "notes": "Times: medians of >= repeats calls (fast calls: until 3 s of timed work, <= 50) after one "
                     "warm-up call; each (library, config, method) in its own subprocess. "
                     "torch NTK-VP column = the faster of the tutorial's pairwise version and the batched one."}

    print("\nTimes (median seconds) and ratios (< 1: ntklib faster)\n")
    tab = table(records, configs, inter)
    print(tab)
    print("\nAgreement with ntklib's structured-derivatives kernel, memory, load\n")
    print(err_table(records))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "records": records, "interleaved": inter, "table_md": tab}, fh, indent=1)
    print(f"\nwrote {args.out}")


def interleave_only(pythons, configs, args):
    if "nt" not in pythons:
        raise SystemExit("--interleave-only needs neural-tangents (drop --skip-nt)")
    tmp = tempfile.mkdtemp(prefix="ntk-peers-")
    inter = []
    try:
        for kind, width in configs:
            data = os.path.join(tmp, f"data-{config_name(kind, width)}.npz")
            _make_data(kind, width, N_MLP if kind == "mlp" else N_CNN, data)
            rec = interleaved(pythons, kind, width, data, tmp, args)
            inter.append(rec)
            msg = _il_msg(rec)
            print(f"  {config_name(kind, width):<12} interleaved  {msg}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"meta": {}, "records": []}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            doc = json.load(fh)
    done = {r["config"] for r in inter}
    doc["interleaved"] = [r for r in doc.get("interleaved", []) if r["config"] not in done] + inter
    doc["meta"]["interleaved_run"] = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds_min": args.rounds,
                                      "note": "run after the main measurements, by --interleave-only"}
    all_configs = list(dict.fromkeys([(r["kind"], r["width"]) for r in doc["records"] if r["kind"] != "large"]
                                     + list(configs)))
    doc["table_md"] = table(doc["records"], all_configs, doc["interleaved"])
    print("\n" + doc["table_md"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    print(f"\nwrote {args.out}")


def _git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../ntklib"], capture_output=True, text=True,
                               cwd=HERE)
        return head.stdout.strip() + (" (ntklib/ modified)" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()

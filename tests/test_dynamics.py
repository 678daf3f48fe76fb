"""Tests of ntklib.dynamics: (5.1), (5.7)/(5.9), the trainers (A.9)/(A.10) and the (A.2) learning rates."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntklib
from ntklib.dynamics import gradient_descent_mse, linearize, train_gradient_descent, train_gradient_flow


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 for this module only (identities need it); the flag does not leak to other modules."""
    with jax.enable_x64(True):
        yield


_NET = ntklib.mlp([12, 12], 2, "erf", W_std=1.5, b_std=0.3)


@pytest.fixture(scope="module")
def setup(x64):
    net = _NET
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(k1, (5, 3))
    x /= jnp.linalg.norm(x, axis=1, keepdims=True)
    y = jax.random.normal(k2, (5, 2))
    xt = jax.random.normal(k3, (3, 3))
    _, p0 = net.init(k4, x.shape)
    full = ntklib.empirical_ntk(net, p0, x, trace_axes=())
    full_t = ntklib.empirical_ntk(net, p0, xt, x, trace_axes=())
    traced = ntklib.empirical_ntk(net, p0, x)
    traced_t = ntklib.empirical_ntk(net, p0, xt, x)
    return dict(net=net, p0=p0, x=x, y=y, xt=xt, f0=net.apply(p0, x), f0t=net.apply(p0, xt),
                full=full, full_t=full_t, traced=traced, traced_t=traced_t)


def _vec_kernel(k, o):
    """Kernel as a matrix over vec-(example, output) order; traced kernels as Θ̂ ⊗ I_O."""
    k = np.asarray(k)
    if k.ndim == 2:
        return np.kron(k, np.eye(o))
    return k.transpose(0, 2, 1, 3).reshape(k.shape[0] * o, k.shape[1] * o)


@jax.jit
def _ode(a_train, a_test, rate, y, f0, f0t, times):
    """Integrate ḟ = −rate·Θ̂(f − y), ḟ_test = −rate·Θ̂(x', 𝒳)(f − y) with diffrax at rtol = atol = 1e-12."""
    def vf(t, s, args):
        r = s[0] - y
        return -rate * (a_train @ r), -rate * (a_test @ r)

    sol = diffrax.diffeqsolve(diffrax.ODETerm(vf), diffrax.Dopri8(), 0.0, times[-1], None, (f0, f0t),
                              saveat=diffrax.SaveAt(ts=times), max_steps=100_000,
                              stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12))
    return sol.ys


def _ode_predictions(k, kt, y, f0, f0t, lr, normalization, times):
    n, o = y.shape
    m = n * o if normalization == "mean" else 1
    ys = _ode(jnp.asarray(_vec_kernel(k, o)), jnp.asarray(_vec_kernel(kt, o)), lr / m, y.reshape(-1),
              f0.reshape(-1), f0t.reshape(-1), jnp.asarray(times))
    return ys[0].reshape(len(times), n, o), ys[1].reshape(len(times), -1, o)


# --------------------------------------------------------------------------- (5.1)

def test_linearize(setup):
    net, p0, x = setup["net"], setup["p0"], setup["x"]
    f_lin = linearize(net, p0)
    np.testing.assert_allclose(f_lin(p0, x), net.apply(p0, x), rtol=0, atol=1e-14)
    d = jax.tree_util.tree_map(lambda a: 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), p0)
    p = jax.tree_util.tree_map(jnp.add, p0, d)
    j = ntklib.jacobian(net, p0, x)
    expected = net.apply(p0, x) + (j @ jax.flatten_util.ravel_pytree(d)[0]).reshape(x.shape[0], -1)
    np.testing.assert_allclose(f_lin(p, x), expected, rtol=1e-12, atol=1e-12)
    # linear in θ: f_lin(θ0 + 2d) − f0 = 2 (f_lin(θ0 + d) − f0); a generic callable works the same
    f_lin_c = linearize(lambda q, xx: net.apply(q, xx), p0)
    p2 = jax.tree_util.tree_map(lambda a, b: a + 2 * b, p0, d)
    np.testing.assert_allclose(f_lin_c(p2, x) - setup["f0"], 2 * (f_lin(p, x) - setup["f0"]), atol=1e-12)
    assert not np.allclose(net.apply(p, x), f_lin(p, x), atol=1e-6)  # the network itself is not linear


# --------------------------------------------------------------------------- (5.7), (5.9)

@pytest.mark.parametrize("kind", ["full", "traced"])
@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_closed_form_matches_ode(setup, kind, normalization):
    k, kt = (setup["full"], setup["full_t"]) if kind == "full" else (setup["traced"], setup["traced_t"])
    y, f0, f0t = setup["y"], setup["f0"], setup["f0t"]
    m = y.size if normalization == "mean" else 1
    lr = m / float(np.linalg.eigvalsh(_vec_kernel(k, 2)).max())          # η λ_max / m = 1
    times = np.array([0.0, 0.3, 1.0, 4.0, 20.0])
    predict = gradient_descent_mse(k, y, lr, f0_train=f0, ntk_test_train=kt, f0_test=f0t,
                                   normalization=normalization)
    ft, ftt = predict(times)
    ot, ott = _ode_predictions(k, kt, y, f0, f0t, lr, normalization, times)
    assert ft.shape == (5, 5, 2) and ftt.shape == (5, 3, 2)
    np.testing.assert_allclose(ft, ot, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ftt, ott, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ft[0], f0, atol=1e-14)
    assert np.abs(ft[-1] - ft[0]).max() > 0.1                       # something actually moved


def test_closed_form_infinity_and_times(setup):
    k, kt, y, f0, f0t = setup["full"], setup["full_t"], setup["y"], setup["f0"], setup["f0t"]
    predict = gradient_descent_mse(k, y, 1.0, f0_train=f0, ntk_test_train=kt, f0_test=f0t)
    f_inf, ft_inf = predict(jnp.inf)
    np.testing.assert_allclose(f_inf, y, atol=1e-10)                 # (5.7) at t = ∞ interpolates
    a, at = _vec_kernel(k, 2), _vec_kernel(kt, 2)
    expected = f0t.reshape(-1) - at @ np.linalg.solve(a, (f0 - y).reshape(-1))
    np.testing.assert_allclose(ft_inf.reshape(-1), expected, rtol=1e-9, atol=1e-9)
    # vector of times == stacked scalars; jit-able; t = 0 is f0; t = ∞ inside an array
    ts = jnp.array([0.0, 2.0, jnp.inf])
    fv, fvt = jax.jit(predict)(ts)
    for i, t in enumerate(ts):
        a_i, b_i = predict(t)
        np.testing.assert_allclose(fv[i], a_i, atol=1e-13)
        np.testing.assert_allclose(fvt[i], b_i, atol=1e-13)
    np.testing.assert_allclose(fv[0], f0, atol=1e-14)
    np.testing.assert_allclose(predict(1e9)[1], ft_inf, atol=1e-8)  # large t approaches t = ∞
    # composes with vmap over learning rates: η enters only through ηt
    lrs = jnp.array([0.5, 2.0])
    batched = jax.vmap(lambda lr: gradient_descent_mse(k, y, lr, f0_train=f0)(1.0)[0])(lrs)
    np.testing.assert_allclose(batched[1], predict(2.0)[0], atol=1e-13)
    # no test data: second output is None
    assert gradient_descent_mse(k, y, 1.0, f0_train=f0)(1.0)[1] is None


def test_closed_form_singular_duplicate_point(setup):
    net, p0 = setup["net"], setup["p0"]
    x = jnp.concatenate([setup["x"][:4], setup["x"][:1]])              # duplicated training point (same shapes)
    y = jnp.concatenate([setup["y"][:4], setup["y"][:1]])
    k = ntklib.empirical_ntk(net, p0, x, trace_axes=())
    kt = ntklib.empirical_ntk(net, p0, setup["xt"], x, trace_axes=())
    f0, f0t = net.apply(p0, x), setup["f0t"]
    lam = np.linalg.eigvalsh(_vec_kernel(k, 2))
    assert lam[0] < 1e-12 * lam[-1]                                    # Θ̂ is singular
    times = np.array([0.0, 1.0, 3.0, 10.0, 100.0])
    predict = gradient_descent_mse(k, y, 1.0, f0_train=f0, ntk_test_train=kt, f0_test=f0t)
    ft, ftt = predict(times)
    assert np.all(np.isfinite(ft)) and np.all(np.isfinite(ftt))
    ot, ott = _ode_predictions(k, kt, y, f0, f0t, 1.0, "mean", times)
    np.testing.assert_allclose(ft, ot, atol=1e-8)
    np.testing.assert_allclose(ftt, ott, atol=1e-8)
    f_inf, ft_inf = predict(jnp.inf)
    np.testing.assert_allclose(f_inf, y, atol=1e-9)
    pinv = np.linalg.pinv(_vec_kernel(k, 2), rcond=1e-10, hermitian=True)
    expected = f0t.reshape(-1) - _vec_kernel(kt, 2) @ pinv @ (f0 - y).reshape(-1)
    np.testing.assert_allclose(ft_inf.reshape(-1), expected, atol=1e-8)


def test_closed_form_exact_zero_eigenvalue():
    """λ = 0 exactly: φ_t(0) = ηt/m at finite t (the exact ODE solution), 0 at t = ∞ (pseudo-inverse)."""
    k = jnp.array([[2.0, 0.0], [0.0, 0.0]])
    kt = jnp.array([[0.5, 0.7]])
    y, f0, f0t = jnp.array([[1.0], [2.0]]), jnp.array([[0.0], [0.5]]), jnp.array([[0.3]])
    predict = gradient_descent_mse(k, y, 3.0, f0_train=f0, ntk_test_train=kt, f0_test=f0t, normalization="sum")
    r1, r2 = -1.0, -1.5
    for t in (0.0, 0.1, 2.0):
        a = 3.0 * t
        ft, ftt = predict(t)
        np.testing.assert_allclose(ft[:, 0], [0.0 - (-np.expm1(-2 * a)) * r1, 0.5], atol=1e-14)
        np.testing.assert_allclose(ftt[0, 0], 0.3 - 0.5 * (-np.expm1(-2 * a) / 2) * r1 - 0.7 * a * r2, atol=1e-14)
    ft, ftt = predict(jnp.inf)
    np.testing.assert_allclose(ft[:, 0], [1.0, 0.5], atol=1e-14)
    np.testing.assert_allclose(ftt[0, 0], 0.3 - 0.5 * r1 / 2, atol=1e-14)
    # the zero kernel: nothing moves, no nan, at any t
    ft, ftt = gradient_descent_mse(jnp.zeros((2, 2)), y, 1.0, f0_train=f0, ntk_test_train=jnp.zeros((1, 2)),
                                   f0_test=f0t)(jnp.array([0.0, 5.0, jnp.inf]))
    np.testing.assert_array_equal(ft, jnp.broadcast_to(f0, (3, 2, 1)))
    np.testing.assert_array_equal(ftt, jnp.broadcast_to(f0t, (3, 1, 1)))


# --------------------------------------------------------------------------- trainers

def _dist(p, p0):
    return jnp.sqrt(sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                                jax.tree_util.tree_leaves(p0))))


@jax.jit
def _hand_step(p, pl, p0, x, y, lr, inv_m):
    """Reference step, written out: θ ← θ − η ∇L for the network and for its linearization."""
    def loss(g, q):
        return 0.5 * jnp.sum((g(q, x) - y) ** 2) * inv_m

    f_lin = linearize(_NET.apply, p0)
    upd = lambda a, r, b: a - r * b  # noqa: E731
    return (jax.tree_util.tree_map(upd, p, lr, jax.grad(loss, 1)(_NET.apply, p)),
            jax.tree_util.tree_map(upd, pl, lr, jax.grad(loss, 1)(f_lin, pl)))


@jax.jit
def _hand_eval(p, pl, p0, x, y, xt, inv_m):
    f_lin = linearize(_NET.apply, p0)
    loss = lambda fx: 0.5 * jnp.sum((fx - y) ** 2) * inv_m  # noqa: E731
    return dict(f=_NET.apply(p, x), fl=f_lin(pl, x), ft=_NET.apply(p, xt), flt=f_lin(pl, xt), p=p,
                loss=loss(_NET.apply(p, x)), loss_lin=loss(f_lin(pl, x)), dist=_dist(p, p0), dist_lin=_dist(pl, p0))


def _hand_loop(p0, x, y, xt, lr, steps, normalization):
    """Reference: a plain Python loop over steps."""
    inv_m = 1.0 / y.size if normalization == "mean" else 1.0
    p, pl, out = p0, p0, []
    for _ in range(steps + 1):
        out.append(_hand_eval(p, pl, p0, x, y, xt, inv_m))
        p, pl = _hand_step(p, pl, p0, x, y, lr, inv_m)
    return out


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_gradient_descent_matches_hand_loop(setup, normalization):
    net, p0, x, y, xt = setup["net"], setup["p0"], setup["x"], setup["y"], setup["xt"]
    lam = float(np.linalg.eigvalsh(_vec_kernel(setup["full"], 2)).max())
    m = y.size if normalization == "mean" else 1
    # per-leaf learning rates (A.2)-style: a pytree with one rate per leaf, here all different
    lr = jax.tree_util.tree_map(lambda a: 0.5 * m / lam * (1 + 0.1 * a.ndim), p0)
    tr = train_gradient_descent(net, p0, x, y, lr, 12, record_every=5, x_test=xt, normalization=normalization,
                                progress=False)
    ref = _hand_loop(p0, x, y, xt, lr, 12, normalization)
    np.testing.assert_array_equal(tr.times, [0, 5, 10, 12])
    assert tr.num_steps == 12 and tr.ntk.shape == (4, 5, 5, 2, 2)
    for i, t in enumerate([0, 5, 10, 12]):
        r = ref[t]
        np.testing.assert_allclose(tr.f_train[i], r["f"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(tr.f_test[i], r["ft"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(tr.f_lin_train[i], r["fl"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(tr.f_lin_test[i], r["flt"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(tr.loss[i], r["loss"], rtol=1e-12)
        np.testing.assert_allclose(tr.loss_lin[i], r["loss_lin"], rtol=1e-12)
        np.testing.assert_allclose(tr.param_distance[i], r["dist"], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(tr.param_distance_lin[i], r["dist_lin"], rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(tr.ntk[i], ntklib.empirical_ntk(net, r["p"], x, trace_axes=()), rtol=1e-11,
                                   atol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(tr.params), jax.tree_util.tree_leaves(ref[12]["p"])):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    assert tr.loss[-1] < tr.loss[0] and tr.param_distance[0] == 0


def test_gradient_descent_progress_bar_and_no_records(setup, capsys):
    net, p0, x, y = setup["net"], setup["p0"], setup["x"], setup["y"]
    tr = train_gradient_descent(net, p0, x, y, 0.5, 5, record_every=5, record_ntk=False, progress=True)
    assert "gradient descent" in capsys.readouterr().err
    assert tr.ntk is None and tr.f_test is None and tr.f_train.shape == (2, 5, 2)
    train_gradient_descent(net, p0, x, y, 0.5, 5, record_every=5, record_ntk=False, progress=False)
    assert capsys.readouterr().err == ""


def test_gradient_flow_linearized_matches_closed_form(setup):
    net, p0, x, y, xt = setup["net"], setup["p0"], setup["x"], setup["y"], setup["xt"]
    lam = float(np.linalg.eigvalsh(_vec_kernel(setup["full"], 2)).max())
    lr = y.size / lam
    times = jnp.array([0.0, 1.0, 5.0, 20.0])
    tr = train_gradient_flow(net, p0, x, y, lr, times, x_test=xt, rtol=1e-11, atol=1e-11, progress=False)
    predict = gradient_descent_mse(setup["full"], y, lr, f0_train=setup["f0"], ntk_test_train=setup["full_t"],
                                   f0_test=setup["f0t"])
    ft, ftt = predict(times)
    np.testing.assert_allclose(tr.f_lin_train, ft, atol=1e-8)
    np.testing.assert_allclose(tr.f_lin_test, ftt, atol=1e-8)
    np.testing.assert_allclose(tr.times, times)
    assert tr.num_steps > 0 and tr.ntk.shape == (4, 5, 5, 2, 2)
    np.testing.assert_allclose(tr.ntk[0], setup["full"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tr.loss, 0.5 * np.sum((np.asarray(tr.f_train) - np.asarray(y)) ** 2, axis=(1, 2))
                               / y.size, rtol=1e-12)
    # the network itself is not linear at width 12 but stays close to its linearization, and the flow agrees
    # with small-step gradient descent to first order in the step
    gap = np.abs(tr.f_train - tr.f_lin_train).max()
    assert 1e-6 < gap < 1.0
    gd = train_gradient_descent(net, p0, x, y, lr / 10, 200, record_every=5, record_ntk=False, progress=False)
    assert np.abs(gd.f_train[-1] - tr.f_train[3]).max() < 0.05


# --------------------------------------------------------------------------- (A.2)

def _std_params(net_ntk, p0, input_shape):
    """Standard-parametrization parameters realising the same function: W = c_w ω, b = c_b β."""
    fans, _ = ntklib.dynamics._weight_layer_fans(net_ntk, input_shape)
    out = list(p0)
    for i, layer, fan in fans:
        c_w, c_b = layer.scales(fan)
        out[i] = {"W": c_w * p0[i]["W"], "b": c_b * p0[i]["b"]}
    return tuple(out)


def test_equivalent_learning_rates_reproduce_standard_gd(setup):
    x, y, net_ntk, p0 = setup["x"], setup["y"], setup["net"], setup["p0"]
    net_std = ntklib.mlp([12, 12], 2, "erf", W_std=1.5, b_std=0.3, parametrization="standard")
    q0 = _std_params(net_ntk, p0, x.shape)
    np.testing.assert_allclose(net_std.apply(q0, x), net_ntk.apply(p0, x), atol=1e-14)
    k_std = ntklib.empirical_ntk(net_std, q0, x, trace_axes=())
    eta_std = 0.5 * y.size / float(np.linalg.eigvalsh(_vec_kernel(k_std, 2)).max())
    common = dict(record_every=5, record_ntk=False, progress=False)
    ref = train_gradient_descent(net_std, q0, x, y, eta_std, 200, **common)
    rates = ntklib.equivalent_ntk_learning_rates(net_ntk, eta_std, x.shape)
    eq = train_gradient_descent(net_ntk, p0, x, y, rates, 200, **common)
    scale = np.abs(ref.f_train).max()
    assert np.abs(eq.f_train - ref.f_train).max() < 1e-12 * scale        # trajectories coincide to rounding
    for a, b in zip(jax.tree_util.tree_leaves(_std_params(net_ntk, eq.params, x.shape)),
                    jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)
    assert ref.loss[-1] < 0.5 * ref.loss[0]

    # the printed (A.2) rates with η_std = η0/n_max: weight rates agree with the equivalent ones, bias rates are
    # n_l (= fan-in) times larger, and the trajectories do not coincide
    printed, n_max = ntklib.layerwise_learning_rates(net_ntk, eta_std * 12, x.shape)
    assert n_max == 12
    fans = [3, 12, 12]
    for li, fan in zip(net_ntk.weight_layers(), fans):
        np.testing.assert_allclose(printed[li]["W"], rates[li]["W"], rtol=1e-14)
        np.testing.assert_allclose(printed[li]["b"], fan * rates[li]["b"], rtol=1e-14)
    a2 = train_gradient_descent(net_ntk, p0, x, y, printed, 200, **common)
    assert np.abs(a2.f_train - ref.f_train).max() > 1e-3 * scale


def test_learning_rate_helpers_edge_cases(setup):
    x = setup["x"]
    rates = ntklib.equivalent_ntk_learning_rates(ntklib.mlp([8], 1, W_std=2.0, b_std=0.0), 0.1, x.shape)
    assert rates[0]["b"] == 0.0 and rates[0]["W"] == pytest.approx(0.1 * 3 / 4)
    rates_std = ntklib.equivalent_ntk_learning_rates(ntklib.mlp([8], 1, parametrization="standard"), 0.1, x.shape)
    assert all(r == 0.1 for r in jax.tree_util.tree_leaves(rates_std))
    printed, n_max = ntklib.layerwise_learning_rates(ntklib.mlp([8], 1, b_std=0.0), 1.0, x.shape)
    assert n_max == 8 and printed[0]["b"] == 0.0 and printed[2]["W"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="eta0"):
        ntklib.layerwise_learning_rates(ntklib.mlp([8], 1), -1.0, x.shape)
    with pytest.raises(ValueError, match="NTK-parametrized"):
        ntklib.layerwise_learning_rates(ntklib.mlp([8], 1, parametrization="standard"), 1.0, x.shape)
    with pytest.raises(ValueError, match="eta_std"):
        ntklib.equivalent_ntk_learning_rates(ntklib.mlp([8], 1), float("nan"), x.shape)


# --------------------------------------------------------------------------- bad input

def test_closed_form_errors(setup):
    k, y, f0 = setup["full"], setup["y"], setup["f0"]
    with pytest.raises(ValueError, match="normalization"):
        gradient_descent_mse(k, y, 1.0, f0_train=f0, normalization="avg")
    with pytest.raises(ValueError, match="learning_rate"):
        gradient_descent_mse(k, y, -1.0, f0_train=f0)
    with pytest.raises(ValueError, match="y_train"):
        gradient_descent_mse(k, y[:, 0], 1.0, f0_train=f0)
    with pytest.raises(ValueError, match="f0_train"):
        gradient_descent_mse(k, y, 1.0, f0_train=f0[:4])
    with pytest.raises(ValueError, match="ntk_train_train"):
        gradient_descent_mse(k[:4, :4], y, 1.0, f0_train=f0)
    with pytest.raises(ValueError, match="ntk_train_train"):
        gradient_descent_mse(k[..., :1, :1], y, 1.0, f0_train=f0)
    with pytest.raises(ValueError, match="together"):
        gradient_descent_mse(k, y, 1.0, f0_train=f0, ntk_test_train=setup["full_t"])
    with pytest.raises(ValueError, match="same kind"):
        gradient_descent_mse(k, y, 1.0, f0_train=f0, ntk_test_train=setup["traced_t"], f0_test=setup["f0t"])
    predict = gradient_descent_mse(k, y, 1.0, f0_train=f0)
    with pytest.raises(ValueError, match="t must be >= 0"):
        predict(-1.0)
    with pytest.raises(ValueError, match="t must be >= 0"):
        predict(jnp.array([0.0, -2.0]))


def test_trainer_errors(setup):
    net, p0, x, y = setup["net"], setup["p0"], setup["x"], setup["y"]
    with pytest.raises(ValueError, match="y_train"):
        train_gradient_descent(net, p0, x, y[:4], 0.1, 1)
    with pytest.raises(ValueError, match="y_train"):
        train_gradient_flow(net, p0, x, y[:, :1], 0.1, [1.0])
    with pytest.raises(ValueError, match="x_test"):
        train_gradient_descent(net, p0, x, y, 0.1, 1, x_test=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="learning_rate"):
        train_gradient_descent(net, p0, x, y, -0.1, 1)
    bad = jax.tree_util.tree_map(lambda a: 0.1, p0)
    bad[0]["b"] = -1.0
    with pytest.raises(ValueError, match="learning_rate"):
        train_gradient_descent(net, p0, x, y, bad, 1)
    with pytest.raises(ValueError, match="learning_rate"):
        train_gradient_descent(net, p0, x, y, {"W": 0.1}, 1)
    with pytest.raises(ValueError, match="normalization"):
        train_gradient_descent(net, p0, x, y, 0.1, 1, normalization="avg")
    with pytest.raises(ValueError, match="steps"):
        train_gradient_descent(net, p0, x, y, 0.1, -1)
    with pytest.raises(ValueError, match="record_every"):
        train_gradient_descent(net, p0, x, y, 0.1, 1, record_every=0)
    with pytest.raises(ValueError, match="ntk_method"):
        train_gradient_descent(net, p0, x, y, 0.1, 1, ntk_method="exact")
    with pytest.raises(ValueError, match="times"):
        train_gradient_flow(net, p0, x, y, 0.1, [0.0, -1.0])
    with pytest.raises(ValueError, match="times"):
        train_gradient_flow(net, p0, x, y, 0.1, [2.0, 1.0])
    with pytest.raises(ValueError, match="rtol"):
        train_gradient_flow(net, p0, x, y, 0.1, [1.0], rtol=0.0)
    with pytest.raises(ValueError, match="solver"):
        train_gradient_flow(net, p0, x, y, 0.1, [1.0], solver="euler")
    with pytest.raises(ValueError, match="params"):
        train_gradient_descent(net, p0[:-1], x, y, 0.1, 1)

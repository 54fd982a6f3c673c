"""Rosenbrock (Rodas-family) integrator, compiled with numba — a *code template*.

This file is not imported as a module.  :mod:`immunoode.compile` appends its
text (from the marker below) to the generated, model-specific functions
``rhs``, ``jac``, ``dfdt``, ``record``, ``lu_factor`` and ``lu_solve`` and the
constants ``N_STATES``, ``NNZ``, ``NLU``, ``JAC_ROWS``, ``JAC_COLS``,
``HAS_T``, ``HAS_SPARSE_LU``, ``HAS_STEP`` (with ``step``, the unrolled step of
:mod:`immunoode.llvmgen`) and a tableau from :mod:`.tableaus` (``_NS``,
``_A``, ``_C``, ``_CS``, ``_DS``, ``_H``, ``_GAMMA``, ``_ERR_EXP``), and writes
the result to the on-disk cache, where numba caches the machine code next to it.

Methods: Rodas5P (default; order 5, embedded order 4, dense output of order 4,
eight stages) or Rodas4 (Hairer & Wanner; order 4, six stages) — stiffly
accurate, L-stable Rosenbrock methods with one Jacobian and one LU
factorisation of ``I/(hγ) − J`` per step.  Explicit
time dependence enters through the ``∂f/∂t`` terms.  The linear systems use a
straight-line sparse LU generated from the Jacobian's sparsity pattern, with a
dense partial-pivoting LU as the fallback whenever a pivot is small.

Integration restarts at every event time (bolus, infusion rate change,
multiplicative event) with a freshly estimated first step, so a dose is a jump,
never smoothed.  Output times are filled from the dense output; an output time
equal to an event time reports the state *after* the event.

Status codes: 0 success, -1 step size underflow, -2 non-finite state,
-3 too many steps, -4 singular iteration matrix.
"""
# --- template begins ---

@njit(cache=True)
def _dense_factor(jv, c, A, piv):
    n = A.shape[0]
    for i in range(n):
        for j in range(n):
            A[i, j] = 0.0
    for k in range(NNZ):
        A[JAC_ROWS[k], JAC_COLS[k]] -= jv[k]
    for i in range(n):
        A[i, i] += c
    for k in range(n):
        m = k
        amax = abs(A[k, k])
        for i in range(k + 1, n):
            if abs(A[i, k]) > amax:
                amax = abs(A[i, k])
                m = i
        if not (amax > 0.0) or not math.isfinite(amax):
            return False
        piv[k] = m
        if m != k:
            for j in range(n):
                tmp = A[k, j]
                A[k, j] = A[m, j]
                A[m, j] = tmp
        inv = 1.0 / A[k, k]
        for i in range(k + 1, n):
            f = A[i, k] * inv
            A[i, k] = f
            if f != 0.0:
                for j in range(k + 1, n):
                    A[i, j] -= f * A[k, j]
    return True


@njit(cache=True)
def _dense_solve(A, piv, B, r):
    """Solve in place for row ``r`` of ``B`` with the factors of :func:`_dense_factor`."""
    n = A.shape[0]
    for k in range(n):
        m = piv[k]
        if m != k:
            tmp = B[r, k]
            B[r, k] = B[r, m]
            B[r, m] = tmp
    for i in range(n):
        s = B[r, i]
        for k in range(i):
            s -= A[i, k] * B[r, k]
        B[r, i] = s
    for i in range(n - 1, -1, -1):
        s = B[r, i]
        for j in range(i + 1, n):
            s -= A[i, j] * B[r, j]
        B[r, i] = s / A[i, i]


@njit(cache=True)
def _rms_scaled(v, y, rtol, atol):
    n = v.shape[0]
    s = 0.0
    for i in range(n):
        e = v[i] / (atol[i] + rtol * abs(y[i]))
        s += e * e
    return math.sqrt(s / n)


@njit(cache=True)
def _store(t, y, p, rec, sel, out, io, states_only):
    if states_only:
        for s in range(sel.shape[0]):
            out[s, io] = y[sel[s]]
        return
    record(t, y, p, rec)
    for s in range(sel.shape[0]):
        out[s, io] = rec[sel[s]]


@njit(cache=True)
def _apply_event(kind, idx, val, y, u):
    if kind == 0:
        y[idx] += val
    elif kind == 1:
        u[idx] += val
        if abs(u[idx]) < 1e-12 * abs(val):
            u[idx] = 0.0
    else:
        y[idx] *= val


@njit(cache=True, error_model="numpy")
def _stages(t, h, y, p, u, f0, dT, dense, lu, A, piv, K, ytmp, du, ynew, rtol, atol):
    """One Rosenbrock step: stages K[s] = W^-1 (f(t + c_s h, y + sum_j A[s,j] K[j])
    + h d_s f_t + sum_j C[s,j] K[j] / h) with W = I/(h gamma) - J; returns the
    scaled RMS error and leaves the new solution in ``ynew``."""
    n = y.shape[0]
    hinv = 1.0 / h
    for st in range(_NS):
        if st == 0:
            for i in range(n):
                du[i] = f0[i]
        else:
            for i in range(n):
                acc = y[i]
                for jj in range(st):
                    acc += _A[st, jj] * K[jj, i]
                ytmp[i] = acc
            rhs(t + _CS[st] * h, ytmp, p, u, du)
        hd = h * _DS[st]
        for i in range(n):
            cc = 0.0
            for jj in range(st):
                cc += _C[st, jj] * K[jj, i]
            K[st, i] = du[i] + hd * dT[i] + cc * hinv
        if dense:
            _dense_solve(A, piv, K, st)
        else:
            lu_solve(lu, K, st)
    err = 0.0
    last = _NS - 1
    for i in range(n):
        ynew[i] = ytmp[i] + K[last, i]
        sc = atol[i] + rtol * max(abs(y[i]), abs(ynew[i]))
        e = K[last, i] / sc
        err += e * e
    return math.sqrt(err / n)


@njit(cache=True, error_model="numpy")
def _dense_coefficients(K, KD):
    n = K.shape[1]
    for r in range(_NH):
        for i in range(n):
            acc = 0.0
            for jj in range(_NS):
                acc += _H[r, jj] * K[jj, i]
            KD[r, i] = acc


@njit(cache=True, error_model="numpy")
def _interpolate(th, y, ynew, KD, out):
    n = y.shape[0]
    th1 = 1.0 - th
    for i in range(n):
        inner = KD[_NH - 1, i]
        for r in range(_NH - 2, -1, -1):
            inner = KD[r, i] + th * inner
        out[i] = th1 * y[i] + th * (ynew[i] + th1 * inner)


@njit(cache=True, nogil=True)
def integrate(y0, p, t_out, ev_t, ev_kind, ev_idx, ev_val, sel, rtol, atol, max_steps, hmax,
              out, info):
    """Integrate one parameter set over ``t_out`` through the events.

    ``out`` (len(sel), len(t_out)) receives ``record(...)[sel]`` at every output
    time; ``info`` (8,) receives steps, accepted, rejected, rhs calls,
    Jacobians, LU factorisations, failure time and failing state index.
    """
    n = N_STATES
    y = y0.copy()
    u = np.zeros(n)
    ynew = np.empty(n)
    ytmp = np.empty(n)
    f0 = np.empty(n)
    du = np.empty(n)
    dT = np.zeros(n)
    K = np.zeros((_NS, n))
    KD = np.zeros((_NH, n))
    jv = np.empty(max(NNZ, 1))
    lu = np.empty(max(NLU, 1))
    A = np.empty((n, n))
    piv = np.zeros(n, dtype=np.int64)
    rec = np.empty(N_RECORD)
    pe = np.empty(N_PE)
    derive_params(p, pe)
    for j in range(info.shape[0]):
        info[j] = 0.0
    info[6] = np.nan
    info[7] = -1.0

    T = t_out.shape[0]
    E = ev_t.shape[0]
    states_only = True
    for s in range(sel.shape[0]):
        if sel[s] >= n:
            states_only = False
    t = t_out[0]
    ie = 0
    io = 0
    while ie < E and ev_t[ie] <= t:
        _apply_event(ev_kind[ie], ev_idx[ie], ev_val[ie], y, u)
        ie += 1
    while io < T and t_out[io] <= t:
        _store(t, y, p, rec, sel, out, io, states_only)
        io += 1
    status = 0
    nsteps = 0
    while io < T:
        tb = t_out[T - 1]
        if ie < E and ev_t[ie] < tb:
            tb = ev_t[ie]
        if tb > t:
            # ---------------- one segment [t, tb] without events -------------
            rhs(t, y, pe, u, f0)
            info[3] += 1
            for i in range(n):
                ytmp[i] = abs(y[i])
            d0 = _rms_scaled(y, ytmp, rtol, atol)
            d1 = _rms_scaled(f0, ytmp, rtol, atol)
            span = tb - t
            if d0 < 1e-5 or d1 < 1e-5:
                h0 = 1e-6 * span if span < 1.0 else 1e-6
            else:
                h0 = 0.01 * d0 / d1
            h0 = min(h0, span)
            for i in range(n):
                ynew[i] = y[i] + h0 * f0[i]
            rhs(t + h0, ynew, pe, u, du)
            info[3] += 1
            for i in range(n):
                du[i] = du[i] - f0[i]
            d2 = _rms_scaled(du, ytmp, rtol, atol) / h0
            if d1 <= 1e-15 and d2 <= 1e-15:
                h1 = max(1e-6, h0 * 1e-3)
            else:
                h1 = (0.01 / max(d1, d2)) ** (-_ERR_EXP)
            h = min(100.0 * h0, h1, span, hmax)
            need_jac = True
            have_f0 = True
            rejected = False
            last_err = 0.0
            while True:
                if nsteps >= max_steps:
                    status = -3
                    break
                nsteps += 1
                last = False
                if t + h >= tb - 1e-12 * max(abs(tb), 1.0):
                    h = tb - t
                    last = True
                if not have_f0:
                    rhs(t, y, pe, u, f0)
                    info[3] += 1
                    have_f0 = True
                if need_jac:
                    jac(t, y, pe, jv)
                    if HAS_T:
                        dfdt(t, y, pe, dT)
                    info[4] += 1
                    need_jac = False
                c = 1.0 / (h * _GAMMA)
                dense = True
                if HAS_SPARSE_LU:
                    dense = not lu_factor(jv, c, lu)
                if dense:
                    ok = _dense_factor(jv, c, A, piv)
                    if not ok:
                        info[2] += 1
                        h *= 0.25
                        if h < 1e-14 * max(abs(t), 1.0):
                            status = -4
                            break
                        continue
                info[5] += 1
                if dense or not HAS_STEP:
                    err = _stages(t, h, y, pe, u, f0, dT, dense, lu, A, piv, K, ytmp, du, ynew,
                                  rtol, atol)
                else:
                    err = step(t, h, y, pe, u, f0, dT, lu, K, ynew, rtol, atol)
                info[3] += _NS - 1
                last_err = err
                if err <= 1.0:
                    info[1] += 1
                    tnew = tb if last else t + h
                    # dense output for output times inside (t, tnew), strictly before tb
                    if io < T and t_out[io] <= tnew and t_out[io] < tb:
                        _dense_coefficients(K, KD)
                        while io < T and t_out[io] <= tnew and t_out[io] < tb:
                            _interpolate((t_out[io] - t) / h, y, ynew, KD, ytmp)
                            _store(t_out[io], ytmp, p, rec, sel, out, io, states_only)
                            io += 1
                    for i in range(n):
                        y[i] = ynew[i]
                    t = tnew
                    need_jac = True
                    have_f0 = False
                    if last:
                        break
                    fac = 0.9 * err ** _ERR_EXP if err > 0.0 else 6.0
                    fac = min(1.0 if rejected else 6.0, max(0.2, fac))
                    h = min(h * fac, hmax)
                    rejected = False
                else:
                    info[2] += 1
                    if math.isfinite(err):
                        fac = max(0.2, 0.9 * err ** _ERR_EXP)
                    else:
                        fac = 0.1
                    h *= fac
                    rejected = True
                    if h < 1e-14 * max(abs(t), 1.0):
                        status = -1 if math.isfinite(err) else -2
                        break
            if status != 0:
                info[6] = t
                # the state that drove the failure: largest scaled error or non-finite value
                worst = 0.0
                iw = 0
                for i in range(n):
                    sc = atol[i] + rtol * abs(y[i])
                    e = abs(K[_NS - 1, i]) / sc
                    if not math.isfinite(e) or not math.isfinite(ynew[i]):
                        iw = i
                        break
                    if e > worst:
                        worst = e
                        iw = i
                info[7] = iw
                break
            t = tb
        while ie < E and ev_t[ie] <= tb:
            _apply_event(ev_kind[ie], ev_idx[ie], ev_val[ie], y, u)
            ie += 1
        while io < T and t_out[io] <= tb:
            _store(tb, y, p, rec, sel, out, io, states_only)
            io += 1
        t = tb
    info[0] = nsteps
    for j in range(io, T):
        for s in range(sel.shape[0]):
            out[s, j] = np.nan
    return status


@njit(cache=True, nogil=True)
def integrate_many(Y0, P, t_out, EV_T, EV_K, EV_I, EV_V, sel, rtol, atol, max_steps, hmax,
                   OUT, INFO, STATUS):
    """:func:`integrate` for every row of ``Y0``/``P`` (releases the GIL: callers run
    chunks of rows on several threads)."""
    for i in range(Y0.shape[0]):
        STATUS[i] = integrate(Y0[i], P[i], t_out, EV_T[i], EV_K[i], EV_I[i], EV_V[i], sel, rtol,
                              atol, max_steps, hmax, OUT[i], INFO[i])

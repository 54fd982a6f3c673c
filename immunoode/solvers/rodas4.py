"""Rodas4 Rosenbrock integrator, compiled with numba — a *code template*.

This file is not imported as a module.  :mod:`immunoode.compile` appends its
text (from the marker below) to the generated, model-specific functions
``rhs``, ``jac``, ``dfdt``, ``record``, ``lu_factor`` and ``lu_solve`` and the
constants ``N_STATES``, ``NNZ``, ``NLU``, ``JAC_ROWS``, ``JAC_COLS``,
``HAS_T``, ``HAS_SPARSE_LU``, and writes the result to the on-disk cache,
where numba caches the machine code next to it.

Method: Rodas4 (Hairer & Wanner, *Solving ODEs II*, 2nd ed., §VI.4), a
stiffly accurate L-stable Rosenbrock method of order 4 with an embedded
order-3 error estimate and a continuous (dense) output of order 3; six stages,
one Jacobian and one LU factorisation of ``I/(hγ) − J`` per step.  Explicit
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

_GAMMA = 0.25
_A21 = 1.544
_A31 = 0.9466785280815826
_A32 = 0.2557011698983284
_A41 = 3.314825187068521
_A42 = 2.896124015972201
_A43 = 0.9986419139977817
_A51 = 1.221224509226641
_A52 = 6.019134481288629
_A53 = 12.53708332932087
_A54 = -0.6878860361058950
_C21 = -5.6688
_C31 = -2.430093356833875
_C32 = -0.2063599157091915
_C41 = -0.1073529058151375
_C42 = -9.594562251023355
_C43 = -20.47028614809616
_C51 = 7.496443313967647
_C52 = -10.24680431464352
_C53 = -33.99990352819905
_C54 = 11.70890893206160
_C61 = 8.083246795921522
_C62 = -7.981132988064893
_C63 = -31.52159432874371
_C64 = 16.31930543123136
_C65 = -6.058818238834054
_c2 = 0.386
_c3 = 0.21
_c4 = 0.63
_D1 = 0.25
_D2 = -0.1043
_D3 = 0.1035
_D4 = -0.03620000000000023
# the same tableau as arrays, in the "u5 + k5" form: stage 6 evaluates at
# y + sum_j A5j K_j + K_5 and the solution is that point plus K_6 (error K_6).
_A = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [_A21, 0.0, 0.0, 0.0, 0.0, 0.0],
    [_A31, _A32, 0.0, 0.0, 0.0, 0.0],
    [_A41, _A42, _A43, 0.0, 0.0, 0.0],
    [_A51, _A52, _A53, _A54, 0.0, 0.0],
    [_A51, _A52, _A53, _A54, 1.0, 0.0]])
_C = np.array([
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [_C21, 0.0, 0.0, 0.0, 0.0, 0.0],
    [_C31, _C32, 0.0, 0.0, 0.0, 0.0],
    [_C41, _C42, _C43, 0.0, 0.0, 0.0],
    [_C51, _C52, _C53, _C54, 0.0, 0.0],
    [_C61, _C62, _C63, _C64, _C65, 0.0]])
_CS = np.array([0.0, _c2, _c3, _c4, 1.0, 1.0])
_DS = np.array([_D1, _D2, _D3, _D4, 0.0, 0.0])
_H21 = 10.12623508344586
_H22 = -7.487995877610167
_H23 = -34.80091861555747
_H24 = -7.992771707568823
_H25 = 1.025137723295662
_H31 = -0.6762803392801253
_H32 = 6.087714651680015
_H33 = 16.43084320892478
_H34 = 24.76722511418386
_H35 = -6.594389125716872


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
def _dense_solve(A, piv, b):
    n = A.shape[0]
    for k in range(n):
        m = piv[k]
        if m != k:
            tmp = b[k]
            b[k] = b[m]
            b[m] = tmp
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= A[i, k] * b[k]
        b[i] = s
    for i in range(n - 1, -1, -1):
        s = b[i]
        for j in range(i + 1, n):
            s -= A[i, j] * b[j]
        b[i] = s / A[i, i]


@njit(cache=True)
def _linsolve(dense, lu, A, piv, b):
    if dense:
        _dense_solve(A, piv, b)
    else:
        lu_solve(lu, b)


@njit(cache=True)
def _rms_scaled(v, y, rtol, atol):
    n = v.shape[0]
    s = 0.0
    for i in range(n):
        e = v[i] / (atol[i] + rtol * abs(y[i]))
        s += e * e
    return math.sqrt(s / n)


@njit(cache=True)
def _store(t, y, p, rec, sel, out, io):
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
    K = np.zeros((6, n))
    kd1 = np.empty(n)
    kd2 = np.empty(n)
    jv = np.empty(max(NNZ, 1))
    lu = np.empty(max(NLU, 1))
    A = np.empty((n, n))
    piv = np.zeros(n, dtype=np.int64)
    rec = np.empty(N_RECORD)
    for j in range(info.shape[0]):
        info[j] = 0.0
    info[6] = np.nan
    info[7] = -1.0

    T = t_out.shape[0]
    E = ev_t.shape[0]
    t = t_out[0]
    ie = 0
    io = 0
    while ie < E and ev_t[ie] <= t:
        _apply_event(ev_kind[ie], ev_idx[ie], ev_val[ie], y, u)
        ie += 1
    while io < T and t_out[io] <= t:
        _store(t, y, p, rec, sel, out, io)
        io += 1
    status = 0
    nsteps = 0
    while io < T:
        tb = t_out[T - 1]
        if ie < E and ev_t[ie] < tb:
            tb = ev_t[ie]
        if tb > t:
            # ---------------- one segment [t, tb] without events -------------
            rhs(t, y, p, u, f0)
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
            rhs(t + h0, ynew, p, u, du)
            info[3] += 1
            for i in range(n):
                du[i] = du[i] - f0[i]
            d2 = _rms_scaled(du, ytmp, rtol, atol) / h0
            if d1 <= 1e-15 and d2 <= 1e-15:
                h1 = max(1e-6, h0 * 1e-3)
            else:
                h1 = (0.01 / max(d1, d2)) ** 0.25
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
                    rhs(t, y, p, u, f0)
                    info[3] += 1
                    have_f0 = True
                if need_jac:
                    jac(t, y, p, jv)
                    if HAS_T:
                        dfdt(t, y, p, dT)
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
                # six stages: K[s] = W^-1 (f(t + c_s h, y + sum_j A[s,j] K[j]) + h d_s f_t
                #                          + sum_j C[s,j] K[j] / h),  W = I/(h gamma) - J
                for st in range(6):
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
                    for i in range(n):
                        acc = du[i] + h * _DS[st] * dT[i]
                        cc = 0.0
                        for jj in range(st):
                            cc += _C[st, jj] * K[jj, i]
                        K[st, i] = acc + cc / h
                    _linsolve(dense, lu, A, piv, K[st])
                info[3] += 5
                err = 0.0
                for i in range(n):
                    ynew[i] = ytmp[i] + K[5, i]
                    sc = atol[i] + rtol * max(abs(y[i]), abs(ynew[i]))
                    e = K[5, i] / sc
                    err += e * e
                err = math.sqrt(err / n)
                last_err = err
                if err <= 1.0:
                    info[1] += 1
                    tnew = tb if last else t + h
                    # dense output for output times inside (t, tnew), strictly before tb
                    if io < T and t_out[io] <= tnew and t_out[io] < tb:
                        for i in range(n):
                            kd1[i] = (_H21 * K[0, i] + _H22 * K[1, i] + _H23 * K[2, i]
                                      + _H24 * K[3, i] + _H25 * K[4, i])
                            kd2[i] = (_H31 * K[0, i] + _H32 * K[1, i] + _H33 * K[2, i]
                                      + _H34 * K[3, i] + _H35 * K[4, i])
                        while io < T and t_out[io] <= tnew and t_out[io] < tb:
                            th = (t_out[io] - t) / h
                            th1 = 1.0 - th
                            for i in range(n):
                                ytmp[i] = th1 * y[i] + th * (ynew[i] + th1 * (kd1[i] + th * kd2[i]))
                            _store(t_out[io], ytmp, p, rec, sel, out, io)
                            io += 1
                    for i in range(n):
                        y[i] = ynew[i]
                    t = tnew
                    need_jac = True
                    have_f0 = False
                    if last:
                        break
                    fac = 0.9 * err ** -0.25 if err > 0.0 else 6.0
                    fac = min(1.0 if rejected else 6.0, max(0.2, fac))
                    h = min(h * fac, hmax)
                    rejected = False
                else:
                    info[2] += 1
                    if math.isfinite(err):
                        fac = max(0.2, 0.9 * err ** -0.25)
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
                    e = abs(K[5, i]) / sc
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
            _store(tb, y, p, rec, sel, out, io)
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

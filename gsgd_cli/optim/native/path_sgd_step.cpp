// Path-SGD's fused CPU step, loaded by gsgd_cli/optim/native/path_sgd.py with ctypes (built by
// native/build.py together with gsgd_step.cpp). The readable reference is
// gsgd_cli/pathnorm/step.py (plan_update / rescale_ratio / apply_update).
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace {

using gsgd_native::parallel_ranges;
using gsgd_native::threads_for;

// ---- Path-SGD: w <- w - lr * rho * dw / kappa, kappa from the caller ------------------------
//
// One read pass per parameter (per-parameter checks: entries where kappa + eps is 0 but dw is
// not, finiteness of lr * update and of dw; sums of dw^2 and u^2 for the rescaling), then, only
// if every check passed, one write pass. kappa + eps = 0 with dw = 0 is a zero step (as in
// PathSGD.step). opts = [lr, eps, rescale (0 none, 1 first, 2 every)]; ratio[0] is the frozen
// ratio of rescale='first' (NaN until the first step that writes, which sets it). status as
// for G-SGD; diag = 3 values per parameter (zero-kappa count, update bad, dw bad).
template <typename T>
struct PathStats {
  double zero = 0, g2 = 0, u2 = 0;
  T chk_u = 0, chk_g = 0;
};

template <typename T>
void path_pass(const T* __restrict__ g, const T* __restrict__ k, int64_t n, T eps, T lr,
               PathStats<T>& st) {
  double zero = 0, g2 = 0, u2 = 0;
  T cu = 0, cg = 0;
#pragma omp simd reduction(+ : zero, g2, u2, cu, cg)
  for (int64_t i = 0; i < n; ++i) {
    const T kk = k[i] + eps;
    const bool z = kk == 0;
    const T u = g[i] / (z ? T(1) : kk);
    zero += (z && g[i] != 0) ? 1.0 : 0.0;
    const T lu = lr * u;   // lr * dw / kappa must be finite (NaN lr, overflow)
    cu += lu - lu;
    cg += g[i] - g[i];
    g2 += static_cast<double>(g[i]) * g[i];
    u2 += static_cast<double>(u) * u;
  }
  st.zero += zero;
  st.g2 += g2;
  st.u2 += u2;
  st.chk_u += cu;
  st.chk_g += cg;
}

template <typename T>
int64_t run_path(const int64_t* numels, int64_t n_params, const int64_t* ptrs,
                 const double* opts, double* ratio_slot, double* status, double* diag,
                 int nthreads) {
  status[0] += 1;
  if (status[1] != 0) return 0;
  const T eps = static_cast<T>(opts[1]);
  const int rescale = static_cast<int>(opts[2]);
  bool ok = true;
  double g2 = 0, u2 = 0;
  for (int64_t p = 0; p < n_params; ++p) {
    const T* g = reinterpret_cast<const T*>(ptrs[3 * p + 1]);
    const T* k = reinterpret_cast<const T*>(ptrs[3 * p + 2]);
    if (!g) continue;
    const int64_t n = numels[p];
    const int nt = threads_for(n, nthreads);
    PathStats<T> total;
    std::vector<PathStats<T>> parts(nt);
    parallel_ranges(nt, n, [&](int64_t i0, int64_t i1) {
      PathStats<T> st;
      path_pass(g + i0, k + i0, i1 - i0, eps, static_cast<T>(opts[0]), st);
#pragma omp critical
      {
        total.zero += st.zero; total.g2 += st.g2; total.u2 += st.u2;
        total.chk_u += st.chk_u; total.chk_g += st.chk_g;
      }
    });
    diag[3 * p] = total.zero;
    diag[3 * p + 1] = total.chk_u == 0 ? 0 : 1;
    diag[3 * p + 2] = total.chk_g == 0 ? 0 : 1;
    ok = ok && total.zero == 0 && total.chk_u == 0;
    g2 += total.g2;
    u2 += total.u2;
  }
  if (!ok) {
    status[1] = status[0];
    return 1;
  }
  for (int64_t p = 0; p < 3 * n_params; ++p) diag[p] = 0;
  double rho = 1;
  if (rescale != 0) {
    rho = std::sqrt(static_cast<double>(static_cast<T>(g2)) / static_cast<double>(static_cast<T>(u2)));
    if (!std::isfinite(rho)) rho = 1;
    if (rescale == 1) {
      if (std::isnan(ratio_slot[0])) ratio_slot[0] = static_cast<T>(rho);
      rho = ratio_slot[0];
    }
  }
  const T lr = static_cast<T>(opts[0]), r = static_cast<T>(rho);
  for (int64_t p = 0; p < n_params; ++p) {
    T* w = reinterpret_cast<T*>(ptrs[3 * p]);
    const T* g = reinterpret_cast<const T*>(ptrs[3 * p + 1]);
    const T* k = reinterpret_cast<const T*>(ptrs[3 * p + 2]);
    if (!g) continue;
    const int64_t n = numels[p];
    parallel_ranges(threads_for(n, nthreads), n, [&](int64_t i0, int64_t i1) {
      T* __restrict__ wp = w;
      const T* __restrict__ gp = g;
      const T* __restrict__ kp = k;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) {
        const T kk = kp[i] + eps;
        const T u = gp[i] / (kk == 0 ? T(1) : kk);
        wp[i] = wp[i] + (-lr) * (rescale != 0 ? u * r : u);
      }
    });
  }
  return 0;
}


}  // namespace

extern "C" {
int64_t path_sgd_step_f32(const int64_t* numels, int64_t n_params, const int64_t* ptrs,
                          const double* opts, double* ratio, double* status, double* diag,
                          int nthreads) {
  return run_path<float>(numels, n_params, ptrs, opts, ratio, status, diag, nthreads);
}
int64_t path_sgd_step_f64(const int64_t* numels, int64_t n_params, const int64_t* ptrs,
                          const double* opts, double* ratio, double* status, double* diag,
                          int nthreads) {
  return run_path<double>(numels, n_params, ptrs, opts, ratio, status, diag, nthreads);
}
}

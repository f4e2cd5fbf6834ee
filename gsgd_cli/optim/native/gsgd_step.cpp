// G-SGD's fused CPU step, loaded by gsgd_cli/optim/native/gsgd.py with ctypes (built by
// native/build.py together with path_sgd_step.cpp).
//
// gsgd_step_*: the G-SGD step of every chain block (and the parameters outside them) in one call.
//
// The readable reference is gsgd_cli/gspace/update.py (plan_chain_step / apply_chain_step);
// this file computes the same step with the same formulas, in two passes over each layer:
//
//   plan   one read pass over w and dw: per-node sums of w*dw (and of w*w with weight decay),
//          the largest |dw| and the finiteness of dw; then the per-node vectors (chain products,
//          pivot ratios, the bound on the update) in a few loops over the nodes;
//   check  nothing is written unless every block and every outside parameter passed;
//   apply  one write pass per layer: w' = w * a(row, col) + dw * b(row, col), where a and b are
//          products of per-row and per-column factors (no full-size coefficient matrix).
//
// Failures are recorded, not thrown (the caller raises GSGDStepError): status[0] counts the
// calls, status[1] is the 1-based number of the first call that failed (0: none). Once a call
// has failed, later calls write nothing until the caller resets status[1]. diag receives, at
// the first failure, which check failed where (its layout is documented in optim/gsgd_diag.py).
//
// Plain C++ with OpenMP, no torch headers: it compiles in a few seconds and is loaded with
// ctypes. Pointers, shapes and flags come from the caller, which checks dtypes and contiguity.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"

namespace {

using gsgd_native::parallel_ranges;
using gsgd_native::threads_for;

constexpr int64_t kDescLayer = 6;           // role, n_out, n_in, kernel, centre, bn
constexpr int64_t kPtrLayer = 6;            // w, dw, b, db, w momentum, b momentum
enum Role { kIn = 0, kPivot = 1, kOut = 2 };

struct Options {
  double lr, mu, wd, bpr, min_ratio;
};

template <typename T>
struct Layer {
  int64_t role, n_out, n_in, kernel, centre, bn;
  T *w, *g, *b, *gb, *buf, *bbuf;
  int64_t numel() const { return n_out * n_in * kernel; }
  int64_t n_skel() const { return role == kOut ? n_in : n_out; }
  // flat index of skeleton entry j: [j, j mod n_in] up to the pivot layer, else [j mod n_out, j]
  int64_t skel_flat(int64_t j) const {
    int64_t row = role == kOut ? j % n_out : j;
    int64_t col = role == kOut ? j : j % n_in;
    return (row * n_in + col) * kernel + centre;
  }
};

// Per-layer results of the plan pass.
struct LayerPlan {
  std::vector<double> node_wg;   // sums of w*dw per row (role in) or column (role out)
  std::vector<double> node_ww;   // sums of w*w, with weight decay
  std::vector<double> skel, gskel;
  std::vector<double> gscale;    // bn: per-row norm of the incoming filter (dw is scaled by it)
  double gmax = 0, bmax = 0;
  bool g_bad = false, b_bad = false;
};

// w * dw * scale (row layers: returned) or acc[i] += w[i] * dw[i] * scale (column layers).
// Accumulates in T (vector lanes); the caller adds the results up in double.
template <typename T, bool kScaled, int kMode>   // kMode 0: max only, 1: row sum, 2: acc
T row_pass_impl(const T* __restrict__ w, const T* __restrict__ g, int64_t n, T scale,
                T* __restrict__ acc, T& mx, T& chk) {
  T s = 0, m = mx, c = chk;
#pragma omp simd reduction(max : m) reduction(+ : c, s)
  for (int64_t i = 0; i < n; ++i) {
    const T a = std::abs(g[i]);
    m = a > m ? a : m;
    c += g[i] - g[i];
    if (kMode != 0) {
      const T p = w[i] * (kScaled ? static_cast<T>(g[i] * scale) : g[i]);
      if (kMode == 1) s += p;
      else acc[i] += p;
    }
  }
  mx = m;
  chk = c;
  return s;
}

template <typename T>
T row_pass(const T* w, const T* g, int64_t n, T scale, bool scaled, T* acc, T& mx, T& chk) {
  if (!w) return row_pass_impl<T, false, 0>(w, g, n, scale, acc, mx, chk);
  if (acc) return scaled ? row_pass_impl<T, true, 2>(w, g, n, scale, acc, mx, chk)
                         : row_pass_impl<T, false, 2>(w, g, n, scale, acc, mx, chk);
  return scaled ? row_pass_impl<T, true, 1>(w, g, n, scale, acc, mx, chk)
                : row_pass_impl<T, false, 1>(w, g, n, scale, acc, mx, chk);
}

// sum of x[i]^2 (row layers) or acc[i] += x[i]^2 (column layers)
template <typename T>
T square_pass(const T* __restrict__ x, int64_t n, T* __restrict__ acc) {
  T s = 0;
  if (acc) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += x[i] * x[i];
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  }
  return s;
}

std::vector<double> reciprocals(const std::vector<double>& x) {
  std::vector<double> out(x.size());
  const double* __restrict__ xp = x.data();
  double* __restrict__ op = out.data();
#pragma omp simd
  for (size_t i = 0; i < x.size(); ++i) op[i] = 1.0 / xp[i];
  return out;
}

// max of x[i]^2 (NaN if any x is NaN)
double max_square(const double* __restrict__ x, int64_t n) {
  double m = 0, chk = 0;
#pragma omp simd reduction(max : m) reduction(+ : chk)
  for (int64_t i = 0; i < n; ++i) {
    const double q = x[i] * x[i];
    m = q > m ? q : m;
    chk += q - q;
  }
  return chk == 0 ? m : std::numeric_limits<double>::quiet_NaN();
}

constexpr int64_t kFlushRows = 32;   // column layers: rows summed in T before adding to double

template <typename T>
void plan_layer(const Layer<T>& L, bool need_ww, int nthreads, LayerPlan& out) {
  const int64_t R = L.n_out, C = L.n_in, K = L.kernel, CK = C * K;
  const int nt = threads_for(L.numel(), nthreads);
  const bool rows = L.role == kIn, cols = L.role == kOut;
  out.skel.assign(L.n_skel(), 0.0);
  out.gskel.assign(L.n_skel(), 0.0);
  if (L.bn && L.g) {                               // paper eq. 39: dw * ||w_row||
    out.gscale.assign(R, 0.0);
    parallel_ranges(nt, R, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        out.gscale[r] = static_cast<T>(std::sqrt(static_cast<double>(
            square_pass<T>(L.w + r * CK, CK, nullptr))));
    });
  }
  const bool scaled = !out.gscale.empty();
  const bool do_wg = (rows || cols) && L.g, do_ww = (rows || cols) && need_ww;
  if (do_wg) out.node_wg.assign(rows ? R : C, 0.0);
  if (do_ww) out.node_ww.assign(rows ? R : C, 0.0);
  double gmax = 0;
  bool gbad = false;
  if (L.g || do_ww) {
    parallel_ranges(nt, R, [&](int64_t r0, int64_t r1) {
      // column layers: sums per (column, kernel offset) over this thread's rows, in T for
      // kFlushRows rows at a time, then in double
      std::vector<T> acc_wg, acc_ww;
      std::vector<double> part_wg, part_ww;
      if (cols && do_wg) { acc_wg.assign(CK, T(0)); part_wg.assign(CK, 0.0); }
      if (cols && do_ww) { acc_ww.assign(CK, T(0)); part_ww.assign(CK, 0.0); }
      T my_max = 0, chk = 0;
      int64_t pending = 0;
      auto flush = [&]() {
        for (int64_t i = 0; i < static_cast<int64_t>(acc_wg.size()); ++i) { part_wg[i] += acc_wg[i]; acc_wg[i] = 0; }
        for (int64_t i = 0; i < static_cast<int64_t>(acc_ww.size()); ++i) { part_ww[i] += acc_ww[i]; acc_ww[i] = 0; }
        pending = 0;
      };
      for (int64_t r = r0; r < r1; ++r) {
        const T* wr = L.w + r * CK;
        const T* gr = L.g ? L.g + r * CK : nullptr;
        const T sc = scaled ? static_cast<T>(out.gscale[r]) : T(1);
        if (gr) {
          T m = 0;
          const T s = row_pass(do_wg ? wr : nullptr, gr, CK, sc, scaled,
                               cols && do_wg ? acc_wg.data() : nullptr, m, chk);
          if (rows && do_wg) out.node_wg[r] = s;
          m = scaled ? m * sc : m;
          my_max = m > my_max ? m : my_max;
        }
        if (do_ww) {
          const T s = square_pass(wr, CK, cols ? acc_ww.data() : nullptr);
          if (rows) out.node_ww[r] = s;
        }
        if (cols && ++pending == kFlushRows) flush();
      }
      if (cols) flush();
#pragma omp critical
      {
        gmax = std::max(gmax, static_cast<double>(my_max));
        gbad = gbad || !(chk == 0);
        for (int64_t c = 0; c < (part_wg.empty() ? 0 : C); ++c)
          for (int64_t k = 0; k < K; ++k) out.node_wg[c] += part_wg[c * K + k];
        for (int64_t c = 0; c < (part_ww.empty() ? 0 : C); ++c)
          for (int64_t k = 0; k < K; ++k) out.node_ww[c] += part_ww[c * K + k];
      }
    });
  }
  out.gmax = gmax;
  out.g_bad = gbad;
  for (int64_t j = 0; j < L.n_skel(); ++j) {
    int64_t f = L.skel_flat(j);
    out.skel[j] = L.w[f];
    if (L.g) {
      int64_t row = f / CK;
      T gv = scaled ? static_cast<T>(L.g[f] * static_cast<T>(out.gscale[row])) : L.g[f];
      out.gskel[j] = gv;
    }
  }
  if (L.b && L.gb) {
    T m = 0, chk = 0;
    row_pass<T>(nullptr, L.gb, R, T(1), false, nullptr, m, chk);
    out.bmax = m;
    out.b_bad = !(chk == 0);
  }
}

// One write pass over a layer: w' = w * (ks - lr wd coef) - lr dw coef, where
// coef = rq[row] * cq[col] and ks = kr[row] * kc[col] (no momentum); with momentum
// buf' = mu buf + dw is + w (wd is + 2 bpr / is), w' = w sc - lr buf' is sc, is = rq[row] cq[col],
// sc = kr[row] kc[col]. Column factors are expanded to one per (column, kernel offset) so
// that the inner loop runs over a contiguous row.
template <typename T>
void apply_layer(const Layer<T>& L, const Options& o, const std::vector<T>& rq,
                 const std::vector<T>& cq, const std::vector<T>& kr, const std::vector<T>& kc,
                 const std::vector<double>& gscale, int nthreads) {
  const int64_t R = L.n_out, C = L.n_in, K = L.kernel, CK = C * K;
  const int nt = threads_for(L.numel(), nthreads);
  const bool scaled = !gscale.empty();
  const T lr = static_cast<T>(o.lr), lrwd = static_cast<T>(o.lr * o.wd);
  const T mu = static_cast<T>(o.mu), wd = static_cast<T>(o.wd), bpr2 = static_cast<T>(2 * o.bpr);
  const bool decay = o.wd != 0, reg = o.wd != 0 || o.bpr != 0;
  std::vector<T> cqk(CK), kck(CK);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      cqk[c * K + k] = cq[c];
      kck[c * K + k] = kc[c];
    }
  }
  const T* __restrict__ cqp = cqk.data();
  const T* __restrict__ kcp = kck.data();
  parallel_ranges(nt, R, [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict__ w = L.w + r * CK;
    const T* __restrict__ g = L.g ? L.g + r * CK : nullptr;
    const T sc = scaled ? static_cast<T>(gscale[r]) : T(1);
    const T rr = rq[r], krr = kr[r];
    if (o.mu == 0) {
      if (g && scaled) {
#pragma omp simd
        for (int64_t i = 0; i < CK; ++i) {
          const T co = rr * cqp[i];
          const T keep = decay ? krr * kcp[i] - lrwd * co : krr * kcp[i];
          w[i] = w[i] * keep - lr * (static_cast<T>(g[i] * sc) * co);
        }
      } else if (g) {
#pragma omp simd
        for (int64_t i = 0; i < CK; ++i) {
          const T co = rr * cqp[i];
          const T keep = decay ? krr * kcp[i] - lrwd * co : krr * kcp[i];
          w[i] = w[i] * keep - lr * (g[i] * co);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < CK; ++i) {
          const T co = rr * cqp[i];
          w[i] = w[i] * (decay ? krr * kcp[i] - lrwd * co : krr * kcp[i]);
        }
      }
    } else {
      T* __restrict__ b = L.buf + r * CK;
#pragma omp simd
      for (int64_t i = 0; i < CK; ++i) {
        const T is = rr * cqp[i];               // here rq, cq hold 1/s per row and column
        const T s_scale = krr * kcp[i];         // 1/R on the pivot side, else 1
        T v = b[i] * mu;
        if (g) v = v + (scaled ? static_cast<T>(g[i] * sc) : g[i]) * is;
        if (reg) v = v + w[i] * (wd * is + bpr2 / is);
        b[i] = v;
        w[i] = w[i] * s_scale - lr * (v * (is * s_scale));
      }
    }
  }
  });
}

template <typename T>
int64_t run(const int64_t* desc, const int64_t* ptrs, const double* opts, double* status,
            double* diag, int nthreads) {
  const Options o{opts[0], opts[1], opts[2], opts[3], opts[4]};
  status[0] += 1;
  if (status[1] != 0) return 0;                  // an earlier step failed: write nothing
  const int64_t num_blocks = desc[0];
  int64_t d = 1, p = 0;
  struct Block {
    int64_t P;
    std::vector<Layer<T>> layers;
    std::vector<LayerPlan> plans;
    T* pivot_buf;
    bool active;
    // per-node results used by apply
    std::vector<std::vector<double>> ins, outs;
    std::vector<std::vector<double>> inv_ins, inv_outs;   // 1 / In, 1 / Out
    std::vector<double> ratio, inv_ratio;
    std::vector<T> new_u;
    std::vector<double> new_pivot_buf;
  };
  std::vector<Block> blocks(num_blocks);
  for (auto& B : blocks) {
    const int64_t nl = desc[d], P = desc[d + 1];
    d += 2;
    B.P = P;
    B.layers.resize(nl);
    B.active = false;
    for (int64_t i = 0; i < nl; ++i, d += kDescLayer, p += kPtrLayer) {
      Layer<T>& L = B.layers[i];
      L.role = desc[d]; L.n_out = desc[d + 1]; L.n_in = desc[d + 2];
      L.kernel = desc[d + 3]; L.centre = desc[d + 4]; L.bn = desc[d + 5];
      L.w = reinterpret_cast<T*>(ptrs[p]);
      L.g = reinterpret_cast<T*>(ptrs[p + 1]);
      L.b = reinterpret_cast<T*>(ptrs[p + 2]);
      L.gb = reinterpret_cast<T*>(ptrs[p + 3]);
      L.buf = reinterpret_cast<T*>(ptrs[p + 4]);
      L.bbuf = reinterpret_cast<T*>(ptrs[p + 5]);
      B.active = B.active || L.g || L.gb;
    }
    B.pivot_buf = reinterpret_cast<T*>(ptrs[p]);
    p += 1;
  }
  const int64_t num_outside = desc[d];
  std::vector<T*> out_p(num_outside), out_g(num_outside), out_buf(num_outside);
  std::vector<int64_t> out_n(num_outside);
  for (int64_t k = 0; k < num_outside; ++k, p += 3) {
    out_n[k] = desc[d + 1 + k];
    out_p[k] = reinterpret_cast<T*>(ptrs[p]);
    out_g[k] = reinterpret_cast<T*>(ptrs[p + 1]);
    out_buf[k] = reinterpret_cast<T*>(ptrs[p + 2]);
  }

  // ---- plan: read passes and per-node vectors; nothing is written to the model ----------
  bool ok = true;
  int64_t diag_at = 0;
  std::vector<int64_t> diag_start(num_blocks);
  for (int64_t bi = 0; bi < num_blocks; ++bi) {
    Block& B = blocks[bi];
    const int64_t nl = static_cast<int64_t>(B.layers.size());
    diag_start[bi] = diag_at;
    diag_at += 3 * nl + 3;
    if (!B.active) continue;
    B.plans.resize(nl);
    for (int64_t i = 0; i < nl; ++i) plan_layer(B.layers[i], o.wd != 0, nthreads, B.plans[i]);
    // chain products In[k] (node layers 0 .. nl-1) and Out[k] (node layers 1 .. nl)
    std::vector<int64_t> widths(nl + 1);
    for (int64_t i = 0; i < nl; ++i) widths[i] = B.layers[i].n_in;
    widths[nl] = B.layers[nl - 1].n_out;
    B.ins.assign(nl, {});
    B.outs.assign(nl + 1, {});
    B.ins[0].assign(widths[0], 1.0);
    for (int64_t i = 0; i + 1 < nl; ++i) {
      const int64_t n = widths[i + 1];
      const auto& s = B.plans[i].skel;
      B.ins[i + 1].resize(n);
      const bool solid = B.layers[i].role == kOut;   // node j's skeleton edge is [j, j]
      for (int64_t j = 0, a = 0; j < n; ++j, a = a + 1 == widths[i] ? 0 : a + 1)
        B.ins[i + 1][j] = s[j] * B.ins[i][solid ? j : a];   // a = j mod n_i
    }
    B.outs[nl].assign(widths[nl], 1.0);
    for (int64_t i = nl - 1; i >= 1; --i) {
      const int64_t n = widths[i];
      const auto& s = B.plans[i].skel;
      B.outs[i].resize(n);
      const bool spread = B.layers[i].role == kOut;  // node j's skeleton edge is [j mod n, j]
      for (int64_t j = 0, b = 0; j < n; ++j, b = b + 1 == widths[i + 1] ? 0 : b + 1)
        B.outs[i][j] = s[j] * B.outs[i + 1][spread ? b : j];
    }
    // Inverse-Chain-Rule: S_j over the non-skeleton edges whose basis path has pivot j
    const int64_t P = B.P, np = widths[P + 1];
    std::vector<double> psum(np, 0.0);
    for (int64_t i = 0; i < nl; ++i) {
      const Layer<T>& L = B.layers[i];
      const LayerPlan& lp = B.plans[i];
      if (L.role == kPivot) continue;
      const int64_t n = L.n_skel();
      if (L.g)
        for (int64_t j = 0; j < n; ++j) psum[j] += lp.node_wg[j] - lp.skel[j] * lp.gskel[j];
      if (o.wd != 0)
        for (int64_t j = 0; j < n; ++j) psum[j] += o.wd * (lp.node_ww[j] - lp.skel[j] * lp.skel[j]);
    }
    for (int64_t i = 0; i < nl; ++i) {
      const Layer<T>& L = B.layers[i];
      if (L.role != kIn || !L.b) continue;
      for (int64_t j = 0; j < L.n_out; ++j) {
        const double bj = L.b[j];
        if (L.gb) psum[j] += bj * static_cast<double>(L.gb[j]);
        if (o.wd != 0) psum[j] += o.wd * bj * bj;
      }
    }
    const LayerPlan& pp = B.plans[P];
    const int64_t nP = widths[P];
    B.ratio.resize(np);
    B.new_u.resize(np);
    if (o.mu != 0) B.new_pivot_buf.resize(np);
    double* dg = diag + diag_start[bi];
    bool pivot_bad = false;
    for (int64_t j = 0; j < np; ++j) {
      const double u = pp.skel[j];
      const double du = pp.gskel[j] + o.wd * u;
      const double t = B.ins[P][j % nP] * B.outs[P + 1][j];
      const double v = u * t;
      double pg = (u * du - psum[j]) / v;
      if (o.bpr != 0) pg += 2 * o.bpr * std::log(std::abs(v)) / v;
      if (o.mu != 0) {
        const T nb = static_cast<T>(o.mu * static_cast<double>(B.pivot_buf[j]) + pg);
        B.new_pivot_buf[j] = nb;
        pg = nb;
      }
      const T nu = static_cast<T>(u - o.lr * pg / t);
      B.new_u[j] = nu;
      const double r = static_cast<double>(nu) / u;
      B.ratio[j] = r;
      // the pivot test, as gspace/update.py pivot_ratio_ok
      if (!pivot_bad && (!std::isfinite(r) || std::abs(r) < o.min_ratio || r == 0)) {
        pivot_bad = true;
        dg[2 * nl] = 1;
        dg[2 * nl + 1] = static_cast<double>(j);
        dg[2 * nl + 2] = r;
      }
    }
    ok = ok && !pivot_bad;
    B.inv_ins.resize(nl);
    B.inv_outs.resize(nl + 1);
    for (int64_t k = 0; k < nl; ++k) B.inv_ins[k] = reciprocals(B.ins[k]);
    for (int64_t k = 1; k <= nl; ++k) B.inv_outs[k] = reciprocals(B.outs[k]);
    B.inv_ratio = reciprocals(B.ratio);
    // bounds: |update| <= lr * max(1/s^2) * max|1/R| * max|dw| (+ the bias term)
    for (int64_t i = 0; i < nl; ++i) {
      const Layer<T>& L = B.layers[i];
      const LayerPlan& lp = B.plans[i];
      const double rq = max_square(B.inv_outs[i + 1].data(), L.n_out);
      const double cq = max_square(B.inv_ins[i].data(), L.n_in);
      const double ir = L.role == kPivot ? 1.0 : std::sqrt(max_square(B.inv_ratio.data(), L.n_skel()));
      const double bound = o.lr * rq * cq * ir * lp.gmax + o.lr * lp.bmax * rq;
      const double top = static_cast<double>(std::numeric_limits<T>::max());
      // lr * dw itself must fit too (the eager step multiplies it by a coefficient)
      const bool bad = !(bound <= top) || !(o.lr * lp.gmax <= top) || !(o.lr * lp.bmax <= top);
      if (lp.g_bad) dg[i] = 1;
      if (lp.b_bad) dg[nl + i] = 1;
      if (bad) dg[2 * nl + 3 + i] = 1;
      ok = ok && !bad && !lp.g_bad && !lp.b_bad;
    }
  }
  for (int64_t k = 0; k < num_outside; ++k) {
    if (!out_g[k]) continue;
    T m = 0, chk = 0;
    row_pass<T>(nullptr, out_g[k], out_n[k], T(1), false, nullptr, m, chk);
    if (!(chk == 0)) {
      diag[diag_at + k] = 1;
      ok = false;
    }
  }
  if (!ok) {
    status[1] = status[0];
    return 1;
  }

  // ---- apply: one write pass per layer --------------------------------------------------
  for (auto& B : blocks) {
    if (!B.active) continue;
    const int64_t nl = static_cast<int64_t>(B.layers.size());
    const T mult = static_cast<T>(1.0 - 2 * o.lr * o.bpr);
    for (int64_t i = 0; i < nl; ++i) {
      Layer<T>& L = B.layers[i];
      const LayerPlan& lp = B.plans[i];
      const int64_t R = L.n_out, C = L.n_in;
      std::vector<T> rq(R), cq(C), kr(R, T(1)), kc(C, T(1));
      // 1/s = 1/Out[i+1][row] * 1/In[i][col]; the first layer has In = 1, the last Out = 1
      for (int64_t r = 0; r < R; ++r) rq[r] = static_cast<T>(B.inv_outs[i + 1][r]);
      for (int64_t c = 0; c < C; ++c) cq[c] = static_cast<T>(B.inv_ins[i][c]);
      std::vector<T> inv_r;
      if (L.role != kPivot) {
        inv_r.resize(L.n_skel());
        for (int64_t j = 0; j < L.n_skel(); ++j) inv_r[j] = static_cast<T>(B.inv_ratio[j]);
      }
      if (o.mu == 0) {
        for (auto& x : rq) x = x * x;
        for (auto& x : cq) x = x * x;
        if (L.role == kIn)
          for (int64_t r = 0; r < R; ++r) { rq[r] *= inv_r[r]; kr[r] = mult * inv_r[r]; }
        else if (L.role == kOut)
          for (int64_t c = 0; c < C; ++c) { cq[c] *= inv_r[c]; kc[c] = inv_r[c]; }
        if (L.role != kIn)
          for (int64_t r = 0; r < R; ++r) kr[r] = mult;
      } else {
        if (L.role == kIn)
          for (int64_t r = 0; r < R; ++r) kr[r] = inv_r[r];
        else if (L.role == kOut)
          for (int64_t c = 0; c < C; ++c) kc[c] = inv_r[c];
      }
      apply_layer(L, o, rq, cq, kr, kc, lp.gscale, nthreads);
      for (int64_t j = 0; j < L.n_skel(); ++j)
        L.w[L.skel_flat(j)] = L.role == kPivot ? B.new_u[j] : static_cast<T>(lp.skel[j]);
      if (!L.b) continue;
      for (int64_t r = 0; r < R; ++r) {
        const T bs = L.role == kIn ? inv_r[r] : T(1);
        const T is = static_cast<T>(B.inv_outs[i + 1][r]);
        const T gb = L.gb ? L.gb[r] : T(0);
        if (o.mu == 0) {
          const T coef = is * is * bs;
          const T m = mult * bs;
          T keep = o.wd != 0 ? m - static_cast<T>(o.lr * o.wd) * coef : m;
          T v = L.b[r] * keep;
          if (L.gb) v = v - static_cast<T>(o.lr) * (gb * coef);
          L.b[r] = v;
        } else {
          T v = L.bbuf[r] * static_cast<T>(o.mu);
          if (L.gb) v = v + gb * is;
          if (o.wd != 0 || o.bpr != 0)
            v = v + L.b[r] * (static_cast<T>(o.wd) * is + static_cast<T>(2 * o.bpr) / is);
          L.bbuf[r] = v;
          L.b[r] = L.b[r] * bs - static_cast<T>(o.lr) * (v * (is * bs));
        }
      }
    }
    for (size_t j = 0; j < B.new_pivot_buf.size(); ++j)
      B.pivot_buf[j] = static_cast<T>(B.new_pivot_buf[j]);
  }
  // parameters outside the blocks: torch.optim.SGD's step
  const T lr = static_cast<T>(o.lr), mu = static_cast<T>(o.mu), wd = static_cast<T>(o.wd);
  for (int64_t k = 0; k < num_outside; ++k) {
    T* x = out_p[k];
    const T* g = out_g[k];
    if (!g) continue;
    const int64_t n = out_n[k];
    const int nt = threads_for(n, nthreads);
    T* buf = out_buf[k];
    parallel_ranges(nt, n, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T gi = o.wd != 0 ? g[i] + x[i] * wd : g[i];
        if (o.mu != 0) {
          gi = buf[i] * mu + gi;
          buf[i] = gi;
        }
        x[i] = x[i] + gi * (-lr);
      }
    });
  }
  return 0;
}

}  // namespace

extern "C" {
int64_t gsgd_step_f32(const int64_t* desc, const int64_t* ptrs, const double* opts,
                      double* status, double* diag, int nthreads) {
  return run<float>(desc, ptrs, opts, status, diag, nthreads);
}
int64_t gsgd_step_f64(const int64_t* desc, const int64_t* ptrs, const double* opts,
                      double* status, double* diag, int nthreads) {
  return run<double>(desc, ptrs, opts, status, diag, nthreads);
}
}

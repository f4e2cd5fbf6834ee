// G-Adam's and G-RMSprop's fused CPU step, loaded by gsgd_cli/optim/native/gadam.py with
// ctypes (built by native/build.py with the other kernels).
//
// gadam_step_*: the step of every active chain block in one call. The readable reference is
// gsgd_cli/gspace/adaptive.py (chain_gradient, adam_rule / rmsprop_rule, allocate); this file
// computes the same step with the same formulas, in three passes over each layer:
//
//   sums    one read pass over w and dw: per-node sums of w*dw' (dw' = dw + wd*w) over the
//           non-skeleton entries (the pivots' S_j) and the finiteness of dw; then the per-node
//           vectors (chain products In/Out, the pivots' gradient, moments, decrement, ratio R)
//           in loops over the nodes;
//   check   one read pass: the new weights and moments of every entry, computed and tested for
//           finiteness, nothing written;
//   write   only if every block passed (and the caller's outside check): the same computation
//           again, written in place.
//
// The gradients come in already scaled for batch norm and negated for maximize (the caller's
// BlockPlan.tensors); a null gradient counts as zero. Returns 1 if the step was written, 0 if
// not; `diag` receives, per block of n layers, G-SGD's layout (optim/gsgd_diag.py): n "weight
// gradient not finite", n "bias gradient not finite", "a pivot failed", its index, its ratio,
// n "update not finite".
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel.h"

namespace {

using gsgd_native::parallel_ranges;
using gsgd_native::threads_for;

constexpr int64_t kDescLayer = 6;    // role, n_out, n_in, kernel, centre, has_bias
constexpr int64_t kPtrLayer = 10;    // w, dw, b, db, w state 1..3, b state 1..3
enum Role { kIn = 0, kPivot = 1, kOut = 2 };

struct Rule {      // the options of the rule (opts[0..11]) and one block's bias corrections
  bool rmsprop, amsgrad, centered;
  double lr, beta1, beta2, eps, wd, bpr, min_ratio, momentum, bc1, bc2s;

  // the new state (s1, s2, s3) of one coordinate with gradient g, and its decrement d
  inline double step(double g, double& s1, double& s2, double& s3) const {
    if (!rmsprop) {                     // s1 exp_avg, s2 exp_avg_sq, s3 max_exp_avg_sq
      s1 = beta1 * s1 + (1 - beta1) * g;
      s2 = beta2 * s2 + (1 - beta2) * g * g;
      double second = s2;
      if (amsgrad) {
        s3 = std::max(s3, s2);
        second = s3;
      }
      return (lr / bc1) * s1 / (std::sqrt(second) / bc2s + eps);
    }
    s1 = beta1 * s1 + (1 - beta1) * g * g;   // s1 square_avg, s2 grad_avg, s3 momentum buffer
    double den;
    if (centered) {
      s2 = beta1 * s2 + (1 - beta1) * g;
      den = std::sqrt(s1 - s2 * s2) + eps;
    } else {
      den = std::sqrt(s1) + eps;
    }
    if (momentum > 0) {
      s3 = momentum * s3 + g / den;
      return lr * s3;
    }
    return lr * g / den;
  }
};

template <typename T>
struct Layer {
  int64_t role, n_out, n_in, kernel, centre, has_bias;
  T *w, *g, *b, *gb;
  T *s[3], *bs[3];
  int64_t numel() const { return n_out * n_in * kernel; }
  int64_t n_skel() const { return role == kOut ? n_in : n_out; }
  int64_t skel_flat(int64_t j) const {
    const int64_t row = role == kOut ? j % n_out : j;
    const int64_t col = role == kOut ? j : j % n_in;
    return (row * n_in + col) * kernel + centre;
  }
};

template <typename T>
inline double at(const T* p, int64_t i) { return p ? static_cast<double>(p[i]) : 0.0; }

// One coordinate: gradient g (already in v-space), its state at index i of (s1, s2, s3);
// returns d and writes the new state into `out` (3 doubles).
template <typename T>
inline double coordinate(const Rule& rule, double g, T* const* s, int64_t i, double* out) {
  out[0] = at(s[0], i);
  out[1] = at(s[1], i);
  out[2] = at(s[2], i);
  return rule.step(g, out[0], out[1], out[2]);
}

// The non-skeleton entries of one layer (and its bias): check (kWrite false: returns whether
// every new value is finite) or write. `row_inv`/`col_inv`: 1/Out, 1/In per node; `inv_r`: 1/R
// per row (role in) or column (role out), empty for the pivot layer.
template <typename T, bool kWrite>
bool entries(const Layer<T>& L, const Rule& rule, const std::vector<double>& row_inv,
             const std::vector<double>& col_inv, const std::vector<double>& inv_r,
             const std::vector<char>& skeleton, int nthreads) {
  const int64_t R = L.n_out, C = L.n_in, K = L.kernel, CK = C * K;
  const int nt = threads_for(L.numel(), nthreads);
  bool finite = true;
  parallel_ranges(nt, R, [&](int64_t r0, int64_t r1) {
    bool ok = true;
    double st[3];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        const double inv_s = row_inv[r] * col_inv[c];
        const double scale = L.role == kIn ? inv_r[r] : L.role == kOut ? inv_r[c] : 1.0;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t i = r * CK + c * K + k;
          if (skeleton[i]) continue;
          const double w = L.w[i];
          double g = (at(L.g, i) + rule.wd * w) * inv_s;
          if (rule.bpr) g += 2 * rule.bpr * w / inv_s;
          const double d = coordinate(rule, g, L.s, i, st);
          const double nw = (w - d * inv_s) * scale;
          if (kWrite) {
            L.w[i] = static_cast<T>(nw);
            for (int q = 0; q < 3; ++q)
              if (L.s[q]) L.s[q][i] = static_cast<T>(st[q]);
          } else {
            ok = ok && std::isfinite(nw) && std::isfinite(st[0]) && std::isfinite(st[1]) &&
                 std::isfinite(st[2]);
          }
        }
      }
      if (L.b) {
        const double inv_s = row_inv[r];
        const double scale = L.role == kIn ? inv_r[r] : 1.0;
        const double b = L.b[r];
        double g = (at(L.gb, r) + rule.wd * b) * inv_s;
        if (rule.bpr) g += 2 * rule.bpr * b / inv_s;
        const double d = coordinate(rule, g, L.bs, r, st);
        const double nb = (b - d * inv_s) * scale;
        if (kWrite) {
          L.b[r] = static_cast<T>(nb);
          for (int q = 0; q < 3; ++q)
            if (L.bs[q]) L.bs[q][r] = static_cast<T>(st[q]);
        } else {
          ok = ok && std::isfinite(nb) && std::isfinite(st[0]) && std::isfinite(st[1]) &&
               std::isfinite(st[2]);
        }
      }
    }
    if (!kWrite && !ok) {
#pragma omp critical
      finite = false;
    }
  });
  return finite;
}

template <typename T>
bool finite_all(const T* p, int64_t n) {
  if (!p) return true;
  double chk = 0;
  for (int64_t i = 0; i < n; ++i) chk += static_cast<double>(p[i]) - static_cast<double>(p[i]);
  return chk == 0;
}

// One block: plan and check (diag written), returns whether it passed; the writes happen in
// `write_block` once every block passed.
template <typename T>
struct Block {
  std::vector<Layer<T>> layers;
  int64_t pivot = 0;
  Rule rule{};
  std::vector<std::vector<double>> row_inv, col_inv, inv_r;
  std::vector<std::vector<char>> skeleton;
  std::vector<double> new_u, pivot_state[3];
  std::vector<int64_t> pivot_flat;

  bool plan(double* diag, int nthreads) {
    const int64_t n = static_cast<int64_t>(layers.size());
    std::vector<std::vector<double>> skel(n);
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) {
      const Layer<T>& L = layers[i];
      skeleton[i].assign(L.numel(), 0);
      skel[i].resize(L.n_skel());
      for (int64_t j = 0; j < L.n_skel(); ++j) {
        skeleton[i][L.skel_flat(j)] = 1;
        skel[i][j] = L.w[L.skel_flat(j)];
      }
      diag[i] = finite_all(L.g, L.numel()) ? 0.0 : 1.0;
      diag[n + i] = finite_all(L.gb, L.b ? L.n_out : 0) ? 0.0 : 1.0;
      ok = ok && diag[i] == 0 && diag[n + i] == 0;
    }
    // chain products: ins[i] (node layer i = 0..n-1), outs[i] (node layer 1..n)
    std::vector<std::vector<double>> ins(n + 1), outs(n + 1);
    ins[0].assign(layers[0].n_in, 1.0);
    for (int64_t i = 0; i + 1 < n; ++i) {
      const Layer<T>& L = layers[i];
      ins[i + 1].resize(L.n_out);
      for (int64_t j = 0; j < L.n_out; ++j)
        ins[i + 1][j] = L.role == kOut ? skel[i][j] * ins[i][j]
                                       : skel[i][j] * ins[i][j % L.n_in];
    }
    outs[n].assign(layers[n - 1].n_out, 1.0);
    for (int64_t i = n - 1; i >= 1; --i) {
      const Layer<T>& L = layers[i];
      outs[i].resize(L.n_in);
      for (int64_t j = 0; j < L.n_in; ++j)
        outs[i][j] = L.role == kOut ? skel[i][j] * outs[i + 1][j % L.n_out]
                                    : skel[i][j] * outs[i + 1][j];
    }
    // S_j: w * dw' over the non-skeleton entries whose path has pivot j
    const Layer<T>& PL = layers[pivot];
    const int64_t num_pivots = PL.n_out;
    std::vector<double> pivot_sum(num_pivots, 0.0);
    const double wd = rule.wd;
    for (int64_t i = 0; i < n; ++i) {
      const Layer<T>& L = layers[i];
      if (L.role == kPivot) continue;
      const int64_t C = L.n_in, K = L.kernel, CK = C * K;
      const char* skel_i = skeleton[i].data();
      // rows in parallel: a row layer's sum per row is its own; a column layer's sums per
      // column are added up per thread, then together in the order of the rows (the same
      // result whichever thread finishes first)
      std::vector<std::pair<int64_t, std::vector<double>>> parts;
      parallel_ranges(threads_for(L.numel(), nthreads), L.n_out, [&](int64_t r0, int64_t r1) {
        std::vector<double> cols(L.role == kOut ? C : 0, 0.0);
        for (int64_t r = r0; r < r1; ++r) {
          double row = 0;
          for (int64_t ck = 0; ck < CK; ++ck) {
            const int64_t e = r * CK + ck;
            if (skel_i[e]) continue;
            const double w = L.w[e];
            const double p = w * (at(L.g, e) + wd * w);
            if (L.role == kIn) row += p;
            else cols[ck / K] += p;
          }
          if (L.role == kIn) {
            if (L.b) {
              const double b = L.b[r];
              row += b * (at(L.gb, r) + wd * b);
            }
            pivot_sum[r] += row;
          }
        }
        if (L.role == kOut) {
#pragma omp critical
          parts.emplace_back(r0, std::move(cols));
        }
      });
      std::sort(parts.begin(), parts.end(),
                [](const auto& a, const auto& b) { return a.first < b.first; });
      for (const auto& part : parts)
        for (int64_t c = 0; c < C; ++c) pivot_sum[c] += part.second[c];
    }
    // the pivots: gradient, moments, decrement, new value, ratio
    new_u.resize(num_pivots);
    pivot_flat.resize(num_pivots);
    for (int q = 0; q < 3; ++q) pivot_state[q].resize(num_pivots);
    std::vector<double> ratio(num_pivots);
    bool pivot_bad = false, update_bad = false;
    int64_t first = -1;
    for (int64_t j = 0; j < num_pivots; ++j) {
      const int64_t f = PL.skel_flat(j);
      pivot_flat[j] = f;
      const double u = skel[pivot][j];
      const double du = at(PL.g, f) + wd * u;
      const double t = ins[pivot][j % PL.n_in] * outs[pivot + 1][j];
      const double v = u * t;
      double g = (u * du - pivot_sum[j]) / v;
      if (rule.bpr) g += 2 * rule.bpr * std::log(std::abs(v)) / v;
      double st[3];
      const double d = coordinate(rule, g, PL.s, f, st);
      new_u[j] = u - d / t;
      for (int q = 0; q < 3; ++q) pivot_state[q][j] = st[q];
      ratio[j] = new_u[j] / u;
      const bool good = std::isfinite(ratio[j]) && std::abs(ratio[j]) >= rule.min_ratio &&
                        ratio[j] != 0;
      if (!good && first < 0) first = j;
      pivot_bad = pivot_bad || !good;
      update_bad = update_bad || !(std::isfinite(new_u[j]) && std::isfinite(st[0]) &&
                                   std::isfinite(st[1]) && std::isfinite(st[2]));
    }
    diag[2 * n] = pivot_bad ? 1.0 : 0.0;
    diag[2 * n + 1] = first < 0 ? 0.0 : static_cast<double>(first);
    diag[2 * n + 2] = ratio[first < 0 ? 0 : first];
    ok = ok && !pivot_bad;
    // per-node factors of every layer
    for (int64_t i = 0; i < n; ++i) {
      const Layer<T>& L = layers[i];
      row_inv[i].resize(L.n_out);
      col_inv[i].resize(L.n_in);
      for (int64_t r = 0; r < L.n_out; ++r) row_inv[i][r] = 1.0 / outs[i + 1][r];
      for (int64_t c = 0; c < L.n_in; ++c) col_inv[i][c] = 1.0 / ins[i][c];
      if (L.role != kPivot) {
        const int64_t m = L.role == kIn ? L.n_out : L.n_in;
        inv_r[i].resize(m);
        for (int64_t j = 0; j < m; ++j) inv_r[i][j] = 1.0 / ratio[j];
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      const bool finite = entries<T, false>(layers[i], rule, row_inv[i], col_inv[i], inv_r[i],
                                            skeleton[i], nthreads) &&
                          !(i == pivot && update_bad);
      diag[2 * n + 3 + i] = finite ? 0.0 : 1.0;
      ok = ok && finite;
    }
    return ok;
  }

  void write(int nthreads) {
    for (size_t i = 0; i < layers.size(); ++i)
      entries<T, true>(layers[i], rule, row_inv[i], col_inv[i], inv_r[i], skeleton[i],
                       nthreads);
    Layer<T>& PL = layers[pivot];
    for (size_t j = 0; j < new_u.size(); ++j) {
      PL.w[pivot_flat[j]] = static_cast<T>(new_u[j]);
      for (int q = 0; q < 3; ++q)
        if (PL.s[q]) PL.s[q][pivot_flat[j]] = static_cast<T>(pivot_state[q][j]);
    }
  }
};

// desc: [blocks, then per block: active, layers, pivot, then per layer kDescLayer values]
// ptrs: per active block, per layer kPtrLayer pointers (0: none)
// opts: [rmsprop, lr, beta1 (alpha), beta2, eps, wd, bpr, min_ratio, amsgrad, centered,
//        momentum, outside_ok, then per block: bc1, bc2s]
template <typename T>
int64_t run(const int64_t* desc, const int64_t* ptrs, const double* opts, double* diag,
            int nthreads) {
  Rule base{};
  base.rmsprop = opts[0] != 0;
  base.lr = opts[1];
  base.beta1 = opts[2];
  base.beta2 = opts[3];
  base.eps = opts[4];
  base.wd = opts[5];
  base.bpr = opts[6];
  base.min_ratio = opts[7];
  base.amsgrad = opts[8] != 0;
  base.centered = opts[9] != 0;
  base.momentum = opts[10];
  const bool outside_ok = opts[11] != 0;
  const int64_t num_blocks = desc[0];
  int64_t at_desc = 1, at_ptr = 0, at_diag = 0;
  std::vector<Block<T>> blocks;
  bool ok = outside_ok;
  for (int64_t k = 0; k < num_blocks; ++k) {
    const bool active = desc[at_desc] != 0;
    const int64_t n = desc[at_desc + 1];
    const int64_t pivot = desc[at_desc + 2];
    at_desc += 3;
    if (!active) {
      std::fill(diag + at_diag, diag + at_diag + 3 * n + 3, 0.0);
      at_desc += kDescLayer * n;
      at_diag += 3 * n + 3;
      continue;
    }
    Block<T> block;
    block.pivot = pivot;
    block.rule = base;
    block.rule.bc1 = opts[12 + 2 * k];
    block.rule.bc2s = opts[13 + 2 * k];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* d = desc + at_desc + kDescLayer * i;
      const int64_t* p = ptrs + at_ptr + kPtrLayer * i;
      Layer<T> L{d[0], d[1], d[2], d[3], d[4], d[5],
                 reinterpret_cast<T*>(p[0]), reinterpret_cast<T*>(p[1]),
                 reinterpret_cast<T*>(p[2]), reinterpret_cast<T*>(p[3]),
                 {reinterpret_cast<T*>(p[4]), reinterpret_cast<T*>(p[5]),
                  reinterpret_cast<T*>(p[6])},
                 {reinterpret_cast<T*>(p[7]), reinterpret_cast<T*>(p[8]),
                  reinterpret_cast<T*>(p[9])}};
      block.layers.push_back(L);
    }
    block.row_inv.resize(n);
    block.col_inv.resize(n);
    block.inv_r.resize(n);
    block.skeleton.resize(n);
    ok = block.plan(diag + at_diag, nthreads) && ok;
    blocks.push_back(std::move(block));
    at_desc += kDescLayer * n;
    at_ptr += kPtrLayer * n;
    at_diag += 3 * n + 3;
  }
  if (!ok) return 0;
  for (auto& block : blocks) block.write(nthreads);
  return 1;
}

}  // namespace

extern "C" {
int64_t gadam_step_f32(const int64_t* desc, const int64_t* ptrs, const double* opts,
                       double* diag, int nthreads) {
  return run<float>(desc, ptrs, opts, diag, nthreads);
}
int64_t gadam_step_f64(const int64_t* desc, const int64_t* ptrs, const double* opts,
                       double* diag, int nthreads) {
  return run<double>(desc, ptrs, opts, diag, nthreads);
}
}

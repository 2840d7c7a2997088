// Fused MAE loss on the CPU: masked MSE + Fourier loss and the gradient with respect to `pred`, in one pass.
//
// Every token holds C' planes of p x p pixels (C' = C for the standard layout, where plane c is the strided
// slice j*C' + c, and 1 for the channel layout). Per plane x (pred) and y (target), weight w of its token:
//   loss += w * ((1-alpha)/P * sum (x-y)^2 + alpha/(C' p^2) * sum_{u,v} | |F x|_uv - |F y|_uv |)
// with F the 2-D DFT, computed as small matrix products: F x = W x W, W_jk = exp(-2 pi i jk/p) = C - iS.
// Real input makes F x Hermitian, so only the columns v = 0..p/2 are formed (the others are conjugate mirror
// images with equal magnitudes; their terms are counted twice):
//   rows:    A = x W[:, 0..p/2]            (real p x p times a p x (p/2+1) complex table)
//   columns: F = W A                       (complex)
// The gradient of the Fourier term wrt x is Re(conj(W) G conj(W)) with G = sign(|Fx|-|Fy|) * Fx/|Fx| (G = 0 where
// |Fx| = 0, as torch defines d|z| at 0); G is Hermitian as well, so the half spectrum with the same weights gives
// it exactly. Planes are processed 16 at a time, one per SIMD lane, so every inner loop runs over lanes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
// lets sqrt vectorise (the arguments are sums of squares, never negative, so errno is never set)
#pragma GCC optimize("no-math-errno")
#endif

namespace mae_fast {
namespace {

constexpr int kLanes = 16;

struct LossArgs {
  int64_t n_planes;         // B * N * C'
  int64_t token_size;       // P
  int64_t planes_per_token; // C'
  int p;
  float coef_mse;           // (1 - alpha) / P
  float coef_fourier;       // alpha / (C' p^2)
  const float* token_weight;  // (B * N,) or nullptr
  float uniform_weight;
  const float* cos_table;   // (p, p): cos(2 pi jk / p)
  const float* sin_table;   // (p, p): sin(2 pi jk / p)
};

// Work buffers of one group of kLanes planes, all indexed [...][lane].
struct Buffers {
  std::vector<float> storage;
  float *x, *y, *ar, *ai, *fxr, *fxi, *fyr, *fyi;
  explicit Buffers(int p) {
    const int pp = p * p, ph = p * (p / 2 + 1);
    storage.assign(static_cast<size_t>((2 * pp + 6 * ph) * kLanes), 0.0f);
    float* s = storage.data();
    x = s; s += pp * kLanes;
    y = s; s += pp * kLanes;
    ar = s; s += ph * kLanes;
    ai = s; s += ph * kLanes;
    fxr = s; s += ph * kLanes;
    fxi = s; s += ph * kLanes;
    fyr = s; s += ph * kLanes;
    fyi = s;
  }
};

// F = W z W on columns v = 0..p/2 of one group of planes z (p*p x lanes) -> fr, fi (p*(p/2+1) x lanes).
template <int PC>
MAE_FAST_INLINE void half_dft(const float* __restrict z, float* __restrict ar, float* __restrict ai,
                              float* __restrict fr, float* __restrict fi, const LossArgs& a) {
  const int p = PC ? PC : a.p, H = p / 2 + 1;
  const float* cs = a.cos_table;
  const float* sn = a.sin_table;
  for (int r = 0; r < p; ++r) {  // rows: A[r][v] = sum_q z[r][q] (cos - i sin)(qv)
    for (int v = 0; v < H; ++v) {
      float accr[kLanes] = {}, acci[kLanes] = {};
      for (int q = 0; q < p; ++q) {
        const float c = cs[q * p + v], s = sn[q * p + v];
        const float* zr = z + (r * p + q) * kLanes;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          accr[l] += zr[l] * c;
          acci[l] -= zr[l] * s;
        }
      }
      for (int l = 0; l < kLanes; ++l) {
        ar[(r * H + v) * kLanes + l] = accr[l];
        ai[(r * H + v) * kLanes + l] = acci[l];
      }
    }
  }
  for (int u = 0; u < p; ++u) {  // columns: F[u][v] = sum_r (cos - i sin)(ur) A[r][v]
    for (int v = 0; v < H; ++v) {
      float accr[kLanes] = {}, acci[kLanes] = {};
      for (int r = 0; r < p; ++r) {
        const float c = cs[u * p + r], s = sn[u * p + r];
        const float* rr = ar + (r * H + v) * kLanes;
        const float* ri = ai + (r * H + v) * kLanes;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          accr[l] += c * rr[l] + s * ri[l];
          acci[l] += c * ri[l] - s * rr[l];
        }
      }
      for (int l = 0; l < kLanes; ++l) {
        fr[(u * H + v) * kLanes + l] = accr[l];
        fi[(u * H + v) * kLanes + l] = acci[l];
      }
    }
  }
}

// One group of up to kLanes planes starting at plane0: returns the group's weighted loss, writes its gradient.
template <int PC, typename PS, typename TS>
MAE_FAST_INLINE double loss_group_body(const PS* __restrict pred, const TS* __restrict target, PS* __restrict grad,
                                       const LossArgs& a, int64_t plane0, Buffers& buf) {
  const int p = PC ? PC : a.p, H = p / 2 + 1, pp = p * p;
  const int64_t cp = a.planes_per_token;
  const int nl = static_cast<int>(std::min<int64_t>(kLanes, a.n_planes - plane0));
  float* x = buf.x;
  float* y = buf.y;
  float w[kLanes];
  int64_t base[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    if (l < nl) {
      const int64_t plane = plane0 + l, token = plane / cp;
      base[l] = token * a.token_size + plane % cp;
      w[l] = a.token_weight ? a.token_weight[token] : a.uniform_weight;
      for (int j = 0; j < pp; ++j) {
        x[j * kLanes + l] = to_float(pred[base[l] + j * cp]);
        y[j * kLanes + l] = to_float(target[base[l] + j * cp]);
      }
    } else {  // padding lanes: zero planes with zero weight contribute nothing
      base[l] = 0;
      w[l] = 0.0f;
      for (int j = 0; j < pp; ++j) x[j * kLanes + l] = y[j * kLanes + l] = 0.0f;
    }
  }
  half_dft<PC>(x, buf.ar, buf.ai, buf.fxr, buf.fxi, a);
  half_dft<PC>(y, buf.ar, buf.ai, buf.fyr, buf.fyi, a);

  // |D| = | |Fx| - |Fy| | summed with the mirror weights; G = weight * sign(D) * Fx / |Fx| overwrites Fx
  float fourier[kLanes] = {};
  for (int u = 0; u < p; ++u) {
    for (int v = 0; v < H; ++v) {
      const float wv = (v == 0 || 2 * v == p) ? 1.0f : 2.0f;
      float* gr = buf.fxr + (u * H + v) * kLanes;
      float* gi = buf.fxi + (u * H + v) * kLanes;
      const float* yr = buf.fyr + (u * H + v) * kLanes;
      const float* yi = buf.fyi + (u * H + v) * kLanes;
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float mx = std::sqrt(gr[l] * gr[l] + gi[l] * gi[l]);
        const float my = std::sqrt(yr[l] * yr[l] + yi[l] * yi[l]);
        const float d = mx - my;
        fourier[l] += wv * std::fabs(d);
        const float sign = static_cast<float>(d > 0.0f) - static_cast<float>(d < 0.0f);
        const float scale = mx > 0.0f ? wv * sign / mx : 0.0f;
        gr[l] *= scale;
        gi[l] *= scale;
      }
    }
  }
  // Hc = conj(W) G (columns v = 0..p/2), into the row buffers
  const float* cs = a.cos_table;
  const float* sn = a.sin_table;
  for (int r = 0; r < p; ++r) {
    for (int v = 0; v < H; ++v) {
      float accr[kLanes] = {}, acci[kLanes] = {};
      for (int u = 0; u < p; ++u) {
        const float c = cs[r * p + u], s = sn[r * p + u];
        const float* gr = buf.fxr + (u * H + v) * kLanes;
        const float* gi = buf.fxi + (u * H + v) * kLanes;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          accr[l] += c * gr[l] - s * gi[l];
          acci[l] += s * gr[l] + c * gi[l];
        }
      }
      for (int l = 0; l < kLanes; ++l) {
        buf.ar[(r * H + v) * kLanes + l] = accr[l];
        buf.ai[(r * H + v) * kLanes + l] = acci[l];
      }
    }
  }
  // grad = w * (2 (1-alpha)/P (x - y) + alpha/(C' p^2) Re(Hc conj(W))), scattered back in pred's layout
  float mse[kLanes] = {};
  for (int r = 0; r < p; ++r) {
    for (int q = 0; q < p; ++q) {
      float acc[kLanes] = {};
      for (int v = 0; v < H; ++v) {
        const float c = cs[v * p + q], s = sn[v * p + q];
        const float* hr = buf.ar + (r * H + v) * kLanes;
        const float* hi = buf.ai + (r * H + v) * kLanes;
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) acc[l] += hr[l] * c - hi[l] * s;
      }
      const float* xr = x + (r * p + q) * kLanes;
      const float* yr = y + (r * p + q) * kLanes;
      float* out = x + (r * p + q) * kLanes;  // the gradient overwrites x in place
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        const float diff = xr[l] - yr[l];
        mse[l] += diff * diff;
        out[l] = w[l] * (2.0f * a.coef_mse * diff + a.coef_fourier * acc[l]);
      }
    }
  }
  double loss = 0.0;
  for (int l = 0; l < nl; ++l) {
    loss += static_cast<double>(w[l]) * (static_cast<double>(a.coef_mse) * mse[l] +
                                         static_cast<double>(a.coef_fourier) * fourier[l]);
    for (int j = 0; j < pp; ++j) grad[base[l] + j * cp] = from_float<PS>(x[j * kLanes + l]);
  }
  return loss;
}

template <int PC, typename PS, typename TS>
MAE_FAST_AVX2 double loss_group_avx2(const PS* pred, const TS* target, PS* grad, const LossArgs& a, int64_t plane0,
                                     Buffers& buf) {
  return loss_group_body<PC>(pred, target, grad, a, plane0, buf);
}

template <int PC, typename PS, typename TS>
double loss_group_base(const PS* pred, const TS* target, PS* grad, const LossArgs& a, int64_t plane0,
                       Buffers& buf) {
  return loss_group_body<PC>(pred, target, grad, a, plane0, buf);
}

template <int PC, typename PS, typename TS>
double loss_all(const PS* pred, const TS* target, PS* grad, const LossArgs& a) {
  const int64_t groups = (a.n_planes + kLanes - 1) / kLanes;
  std::vector<double> group_loss(static_cast<size_t>(groups));
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, groups, 8, [&](int64_t begin, int64_t end) {
    Buffers buf(a.p);
    for (int64_t g = begin; g < end; ++g) {
      group_loss[g] = avx2 ? loss_group_avx2<PC>(pred, target, grad, a, g * kLanes, buf)
                           : loss_group_base<PC>(pred, target, grad, a, g * kLanes, buf);
    }
  });
  double total = 0.0;  // fixed order: the same sum for any thread count
  for (double l : group_loss) total += l;
  return total;
}

std::pair<std::vector<float>, std::vector<float>> dft_tables(int p) {
  std::vector<float> c(static_cast<size_t>(p * p)), s(static_cast<size_t>(p * p));
  for (int j = 0; j < p; ++j) {
    for (int k = 0; k < p; ++k) {
      const double angle = 2.0 * M_PI * static_cast<double>((j * k) % p) / p;
      c[j * p + k] = static_cast<float>(std::cos(angle));
      s[j * p + k] = static_cast<float>(std::sin(angle));
    }
  }
  return {c, s};
}

at::Tensor mae_loss_out(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& token_weight,
                        double uniform_weight, int64_t patch_size, int64_t planes_per_token, double alpha,
                        at::Tensor& grad) {
  check_cpu(pred, "pred");
  check_cpu(target, "target");
  check_contiguous(pred, "pred");
  check_contiguous(target, "target");
  TORCH_CHECK(pred.sizes() == target.sizes(), "mae_loss: pred ", pred.sizes(), " and target ", target.sizes(),
              " differ in shape");
  TORCH_CHECK(pred.dim() == 3, "mae_loss: pred must be (B, N, P), got ", pred.sizes());
  const int64_t p = patch_size, P = pred.size(2), cp = planes_per_token;
  TORCH_CHECK(p >= 1 && p <= 64 && cp >= 1 && P == p * p * cp, "mae_loss: token size ", P, " is not ", cp,
              " planes of ", p, "x", p);
  TORCH_CHECK(grad.scalar_type() == pred.scalar_type() && grad.is_contiguous() && grad.sizes() == pred.sizes(),
              "mae_loss: grad must be a contiguous tensor of pred's shape and dtype");
  const int64_t tokens = pred.size(0) * pred.size(1);
  if (token_weight) {
    TORCH_CHECK(token_weight->scalar_type() == at::kFloat && token_weight->is_contiguous() &&
                    token_weight->numel() == tokens,
                "mae_loss: token_weight must be a contiguous float32 tensor of B*N = ", tokens, " values");
  }
  auto [cos_table, sin_table] = dft_tables(static_cast<int>(p));
  const LossArgs a{tokens * cp, P, cp, static_cast<int>(p), static_cast<float>((1.0 - alpha) / P),
                   static_cast<float>(alpha / (cp * p * p)),
                   token_weight ? token_weight->const_data_ptr<float>() : nullptr,
                   static_cast<float>(uniform_weight), cos_table.data(), sin_table.data()};
  TORCH_CHECK(target.scalar_type() == at::kFloat || target.scalar_type() == pred.scalar_type(),
              "mae_loss: target must be float32 or of pred's dtype, got ", target.scalar_type());
  double loss = 0.0;
  MAE_FAST_DISPATCH_FLOAT(pred.scalar_type(), "mae_loss (pred)", [&] {
    const auto* pr = cptr<scalar_t>(pred);
    auto* gr = mptr<scalar_t>(grad);
    auto by_patch = [&](const auto* tg) {
      if (p == 8) return loss_all<8>(pr, tg, gr, a);
      if (p == 16) return loss_all<16>(pr, tg, gr, a);
      return loss_all<0>(pr, tg, gr, a);
    };
    loss = target.scalar_type() == at::kFloat ? by_patch(cptr<float>(target)) : by_patch(cptr<scalar_t>(target));
  });
  return at::scalar_tensor(loss, pred.options().dtype(at::kFloat));
}

}  // namespace
}  // namespace mae_fast

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) { m.impl("mae_loss_out", &mae_fast::mae_loss_out); }

// Multi-tensor Lion step on the CPU: one pass over (param, grad, exp_avg) per element, all tensors of one dtype
// combination in one parallel loop over fixed-size chunks.
//   c = beta1 * m + (1 - beta1) * g;  p = p * (1 - lr * wd) - lr * sign(c);  m = beta2 * m + (1 - beta2) * g
// The roundings follow the reference op by op: c adds two separately rounded products (two torch muls, one add);
// the momentum adds g*(1-beta2) to the rounded m*beta2 with one fused multiply-add (torch's add with alpha);
// sign(NaN) = sign(0) = 0 as torch.sign. Contraction of other multiply-adds into FMAs is switched off below so
// that the compiler cannot change these roundings.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

namespace mae_fast {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per parallel work item

struct LionScalars {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
};

template <typename P, typename G, typename M>
MAE_FAST_INLINE void lion_body(P* __restrict p, const G* __restrict g, M* __restrict m, int64_t n,
                               const LionScalars s) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gf = to_float(g[i]);
    const float mf = to_float(m[i]);
    const float c = mf * s.beta1 + gf * s.one_minus_beta1;
    const float sign = static_cast<float>(c > 0.0f) - static_cast<float>(c < 0.0f);
    p[i] = from_float<P>(std::fma(sign, -s.lr, to_float(p[i]) * s.decay));
    m[i] = from_float<M>(std::fma(gf, s.one_minus_beta2, mf * s.beta2));
  }
}

template <typename P, typename G, typename M>
MAE_FAST_AVX2 void lion_avx2(P* p, const G* g, M* m, int64_t n, const LionScalars s) {
  lion_body(p, g, m, n, s);
}

template <typename P, typename G, typename M>
void lion_base(P* p, const G* g, M* m, int64_t n, const LionScalars s) {
  lion_body(p, g, m, n, s);
}

template <typename PT, typename GT, typename MT>
void lion_lists(const at::TensorList params, const at::TensorList grads, const at::TensorList exp_avgs,
                const LionScalars s) {
  using P = typename storage<PT>::type;
  using G = typename storage<GT>::type;
  using M = typename storage<MT>::type;
  struct Work { P* p; const G* g; M* m; int64_t n; };
  std::vector<Work> work;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t numel = params[t].numel();
    P* p = mptr<PT>(params[t]);
    const G* g = cptr<GT>(grads[t]);
    M* m = mptr<MT>(exp_avgs[t]);
    for (int64_t start = 0; start < numel; start += kChunk) {
      work.push_back({p + start, g + start, m + start, std::min(kChunk, numel - start)});
    }
  }
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Work& w = work[i];
      if (avx2) {
        lion_avx2(w.p, w.g, w.m, w.n, s);
      } else {
        lion_base(w.p, w.g, w.m, w.n, s);
      }
    }
  });
}

void check_lists(const at::TensorList params, const at::TensorList grads, const at::TensorList exp_avgs) {
  TORCH_CHECK(params.size() == grads.size() && params.size() == exp_avgs.size(),
              "lion_update_: params, grads and exp_avgs must have the same length");
  for (size_t t = 0; t < params.size(); ++t) {
    const char* names[3] = {"params", "grads", "exp_avgs"};
    const at::Tensor* ts[3] = {&params[t], &grads[t], &exp_avgs[t]};
    for (int k = 0; k < 3; ++k) {
      check_cpu(*ts[k], names[k]);
      TORCH_CHECK(ts[k]->is_contiguous(), "lion_update_: ", names[k], "[", t, "] must be contiguous");
      TORCH_CHECK(ts[k]->numel() == params[t].numel(), "lion_update_: ", names[k], "[", t, "] has ",
                  ts[k]->numel(), " elements, params[", t, "] has ", params[t].numel());
    }
    TORCH_CHECK(params[t].scalar_type() == params[0].scalar_type() &&
                    grads[t].scalar_type() == grads[0].scalar_type() &&
                    exp_avgs[t].scalar_type() == exp_avgs[0].scalar_type(),
                "lion_update_: all tensors of one call must share the dtypes of the first (param, grad, exp_avg)");
  }
}

template <typename PT, typename GT>
void dispatch_m(const at::TensorList ps, const at::TensorList gs, const at::TensorList ms, const LionScalars s) {
  switch (ms[0].scalar_type()) {
    case at::kFloat: return lion_lists<PT, GT, float>(ps, gs, ms, s);
    case at::kBFloat16: return lion_lists<PT, GT, c10::BFloat16>(ps, gs, ms, s);
    default: TORCH_CHECK(false, "lion_update_: exp_avgs must be float32 or bfloat16, got ", ms[0].scalar_type());
  }
}

template <typename PT>
void dispatch_g(const at::TensorList ps, const at::TensorList gs, const at::TensorList ms, const LionScalars s) {
  switch (gs[0].scalar_type()) {
    case at::kFloat: return dispatch_m<PT, float>(ps, gs, ms, s);
    case at::kBFloat16: return dispatch_m<PT, c10::BFloat16>(ps, gs, ms, s);
    default: TORCH_CHECK(false, "lion_update_: grads must be float32 or bfloat16, got ", gs[0].scalar_type());
  }
}

void lion_update_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr, double decay,
                  double beta1, double one_minus_beta1, double beta2, double one_minus_beta2) {
  if (params.empty()) return;
  check_lists(params, grads, exp_avgs);
  const LionScalars s{static_cast<float>(lr), static_cast<float>(decay), static_cast<float>(beta1),
                      static_cast<float>(one_minus_beta1), static_cast<float>(beta2),
                      static_cast<float>(one_minus_beta2)};
  switch (params[0].scalar_type()) {
    case at::kFloat: return dispatch_g<float>(params, grads, exp_avgs, s);
    case at::kBFloat16: return dispatch_g<c10::BFloat16>(params, grads, exp_avgs, s);
    default: TORCH_CHECK(false, "lion_update_: params must be float32 or bfloat16, got ", params[0].scalar_type());
  }
}

}  // namespace
}  // namespace mae_fast

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) { m.impl("lion_update_", &mae_fast::lion_update_); }

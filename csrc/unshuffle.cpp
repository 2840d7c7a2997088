// Decoder unshuffle on the CPU.
//   forward:  out[b, t] = (x[b, ids_restore[b, t]] if ids_restore[b, t] < K else mask_token) + pos_embed[t]
//   backward: grad_x[b, k] = grad_out[b, t] for the token t at shuffled position k < K (a permutation: every row
//             written once, no atomics); the mask token's gradient is the sum of grad_out over masked tokens,
//             accumulated per image in float32 and then summed over images in a fixed order (deterministic).
// mask_token and pos_embed arrive in x's dtype (the Python wrapper converts them, as the reference does), and the
// sum is rounded to x's dtype once, as torch's add.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace mae_fast {
namespace {

template <typename T>
MAE_FAST_INLINE void add_row(T* __restrict out, const T* __restrict src, const T* __restrict pos, int64_t D) {
  if (pos == nullptr) {
    for (int64_t d = 0; d < D; ++d) out[d] = src[d];
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(to_float(src[d]) + to_float(pos[d]));
  }
}

template <typename T>
MAE_FAST_INLINE void accumulate_row(float* __restrict acc, const T* __restrict row, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) acc[d] += to_float(row[d]);
}

void check_ids(const at::Tensor& ids_restore, int64_t B) {
  check_cpu(ids_restore, "ids_restore");
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong && ids_restore.dim() == 2 && ids_restore.size(0) == B &&
                  ids_restore.is_contiguous(),
              "unshuffle: ids_restore must be a contiguous int64 (B=", B, ", L) tensor, got ",
              ids_restore.sizes(), " ", ids_restore.scalar_type());
}

void unshuffle_out(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                   const std::optional<at::Tensor>& pos_embed, at::Tensor& out) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "unshuffle: x must be (B, K, D) with unit stride in D");
  const int64_t B = x.size(0), K = x.size(1), D = x.size(2);
  check_ids(ids_restore, B);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(mask_token.scalar_type() == x.scalar_type() && mask_token.is_contiguous() && mask_token.numel() == D,
              "unshuffle: mask_token must be a contiguous (D,) tensor of x's dtype");
  if (pos_embed) {
    TORCH_CHECK(pos_embed->scalar_type() == x.scalar_type() && pos_embed->is_contiguous() &&
                    pos_embed->numel() == L * D,
                "unshuffle: pos_embed must be a contiguous (L, D) tensor of x's dtype");
  }
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({B, L, D}),
              "unshuffle: out must be a contiguous (", B, ", ", L, ", ", D, ") tensor of x's dtype");
  MAE_FAST_DISPATCH_FLOAT(x.scalar_type(), "unshuffle", [&] {
    using S = typename storage<scalar_t>::type;
    const S* xs = cptr<scalar_t>(x);
    const S* mt = cptr<scalar_t>(mask_token);
    const S* pe = pos_embed ? cptr<scalar_t>(*pos_embed) : nullptr;
    const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
    S* o = mptr<scalar_t>(out);
    const int64_t sb = x.stride(0), sk = x.stride(1);
    at::parallel_for(0, B * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / L, t = i % L;
        const int64_t pos = ids[i];
        TORCH_CHECK(pos >= 0 && pos < L, "unshuffle: ids_restore[", b, ", ", t, "] = ", pos, " outside [0, ", L, ")");
        const S* src = pos < K ? xs + b * sb + pos * sk : mt;
        add_row(o + i * D, src, pe ? pe + t * D : nullptr, D);
      }
    });
  });
}

at::Tensor unshuffle_backward_out(const at::Tensor& grad_out, const at::Tensor& ids_restore, at::Tensor& grad_x) {
  check_cpu(grad_out, "grad_out");
  check_contiguous(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3, "unshuffle backward: grad_out must be (B, L, D)");
  const int64_t B = grad_out.size(0), L = grad_out.size(1), D = grad_out.size(2);
  check_ids(ids_restore, B);
  TORCH_CHECK(ids_restore.size(1) == L, "unshuffle backward: ids_restore covers ", ids_restore.size(1),
              " tokens, grad_out ", L);
  TORCH_CHECK(grad_x.scalar_type() == grad_out.scalar_type() && grad_x.is_contiguous() && grad_x.dim() == 3 &&
                  grad_x.size(0) == B && grad_x.size(2) == D && grad_x.size(1) <= L,
              "unshuffle backward: grad_x must be a contiguous (B, K, D) tensor of grad_out's dtype");
  const int64_t K = grad_x.size(1);
  std::vector<float> per_image(static_cast<size_t>(B * D), 0.0f);
  MAE_FAST_DISPATCH_FLOAT(grad_out.scalar_type(), "unshuffle backward", [&] {
    using S = typename storage<scalar_t>::type;
    const S* g = cptr<scalar_t>(grad_out);
    const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
    S* gx = mptr<scalar_t>(grad_x);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* acc = per_image.data() + b * D;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t pos = ids[b * L + t];
          TORCH_CHECK(pos >= 0 && pos < L, "unshuffle: ids_restore[", b, ", ", t, "] = ", pos, " outside [0, ", L,
                      ")");
          const S* row = g + (b * L + t) * D;
          if (pos < K) {
            std::memcpy(gx + (b * K + pos) * D, row, D * sizeof(S));
          } else {
            accumulate_row(acc, row, D);
          }
        }
      }
    });
  });
  at::Tensor grad_mask = at::zeros({D}, grad_out.options().dtype(at::kFloat));
  float* gm = grad_mask.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t d = 0; d < D; ++d) gm[d] += per_image[b * D + d];
  }
  return grad_mask;
}

}  // namespace
}  // namespace mae_fast

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) {
  m.impl("unshuffle_out", &mae_fast::unshuffle_out);
  m.impl("unshuffle_backward_out", &mae_fast::unshuffle_backward_out);
}

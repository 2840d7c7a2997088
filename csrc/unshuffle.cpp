// Decoder unshuffle on the CPU. x is (B, prefix + K, D): `prefix` leading rows that keep their place (the class
// token), then the K visible tokens in shuffled order; out and grad_out are (B, prefix + L, D).
//   forward:  out[b, r] = x[b, r] + pos_embed[r]  for r < prefix
//             out[b, r] = (x[b, prefix + i] if i < K else mask_token) + pos_embed[r], i = ids_restore[b, r - prefix]
//   backward: grad_x[b, r] = grad_out[b, r] for r < prefix, grad_x[b, prefix + i] = grad_out[b, r] for each kept
//             row (a permutation: every row written once, no atomics); the mask token's gradient is the sum of
//             grad_out over masked rows, accumulated per image in float32 and then summed over images in a fixed
//             order (deterministic).
// Dtypes: out's dtype is the output dtype (the Python wrapper passes mask_token and pos_embed converted to it, small
// tensors); x may have another. The kernels are instantiated per (x dtype, out dtype) pair rather than converting x
// (or grad_x) in a separate full-size pass: a token is rounded to the output dtype (as the reference's
// x.to(out_dtype); free unless the output is narrower), the sum is formed in float32 and rounded once, like torch's
// add; the backward stores grad_out's values converted to x's dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"

namespace mae_fast {
namespace {

// v's value after rounding to the storage type O, as a float
template <typename O, typename S>
MAE_FAST_INLINE float rounded_to(S v) {
  if constexpr (std::is_same_v<O, S> || std::is_same_v<O, float>) {
    return to_float(v);
  } else {
    return to_float(from_float<O>(to_float(v)));
  }
}

// out = src converted to T (a plain copy when the types agree)
template <typename S, typename T>
MAE_FAST_INLINE void copy_row(T* __restrict out, const S* __restrict src, int64_t D) {
  if constexpr (std::is_same_v<S, T>) {
    std::memcpy(out, src, D * sizeof(T));
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = from_float<T>(to_float(src[d]));
  }
}

// out = src (converted to O) + pos; src is a token of x (type S) or the mask token (already O)
template <typename S, typename O>
MAE_FAST_INLINE void add_row(O* __restrict out, const S* __restrict src, const O* __restrict pos, int64_t D) {
  if (pos == nullptr) {
    copy_row(out, src, D);
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = from_float<O>(rounded_to<O>(src[d]) + to_float(pos[d]));
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

int64_t checked_id(const int64_t* ids, int64_t b, int64_t t, int64_t L) {
  const int64_t id = ids[b * L + t];
  TORCH_CHECK(id >= 0 && id < L, "unshuffle: ids_restore[", b, ", ", t, "] = ", id, " outside [0, ", L, ")");
  return id;
}

void unshuffle_out(const at::Tensor& x, const at::Tensor& mask_token, const at::Tensor& ids_restore,
                   const std::optional<at::Tensor>& pos_embed, int64_t prefix, at::Tensor& out) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "unshuffle: x must be (B, prefix + K, D) with unit stride in D");
  const int64_t B = x.size(0), D = x.size(2);
  TORCH_CHECK(prefix >= 0 && prefix <= x.size(1), "unshuffle: prefix must be in [0, ", x.size(1), "], got ", prefix);
  const int64_t K = x.size(1) - prefix;
  check_ids(ids_restore, B);
  const int64_t L = ids_restore.size(1), R = prefix + L;
  check_cpu(out, "out");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == at::IntArrayRef({B, R, D}),
              "unshuffle: out must be a contiguous (", B, ", ", R, ", ", D, ") tensor");
  TORCH_CHECK(mask_token.scalar_type() == out.scalar_type() && mask_token.is_contiguous() && mask_token.numel() == D,
              "unshuffle: mask_token must be a contiguous (D,) tensor of out's dtype");
  if (pos_embed) {
    TORCH_CHECK(pos_embed->scalar_type() == out.scalar_type() && pos_embed->is_contiguous() &&
                    pos_embed->numel() == R * D,
                "unshuffle: pos_embed must be a contiguous (prefix + L, D) tensor of out's dtype");
  }
  MAE_FAST_DISPATCH_FLOAT(x.scalar_type(), "unshuffle", [&] {
    using x_scalar = scalar_t;
    using X = typename storage<x_scalar>::type;
    MAE_FAST_DISPATCH_FLOAT(out.scalar_type(), "unshuffle", [&] {
      using O = typename storage<scalar_t>::type;
      const X* xs = cptr<x_scalar>(x);
      const O* mt = cptr<scalar_t>(mask_token);
      const O* pe = pos_embed ? cptr<scalar_t>(*pos_embed) : nullptr;
      const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
      O* o = mptr<scalar_t>(out);
      const int64_t sb = x.stride(0), sk = x.stride(1);
      at::parallel_for(0, B * R, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = i / R, r = i % R;
          const O* pos = pe ? pe + r * D : nullptr;
          const int64_t row = r < prefix ? r : prefix + checked_id(ids, b, r - prefix, L);
          if (row < prefix + K) {
            add_row(o + i * D, xs + b * sb + row * sk, pos, D);
          } else {
            add_row(o + i * D, mt, pos, D);
          }
        }
      });
    });
  });
}

at::Tensor unshuffle_backward_out(const at::Tensor& grad_out, const at::Tensor& ids_restore, int64_t prefix,
                                  at::Tensor& grad_x) {
  check_cpu(grad_out, "grad_out");
  check_contiguous(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 3, "unshuffle backward: grad_out must be (B, prefix + L, D)");
  const int64_t B = grad_out.size(0), R = grad_out.size(1), D = grad_out.size(2);
  check_ids(ids_restore, B);
  const int64_t L = ids_restore.size(1);
  TORCH_CHECK(prefix >= 0 && prefix + L == R, "unshuffle backward: grad_out has ", R, " rows, prefix ", prefix,
              " + ids_restore's ", L, " tokens");
  check_cpu(grad_x, "grad_x");
  TORCH_CHECK(grad_x.is_contiguous() && grad_x.dim() == 3 && grad_x.size(0) == B && grad_x.size(2) == D &&
                  grad_x.size(1) >= prefix && grad_x.size(1) <= R,
              "unshuffle backward: grad_x must be a contiguous (B, prefix + K, D) tensor");
  const int64_t K = grad_x.size(1) - prefix;
  std::vector<float> per_image(static_cast<size_t>(B * D), 0.0f);
  MAE_FAST_DISPATCH_FLOAT(grad_x.scalar_type(), "unshuffle backward", [&] {
    using x_scalar = scalar_t;
    using X = typename storage<x_scalar>::type;
    MAE_FAST_DISPATCH_FLOAT(grad_out.scalar_type(), "unshuffle backward", [&] {
      using O = typename storage<scalar_t>::type;
      const O* g = cptr<scalar_t>(grad_out);
      const int64_t* ids = ids_restore.const_data_ptr<int64_t>();
      X* gx = mptr<x_scalar>(grad_x);
      at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          float* acc = per_image.data() + b * D;
          for (int64_t r = 0; r < R; ++r) {
            const O* row = g + (b * R + r) * D;
            const int64_t dst = r < prefix ? r : prefix + checked_id(ids, b, r - prefix, L);
            if (dst < prefix + K) {
              copy_row(gx + (b * (prefix + K) + dst) * D, row, D);
            } else {
              accumulate_row(acc, row, D);
            }
          }
        }
      });
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

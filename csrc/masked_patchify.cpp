// Fused masking + patchify + self-standardisation on the CPU.
//
// channel_stats: per-image per-channel mean and rstd of images/scale, in one read of each (b, c) plane (sums of
// x and x^2 in double).
// masked_patchify_out: one pass over the image in patch rows; each token is standardised and written straight to
// its shuffled slot, in `visible` when ids_restore < len_keep and in `target` otherwise (no patchified copy).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "common.h"

namespace mae_fast {
namespace {

struct Plane {  // one (b, c) image plane
  const void* data;
  int64_t height, width, row_stride, col_stride;
};

MAE_FAST_INLINE double pixel_double(uint8_t v) { return v; }
MAE_FAST_INLINE double pixel_double(uint16_t v) { return v; }
MAE_FAST_INLINE double pixel_double(int32_t v) { return v; }
template <typename T>
MAE_FAST_INLINE double pixel_double(T v) { return to_float(v); }

// Sum and sum of squares of one plane in double: exact for integer pixels (x^2 < 2^32, sums < 2^53 up to 2^21
// pixels per plane), and E[x^2] - E[x]^2 then loses nothing at float32 resolution for float pixels either.
template <typename T>
MAE_FAST_INLINE std::pair<double, double> plane_sums_body(const Plane& pl) {
  const T* base = static_cast<const T*>(pl.data);
  double sum = 0.0, sumsq = 0.0;
  for (int64_t y = 0; y < pl.height; ++y) {
    const T* row = base + y * pl.row_stride;
    double s = 0.0, ss = 0.0;
    if (pl.col_stride == 1) {
#pragma omp simd reduction(+ : s, ss)
      for (int64_t x = 0; x < pl.width; ++x) {
        const double v = pixel_double(row[x]);
        s += v;
        ss += v * v;
      }
    } else {
      for (int64_t x = 0; x < pl.width; ++x) {
        const double v = pixel_double(row[x * pl.col_stride]);
        s += v;
        ss += v * v;
      }
    }
    sum += s;
    sumsq += ss;
  }
  return {sum, sumsq};
}

template <typename T>
MAE_FAST_AVX2 std::pair<double, double> plane_sums_avx2(const Plane& pl) { return plane_sums_body<T>(pl); }

template <typename T>
std::pair<double, double> plane_sums_base(const Plane& pl) { return plane_sums_body<T>(pl); }

// Calls body(type tag) with the storage type of an image dtype.
template <typename F>
auto dispatch_pixels(at::ScalarType dtype, F&& body) {
  switch (dtype) {
    case at::kByte: return body(uint8_t{});
    case at::kUInt16: return body(uint16_t{});
    case at::kInt: return body(int32_t{});
    case at::kFloat: return body(float{});
    case at::kDouble: return body(double{});
    case at::kBFloat16: return body(bf16_t{});
    case at::kHalf: return body(c10::Half{});
    default:
      TORCH_CHECK(false, "masked_patchify: images must be uint8, uint16, int32 (widened uint16) or float, got ",
                  dtype);
  }
}

MAE_FAST_INLINE float pixel_float(uint8_t v) { return static_cast<float>(v); }
MAE_FAST_INLINE float pixel_float(uint16_t v) { return static_cast<float>(v); }
MAE_FAST_INLINE float pixel_float(int32_t v) { return static_cast<float>(v); }
template <typename T>
MAE_FAST_INLINE float pixel_float(T v) { return to_float(v); }

void check_images(const at::Tensor& images) {
  check_cpu(images, "images");
  TORCH_CHECK(images.dim() == 4, "masked_patchify: images must be (B, C, H, W), got ", images.sizes());
}

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& images, double scale, double eps) {
  check_images(images);
  const int64_t B = images.size(0), C = images.size(1);
  auto opts = images.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({B, C}, opts), rstd = at::empty({B, C}, opts);
  float* mean_out = mean.mutable_data_ptr<float>();
  float* rstd_out = rstd.mutable_data_ptr<float>();
  dispatch_pixels(images.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(images.const_data_ptr());
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / C, c = i % C;
        const Plane pl{base + b * images.stride(0) + c * images.stride(1), images.size(2), images.size(3),
                       images.stride(2), images.stride(3)};
        auto [sum, sumsq] = cpu_has_avx2_fma() ? plane_sums_avx2<T>(pl) : plane_sums_base<T>(pl);
        const double n = static_cast<double>(pl.height * pl.width);
        double m = sum / n;
        double v = std::max(0.0, sumsq / n - m * m);
        m /= scale;
        v /= scale * scale;
        mean_out[i] = static_cast<float>(m);
        rstd_out[i] = static_cast<float>(1.0 / std::sqrt(v + eps));
      }
    });
    return 0;
  });
  return {mean, rstd};
}

struct PatchifyArgs {
  int64_t B, C, H, W, p, h, w;
  int64_t sb, sc, sy, sx;       // image strides
  const float* mean;            // (B, C) of images/scale
  const float* rstd;
  const int64_t* ids_restore;   // (B, L)
  int64_t L, len_keep, P;       // tokens per image, visible tokens, values per token
  bool channel_layout;
  float inv_scale;
  float* visible;               // (B, len_keep, P)
  float* target;                // (B, L - len_keep, P)
};

// One patch row of one image (standard layout) or of one image channel (channel layout).
template <typename T>
void patchify_row(const T* img, const PatchifyArgs& a, int64_t b, int64_t c_row, int64_t hi) {
  const int64_t p = a.p;
  const int64_t C = a.C;
  float scale[16], shift[16];  // y = x * scale + shift per channel (C <= 16 checked by the caller, else looped)
  const int64_t c_lo = a.channel_layout ? c_row : 0, c_hi = a.channel_layout ? c_row + 1 : C;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    const float r = a.rstd[b * C + c];
    scale[c - c_lo] = a.inv_scale * r;
    shift[c - c_lo] = -a.mean[b * C + c] * r;
  }
  const int64_t nc = c_hi - c_lo;
  for (int64_t wi = 0; wi < a.w; ++wi) {
    const int64_t t = (a.channel_layout ? c_row * a.h * a.w : 0) + hi * a.w + wi;
    const int64_t pos = a.ids_restore[b * a.L + t];
    TORCH_CHECK(pos >= 0 && pos < a.L, "masked_patchify: ids_restore[", b, ", ", t, "] = ", pos, " outside [0, ",
                a.L, ")");
    float* dst = pos < a.len_keep ? a.visible + (b * a.len_keep + pos) * a.P
                                  : a.target + (b * (a.L - a.len_keep) + (pos - a.len_keep)) * a.P;
    for (int64_t pp = 0; pp < p; ++pp) {
      const T* rows[16];  // this pixel row of the patch in each channel
      for (int64_t k = 0; k < nc; ++k) rows[k] = img + b * a.sb + (c_lo + k) * a.sc + (hi * p + pp) * a.sy + wi * p * a.sx;
      float* out = dst + pp * p * nc;  // (p, q, c) order, written contiguously; nc == 1 for the channel layout
      for (int64_t q = 0; q < p; ++q) {
        for (int64_t k = 0; k < nc; ++k) out[q * nc + k] = pixel_float(rows[k][q * a.sx]) * scale[k] + shift[k];
      }
    }
  }
}

void masked_patchify_out(const at::Tensor& images, const at::Tensor& mean, const at::Tensor& rstd,
                         const at::Tensor& ids_restore, int64_t len_keep, int64_t patch_size, bool channel_layout,
                         double scale, at::Tensor& visible, at::Tensor& target) {
  check_images(images);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3), p = patch_size;
  TORCH_CHECK(p > 0 && H % p == 0 && W % p == 0, "masked_patchify: image size ", H, "x", W,
              " is not a multiple of the patch size ", p);
  TORCH_CHECK(C <= 16, "masked_patchify: at most 16 channels, got ", C);
  const int64_t h = H / p, w = W / p;
  const int64_t L = h * w * (channel_layout ? C : 1);
  const int64_t P = p * p * (channel_layout ? 1 : C);
  TORCH_CHECK(0 <= len_keep && len_keep <= L, "masked_patchify: len_keep ", len_keep, " outside [0, ", L, "]");
  TORCH_CHECK(ids_restore.scalar_type() == at::kLong && ids_restore.is_contiguous() &&
                  ids_restore.sizes() == at::IntArrayRef({B, L}),
              "masked_patchify: ids_restore must be a contiguous int64 (B=", B, ", L=", L, ") tensor, got ",
              ids_restore.sizes(), " ", ids_restore.scalar_type());
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->numel() == B * C,
                "masked_patchify: mean and rstd must be contiguous float32 (B, C) tensors");
  }
  TORCH_CHECK(visible.scalar_type() == at::kFloat && visible.is_contiguous() &&
                  visible.sizes() == at::IntArrayRef({B, len_keep, P}),
              "masked_patchify: visible must be a contiguous float32 (", B, ", ", len_keep, ", ", P, ") tensor");
  TORCH_CHECK(target.scalar_type() == at::kFloat && target.is_contiguous() &&
                  target.sizes() == at::IntArrayRef({B, L - len_keep, P}),
              "masked_patchify: target must be a contiguous float32 (", B, ", ", L - len_keep, ", ", P,
              ") tensor");
  const PatchifyArgs a{B, C, H, W, p, h, w, images.stride(0), images.stride(1), images.stride(2), images.stride(3),
                       mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                       ids_restore.const_data_ptr<int64_t>(), L, len_keep, P, channel_layout,
                       static_cast<float>(1.0 / scale), visible.mutable_data_ptr<float>(),
                       target.mutable_data_ptr<float>()};
  const int64_t rows_per_image = channel_layout ? C * h : h;
  dispatch_pixels(images.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* img = static_cast<const T*>(images.const_data_ptr());
    at::parallel_for(0, B * rows_per_image, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / rows_per_image, r = i % rows_per_image;
        if (channel_layout) {
          patchify_row(img, a, b, r / h, r % h);
        } else {
          patchify_row(img, a, b, 0, r);
        }
      }
    });
    return 0;
  });
}

}  // namespace
}  // namespace mae_fast

TORCH_LIBRARY_IMPL(mae_fast, CPU, m) {
  m.impl("channel_stats", &mae_fast::channel_stats);
  m.impl("masked_patchify_out", &mae_fast::masked_patchify_out);
}

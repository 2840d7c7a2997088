// The Python module mae_fast._C and the schemas of the mae_fast CPU ops (implemented in the other csrc/*.cpp
// files). Importing mae_fast._C loads the library, after which the ops live under torch.ops.mae_fast.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "mae_fast CPU kernels (torch.ops.mae_fast)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mae_fast, m) {
  // fake (meta) implementations live in Python, beside the registration of these kernels as the "cpp" kernel of
  // each mae_fast op; torch imports this module when it needs one
  m.set_python_module("mae_fast.ops.cpp");
  // per-image per-channel mean and 1/sqrt(var + eps) of images/scale: two (B, C) float32 tensors
  m.def("channel_stats(Tensor images, float scale, float eps) -> (Tensor, Tensor)");
  // standardised visible tokens and masked targets, in shuffled order, straight from the raw images
  m.def(
      "masked_patchify_out(Tensor images, Tensor mean, Tensor rstd, Tensor ids_restore, int len_keep, "
      "int patch_size, bool channel_layout, float scale, Tensor(a!) visible, Tensor(b!) target) -> ()");
  // out[b, prefix + t] = (x[b, prefix + ids_restore[b, t]] if visible else mask_token) + pos_embed[prefix + t], the
  // `prefix` leading rows of x (the class token) in place; out in mask_token's and pos_embed's dtype, x in its own
  m.def(
      "unshuffle_out(Tensor x, Tensor mask_token, Tensor ids_restore, Tensor? pos_embed, int prefix, "
      "Tensor(a!) out) -> ()");
  // grad_x[b, prefix + k] = grad_out[b, token at shuffled position k] (prefix rows in place), converted to
  // grad_x's dtype; returns the float32 sum over masked tokens (D,)
  m.def("unshuffle_backward_out(Tensor grad_out, Tensor ids_restore, int prefix, Tensor(a!) grad_x) -> Tensor");
  // MAE loss (MSE + Fourier) and its gradient wrt pred, in one pass; returns the float32 loss
  m.def(
      "mae_loss_out(Tensor pred, Tensor target, Tensor? token_weight, float uniform_weight, int patch_size, "
      "int planes_per_token, float alpha, Tensor(a!) grad) -> Tensor");
  // one Lion step over lists of contiguous tensors of one dtype combination
  m.def(
      "lion_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, float decay, "
      "float beta1, float one_minus_beta1, float beta2, float one_minus_beta2) -> ()");
}

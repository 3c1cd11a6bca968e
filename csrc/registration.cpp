// The only place lgvq_C op schemas are written. Device files register implementations with
// TORCH_LIBRARY_IMPL(lgvq_C, CPU|CUDA, m); Python wraps them as torch.ops.lgvq custom ops.
#include <torch/library.h>

TORCH_LIBRARY(lgvq_C, m) {
  // x [N, D] contiguous, codebook [K, D] contiguous (same dtype: float32/float16/bfloat16, and
  // float64 on CPU), codebook_sqnorm [K] float32 (float64 for float64 inputs) or None.
  // cosine=false: distance = max(|x|^2 - 2 x.c + sqnorm, 0); cosine=true: inputs are unit rows,
  // sqnorm is ignored, distance = 1 - x.c.  Returns (indices int64 [N], distances [N]):
  // argmin with ties to the lowest index; non-finite scores never win unless all do (index 0).
  m.def("nearest_code(Tensor x, Tensor codebook, Tensor? codebook_sqnorm, bool cosine)"
        " -> (Tensor indices, Tensor distances)");
}

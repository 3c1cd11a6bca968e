"""Nearest code: lgvq's backends against the plain PyTorch expressions and the peers.

Shape dict: {"N": vectors, "K": codes, "D": code dimension, "metric": "l2" | "cosine"}.
Inputs (seeded, built outside the timing): codebook ~ N(0, 1) [K, D]; x = a random code plus
N(0, 0.3^2) noise [N, D] — vectors near codes, as in a trained quantizer.

Providers (ids for --providers, then what the table shows):
  lgvq-native         lgvq_kernels.nearest_code(x, codebook, backend="native")
  lgvq-triton         ... backend="triton" (CUDA; the CPU interpreter is for tests, not timing)
  lgvq-reference      ... backend="reference"
  torch-addmm-argmin  the baseline: torch.addmm(codebook_sqnorm, x, codebook.T, alpha=-2)
                      .argmin(1), codebook_sqnorm precomputed; for cosine
                      (F.normalize(x) @ F.normalize(codebook).T).argmax(1)
  torch-cdist-argmin  torch.cdist(x, codebook).argmin(1) (l2 only)
  vqp-cdist-argmax    vector-quantize-pytorch's Codebook.forward distance path as it runs in
                      training, by calling its own functions: x.float(), pack, -cdist(x, embed)
                      (cosine: l2norm'd input and einsum), gumbel_sample(dist, training=True)
                      = argmax plus the N x K one-hot it builds for the update
  gemm                the floor: x @ codebook.T, nothing else
  native-op           the per-call overhead rows: torch.ops.lgvq.nearest_code(..., "native")
  native-kernel       on inputs laid out as the public function lays them out, and the CPU
                      kernel torch.ops.lgvq_C.nearest_code alone
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import harness

def _with_cosine(shapes: list[dict]) -> list[dict]:
    """Each size twice: l2, then cosine (cosine must cost what l2 costs, at every size)."""
    return [dict(shape, metric=metric) for shape in shapes for metric in ("l2", "cosine")]


SHAPE_SETS = {
    # CI / demo: the whole set runs in well under a minute on 2 cores.
    "quick": _with_cosine([
        {"N": 1024, "K": 1024, "D": 64},
        {"N": 4096, "K": 1024, "D": 256},
        {"N": 2048, "K": 4096, "D": 8},
        {"N": 2048, "K": 2048, "D": 32},
    ]),
    # the shapes that matter (docs/benchmarks.md) that fit a 24 GiB, 2-core machine, and the
    # shapes of the targets
    "full": _with_cosine([
        {"N": 1024, "K": 1024, "D": 64},  # medium shapes (issue: never slower than PyTorch)
        {"N": 4096, "K": 1024, "D": 256},
        {"N": 2048, "K": 2048, "D": 32},
        {"N": 2048, "K": 1024, "D": 256},  # VQGAN f16 / LG-VQ, small batch
        {"N": 16384, "K": 1024, "D": 256},  # VQGAN f16 / LG-VQ
        {"N": 4096, "K": 16384, "D": 256},  # RQ-VAE stage (64 x B=64)
        {"N": 16384, "K": 16384, "D": 256},  # VQGAN large codebook: target
        {"N": 8192, "K": 16384, "D": 8},  # LlamaGen (256 x B=32; cosine there)
        {"N": 65536, "K": 16384, "D": 8},  # target (D=8)
        {"N": 65536, "K": 100000, "D": 8},  # VQGAN-LC: N x K matrix is 26 GB
        {"N": 64, "K": 262144, "D": 256},  # inference look-up, large codebook
        {"N": 1, "K": 16384, "D": 256},  # inference look-up, one vector
    ]),
    # gpu_check.sh: kept small enough for its 8-minute limit on one H100.
    "gpu": [
        {"N": 16384, "K": 1024, "D": 256, "metric": "l2"},
        {"N": 16384, "K": 16384, "D": 256, "metric": "l2"},
        {"N": 65536, "K": 16384, "D": 8, "metric": "l2"},
        {"N": 8192, "K": 16384, "D": 8, "metric": "cosine"},
        {"N": 65536, "K": 100000, "D": 8, "metric": "l2"},
        {"N": 64, "K": 262144, "D": 256, "metric": "l2"},
    ],
    # pytest-benchmark suite (benchmarks/test_nearest_code_bench.py)
    "bench": [
        {"N": 1024, "K": 1024, "D": 64, "metric": "l2"},
        {"N": 4096, "K": 1024, "D": 256, "metric": "l2"},
        {"N": 4096, "K": 4096, "D": 8, "metric": "l2"},
    ],
}


SHAPE_FORMAT = harness.ShapeFormat("{N}x{K}x{D}[:{metric}]", label="{N}x{K}x{D}[ {metric}]",
                                   words={"metric": ("l2", "cosine")})


def input_bytes(shape: dict, dtype: str) -> int:
    return (shape["N"] + shape["K"]) * shape["D"] * harness.element_size(dtype)


def vectors_near_codes(n: int, k: int, d: int, seed: int = 0):
    """(x [n, d], codebook [k, d]), float32 on CPU: codebook ~ N(0, 1), each x a random code
    plus N(0, 0.3^2) noise, as in a trained quantizer (the quantizer family uses them too)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=generator)
    x = codebook[torch.randint(0, k, (n,), generator=generator)]
    x += 0.3 * torch.randn(n, d, generator=generator)
    return x, codebook


def make_inputs(shape: dict, device: torch.device, dtype: str, seed: int = 0):
    """(x [N, D], codebook [K, D]) in the dtype's storage type on device."""
    x, codebook = vectors_near_codes(shape["N"], shape["K"], shape["D"], seed)
    storage = harness.torch_dtype(dtype)
    return x.to(device=device, dtype=storage), codebook.to(device=device, dtype=storage)


def _metric(shape: dict) -> str:
    return shape.get("metric", "l2")


def _nk(shape: dict) -> int:
    return shape["N"] * shape["K"]


def _normalised_copies(shape: dict) -> int:
    """Float32 normalised copies of x and codebook (cosine) or upcasts."""
    return 2 * (shape["N"] + shape["K"]) * shape["D"] * 4


FAMILY = harness.register(harness.OpFamily(
    name="nearest_code",
    module=__name__,
    shape_sets=SHAPE_SETS,
    input_bytes=input_bytes,
    shape_format=SHAPE_FORMAT,
    baseline="torch-addmm-argmin",
    floor="gemm",
    floor_label="GEMM",
    default_dtypes={"cpu": ("float32",), "cuda": ("float32", "tf32", "bfloat16")},
))


# --------------------------------------------------------------------------------------------
# lgvq backends
# --------------------------------------------------------------------------------------------


def _lgvq_factory(backend: str):
    def factory(shape: dict, device: torch.device, dtype: str):
        import lgvq_kernels

        x, codebook = make_inputs(shape, device, dtype)
        metric, precision = _metric(shape), harness.precision(dtype)
        return lambda: lgvq_kernels.nearest_code(x, codebook, metric=metric, precision=precision,
                                                 backend=backend)

    return factory


def _streaming_extra(shape: dict, dtype: str) -> int:
    extra = shape["N"] * 12 + shape["K"] * 4  # indices int64 + distances float32, sqnorm
    return extra + (_normalised_copies(shape) if _metric(shape) == "cosine" else 0)


for _backend in ("native", "triton"):
    FAMILY.provider(f"lgvq-{_backend}", f"lgvq {_backend}",
                    available=harness.lgvq_backend_available(_backend, "nearest_code"),
                    extra_bytes=_streaming_extra)(_lgvq_factory(_backend))

def _reference_extra(shape: dict, dtype: str) -> int:
    # one chunk of float32 scores (reference.CHUNK_SCORES), the masked copy where a chunk's
    # minimum is not finite, plus the normalised codebook
    from lgvq_kernels.reference import CHUNK_SCORES

    rows = min(shape["N"], max(1, CHUNK_SCORES // shape["K"]))
    return 2 * 4 * rows * shape["K"] + _streaming_extra(shape, dtype)


FAMILY.provider(
    "lgvq-reference", "lgvq reference",
    available=harness.lgvq_backend_available("reference", "nearest_code"),
    extra_bytes=_reference_extra,
)(_lgvq_factory("reference"))


# The per-call overhead of the public function (validation, layout, backend choice): the same
# search through the registered op (torch.ops.lgvq, inputs laid out as the public function lays
# them out) and through the C++ kernel alone (torch.ops.lgvq_C, CPU).
def _laid_out(shape: dict, device: torch.device, dtype: str):
    x, codebook = make_inputs(shape, device, dtype)
    if _metric(shape) == "cosine":  # what lgvq_kernels.nearest_code hands the op
        return x.float(), codebook.float()
    return x, codebook


@FAMILY.provider("native-op", "lgvq native: registered op only",
                 available=harness.lgvq_backend_available("native", "nearest_code"),
                 extra_bytes=_streaming_extra)
def native_registered_op(shape: dict, device: torch.device, dtype: str):
    x, codebook = _laid_out(shape, device, dtype)
    metric, precision = _metric(shape), harness.precision(dtype)
    return lambda: torch.ops.lgvq.nearest_code(x, codebook, None, metric, precision, "native")


@FAMILY.provider("native-kernel", "lgvq native: C++ kernel only",
                 available=harness.lgvq_backend_available("native", "nearest_code"),
                 applies=lambda shape, dtype, device: "" if device.type == "cpu"
                 else "the CPU kernel's overhead row",
                 extra_bytes=_streaming_extra)
def native_kernel(shape: dict, device: torch.device, dtype: str):
    from lgvq_kernels._backends import _native_module

    _native_module()  # registers torch.ops.lgvq_C
    x, codebook = _laid_out(shape, device, dtype)
    kernel, cosine = torch.ops.lgvq_C.nearest_code, _metric(shape) == "cosine"
    return lambda: kernel(x, codebook, None, cosine)


# --------------------------------------------------------------------------------------------
# plain PyTorch
# --------------------------------------------------------------------------------------------


@FAMILY.provider("torch-addmm-argmin", "torch addmm+argmin",
                 extra_bytes=lambda shape, dtype: _nk(shape) * harness.element_size(dtype)
                 + _normalised_copies(shape))
def addmm_argmin(shape: dict, device: torch.device, dtype: str):
    x, codebook = make_inputs(shape, device, dtype)
    if _metric(shape) == "cosine":
        return lambda: torch.mm(F.normalize(x, dim=1), F.normalize(codebook, dim=1).T).argmax(1)
    codebook_sqnorm = (codebook * codebook).sum(1)
    return lambda: torch.addmm(codebook_sqnorm, x, codebook.T, alpha=-2).argmin(1)


@FAMILY.provider("torch-cdist-argmin", "torch cdist+argmin",
                 applies=lambda shape, dtype, device: "" if _metric(shape) == "l2"
                 else "cdist is Euclidean only",
                 extra_bytes=lambda shape, dtype: 2 * _nk(shape) * harness.element_size(dtype)
                 + _normalised_copies(shape))
def cdist_argmin(shape: dict, device: torch.device, dtype: str):
    x, codebook = make_inputs(shape, device, dtype)
    return lambda: torch.cdist(x, codebook).argmin(1)


@FAMILY.provider("gemm", "bare GEMM x @ codebook.T",
                 extra_bytes=lambda shape, dtype: _nk(shape) * harness.element_size(dtype))
def bare_gemm(shape: dict, device: torch.device, dtype: str):
    x, codebook = make_inputs(shape, device, dtype)
    return lambda: x @ codebook.T


# --------------------------------------------------------------------------------------------
# vector-quantize-pytorch (lucidrains): its Codebook.forward distance path in training mode
# --------------------------------------------------------------------------------------------


@FAMILY.provider("vqp-cdist-argmax", "vector-quantize-pytorch -cdist+argmax",
                 available=harness.importable("vector_quantize_pytorch",
                                               "vector-quantize-pytorch"),
                 # float32 distances through ~3 N x K temporaries, then the int64 one-hot and
                 # its float32 copy while the distances are alive
                 extra_bytes=lambda shape, dtype: 16 * _nk(shape) + _normalised_copies(shape))
def vqp_distance_argmax(shape: dict, device: torch.device, dtype: str):
    from einops import rearrange
    from vector_quantize_pytorch import vector_quantize_pytorch as vqp

    x, codebook = make_inputs(shape, device, dtype)
    cosine = _metric(shape) == "cosine"
    embed = rearrange(codebook, "c d -> 1 c d")  # the 'embed' buffer [heads, codes, dim]
    if cosine:
        embed = vqp.l2norm(embed)  # CosineSim codebooks are kept unit-norm

    def run():
        # VectorQuantize.forward: transform_input (l2norm for cosine, identity otherwise)
        inputs = vqp.l2norm(x) if cosine else x
        # Codebook.forward (training, no mask / affine / transform fn / topk)
        inputs = inputs.float()
        inputs = rearrange(inputs, "... -> 1 ...")
        flatten, _ = vqp.pack_one(inputs, "h * d")
        codes = embed.to(flatten.dtype)
        if cosine:
            dist = vqp.einsum("h n d, h c d -> h n c", flatten, codes)
        else:
            dist = -vqp.cdist(flatten, codes)
        embed_ind, embed_onehot = vqp.gumbel_sample(dist, dim=-1, temperature=1.0,
                                                    stochastic=False, straight_through=False,
                                                    training=True)
        return embed_ind, embed_onehot

    return run


# --------------------------------------------------------------------------------------------
# targets (docs/benchmarks.md, "Targets"), computed from the measured rows
# --------------------------------------------------------------------------------------------

MEMORY_TARGET_BYTES = 64 * harness.MiB


def _memory_target(rows, provider, device_type):
    description = (f"extra peak memory of nearest code, {provider} on {device_type}, "
                   f"every shape: <= {MEMORY_TARGET_BYTES // harness.MiB} MiB")
    mine = [row for row in rows if row.provider == provider and row.device_type == device_type]
    measured = [row for row in mine if row.status == "ok" and row.peak_extra_bytes is not None]
    if not measured:
        reason = (mine[0].note or "memory not measured (--no-memory)") if mine \
            else "provider not in this run"
        return harness.Target(description, "NOT MEASURED", reason)
    worst = max(measured, key=lambda row: row.peak_extra_bytes)
    unmeasured = len(mine) - len(measured)
    detail = (f"max {worst.peak_extra_bytes / harness.MiB:.1f} MiB at {worst.shape} {worst.dtype} "
              f"over {len(measured)} case(s)"
              + (f"; {unmeasured} case(s) not measured" if unmeasured else ""))
    met = worst.peak_extra_bytes <= MEMORY_TARGET_BYTES
    return harness.Target(description, "MET" if met else "NOT MET", detail)


def targets(rows: list[harness.Row]) -> list[harness.Target]:
    results = []
    if any(row.device_type == "cpu" for row in rows):
        cpu = harness.rows_by_case(rows, "cpu")

        def float32_ratio(description, numerator, denominator, label, **bound):
            return harness.ratio_target(description, cpu.get((label, "float32"), {}), numerator,
                                        denominator, where=f"{label} float32", **bound)

        results += [
            float32_ratio("native CPU vs torch addmm+argmin at 16384x16384x256 fp32: >= 1.3x "
                          "faster", "torch-addmm-argmin", "lgvq-native", "16384x16384x256",
                          at_least=1.3),
            float32_ratio("native CPU at 16384x16384x256 fp32: <= 1.15x the bare GEMM",
                          "lgvq-native", "gemm", "16384x16384x256", at_most=1.15),
            float32_ratio("native CPU vs torch addmm+argmin at 65536x16384x8 fp32: >= 5x faster",
                          "torch-addmm-argmin", "lgvq-native", "65536x16384x8", at_least=5.0),
            _memory_target(rows, "lgvq-native", "cpu"),
            harness.every_shape_target(
                "native CPU >= 1.0x torch addmm+argmin at every shape, cosine included",
                rows, "torch-addmm-argmin", "lgvq-native", at_least=1.0, device_type="cpu"),
            harness.every_shape_target(
                "native CPU <= 1.0x the bare GEMM at every shape with D >= 32 and N*K >= 4M",
                rows, "lgvq-native", "gemm", at_most=1.0, device_type="cpu",
                applies=lambda shape: shape["D"] >= 32 and _nk(shape) >= 4 * 2**20),
            harness.every_shape_target(
                "reference CPU >= 0.95x torch addmm+argmin at every shape",
                rows, "torch-addmm-argmin", "lgvq-reference", at_least=0.95, device_type="cpu"),
        ]
    if any(row.device_type == "cuda" for row in rows):
        for provider in ("lgvq-native", "lgvq-triton"):
            for dtype in sorted({row.dtype for row in rows if row.device_type == "cuda"}):
                results.append(_gpu_gemm_target(rows, provider, dtype))
            results.append(_memory_target(rows, provider, "cuda"))
    return results


def _gpu_gemm_target(rows, provider, dtype):
    description = (f"{provider} on GPU within 1.3x of the cuBLAS GEMM (same shape, {dtype}), "
                   "every shape")
    ratios, missing = [], []
    cuda = harness.rows_by_case(rows, "cuda")
    for row in rows:
        if row.provider != provider or row.dtype != dtype or row.device_type != "cuda":
            continue
        gemm = cuda[(row.shape, dtype)].get("gemm")
        if row.status != "ok" or gemm is None or gemm.status != "ok":
            missing.append(row.shape)
            continue
        ratios.append((row.median_s / gemm.median_s, row.shape))
    if not ratios:
        return harness.Target(description, "NOT MEASURED",
                              f"no measured pair (missing: {', '.join(missing) or 'all'})")
    worst = max(ratios)
    detail = (f"worst {worst[0]:.2f}x at {worst[1]} over {len(ratios)} shape(s)"
              + (f"; not measured: {', '.join(missing)}" if missing else ""))
    return harness.Target(description, "MET" if worst[0] <= 1.3 else "NOT MET", detail)


FAMILY.targets = targets

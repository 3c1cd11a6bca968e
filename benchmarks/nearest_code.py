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
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from benchmarks import harness

SHAPE_SETS = {
    # CI / demo: the whole set runs in well under a minute on 2 cores.
    "quick": [
        {"N": 1024, "K": 1024, "D": 64, "metric": "l2"},
        {"N": 4096, "K": 1024, "D": 256, "metric": "l2"},
        {"N": 2048, "K": 4096, "D": 8, "metric": "l2"},
        {"N": 2048, "K": 2048, "D": 32, "metric": "cosine"},
    ],
    # PEERS.md "Shapes that matter" that fit a 24 GiB, 2-core machine, and DESIGN.md's targets.
    "full": [
        {"N": 2048, "K": 1024, "D": 256, "metric": "l2"},  # VQGAN f16 / LG-VQ, small batch
        {"N": 16384, "K": 1024, "D": 256, "metric": "l2"},  # VQGAN f16 / LG-VQ
        {"N": 4096, "K": 16384, "D": 256, "metric": "l2"},  # RQ-VAE stage (64 x B=64)
        {"N": 16384, "K": 16384, "D": 256, "metric": "l2"},  # VQGAN large codebook: target
        {"N": 8192, "K": 16384, "D": 8, "metric": "cosine"},  # LlamaGen (256 x B=32)
        {"N": 65536, "K": 16384, "D": 8, "metric": "l2"},  # target (D=8)
        {"N": 65536, "K": 100000, "D": 8, "metric": "l2"},  # VQGAN-LC: N x K matrix is 26 GB
        {"N": 64, "K": 262144, "D": 256, "metric": "l2"},  # inference look-up, large codebook
        {"N": 1, "K": 16384, "D": 256, "metric": "l2"},  # inference look-up, one vector
    ],
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


def shape_label(shape: dict) -> str:
    text = f"{shape['N']}x{shape['K']}x{shape['D']}"
    return text if shape.get("metric", "l2") == "l2" else f"{text} {shape['metric']}"


def parse_shape(text: str) -> dict:
    """"16384x16384x256", "8192x16384x8:cosine" or "N=..,K=..,D=..,metric=.."."""
    match = re.fullmatch(r"\s*(\d+)[x×](\d+)[x×](\d+)\s*(?::\s*(l2|cosine))?\s*", text)
    if match:
        n, k, d, metric = match.groups()
        return {"N": int(n), "K": int(k), "D": int(d), "metric": metric or "l2"}
    shape = harness.parse_key_values(text)
    missing = {"N", "K", "D"} - set(shape)
    if missing:
        raise ValueError(f"nearest_code shape {text!r} lacks {sorted(missing)}; write NxKxD, "
                         "NxKxD:cosine or N=..,K=..,D=..,metric=..")
    shape.setdefault("metric", "l2")
    return shape


def input_bytes(shape: dict, dtype: str) -> int:
    return (shape["N"] + shape["K"]) * shape["D"] * harness.element_size(dtype)


def make_inputs(shape: dict, device: torch.device, dtype: str, seed: int = 0):
    """(x [N, D], codebook [K, D]) in the dtype's storage type on device."""
    generator = torch.Generator().manual_seed(seed)
    n, k, d = shape["N"], shape["K"], shape["D"]
    codebook = torch.randn(k, d, generator=generator)
    x = codebook[torch.randint(0, k, (n,), generator=generator)]
    x += 0.3 * torch.randn(n, d, generator=generator)
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
    shape_label=shape_label,
    parse_shape=parse_shape,
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

FAMILY.provider(
    "lgvq-reference", "lgvq reference",
    available=harness.lgvq_backend_available("reference", "nearest_code"),
    # float32 scores, the isfinite mask, its masked copy, argmin scratch: ~11 bytes per score
    # (measured 176 MiB at 4096 x 4096), plus upcast/normalised inputs
    extra_bytes=lambda shape, dtype: 11 * _nk(shape) + _normalised_copies(shape),
)(_lgvq_factory("reference"))


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


def _vqp_available(device: torch.device) -> tuple[bool, str]:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return False, f"vector-quantize-pytorch is not importable ({type(error).__name__}: {error})"
    return True, ""


@FAMILY.provider("vqp-cdist-argmax", "vector-quantize-pytorch -cdist+argmax",
                 available=_vqp_available,
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
# targets (DESIGN.md "Performance targets"), computed from the measured rows
# --------------------------------------------------------------------------------------------

MEMORY_TARGET_BYTES = 64 * harness.MiB


def _find(rows, provider, shape, dtype="float32", device_type="cpu"):
    for row in rows:
        if (row.provider == provider and row.dtype == dtype and row.device_type == device_type
                and row.shape_dict == shape):
            return row
    return None


def _ratio_target(rows, description, numerator, denominator, shape, bound, at_least, *,
                  dtype="float32", device_type="cpu"):
    """Target on median(numerator) / median(denominator) against bound."""
    label = shape_label(shape)
    top, bottom = (_find(rows, name, shape, dtype, device_type) for name in (numerator,
                                                                            denominator))
    missing = []
    for name, row in ((numerator, top), (denominator, bottom)):
        if row is None:
            missing.append(f"{name} at {label} {dtype} not in this run")
        elif row.status != "ok":
            missing.append(f"{name} {row.status}: {row.note}")
    if missing:
        return harness.Target(description, "NOT MEASURED", "; ".join(missing))
    ratio = top.median_s / bottom.median_s
    met = ratio >= bound if at_least else ratio <= bound
    detail = (f"{ratio:.2f}x ({numerator} {harness.format_seconds(top.median_s)} / "
              f"{denominator} {harness.format_seconds(bottom.median_s)}; "
              f"needs {'>=' if at_least else '<='} {bound}x)")
    return harness.Target(description, "MET" if met else "NOT MET", detail)


def _memory_target(rows, provider, device_type):
    description = (f"extra peak memory of nearest code, {provider} on {device_type}, "
                   f"every shape: <= {MEMORY_TARGET_BYTES // harness.MiB} MiB")
    mine = [row for row in rows if row.provider == provider and row.device_type == device_type]
    measured = [row for row in mine if row.status == "ok" and row.peak_extra_bytes is not None]
    if not measured:
        reason = mine[0].note if mine else "provider not in this run"
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
        large = {"N": 16384, "K": 16384, "D": 256, "metric": "l2"}
        tiny_d = {"N": 65536, "K": 16384, "D": 8, "metric": "l2"}
        results += [
            _ratio_target(rows, "native CPU vs torch addmm+argmin at 16384x16384x256 fp32: "
                          ">= 1.3x faster", "torch-addmm-argmin", "lgvq-native", large, 1.3,
                          at_least=True),
            _ratio_target(rows, "native CPU at 16384x16384x256 fp32: <= 1.15x the bare GEMM",
                          "lgvq-native", "gemm", large, 1.15, at_least=False),
            _ratio_target(rows, "native CPU vs torch addmm+argmin at 65536x16384x8 fp32: "
                          ">= 5x faster", "torch-addmm-argmin", "lgvq-native", tiny_d, 5.0,
                          at_least=True),
            _memory_target(rows, "lgvq-native", "cpu"),
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
    for row in rows:
        if row.provider != provider or row.dtype != dtype or row.device_type != "cuda":
            continue
        gemm = _find(rows, "gemm", row.shape_dict, dtype, "cuda")
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

"""What the quantizer layers share about their callers: the vector-quantize-pytorch options
lgvq does not take, the peer's state-dict names, and the argument checks and dtype rule that
VectorQuantizer, ResidualVQ and the other layers apply alike."""

from __future__ import annotations

from torch import Tensor, nn

BACKEND_CHOICES = ("auto", "reference", "native", "triton")

# vector-quantize-pytorch options lgvq does not implement (README, "The drop-in quantizer")
PEER_ONLY_OPTIONS = (
    "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes",
    "codebook_diversity_loss_weight", "codebook_diversity_temperature",
    "stochastic_sample_codes", "sample_codebook_temp", "straight_through", "directional_reparam",
    "affine_param", "accept_3d_fmap", "layernorm_after_project_in", "freeze_codebook",
    "manual_ema_update", "in_place_codebook_optimizer", "sync_update_v", "vq_bridge",
    "commitment_use_cross_entropy_loss", "return_zeros_for_masked_padding", "reinmax",
    "sync_kmeans", "sync_affine_param", "learnable_codebook_init", "implicit_neural_codebook",
    "use_ddp", "codebook_transform", "kmeans_init_fn", "diveq",
)


# vector-quantize-pytorch's state-dict names -> ours (same shapes and meaning; the parity tests
# compare these buffers directly)
PEER_STATE_NAMES = {"_codebook.embed": "codebooks", "_codebook.cluster_size": "cluster_size",
                    "_codebook.embed_avg": "embed_sum", "_codebook.initted": "kmeans_done"}


def convert_vector_quantize_state_dict(state_dict: dict, prefix: str = "", *,
                                       ema_update: bool = True) -> dict:
    """A vector-quantize-pytorch ``VectorQuantize`` state dict (keys under ``prefix``) with
    lgvq's names, in place; returned for convenience. ``project_in``/``project_out`` keep their
    names. Without ``ema_update`` the peer's ``embed_avg`` (which it keeps even then) is
    dropped. A state dict with lgvq's names is left as it is."""
    if prefix + "_codebook.embed" not in state_dict:
        return state_dict
    for theirs, ours in PEER_STATE_NAMES.items():
        if prefix + theirs in state_dict:
            state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
    if not ema_update:
        state_dict.pop(prefix + "embed_sum", None)
    return state_dict


def reject_options(class_name: str, options: dict) -> None:
    """TypeError naming ``class_name`` (the class the user called) for ``options`` it does not
    take, and what to do."""
    if not options:
        return
    names = sorted(options)
    peer = [name for name in names if name in PEER_ONLY_OPTIONS]
    if peer:
        raise TypeError(f"{class_name} does not offer vector-quantize-pytorch's {peer}: remove "
                        "them (the README's 'The drop-in quantizer' lists what lgvq supports "
                        "and how it differs)")
    raise TypeError(f"{class_name} got unexpected keyword arguments {names}")


def check_backend(backend) -> None:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")


def projected_dtype(module: nn.Module, codes: Tensor) -> Tensor:
    """codes (float32, from the codebook) in the dtype of ``module.project_out`` (the module's
    dtype after .half()/.bfloat16()/.double()); unchanged without projections."""
    if not module.has_projections:
        return codes
    return codes.to(module.project_out.weight.dtype)

"""State dicts written by vector-quantize-pytorch (trained a few steps, so that the EMA state is
its own) and taming-transformers' VectorQuantizer2 load into lgvq's quantizers with
``load_state_dict``; the loaded layer then quantizes and trains on like the peer."""

import pytest
import torch

import lgvq

vector_quantize_pytorch = pytest.importorskip("vector_quantize_pytorch")

CASES = {
    "vq": ("VectorQuantize", "VectorQuantizer", dict(dim=8, codebook_size=16)),
    "vq-heads-projected": ("VectorQuantize", "VectorQuantizer",
                           dict(dim=8, codebook_size=16, codebook_dim=3, heads=2,
                                separate_codebook_per_head=True)),
    "vq-cosine-kmeans": ("VectorQuantize", "VectorQuantizer",
                         dict(dim=8, codebook_size=16, use_cosine_sim=True, kmeans_init=True)),
    "vq-learnable": ("VectorQuantize", "VectorQuantizer",
                     dict(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False)),
    "rvq-projected": ("ResidualVQ", "ResidualVQ",
                      dict(dim=8, num_quantizers=2, codebook_size=16, codebook_dim=4)),
    "rvq-shared": ("ResidualVQ", "ResidualVQ",
                   dict(dim=8, num_quantizers=3, codebook_size=16, shared_codebook=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_vector_quantize_pytorch_state_dict_loads(case):
    peer_name, our_name, options = CASES[case]
    torch.manual_seed(0)
    theirs = getattr(vector_quantize_pytorch, peer_name)(**options)
    for _ in range(3):  # train: k-means init, EMA updates
        theirs(torch.randn(2, 10, 8))
    state = theirs.state_dict()
    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    ours = getattr(lgvq, our_name)(**options, backend="reference")
    ours.load_state_dict(state)

    x = torch.randn(3, 7, 8)
    theirs.eval(), ours.eval()
    q_theirs, i_theirs, _ = theirs(x)
    q_ours, i_ours, _ = ours(x)
    assert torch.equal(i_ours, i_theirs)
    torch.testing.assert_close(q_ours, q_theirs, rtol=0, atol=1e-5)
    if not options.get("learnable_codebook") and not options.get("shared_codebook"):
        theirs.train(), ours.train()  # and a training step updates the same EMA state
        theirs(x), ours(x)
        first = ours if our_name == "VectorQuantizer" else ours.quantizers[0]
        peer = theirs if peer_name == "VectorQuantize" else theirs.layers[0]
        torch.testing.assert_close(first.codebooks, peer._codebook.embed, rtol=0, atol=1e-5)
        torch.testing.assert_close(first.cluster_size, peer._codebook.cluster_size)


def test_taming_vector_quantizer2_state_dict_loads():
    # taming.modules.vqvae.quantize.VectorQuantizer2 keeps its codes in an nn.Embedding
    codes = torch.randn(16, 4)
    ours = lgvq.TamingVectorQuantizer(16, 4, beta=0.25, backend="reference")
    ours.load_state_dict({"embedding.weight": codes})
    assert torch.equal(ours.embedding.weight, codes)
    z = torch.randn(2, 4, 3, 3)
    expected = ((z.permute(0, 2, 3, 1)[..., None, :] - codes).square().sum(-1)).argmin(-1)
    assert torch.equal(ours(z)[2][2].reshape(2, 3, 3), expected)

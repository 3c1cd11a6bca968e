"""VectorQuantizer on bad and awkward input: wrong shapes and dims, NaN/Inf, empty batches,
masks, codebook_size 1, fp16 with EMA, codes that never receive a vector, k-means init, dead
codes, constructor validation."""

import pytest
import torch

import lgvq

BACKENDS = ["reference", "auto"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


# --------------------------------------------------------------------------------------------
# constructor validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name", [
    (dict(dim=0, codebook_size=4), "dim"),
    (dict(dim=4, codebook_size=0), "codebook_size"),
    (dict(dim=4, codebook_size=4, codebook_dim=0), "codebook_dim"),
    (dict(dim=4, codebook_size=4, heads=0), "heads"),
    (dict(dim=4, codebook_size=4, decay=1.5), "decay"),
    (dict(dim=4, codebook_size=4, decay=-0.1), "decay"),
    (dict(dim=4, codebook_size=4, eps=0.0), "eps"),
    (dict(dim=4, codebook_size=4, commitment_weight=-1.0), "commitment_weight"),
    (dict(dim=4, codebook_size=4, kmeans_iters=-1), "kmeans_iters"),
    (dict(dim=4, codebook_size=4, threshold_ema_dead_code=-1.0), "threshold_ema_dead_code"),
    (dict(dim=4, codebook_size=4, learnable_codebook=True, ema_update=True), "ema_update"),
    (dict(dim=4, codebook_size=4, backend="cuda"), "backend"),
    (dict(dim=4.0, codebook_size=4), "dim"),
])
def test_constructor_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lgvq.VectorQuantizer(**kwargs)


# --------------------------------------------------------------------------------------------
# forward input validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, shape", [
    (dict(), (2, 5, 7)),  # wrong feature size
    (dict(), (2, 3, 5, 8)),  # too many dims
    (dict(), (8,)),  # too few
    (dict(channel_last=False), (2, 5, 8)),  # feature axis must be axis 1
    (dict(accept_image_fmap=True), (2, 8, 5)),  # not a feature map
    (dict(accept_image_fmap=True), (2, 4, 3, 3)),  # wrong channels
])
def test_wrong_shape_names_x_and_both_shapes(layout, shape, backend):
    quantizer = lgvq.VectorQuantizer(8, 4, backend=backend, **layout)
    with pytest.raises(ValueError) as error:
        quantizer(torch.randn(shape))
    message = str(error.value)
    assert message.startswith("x ") and str(tuple(shape)) in message and "8" in message


def test_wrong_types_raise_type_error():
    quantizer = lgvq.VectorQuantizer(8, 4)
    with pytest.raises(TypeError, match="x"):
        quantizer(torch.zeros(2, 3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="mask"):
        quantizer(torch.zeros(2, 3, 8), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        quantizer(torch.zeros(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_when_checked_and_opt_out_works(bad, backend):
    quantizer = lgvq.VectorQuantizer(8, 4, backend=backend, check_finite=True)
    x = torch.randn(2, 3, 8)
    x[1, 2, 5] = bad
    codebook_before = quantizer.codebooks.clone()
    with pytest.raises(ValueError, match=r"^x contains 1 non-finite"):
        quantizer(x)
    assert torch.equal(quantizer.codebooks, codebook_before)  # raised before any update
    quantizer.check_finite = False
    quantized, indices, loss = quantizer.eval()(x)
    assert quantized.shape == x.shape and indices.shape == (2, 3)


# --------------------------------------------------------------------------------------------
# awkward but valid input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 5, 8), (3, 0, 8), (0, 8)])
def test_empty_batch_gives_empty_outputs_zero_loss_and_no_update(shape, backend):
    quantizer = lgvq.VectorQuantizer(8, 4, backend=backend, threshold_ema_dead_code=1.0,
                                     kmeans_init=True)
    state = {name: tensor.clone() for name, tensor in quantizer.state_dict().items()}
    x = torch.randn(shape, requires_grad=True)
    quantized, indices, loss, usage = quantizer(x, return_usage=True)
    assert quantized.shape == x.shape and indices.shape == shape[:-1]
    assert loss.item() == 0.0 and usage.used_fraction.item() == 0.0
    loss.backward()
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_codebook_size_one(backend):
    quantizer = lgvq.VectorQuantizer(8, 1, backend=backend, threshold_ema_dead_code=0.5)
    x = torch.randn(4, 6, 8, requires_grad=True)
    quantized, indices, loss = quantizer(x)
    assert torch.equal(indices, torch.zeros(4, 6, dtype=torch.int64))
    loss.backward()
    # one code, decay 0.8 from cluster size 1: the EMA mean moves toward the batch mean
    assert torch.isfinite(quantizer.codebooks).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_keeps_float32_ema_and_returns_input_dtype(dtype, backend):
    quantizer = lgvq.VectorQuantizer(8, 16, backend=backend)
    x = torch.randn(3, 10, 8).to(dtype).requires_grad_()
    for _ in range(3):
        quantized, indices, loss = quantizer(x)
        loss.backward()
    assert quantized.dtype == dtype and x.grad.dtype == dtype
    assert loss.dtype == torch.float32
    for name in ("codebooks", "cluster_size", "embed_sum"):
        assert getattr(quantizer, name).dtype == torch.float32, name
    quantizer.half()  # must not round the EMA state
    assert quantizer.embed_sum.dtype == torch.float32
    assert torch.isfinite(quantizer.codebooks).all()


def test_ema_state_stays_finite_for_codes_without_vectors(backend):
    quantizer = lgvq.VectorQuantizer(4, 64, backend=backend, decay=0.5)
    x = torch.zeros(2, 8, 4)
    x[..., 0] = 5.0  # every row lands on one code; 63 codes receive nothing for 60 steps
    for _ in range(60):
        quantizer(x)
    for name in ("codebooks", "cluster_size", "embed_sum"):
        assert torch.isfinite(getattr(quantizer, name)).all(), name
    assert (quantizer.cluster_size >= 0).all()


def test_mask_rows_leave_losses_ema_and_output_alone(backend):
    torch.manual_seed(0)
    quantizer = lgvq.VectorQuantizer(8, 16, backend=backend)
    twin = lgvq.VectorQuantizer(8, 16, backend=backend)
    twin.load_state_dict(quantizer.state_dict())
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    garbage = x.clone()
    garbage[~mask] = 1e4  # padding content must not matter
    quantized, indices, loss = quantizer(garbage, mask=mask)
    kept = x[mask][None]
    _, twin_indices, twin_loss = twin(kept)
    torch.testing.assert_close(loss, twin_loss)
    assert torch.equal(indices[mask], twin_indices[0]) and (indices[~mask] == -1).all()
    assert torch.equal(quantized[~mask], garbage[~mask])
    torch.testing.assert_close(quantizer.codebooks, twin.codebooks)
    torch.testing.assert_close(quantizer.embed_sum, twin.embed_sum)


def test_single_vector_input_and_eval_leaves_state(backend):
    quantizer = lgvq.VectorQuantizer(8, 16, backend=backend).eval()
    before = quantizer.codebooks.clone()
    quantized, indices, loss = quantizer(torch.randn(5, 8))
    assert quantized.shape == (5, 8) and indices.shape == (5,)
    assert torch.equal(quantizer.codebooks, before)


# --------------------------------------------------------------------------------------------
# codebook maintenance: k-means init, dead codes, cosine
# --------------------------------------------------------------------------------------------


def clustered_batch(generator, centers, count=240, spread=0.05):
    labels = torch.randint(0, centers.shape[0], (count,), generator=generator)
    return centers[labels] + spread * torch.randn(count, centers.shape[1], generator=generator)


def test_kmeans_init_finds_the_clusters_and_initialises_ema(backend):
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=generator) * 4
    torch.manual_seed(0)
    quantizer = lgvq.VectorQuantizer(8, 16, backend=backend, kmeans_init=True, kmeans_iters=10,
                                     decay=1.0)  # decay 1: the EMA keeps the k-means state
    x = clustered_batch(generator, centers)[None]
    quantizer(x)
    assert bool(quantizer.kmeans_done)
    codebook = quantizer.codebook
    assert torch.cdist(centers, codebook).min(dim=1).values.max() < 0.2  # every cluster found
    # a Lloyd fixed point: each centroid with members is their mean
    members = torch.cdist(x[0], codebook).argmin(dim=1)
    for code in members.unique():
        torch.testing.assert_close(codebook[code], x[0][members == code].mean(0), rtol=1e-4,
                                   atol=1e-4)
    torch.testing.assert_close(quantizer.cluster_size.sum(), torch.tensor(240.0))
    torch.testing.assert_close(quantizer.embed_sum / quantizer.cluster_size[..., None],
                               quantizer.codebooks, rtol=1e-4, atol=1e-4)

    reloaded = lgvq.VectorQuantizer(8, 16, backend=backend, kmeans_init=True, decay=1.0)
    reloaded.load_state_dict(quantizer.state_dict())
    reloaded._kmeans_init_ = None  # loading an initialised state must not initialise again
    reloaded(x)
    torch.testing.assert_close(reloaded.codebooks, quantizer.codebooks, rtol=1e-4, atol=1e-4)


def test_dead_codes_are_moved_onto_batch_vectors(backend):
    generator = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 8, generator=generator) * 4
    torch.manual_seed(0)
    quantizer = lgvq.VectorQuantizer(8, 12, backend=backend, threshold_ema_dead_code=2.0,
                                     decay=0.5)
    for _ in range(15):
        quantized, indices, loss, usage = quantizer(clustered_batch(generator, centers)[None],
                                                    return_usage=True)
    distance_to_data = torch.cdist(quantizer.codebook, centers).min(dim=1).values
    assert distance_to_data.max() < 1.0  # every code now sits on one of the clusters
    assert torch.isfinite(quantizer.embed_sum).all()


def test_learnable_codebook_with_dead_codes_keeps_graph_values(backend):
    torch.manual_seed(0)
    quantizer = lgvq.VectorQuantizer(8, 6, backend=backend, learnable_codebook=True,
                                     threshold_ema_dead_code=5.0)
    x = torch.randn(2, 10, 8)
    quantized, indices, loss = quantizer(x)  # replaces dead codes after the search
    loss.backward()  # the graph still holds the codes it was computed with
    assert quantizer.codebooks.grad is not None and torch.isfinite(quantizer.codebooks.grad).all()


def test_cosine_codebook_stays_unit_norm(backend):
    quantizer = lgvq.VectorQuantizer(8, 16, backend=backend, use_cosine_sim=True,
                                     threshold_ema_dead_code=1.0)
    for _ in range(5):
        quantized, _, _ = quantizer(torch.randn(2, 20, 8) * 3)
    norms = quantizer.codebooks.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    torch.testing.assert_close(quantized.norm(dim=-1), torch.ones(2, 20))


def test_rotation_trick_value_is_the_code_and_gradient_is_rotated(backend):
    quantizer = lgvq.VectorQuantizer(8, 16, backend=backend, rotation_trick=True,
                                     ema_update=False)
    x = torch.randn(1, 30, 8, requires_grad=True)
    quantized, indices, _ = quantizer(x)
    codes = quantizer.codebook[indices]
    torch.testing.assert_close(quantized, codes, rtol=0, atol=0)
    upstream = torch.randn_like(quantized)
    (quantized * upstream).sum().backward()
    # the rotation scaled by |e|/|x| changes the gradient's norm by exactly |e|/|x|
    ratio = x.grad.norm(dim=-1) / upstream.norm(dim=-1)
    torch.testing.assert_close(ratio, codes.norm(dim=-1) / x.detach().norm(dim=-1))


def test_usage_counts_codes(backend):
    quantizer = lgvq.VectorQuantizer(2, 4, backend=backend).eval()
    quantizer.codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.tensor([[[0.1, 0.0], [9.9, 0.1], [0.2, 0.1], [9.8, 0.0]]])
    _, indices, _, usage = quantizer(x, return_usage=True)
    assert indices.tolist() == [[0, 1, 0, 1]]
    torch.testing.assert_close(usage.used_fraction, torch.tensor(0.5))
    torch.testing.assert_close(usage.perplexity, torch.tensor(2.0))


@pytest.mark.parametrize("make, name", [
    (lambda **kw: lgvq.VectorQuantizer(8, 16, **kw), "VectorQuantizer"),
    (lambda **kw: lgvq.ResidualVQ(8, 2, 16, **kw), "ResidualVQ"),
])
def test_unsupported_peer_options_name_the_class_called(make, name):
    with pytest.raises(TypeError, match=rf"^{name} does not offer vector-quantize-pytorch's "
                                        r"\['orthogonal_reg_weight'\]: remove them"):
        make(orthogonal_reg_weight=0.1)
    with pytest.raises(TypeError, match=rf"^{name} got unexpected keyword arguments \['colour'\]"):
        make(colour=1)

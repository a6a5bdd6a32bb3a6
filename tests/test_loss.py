"""Tests of MultiTextContrastiveLoss against a loop-based reference, and across two gloo ranks."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.loss import MultiTextContrastiveLoss, branch_similarity, free_matching


def embeddings(b: int, h: int, m: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, h, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(b, m, d, generator=g), dim=-1)
    return image, text


# ----------------------------------------------------------------------------- reference


def reference_infonce(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE over rows of (N, D) image and text, one row at a time."""
    n = image.shape[0]
    i2t = t2i = 0.0
    for j in range(n):
        row = torch.stack([scale * image[j] @ text[k] for k in range(n)])
        i2t = i2t - torch.log_softmax(row, dim=0)[j]
        row = torch.stack([scale * text[j] @ image[k] for k in range(n)])
        t2i = t2i - torch.log_softmax(row, dim=0)[j]
    return (i2t / n + t2i / n) / 2


def reference_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-text-type losses (M,), with free matching written out sample by sample."""
    b, h, _ = image.shape
    per_type = []
    for m in range(text.shape[1]):
        rows = []
        for i in range(b):
            branch = m if m < h else max(range(h), key=lambda k: float(image[i, k] @ text[i, m]))
            rows.append(image[i, branch])
        per_type.append(reference_infonce(torch.stack(rows), text[:, m], scale))
    return torch.stack(per_type)


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize(
    "mode,h,m",
    [("o2o", 1, 1), ("o2m", 1, 4), ("m2m", 3, 3), ("m2m", 2, 5), ("m2m", 4, 2), ("m2m", 1, 3)],
)
def test_matches_reference(mode, h, m):
    image, text = embeddings(6, h, m)
    out = MultiTextContrastiveLoss(mode)(image, text, torch.tensor([12.0]))
    expected = reference_loss(image, text, 12.0)
    assert out["per_text_type"].shape == (m,)
    assert torch.allclose(out["per_text_type"], expected, atol=1e-5)
    assert torch.allclose(out["loss"], expected.mean(), atol=1e-5)
    assert out["loss"].ndim == 0 and not out["per_text_type"].requires_grad
    assert out["diversity"].item() == 0.0


def test_o2o_equals_clip_cross_entropy():
    image, text = embeddings(5, 1, 1)
    logits = 20.0 * image[:, 0] @ text[:, 0].T
    labels = torch.arange(5)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(MultiTextContrastiveLoss("o2o")(image[:, 0], text[:, 0], 20.0)["loss"], clip, atol=1e-6)


def test_logit_scale_scalar_or_shape_one():
    image, text = embeddings(4, 2, 2)
    loss = MultiTextContrastiveLoss()
    assert torch.equal(loss(image, text, torch.tensor([7.0]))["loss"], loss(image, text, torch.tensor(7.0))["loss"])


def test_free_matching_pairs_fixed_then_most_similar_branch():
    image, text = embeddings(2, 2, 4)
    text = text.clone()
    text[0, 0] = image[0, 1]  # text 0 < H: pairs with branch 0 whatever the similarity
    text[0, 2] = image[0, 1]  # text 2 >= H: most similar branch of the same sample is 1
    text[0, 3] = image[0, 0]
    text[1, 2] = image[1, 1]
    text[1, 3] = image[1, 1]
    paired = free_matching(image, text)
    assert torch.equal(paired[0], image[0, [0, 1, 1, 0]])
    assert torch.equal(paired[1], image[1, [0, 1, 1, 1]])


def test_gradients_follow_the_matching():
    # H > M: branches >= M are unused and get no gradient.
    image, text = embeddings(4, 4, 2)
    image.requires_grad_()
    scale = torch.tensor([10.0], requires_grad=True)
    MultiTextContrastiveLoss()(image, text, scale)["loss"].backward()
    assert image.grad[:, :2].abs().sum(-1).gt(0).all()
    assert image.grad[:, 2:].eq(0).all()
    assert scale.grad.abs().item() > 0

    # H < M: text 2 sends gradient only to the branch it was matched with, none through the choice.
    image, text = embeddings(6, 2, 3, seed=1)
    image.requires_grad_(), text.requires_grad_()
    chosen = torch.einsum("bhd,bd->bh", image, text[:, 2]).argmax(-1)
    grad_image, grad_text = torch.autograd.grad(
        free_matching(image, text)[:, 2].sum(), (image, text), allow_unused=True, materialize_grads=True
    )
    assert chosen.unique().numel() == 2  # the example exercises both branches
    for i in range(6):
        assert grad_image[i, chosen[i]].ne(0).all()
        assert grad_image[i, 1 - chosen[i]].eq(0).all()
    assert grad_text.eq(0).all()


def test_mode_checks_shapes():
    image, text = embeddings(3, 2, 2)
    with pytest.raises(ValueError, match="'o2o'"):
        MultiTextContrastiveLoss("o2o")(image[:, :1], text, 10.0)
    with pytest.raises(ValueError, match="'o2m'"):
        MultiTextContrastiveLoss("o2m")(image, text, 10.0)
    with pytest.raises(ValueError, match="expected image"):
        MultiTextContrastiveLoss()(image, text[:2], 10.0)
    with pytest.raises(ValueError, match="loss mode"):
        MultiTextContrastiveLoss("m2o")


def test_diversity_hinge_hand_made():
    c = 0.9
    image = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [c, (1 - c * c) ** 0.5, 0.0]],  # cosine 0.9
            [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]],  # cosine 1.0
        ]
    )
    text = F.normalize(torch.tensor([[[1.0, 1.0, 0.0]] * 2, [[0.0, 1.0, 1.0]] * 2]), dim=-1)
    assert branch_similarity(image).item() == pytest.approx(0.95)

    plain = MultiTextContrastiveLoss()(image, text, 10.0)
    out = MultiTextContrastiveLoss(diversity_weight=2.0)(image, text, 10.0)
    assert out["diversity"].item() == pytest.approx(2.0 * (0.95 - 0.7))
    assert out["loss"].item() == pytest.approx(plain["loss"].item() + 0.5)

    # Below the margin the hinge is zero; with one branch it is always zero.
    apart = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [0.6, 0.8, 0.0]]])
    assert MultiTextContrastiveLoss(diversity_weight=2.0)(apart, text, 10.0)["diversity"].item() == 0.0
    assert MultiTextContrastiveLoss("o2m", diversity_weight=2.0)(image[:, :1], text, 10.0)["diversity"].item() == 0.0


def test_branch_similarity_three_branches():
    # Pairs (0,1), (0,2), (1,2) have cosines 1, 0, 0: mean 1/3.
    image = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert branch_similarity(image).item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- two ranks

WORLD, LOCAL_BATCH, H, M = 2, 4, 2, 3


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image, text = embeddings(WORLD * LOCAL_BATCH, H, M, seed=3)
    return image, text, torch.tensor([9.0])


def rank_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        image, text, scale = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        scale.requires_grad_()
        out = MultiTextContrastiveLoss("m2m")(image, text, scale)
        out["loss"].backward()
        result = {"loss": out["loss"].detach(), "per_text_type": out["per_text_type"]}
        result |= {"image": image.grad, "text": text.grad, "scale": scale.grad}
        torch.save(result, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_single_process(tmp_path):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]

    image, text, scale = global_batch()
    image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()
    single = MultiTextContrastiveLoss("m2m")(image, text, scale)
    single["loss"].backward()

    # DDP/DeepSpeed average gradients over ranks, so the objective is the mean of the rank losses.
    assert torch.allclose(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], atol=1e-6)
    assert torch.allclose(torch.stack([r["per_text_type"] for r in ranks]).mean(0), single["per_text_type"], atol=1e-6)
    # Each rank's embedding gradient already sums every rank's loss (all_gather backward);
    # divided by the world size it is the gradient of the mean.
    assert torch.allclose(torch.cat([r["image"] for r in ranks]) / WORLD, image.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["text"] for r in ranks]) / WORLD, text.grad, atol=1e-6)
    assert torch.allclose(torch.stack([r["scale"] for r in ranks]).mean(0), scale.grad, atol=1e-6)

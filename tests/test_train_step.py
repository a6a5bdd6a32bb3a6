"""Tests of one training step (train/step.py) without DeepSpeed: contrastive-exact gradient
accumulation on one process and on two gloo ranks, mixed precision, lean batches (trimmed
tokens), gradient checkpointing, and the bookkeeping collectives under a process group whose
only backend serves CUDA tensors (what DeepSpeed's NCCL group is on a GPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from train.distributed import Bookkeeping, serves_cpu
from train.loss import MultiTextContrastiveLoss
from train.model import HolisticCLIP, load_model_config
from train.step import NonFiniteLoss, Precision, _checked, run_step
from train.tokenizer import trim_padding

TINY = load_model_config("tiny")
EOT = 49407
GLOBAL = 8  # images per step, all ranks together
# (branch, H, loss mode, M): o2o, o2m, Psi_CLS and Psi_MLP with H = M, and free matching (M > H).
DESIGNS = [("none", 1, "o2o", 1), ("none", 1, "o2m", 3), ("cls", 3, "m2m", 3), ("mlp", 3, "m2m", 3),
           ("cls", 2, "m2m", 4)]


def model_for(branch: str, h: int) -> HolisticCLIP:
    torch.manual_seed(0)
    return HolisticCLIP(dataclasses.replace(TINY, branch=branch, num_branches=h))


def batch(n: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n normalised-looking images and (n, m, T) token rows of different lengths, zero-padded."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=g)
    tokens = torch.zeros(n, m, TINY.context_length, dtype=torch.long)
    for i in range(n):
        for j in range(m):
            length = int(torch.randint(3, 12, (1,), generator=g))
            tokens[i, j, :length] = torch.randint(1, 49406, (length,), generator=g)
            tokens[i, j, length - 1] = EOT
    return images, tokens


class PlainEngine:
    """The engine interface of run_step on a plain module: backward accumulates .grad, step is a
    no-op (the test reads the gradients); scale_wrt_gas divides by the accumulation, as DeepSpeed."""

    def __init__(self, model: HolisticCLIP, accumulation: int) -> None:
        self.model, self.accumulation = model, accumulation

    def __call__(self, images, tokens):
        return self.model(images, tokens)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.accumulation if scale_wrt_gas else loss).backward()

    def step(self) -> None:
        pass


def step_gradients(branch, h, mode, m, images, tokens, accumulation, how="exact", precision="fp32",
                   diversity=0.5) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Loss values and every parameter's gradient of one step over (images, tokens) cut into
    `accumulation` micro-batches."""
    model = model_for(branch, h)
    engine = PlainEngine(model, accumulation)
    inputs = list(zip(images.chunk(accumulation), tokens.chunk(accumulation), strict=True))
    loss_fn = MultiTextContrastiveLoss(mode, diversity_weight=diversity if h > 1 else 0.0, diversity_margin=-1.0)
    result = run_step(engine, inputs, loss_fn, Precision.named(precision), torch.device("cpu"), Bookkeeping(), how)
    return result.losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=atol), (la, lb)
    assert ga.keys() == gb.keys()
    for name in ga:
        scale = ga[name].abs().max().clamp(min=1e-3)
        assert torch.allclose(ga[name] / scale, gb[name] / scale, atol=atol), name


# ----------------------------------------------------------------------------- one process


@pytest.mark.parametrize("branch,h,mode,m", DESIGNS)
def test_exact_accumulation_matches_the_full_batch(branch, h, mode, m):
    images, tokens = batch(GLOBAL, m, seed=1)
    full = step_gradients(branch, h, mode, m, images, tokens, 1)
    assert "logit_scale" in full[1] and len(full[1]) == sum(1 for _ in model_for(branch, h).parameters())
    for accumulation in (2, 4):
        assert_same(step_gradients(branch, h, mode, m, images, tokens, accumulation), full)


def test_independent_accumulation_is_another_objective():
    """The old behaviour, kept under its name: each micro-batch its own contrastive batch."""
    images, tokens = batch(GLOBAL, 3, seed=2)
    full = step_gradients("cls", 3, "m2m", 3, images, tokens, 1)
    independent = step_gradients("cls", 3, "m2m", 3, images, tokens, 4, how="independent")
    assert abs(independent[0][0] - full[0][0]) > 0.1  # 2 rows per micro-batch: far fewer negatives
    # Its loss is the mean of the micro-batches' own losses.
    parts = [step_gradients("cls", 3, "m2m", 3, images[i:i + 2], tokens[i:i + 2], 1)[0][0] for i in range(0, 8, 2)]
    assert independent[0][0] == pytest.approx(sum(parts) / 4, abs=1e-5)


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_and_gradients():
    images, tokens = batch(4, 3, seed=3)
    model = model_for("cls", 3)
    seen = set()
    model.visual.blocks[0].mlp_fc.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    inputs = [(images[:2], tokens[:2]), (images[2:], tokens[2:])]
    result = run_step(PlainEngine(model, 2), inputs, MultiTextContrastiveLoss("m2m"), Precision.named("bf16"),
                      torch.device("cpu"), Bookkeeping())
    assert seen == {torch.bfloat16}  # the matmuls ran in bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # Exact accumulation holds in bf16 too: the recomputed micro-batch equals its cached one.
    assert_same(step_gradients("cls", 3, "m2m", 3, images, tokens, 2, precision="bf16"),
                step_gradients("cls", 3, "m2m", 3, images, tokens, 1, precision="bf16"), atol=2e-2)


def test_a_non_finite_loss_stops_before_any_backward():
    images, tokens = batch(4, 1, seed=4)
    model = model_for("none", 1)
    with torch.no_grad():
        model.visual.proj.weight.fill_(float("nan"))
    inputs = [(images[:2], tokens[:2]), (images[2:], tokens[2:])]
    with pytest.raises(NonFiniteLoss):
        run_step(PlainEngine(model, 2), inputs, MultiTextContrastiveLoss("o2o"), Precision.named("fp32"),
                 torch.device("cpu"), Bookkeeping())
    assert all(p.grad is None for p in model.parameters())


def test_trimmed_tokens_give_the_same_embeddings():
    _, tokens = batch(6, 3, seed=5)
    for pool, pad in (("argmax", 0), ("last", 7)):
        model = HolisticCLIP(dataclasses.replace(TINY, text_pool=pool, pad_token_id=pad)).eval()
        padded = tokens.masked_fill(tokens == 0, pad)
        trimmed = [trim_padding(padded[:, m], pad) for m in range(3)]
        assert all(t.shape[1] < TINY.context_length and t.shape[1] % 8 == 0 for t in trimmed)
        with torch.no_grad():
            assert torch.allclose(model.encode_text(trimmed), model.encode_text(padded), atol=1e-5)
    assert trim_padding(torch.zeros(2, 32, dtype=torch.long), 0).shape == (2, 8)  # all padding: one block


def test_gradient_checkpointing_gives_the_same_gradients():
    images, tokens = batch(4, 3, seed=6)
    grads = []
    for enabled in (False, True):
        model = model_for("mlp", 3)
        model.set_grad_checkpointing(enabled)
        out = model(images, tokens)
        MultiTextContrastiveLoss("m2m")(out["image"], out["text"], out["logit_scale"])["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


# ----------------------------------------------------------------------------- two ranks

WORLD = 2


def on_two_ranks(worker, tmp_path: Path) -> list[dict]:
    """Run worker(rank, port, out) on WORLD processes; what each rank saved as OUT/<rank>.pt."""
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]


def accumulation_worker(rank: int, port: int, out: str) -> None:
    images, tokens = batch(GLOBAL, 4, seed=7)
    reference = step_gradients("cls", 2, "m2m", 4, images, tokens, 1)  # one process, the whole batch
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        local = slice(rank * GLOBAL // WORLD, (rank + 1) * GLOBAL // WORLD)
        results = {}
        for accumulation in (1, 2, 4):
            losses, grads = step_gradients("cls", 2, "m2m", 4, images[local], tokens[local], accumulation)
            for g in grads.values():  # DeepSpeed averages the gradients over ranks
                dist.all_reduce(g)
                g /= WORLD
            results[accumulation] = (losses, grads)
        torch.save({"reference": reference, "ranks": results}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_exact_accumulation_on_two_ranks_matches_one_process(tmp_path):
    for saved in on_two_ranks(accumulation_worker, tmp_path):
        for accumulation in (1, 2, 4):
            assert_same(saved["ranks"][accumulation], saved["reference"])


def cuda_only_worker(rank: int, port: int, out: str) -> None:
    # The GPU condition on a CPU: the default group's only backend is registered for CUDA tensors,
    # as DeepSpeed's NCCL group is on a GPU machine.
    dist.init_process_group("cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        failed = ""
        try:
            dist.all_reduce(torch.ones(1))  # what the trainer's bookkeeping did before
        except RuntimeError as e:
            failed = str(e)
        books = Bookkeeping()
        total = books.sum(torch.tensor([rank + 1.0, 10.0]))
        mean = books.mean(torch.tensor([float(rank)]))
        gathered = books.gather([f"problem of rank {rank}"])
        stopped = []
        try:  # every rank sees a non-finite loss of one rank, so all stop together
            loss = torch.tensor(float("nan") if rank == 1 else 1.0)
            _checked({"loss": loss, "per_text_type": loss.reshape(1), "diversity": torch.tensor(0.0)},
                     torch.tensor([14.3]), books)
        except NonFiniteLoss:
            stopped.append(rank)
        torch.save({"failed": failed, "total": total, "mean": mean, "gathered": gathered, "stopped": stopped},
                   f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bookkeeping_runs_on_a_group_that_serves_only_cuda(tmp_path):
    for rank, saved in enumerate(on_two_ranks(cuda_only_worker, tmp_path)):
        assert "No backend type associated with device type cpu" in saved["failed"]
        assert saved["total"].tolist() == [3.0, 20.0] and saved["total"].dtype == torch.float64
        assert saved["mean"].tolist() == [0.5]
        assert saved["gathered"] == [["problem of rank 0"], ["problem of rank 1"]]
        assert saved["stopped"] == [rank]


def test_which_backends_serve_the_cpu():
    assert serves_cpu("gloo") and serves_cpu("cpu:gloo,cuda:nccl")
    assert not serves_cpu("nccl") and not serves_cpu("cuda:gloo") and not serves_cpu("cuda:nccl")


def test_the_model_and_step_run_under_torch_compile():
    """train.compile runs DeepSpeed's engine.compile(), i.e. torch.compile of the model (inductor
    on GPUs; its C++ build takes minutes on this CPU, so CI traces with aot_eager: the same graph
    capture and autograd, without code generation). The compiled step gives the same loss and
    gradients, also with exact accumulation and per-type token lengths that change between calls."""
    images, tokens = batch(GLOBAL, 3, seed=8)
    reference = step_gradients("cls", 3, "m2m", 3, images, tokens, 2)
    model = model_for("cls", 3)
    compiled = torch.compile(model, backend="aot_eager")
    inputs = [(images[i:i + 4], [trim_padding(tokens[i:i + 4, m], 0) for m in range(3)]) for i in (0, 4)]
    result = run_step(PlainEngine(compiled, 2), inputs, MultiTextContrastiveLoss("m2m", 0.5, -1.0),
                      Precision.named("fp32"), torch.device("cpu"), Bookkeeping())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_same((result.losses, grads), reference)

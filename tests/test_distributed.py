"""The model trains under FSDP2 (``torch.distributed.fsdp.fully_shard``) with the package's
kernels: 2 CPU processes on gloo give the same loss and gradients as one process."""

from __future__ import annotations

import datetime
import gc
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from internlm_kernels.models import InternLMForCausalLM, ModelArgs

WORLD = 2


def _batch():
    return torch.randint(0, 256, (4, 13), generator=torch.Generator().manual_seed(7))


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def _model():
    torch.manual_seed(0)
    return InternLMForCausalLM(ModelArgs.from_name("tiny-internlm2"), backend="auto")


def _train_and_save(rank: int, result_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    local = _batch()[rank::WORLD]  # equal shards: the mean of the local means is the global mean
    loss = _loss(model, local)
    loss.backward()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    grads = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads}, result_path)


def _worker(rank: int, port: int, result_path: str) -> None:
    # A lost peer fails the test within minutes instead of gloo's default half hour.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        _train_and_save(rank, result_path)
        # Tear down cleanly (CI once saw rank 1 abort with "terminate called without an active
        # exception"): FSDP's hooks leave reference cycles that would otherwise free gloo
        # objects during interpreter shutdown, and the barrier lets both ranks finish their
        # traffic before either destroys the group.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_two_processes_match_one(tmp_path):
    result_path = str(tmp_path / "fsdp.pt")
    mp.spawn(_worker, args=(_free_port(), result_path), nprocs=WORLD, join=True)
    sharded = torch.load(result_path)

    model = _model()
    loss = _loss(model, _batch())
    loss.backward()
    assert abs(float(sharded["loss"]) - float(loss)) <= 1e-5 * abs(float(loss))
    for name, param in model.named_parameters():
        expected, actual = param.grad, sharded["grads"][name]
        scale = float(expected.abs().max())
        assert float((actual - expected).abs().max()) <= 1e-5 * scale + 1e-9, name

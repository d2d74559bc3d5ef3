"""Two Ray Train workers (gloo) stay in lock-step: gradients are averaged, parameters identical."""

from __future__ import annotations

import pytest
import torch

from unmix_ray.config import AugmentConfig, MethodConfig, MixtureConfig


def _loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from unmix_ray.augment import BatchAugment
    from unmix_ray.methods import build_method
    from unmix_ray.models import NarrowResNet
    from unmix_ray.unmix import MixtureSampler

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    method = build_method(MethodConfig(**config["method"]), NarrowResNet(1, width=8))
    initial = torch.cat([p.detach().flatten().clone() for p in method.parameters()])
    model = ray.train.torch.prepare_model(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    augment = BatchAugment(AugmentConfig(jitter=(0.4, 0.4, 0, 0), gray_p=0), 16, (0.5,), (0.25,), g)
    mixer = MixtureSampler(MixtureConfig(type="both"), seed=rank)  # each rank mixes its own batch, its own draw
    for _ in range(config["steps"]):
        x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=g)  # different data per rank
        x0, x1 = augment(x), augment(x)
        out = model(x0, x1, mixer(x0))
        opt.zero_grad()
        out.total.backward()
        opt.step()
    final = torch.cat([p.detach().flatten() for p in method.parameters()])
    torch.save({"initial": initial, "final": final}, f"{config['out']}/rank{rank}.pt")
    ray.train.report({"loss": out.total.item()})


@pytest.mark.slow
def test_two_workers_end_with_identical_parameters(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    method = {"name": "simclr", "params": {"temperature": 0.5, "proj_hidden": 32, "proj_dim": 16}}
    trainer = TorchTrainer(
        _loop, train_loop_config={"method": method, "steps": 4, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="sync", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert not torch.equal(r0["initial"], r1["initial"])  # they did start apart
    assert not torch.equal(r0["final"], r0["initial"])  # and training moved them
    assert torch.equal(r0["final"], r1["final"])

"""Every method's Un-Mix objective on tiny models: the maths of each term, and the method state."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from unmix_ray.compose import compose_sweep
from unmix_ray.config import CONFIG_DIR, ConfigError, MethodConfig, MixtureConfig, OptimConfig
from unmix_ray.losses.byol import normalized_mse
from unmix_ray.losses.info_nce import info_nce
from unmix_ray.losses.nt_xent import nt_xent
from unmix_ray.losses.swav import sinkhorn, swapped_prediction
from unmix_ray.methods import METHODS, build_method
from unmix_ray.methods.byol import target_momentum
from unmix_ray.methods.moco import MoCo, same_mixture
from unmix_ray.models import NarrowResNet
from unmix_ray.optim import build_optimizer
from unmix_ray.unmix import Mixture, MixtureSampler, cutmix, flip, mixup

torch.set_num_threads(1)

# Narrow heads so every test runs in well under a second on one core.
SMALL = {
    "simclr": {"proj_hidden": 32, "proj_dim": 16},
    "byol": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32},
    "byol_online": {"proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32, "mix_branches": "online"},
    "moco_v1": {"proj_dim": 16, "queue_size": 64},
    "moco_v1_sym": {"proj_dim": 16, "queue_size": 64, "symmetric": True},
    "moco_v1_sym_both": {"proj_dim": 16, "queue_size": 64, "symmetric": True, "symmetric_mix": "both_views"},
    "moco_v2": {"proj_hidden": 32, "proj_dim": 16, "queue_size": 64},
    "swav": {"proj_hidden": 32, "proj_dim": 16, "n_prototypes": 10},
}
VARIANTS = list(SMALL)


def make(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    name = variant.removesuffix("_online").removesuffix("_both").removesuffix("_sym")
    return build_method(MethodConfig(name=name, params=SMALL[variant]), NarrowResNet(3, 8)).train()


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)


def mixture_of(x0: torch.Tensor, kind: str) -> Mixture:
    if kind == "mixup":
        return Mixture(mixup(x0, 0.3), 0.3, "mixup")
    box = (2, 11, 4, 13)
    images, lam = cutmix(x0, box)
    return Mixture(images, lam, "cutmix", box)


def base_loss_reference(m, x0: torch.Tensor, x1: torch.Tensor, negatives=None) -> torch.Tensor:
    """The base method's loss L(x0, x1), written from the pure loss functions."""
    p = m.params
    if m.__class__.__name__ == "SimCLR":
        return nt_xent(m.outputs(x0), m.outputs(x1), p.temperature, gather=False)
    if m.__class__.__name__ == "BYOL":
        return normalized_mse(m.online(x0), m.target(x1)) + normalized_mse(m.online(x1), m.target(x0))
    if isinstance(m, MoCo):
        q0, k1 = m.outputs(x0).q, m.keys(x1).k
        loss = info_nce(q0, k1, negatives, p.temperature)
        if p.symmetric:
            loss = loss + info_nce(m.outputs(x1).q, m.keys(x0).k, negatives, p.temperature)
        return loss
    s0, s1 = m.outputs(x0).scores, m.outputs(x1).scores
    c0, c1 = sinkhorn(s0, p.sinkhorn_eps, p.sinkhorn_iters), sinkhorn(s1, p.sinkhorn_eps, p.sinkhorn_iters)
    return swapped_prediction(s0, c0, s1, c1, p.temperature)


# ---------------------------------------------------------------- configs


def test_every_method_is_registered_with_a_recipe_config():
    assert set(METHODS) == {"simclr", "byol", "moco_v1", "moco_v2", "swav"}
    for name in METHODS:
        data = yaml.safe_load((CONFIG_DIR / "methods" / f"{name}.yaml").read_text())
        assert data["name"] == name and set(data) == {"name", "params", "optim"}


def test_method_configs_compose_and_overrides_apply():
    sweep = compose_sweep({
        "name": "t", "untrained_reference": False,
        "grid": {"dataset": ["fashion_mnist"], "method": sorted(METHODS), "mixture": ["both"]},
        "methods": {"moco_v1": {"params": {"queue_size": 256, "symmetric": True}},
                    "swav": {"optim": {"lr": 0.3}}},
    })
    by_name = {t.method.name: t.method for t in sweep.trials}
    assert by_name["moco_v1"].params["queue_size"] == 256 and by_name["moco_v1"].params["symmetric"]
    assert by_name["moco_v1"].params["temperature"] == 0.1
    assert by_name["moco_v2"].params["temperature"] == 0.2
    assert by_name["moco_v2"].params["proj_hidden"] == 2048
    assert by_name["swav"].optim.name == "lars" and by_name["swav"].optim.lr == 0.3
    assert by_name["byol"].params["mix_branches"] == "both"


def test_bad_method_params_are_reported():
    with pytest.raises(ConfigError) as err:
        compose_sweep({"name": "t", "grid": {"dataset": ["fashion_mnist"], "method": ["byol", "moco_v2"]},
                       "methods": {"byol": {"params": {"mix_branches": "target"}},
                                   "moco_v2": {"params": {"queue": 3}}}})
    text = str(err.value)
    assert "mix_branches" in text and "queue: unknown key" in text


# ---------------------------------------------------------------- the objective


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixing_off_gives_exactly_the_base_loss(variant):
    m = make(variant)
    x0, x1 = batch()
    negatives = m.queue.clone() if isinstance(m, MoCo) else None
    out = m(x0, x1, None)
    expected = base_loss_reference(m, x0, x1, negatives)
    assert torch.equal(out.total, expected), (out.total.item(), expected.item())
    assert torch.equal(out.clean, expected) and out.mixed.item() == 0.0


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_flipped_outputs_equal_a_real_forward_of_the_flipped_mixture(variant, kind):
    """The shortcut flip(out(mix)) stands for out(flip(mix)): check it output by output and in the
    loss, with BatchNorm in train mode (batch statistics)."""
    m = make(variant)
    x0, x1 = batch()
    mix = mixture_of(x0, kind)
    lam = mix.lam
    negatives = m.queue.clone() if isinstance(m, MoCo) else None

    shortcut = flip(m.mix_outputs(mix.images))
    real = m.mix_outputs(mix.images.flip(0))
    for a, b in zip(shortcut, real, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    out = m(x0, x1, mix)
    # The same objective, with a real forward pass of flip(mix) in place of the shortcut.
    if isinstance(m, MoCo):
        def loss(a, b):
            return m.loss(a, b, negatives=negatives)

        def half(xa, xb, images):
            qa, kb = m.outputs(xa), m.keys(xb)
            return (loss(qa, kb) + lam * loss(kb, m.outputs(images))
                    + (1 - lam) * loss(kb, m.outputs(images.flip(0))))

        expected = half(x0, x1, mix.images)
        if m.params.symmetric:
            swapped_mix = mix.images if m.params.symmetric_mix == "view0" else same_mixture(mix, x1)
            expected = expected + half(x1, x0, swapped_mix)
    else:
        o0, o1 = m.outputs(x0), m.outputs(x1)
        expected = (m.loss(o0, o1) + lam * m.loss(o1, m.mix_outputs(mix.images))
                    + (1 - lam) * m.loss(o1, m.mix_outputs(mix.images.flip(0))))
    torch.testing.assert_close(out.total, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.clean + out.mixed, out.total)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_term_weights_follow_lam(variant):
    """With mix = x0 exactly (lam = 1 mixup), L(x1, mix) is the clean loss with roles swapped; with
    lam = 0 only the flipped term remains. A wrong weighting fails one of the two."""
    m = make(variant)
    x0, x1 = batch()
    neg = m.queue.clone() if isinstance(m, MoCo) else None
    if isinstance(m, MoCo):
        m.params = m.params.model_copy(update={"symmetric": False})

        def loss(a, b):
            return m.loss(a, b, negatives=neg)

        o1, om = m.keys(x1), m.outputs(x0)
    else:
        loss = m.loss
        o1, om = m.outputs(x1), m.mix_outputs(x0)
    for lam, target in ((1.0, loss(o1, om)), (0.0, loss(o1, flip(om)))):
        if isinstance(m, MoCo):
            m.queue.copy_(neg)
        out = m(x0, x1, Mixture(x0.clone(), lam, "mixup"))
        torch.testing.assert_close(out.mixed, target, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_is_finite_and_falls_on_a_fixed_batch(variant):
    """A few optimiser steps on one batch and one mixture lower the Un-Mix loss. For MoCo the queue
    is held at its initial negatives, so that the change measured is the encoder's."""
    m = make(variant)
    x0, x1 = batch()
    mix = mixture_of(x0, "cutmix")
    queue = m.queue.clone() if isinstance(m, MoCo) else None
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for step in range(8):
        if queue is not None:
            m.queue.copy_(queue)
        out = m(x0, x1, mix)
        assert torch.isfinite(out.total) and torch.isfinite(out.clean) and torch.isfinite(out.mixed)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        m.after_step(step / 8)
        losses.append(out.total.item())
    assert losses[-1] < 0.9 * losses[0], losses


# ---------------------------------------------------------------- method state


def test_moco_queue_holds_the_last_keys_in_order_and_its_pointer_wraps():
    m = make("moco_v1")
    size = m.queue.shape[0]  # 64
    seen = []
    for i, n in enumerate([24, 24, 24, 8, 100]):  # wraps at 72, lands on 0 at 80, then overfills
        keys = torch.randn(n, 16, generator=torch.Generator().manual_seed(i))
        m.enqueue(keys)
        seen.append(keys)
        everything = torch.cat(seen)
        ptr = int(m.queue_ptr)
        assert ptr == everything.shape[0] % size
        if everything.shape[0] >= size:  # oldest key at the pointer, newest just before it
            torch.testing.assert_close(m.queue.roll(-ptr, dims=0), everything[-size:])
        else:
            torch.testing.assert_close(m.queue[:ptr], everything)


@pytest.mark.parametrize("variant", ["moco_v1", "moco_v1_sym"])
def test_moco_enqueues_only_clean_keys(variant):
    m = make(variant)
    x0, x1 = batch()
    keys = [m.keys(x1).k] + ([m.keys(x0).k] if m.params.symmetric else [])
    m(x0, x1, mixture_of(x0, "mixup"))
    n = sum(k.shape[0] for k in keys)
    assert int(m.queue_ptr) == n
    torch.testing.assert_close(m.queue[:n], torch.cat(keys))


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_moco_symmetric_default_is_the_authors_formula(kind):
    """The authors' symmetric MoCo (unmix_c10.py): one mixture, of the first view, in both halves:
    L(q0,k1) + L(q1,k0) + lam L(qm,k1) + (1-lam) L(flip qm,k1) + lam L(qm,k0) + (1-lam) L(flip qm,k0),
    with L the InfoNCE of a query against its key and the queue; keys of both views enqueued."""
    m = make("moco_v1_sym")
    assert m.params.symmetric_mix == "view0"
    x0, x1 = batch()
    mix = mixture_of(x0, kind)
    lam, t, queue = mix.lam, m.params.temperature, m.queue.clone()

    def encode(x):
        return F.normalize(m.projector(m.backbone(x)), dim=1)

    def key(x):
        with torch.no_grad():
            return F.normalize(m.key_projector(m.key_backbone(x)), dim=1)

    def L(q, k):
        return info_nce(q, k, queue, t)

    q0, q1, qm, k0, k1 = encode(x0), encode(x1), encode(mix.images), key(x0), key(x1)
    by_hand = (L(q0, k1) + L(q1, k0) + lam * L(qm, k1) + (1 - lam) * L(qm.flip(0), k1)
               + lam * L(qm, k0) + (1 - lam) * L(qm.flip(0), k0))
    out = m(x0, x1, mix)
    torch.testing.assert_close(out.total, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.clean, L(q0, k1) + L(q1, k0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.queue[: 2 * x0.shape[0]], torch.cat([k1, k0]), rtol=1e-5, atol=1e-6)
    # The other form mixes the second view for the swapped half, so it differs from the authors'.
    other = make("moco_v1_sym_both")
    other.queue.copy_(queue)
    assert not torch.allclose(other(x0, x1, mix).total, by_hand, rtol=1e-3)


def test_moco_key_encoder_follows_the_momentum_rule():
    m = make("moco_v2")
    x0, x1 = batch()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m(x0, x1, mixture_of(x0, "mixup")).total.backward()
    key = list(m.key_backbone.parameters()) + list(m.key_projector.parameters())
    old_key = [p.clone() for p in key]
    opt.step()
    m.after_step(0.3)
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    mom = m.params.momentum
    moved = 0
    for k_new, k_old, q in zip(key, old_key, online, strict=True):
        torch.testing.assert_close(k_new, mom * k_old + (1 - mom) * q)
        moved += int(not torch.equal(k_new, k_old))
    assert moved > 0 and not any(p.requires_grad for p in key)


@pytest.mark.parametrize("progress", [0.0, 0.4, 1.0])
def test_byol_target_moves_by_the_ema_rule(progress):
    m = make("byol")
    x0, x1 = batch()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    m(x0, x1, mixture_of(x0, "cutmix")).total.backward()
    target = list(m.target_backbone.parameters()) + list(m.target_projector.parameters())
    old = [p.clone() for p in target]
    opt.step()
    m.after_step(progress)
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    tau = target_momentum(m.params.tau_base, progress)
    for t_new, t_old, o in zip(target, old, online, strict=True):
        torch.testing.assert_close(t_new, tau * t_old + (1 - tau) * o)
    if progress == 1.0:  # tau = 1: the target no longer moves
        assert all(torch.equal(a, b) for a, b in zip(target, old, strict=True))
    else:
        assert any(not torch.equal(a, b) for a, b in zip(target, old, strict=True))


def test_byol_mix_branches_decides_whether_the_target_sees_the_mixture():
    x0, _ = batch()
    assert make("byol").mix_outputs(x0).z is not None
    assert make("byol_online").mix_outputs(x0).z is None


def test_swav_codes_meet_their_marginals_and_prototypes_stay_unit():
    m = make("swav")
    x0, x1 = batch(16)
    out = m.outputs(x0)
    torch.testing.assert_close(out.codes.sum(dim=1), torch.ones(16))
    expected = sinkhorn(out.scores, m.params.sinkhorn_eps, m.params.sinkhorn_iters)
    torch.testing.assert_close(out.codes, expected)
    assert out.codes.grad_fn is None
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m(x0, x1, mixture_of(x0, "mixup")).total.backward()
    opt.step()
    assert not torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(10))
    m.after_step(0.1)
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_swav_prototypes_do_not_move_while_frozen_and_do_after(optimizer):
    """freeze_prototypes_iters = 3: the prototypes keep their weights through optimiser steps 1-3 (even
    with weight decay and momentum, their gradient is dropped) and move at step 4; the rest of the
    network moves from step 1. The count of steps survives a state_dict round trip."""
    torch.manual_seed(0)
    params = SMALL["swav"] | {"freeze_prototypes_iters": 3}
    m = build_method(MethodConfig(name="swav", params=params), NarrowResNet(3, 8)).train()
    opt = build_optimizer(m, OptimConfig(name=optimizer, lr=0.5, weight_decay=0.1), 8)
    x0, x1 = batch()
    mix = mixture_of(x0, "mixup")
    start = m.prototypes.weight.detach().clone()
    head = m.projector[0].weight.detach().clone()
    saved = None
    for step in range(1, 5):
        opt.zero_grad()
        m(x0, x1, mix).total.backward()
        assert m.prototypes.weight.grad is not None  # the loss does reach them; the optimiser drops it
        opt.step()
        m.after_step(step / 4)
        moved = not torch.equal(m.prototypes.weight, start)
        assert moved == (step == 4), step
        assert not torch.equal(m.projector[0].weight, head)
        if step == 2:
            saved = m.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # as a checkpoint holds it, read back as checkpoints are (tensors only)
    buffer.seek(0)
    fresh = build_method(MethodConfig(name="swav", params=params), NarrowResNet(3, 8))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.optimizer_steps == 2
    assert fresh.frozen_parameters() == [fresh.prototypes.weight]
    fresh.after_step(0.75)
    assert fresh.frozen_parameters() == []


def test_swav_scores_stay_float32_under_bf16_autocast():
    m = make("swav")
    x0, _ = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.outputs(x0)
    assert out.scores.dtype == torch.float32 and out.codes.dtype == torch.float32


def test_swav_flip_reverses_both_scores_and_codes():
    m = make("swav")
    x0, _ = batch()
    out = m.outputs(x0)
    flipped = flip(out)
    assert torch.equal(flipped.scores, out.scores.flip(0)) and torch.equal(flipped.codes, out.codes.flip(0))


@pytest.mark.parametrize("variant", ["moco_v1", "byol", "swav"])
def test_method_state_round_trips_through_state_dict(variant, tmp_path: Path):
    m = make(variant)
    x0, x1 = batch()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    sampler = MixtureSampler(MixtureConfig(type="both"), 0)
    for step in range(2):
        opt.zero_grad()
        m(x0, x1, sampler(x0)).total.backward()
        opt.step()
        m.after_step(step / 2)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    fresh = make(variant, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    for (name, a), (_, b) in zip(m.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    if variant == "moco_v1":
        assert {"queue", "queue_ptr"} <= set(fresh.state_dict()) and int(fresh.queue_ptr) == 16
        assert any(k.startswith("key_backbone.") for k in fresh.state_dict())
    if variant == "byol":
        assert any(k.startswith("target_projector.") for k in fresh.state_dict())


def test_moco_loss_needs_one_query_and_one_key():
    m = make("moco_v1")
    x0, x1 = batch()
    with pytest.raises(TypeError):
        m.loss(m.outputs(x0), m.outputs(x1))

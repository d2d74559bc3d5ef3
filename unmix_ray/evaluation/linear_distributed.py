"""The ``paper`` linear protocol, data-parallel over the ranks of a process group (a Ray Train job's
workers, or plain torch.distributed processes), on any dataset: streamed (ImageNet) or in memory.

The maths is ``linear_paper``'s (the same classifier, optimiser, schedule, views and last / best
epoch), with the data split over the ranks instead of held in one process:

- every epoch the training split comes in a fresh seeded order (``set_epoch``) and is cut into global
  batches of the recipe's size; each rank encodes its ``batch // W`` images of every global batch
  through the frozen encoder (BN in eval mode, no gradients), and ``DistributedDataParallel`` averages
  the classifier's gradients over the ranks: the gradient of the mean loss over the global batch, so
  one SGD step per global batch, as one process taking the whole batch would;
- the test split is encoded once (the frozen encoder and the fixed test view make its features
  constant), each rank its shard; after every epoch each rank counts its top-1 and top-5 hits and the
  counts are summed over the ranks, the wrapped padding of the last shard left out.

Views: a streamed dataset's loader crops them in its DataLoader workers (``train``: RandomResizedCrop
scale 0.08-1 + flip; ``eval``: shorter side resized to ``image_size``, centre ``crop_size``), so the
recipe must ask for that geometry (``check_streamed_views``); an in-memory dataset's uint8 batches are
cropped here, on the device, exactly as ``linear_paper`` crops them.

With one rank the result is ``linear_paper``'s up to the order of the training batches: ``linear_paper``
permutes the images with torch's generator, the loaders here with the shard sampler's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unmix_ray.augment import normalize
from unmix_ray.collectives import data_parallel, rank, sum_shards, world_size
from unmix_ray.config import DatasetConfig, TrialConfig
from unmix_ray.data import image_loader, is_streamed
from unmix_ray.data.loader import MemoryBatches, StreamBatches
from unmix_ray.evaluation.evaluate import Evaluation
from unmix_ray.evaluation.features import Features, eval_view, freeze, frozen
from unmix_ray.evaluation.linear import PaperResult, paper_augment, paper_classifier
from unmix_ray.evaluation.protocols import PROTOCOL_TAG, PaperRecipe, paper_protocol, paper_recipe

View = Callable[[torch.Tensor], torch.Tensor]  # uint8 batch (on the CPU) -> normalised float views on the device
EpochHook = Callable[[int, float, float], None]  # (epoch, test top-1, test top-5), on every rank

# The training crop of the streamed loaders (``unmix_ray.data.imagenet.train_view``).
STREAMED_TRAIN_SCALE = (0.08, 1.0)
# Rank r's augmentation stream is seeded ``seed + r * RANK_SEED_STRIDE``: rank 0 draws linear_paper's.
RANK_SEED_STRIDE = 1_000_003


@dataclass
class ShardFeatures:
    """This rank's shard of a split's features (rank r's row j is item r + j * W; the last rows may be
    the wrapped padding) and the size ``n`` of the split."""

    features: torch.Tensor
    labels: torch.Tensor
    n: int


def per_worker_batch(recipe: PaperRecipe, workers: int) -> int:
    """Each worker's share of the recipe's global batch; the global batch must split evenly."""
    if workers < 1 or recipe.batch_size % workers:
        raise ValueError(f"the {recipe.name} recipe's batch of {recipe.batch_size} does not split evenly over "
                         f"{workers} workers: choose a worker count that divides it (or set eval.paper_batch_size)")
    return recipe.batch_size // workers


def check_streamed_views(ds: DatasetConfig, recipe: PaperRecipe) -> None:
    """A streamed dataset's loader crops the views itself: refuse a recipe asking for other views than
    those, so the protocol string never describes views that were not used."""
    if tuple(recipe.crop_scale) != STREAMED_TRAIN_SCALE:
        raise ValueError(f"{ds.name} is streamed: its loader crops the training views at scale "
                         f"{STREAMED_TRAIN_SCALE}, not the {tuple(recipe.crop_scale)} of eval.paper_crop_scale")
    resize = recipe.test_resize_px(ds.crop_size) or ds.crop_size
    if ds.image_size != resize:
        raise ValueError(f"the {recipe.name} recipe tests on the centre {ds.crop_size} px of images resized to "
                         f"{resize} px; {ds.name} is streamed resized to its image_size, {ds.image_size} px "
                         f"(set dataset.image_size={resize}, or choose eval.paper_recipe to match)")


def paper_views(ds: DatasetConfig, recipe: PaperRecipe, device: torch.device, seed: int = 0,
                worker: int = 0) -> tuple[View, View]:
    """The (training, test) views of ``ds``'s batches under ``recipe``, on ``device``; ``worker``: this
    process's rank (each draws its own random crops)."""
    def to_device(images: torch.Tensor) -> torch.Tensor:
        return images.to(device, non_blocking=True)

    if is_streamed(ds):
        check_streamed_views(ds, recipe)

        def cropped(images: torch.Tensor) -> torch.Tensor:
            return normalize(to_device(images), ds.mean, ds.std)

        return cropped, cropped
    gen = torch.Generator(device=device).manual_seed(seed + RANK_SEED_STRIDE * worker)
    augment = paper_augment(recipe, ds.crop_size, ds.mean, ds.std, gen)
    resize = recipe.test_resize_px(ds.crop_size)

    def train_view(images: torch.Tensor) -> torch.Tensor:
        return augment(to_device(images))

    def test_view(images: torch.Tensor) -> torch.Tensor:
        return eval_view(to_device(images), ds.mean, ds.std, ds.crop_size, resize)

    return train_view, test_view


@torch.no_grad()
def encode_shard(encoder: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], view: View,
                 n: int, device: torch.device) -> ShardFeatures:
    """Features of this rank's shard of a split (an ``eval``-mode loader: in order, padded by wrapping)
    through the frozen ``encoder`` (``freeze``: BN in eval mode; it is left so)."""
    freeze(encoder)
    feats, labels = [], []
    for images, y in batches:
        feats.append(encoder(view(images)).float())
        labels.append(y.to(device, non_blocking=True))
    return ShardFeatures(torch.cat(feats), torch.cat(labels), n)


@torch.no_grad()
def shard_topk(classifier: nn.Module, test: ShardFeatures) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the whole split: every rank's hits on its shard, summed."""
    scores = classifier(test.features)
    hits = [(scores.topk(min(k, scores.shape[1]), dim=1).indices == test.labels.view(-1, 1)).any(dim=1)
            for k in (1, 5)]
    counts = sum_shards(torch.stack(hits, 1).double(), test.n)
    top1, top5 = (100.0 * counts / test.n).tolist()
    return top1, top5


def fit_sharded(encoder: nn.Module, classifier: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int, train: MemoryBatches | StreamBatches,
                train_view: View,
                test: ShardFeatures, device: torch.device, on_epoch: EpochHook | None = None) -> PaperResult:
    """Train ``classifier`` on the frozen ``encoder``'s features of ``train`` (a sharded ``train``-mode
    loader: ``set_epoch``, equal batch counts on every rank) for ``epochs``, one optimiser step per
    batch with the gradients averaged over ranks, the schedule stepped per epoch; test after every
    epoch. Every rank calls it together and gets the same result."""
    if len(train) == 0:
        raise ValueError("the training split holds less than one global batch: nothing to train on "
                         "(set a smaller eval.paper_batch_size)")
    freeze(encoder)
    model = data_parallel(classifier)
    history: list[tuple[float, float]] = []
    for epoch in range(epochs):
        train.set_epoch(epoch)
        model.train()
        for images, labels in train:
            with torch.no_grad():
                feats = encoder(train_view(images)).float()
            loss = F.cross_entropy(model(feats), labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        history.append(shard_topk(classifier, test))
        if on_epoch is not None:
            on_epoch(epoch + 1, *history[-1])
    return PaperResult.of(history)


def linear_paper_sharded(encoder: nn.Module, feature_dim: int, ds: DatasetConfig, recipe: PaperRecipe,
                         device: torch.device, seed: int = 0, chunk: int = 1024,
                         on_epoch: EpochHook | None = None) -> PaperResult:
    """The ``paper`` protocol on ``ds`` (training split in full, test split subsetted by its
    ``test_subset``), over every rank of the process group (or this process alone): each rank loads
    and encodes its shard, ``chunk`` test images at a time. All ranks call it together; the result
    is the same on every rank. The encoder is left frozen."""
    world, me = world_size(), rank()
    batch = per_worker_batch(recipe, world)
    train_view, test_view = paper_views(ds, recipe, device, seed, me)
    test_batches = image_loader(ds, ds.test_split, chunk, mode="eval", seed=seed, rank=me, world_size=world,
                                subset=ds.test_subset)
    test = encode_shard(encoder, test_batches, test_view, test_batches.sampler.n, device)
    del test_batches  # its DataLoader workers (streamed data) are not needed again
    train = image_loader(ds, ds.train_split, batch, mode="train", seed=seed, rank=me, world_size=world)
    classifier, optimizer, scheduler = paper_classifier(feature_dim, ds.num_classes, recipe, device, seed)
    return fit_sharded(encoder, classifier, optimizer, scheduler, recipe.epochs, train, train_view, test, device,
                       on_epoch)


def sharded_paper_protocol(recipe: PaperRecipe, workers: int, encoder_at: str = "last pretraining epoch") -> str:
    """``paper_protocol`` plus how the job was spread: the same protocol, stated as run."""
    return (f"{paper_protocol(recipe, encoder_at)}; distributed on {workers} worker{'s' if workers > 1 else ''}, "
            f"batch {recipe.batch_size // workers} per worker, gradients averaged over workers")


def evaluate_paper_sharded(method: nn.Module, trial: TrialConfig, device: torch.device,
                           encoder_at: str = "last pretraining epoch",
                           on_epoch: EpochHook | None = None) -> Evaluation:
    """``linear_paper_sharded`` on the backbone features of ``method`` (``SSLMethod.features``) with the
    trial's dataset and recipe (``eval.paper_*``): the metrics of the in-memory ``paper`` protocol and
    its protocol tag, saying how many workers ran it. The method's mode and flags are restored after."""
    ds = trial.dataset
    recipe = paper_recipe(trial.eval, ds.name)
    with frozen(method):
        encoder = Features(method)
        with torch.no_grad():
            dim = encoder(torch.zeros(2, ds.channels, ds.crop_size, ds.crop_size, device=device)).shape[1]
        res = linear_paper_sharded(encoder, dim, ds, recipe, device, trial.seed, trial.eval.feature_batch_size,
                                   on_epoch)
    tag = sharded_paper_protocol(recipe, world_size(), encoder_at)
    return Evaluation(res.metrics(), {PROTOCOL_TAG + "linear_paper": tag})

"""Evaluation of a frozen encoder: weighted kNN (``knn``), linear protocols (``linear``; the paper's,
data-parallel over a process group and streamed data, in ``linear_distributed``), features
(``features``), the protocol strings every number carries (``protocols``), and ``evaluate``, which
runs any of them on a method."""

from unmix_ray.evaluation.evaluate import (
    PROTOCOLS,
    Evaluation,
    checkpoint_epoch_text,
    evaluate,
    method_from_checkpoint,
    monitor_knn,
)
from unmix_ray.evaluation.features import eval_view, extract_features, frozen, split_features
from unmix_ray.evaluation.knn import knn_predict, topk_accuracy
from unmix_ray.evaluation.linear import LinearResult, PaperResult, linear_paper, linear_probe
from unmix_ray.evaluation.linear_distributed import (
    evaluate_paper_sharded,
    linear_paper_sharded,
    per_worker_batch,
    sharded_paper_protocol,
)
from unmix_ray.evaluation.protocols import (
    METRIC_SPECS,
    METRICS,
    PAPER_RECIPES,
    PROTOCOL_TAG,
    MetricSpec,
    PaperRecipe,
    knn_protocol,
    linear_protocol,
    metric_protocol,
    paper_protocol,
    paper_recipe,
)

__all__ = [
    "METRICS", "METRIC_SPECS", "PAPER_RECIPES", "PROTOCOLS", "PROTOCOL_TAG", "Evaluation", "LinearResult",
    "MetricSpec", "PaperRecipe", "PaperResult", "checkpoint_epoch_text", "eval_view", "evaluate",
    "evaluate_paper_sharded", "extract_features", "frozen", "knn_predict", "knn_protocol", "linear_paper",
    "linear_paper_sharded", "linear_probe", "linear_protocol", "metric_protocol", "method_from_checkpoint",
    "monitor_knn", "paper_protocol", "paper_recipe", "per_worker_batch", "sharded_paper_protocol", "split_features",
    "topk_accuracy",
]

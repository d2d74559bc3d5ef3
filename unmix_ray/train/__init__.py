"""The Ray Train layer: the loop every training worker runs (``loop``) and rank 0's MLflow logging
(``logger``). It imports the library below it, never the orchestration above."""

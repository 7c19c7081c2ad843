"""The core: the two-stage trial, its attacks and training loop, the probe cache and source-backbone pretraining. It knows nothing of Ray, MLflow or the console."""

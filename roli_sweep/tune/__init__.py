"""The Ray Tune glue of a sweep: the checkpointing trainable, the callbacks (MLflow, console) and the Optuna
searcher that tells Optuna what really happened to each trial."""

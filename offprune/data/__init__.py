"""D4RL-format datasets: reading, sampling, generating."""

from offprune.data.d4rl import (
    REFERENCE_SCORES,
    OfflineDataset,
    available_datasets,
    datasets_dir,
    load_dataset,
    normalized_score,
    resolve_dataset_path,
    write_d4rl_file,
)
from offprune.data.sampler import Batch, SequenceBatch, SequenceSampler, TransitionSampler, episode_ends

__all__ = [
    "REFERENCE_SCORES",
    "Batch",
    "OfflineDataset",
    "SequenceBatch",
    "SequenceSampler",
    "TransitionSampler",
    "episode_ends",
    "available_datasets",
    "datasets_dir",
    "load_dataset",
    "normalized_score",
    "resolve_dataset_path",
    "write_d4rl_file",
]

"""Training data for δ-mem: chat examples -> episodes (memory stream + visible stream) -> padded batches."""

from .collator import ABLATION_MODES, DeltaMemDataCollator, validate_ablation_probs
from .episodes import (
    IGNORE_INDEX,
    EpisodeConfig,
    EpisodeError,
    EpisodeMapper,
    EpisodeStats,
    NoSupervisedTurnError,
    build_episodes,
    episodes_map_fn,
    fit_prompt_and_answer,
    tokenize_messages,
    tokenize_prompt_and_answer,
    validate_messages,
)

__all__ = [
    "ABLATION_MODES",
    "IGNORE_INDEX",
    "DeltaMemDataCollator",
    "EpisodeConfig",
    "EpisodeError",
    "EpisodeMapper",
    "EpisodeStats",
    "NoSupervisedTurnError",
    "build_episodes",
    "episodes_map_fn",
    "fit_prompt_and_answer",
    "tokenize_messages",
    "tokenize_prompt_and_answer",
    "validate_ablation_probs",
    "validate_messages",
]

"""Training δ-mem: chat examples -> episodes (memory + visible stream) -> padded batches; Trainer callbacks."""

from .callbacks import (
    MemoryHealth,
    MemoryHealthCallback,
    add_memory_health_callback,
    check_remove_unused_columns,
    measure_memory_health,
)
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
    tokenize_prompt,
    tokenize_prompt_and_answer,
    validate_messages,
)

__all__ = [
    "ABLATION_MODES",
    "IGNORE_INDEX",
    "MemoryHealth",
    "MemoryHealthCallback",
    "add_memory_health_callback",
    "check_remove_unused_columns",
    "measure_memory_health",
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
    "tokenize_prompt",
    "tokenize_prompt_and_answer",
    "validate_ablation_probs",
    "validate_messages",
]

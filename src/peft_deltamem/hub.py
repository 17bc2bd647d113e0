"""Uploading a δ-mem adapter with its model card."""

from __future__ import annotations

import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload δ-mem adapter",
):
    """Upload exactly what ``model.save_pretrained`` writes, model card included.

    ``PeftModel.push_to_hub`` (transformers' mixin) replaces ``README.md`` with the Hub's existing
    card or a generic template, which drops the note telling users to ``import peft_deltamem``.
    This helper keeps the card that ``save_pretrained`` wrote. Returns the commit info.
    """
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be True, False or None, got {private!r} ({type(private).__name__}).")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(tmp).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(tmp).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id, operations=operations, commit_message=commit_message, revision=revision
        )

"""A tiny key→value recall task (demo and learning tests): a fact stated among noise, asked later.

Episode: the history ``"<bos> n1 n2 … alice likes red . … nk"`` and the question
``"alice likes ?"`` whose answer is ``red``. With ``in_context=True`` the history is part of the
visible sequence (how the backbone learns to answer from context); otherwise it is returned as
the memory stream and only the question is visible.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
VALUES = (
    "red",
    "blue",
    "green",
    "amber",
    "violet",
    "teal",
    "gold",
    "grey",
    "pink",
    "navy",
    "olive",
    "coral",
    "ivory",
    "lime",
    "plum",
    "rust",
)
NOISE = (
    "the",
    "a",
    "so",
    "then",
    "maybe",
    "today",
    "we",
    "talked",
    "about",
    "weather",
    "work",
    "lunch",
    "trains",
    "music",
    "books",
    "later",
    "again",
    "and",
    "it",
    "was",
    "fine",
    "well",
    "ok",
    "yes",
)
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
MARKERS = ("likes", "?", ".")
# Renders the task's chats exactly as its sequences: "<bos> words ...", the answer a single token.
CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's closed vocabulary, with a chat template (built locally, no downloads)."""
    vocab = {word: i for i, word in enumerate(SPECIAL + MARKERS + NAMES + VALUES + NOISE)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def history_text(name: str, value: str, noise: list[str], position: int, bos: bool = True) -> str:
    words = noise[:position] + [name, "likes", value, "."] + noise[position:]
    return " ".join(["<bos>"] * bos + words)


def _pick(generator: torch.Generator, options, n=None):
    index = torch.randint(len(options), (n or 1,), generator=generator).tolist()
    return [options[i] for i in index] if n else options[index[0]]


def recall_chats(n: int, seed: int, noise_words: int = 12) -> list[dict]:
    """The task as chat data: the first message states a fact among noise, the last turn asks for it."""
    generator = torch.Generator().manual_seed(seed)
    chats = []
    for _ in range(n):
        name, value, noise = _pick(generator, NAMES), _pick(generator, VALUES), _pick(generator, NOISE, noise_words)
        position = int(torch.randint(noise_words + 1, (1,), generator=generator))
        messages = [
            {"role": "user", "content": history_text(name, value, noise, position, bos=False)},
            {"role": "user", "content": f"{name} likes ?"},
            {"role": "assistant", "content": value},
        ]
        chats.append({"messages": messages})
    return chats


def sample_batch(
    tokenizer: PreTrainedTokenizerFast,
    batch_size: int,
    generator: torch.Generator,
    noise_words: int = 12,
    in_context: bool = False,
) -> dict[str, torch.Tensor]:
    """A batch of episodes as tensors; ``answers`` holds the answer token ids."""
    histories, questions, answers = [], [], []
    for _ in range(batch_size):
        name, value = _pick(generator, NAMES), _pick(generator, VALUES)
        position = int(torch.randint(noise_words + 1, (1,), generator=generator))
        histories.append(history_text(name, value, _pick(generator, NOISE, noise_words), position))
        questions.append(f"{name} likes ?")
        answers.append(value)
    history_ids = [tokenizer.convert_tokens_to_ids(h.split()) for h in histories]
    answer_ids = tokenizer.convert_tokens_to_ids(answers)
    visible = []
    for h, q, a in zip(history_ids, questions, answer_ids):
        prompt = tokenizer.convert_tokens_to_ids(q.split())
        visible.append((h if in_context else [tokenizer.bos_token_id]) + prompt + [a])
    batch = {"input_ids": torch.tensor(visible), "answers": torch.tensor(answer_ids)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -1] = batch["answers"]
    batch["labels"] = labels
    if not in_context:
        batch["memory_input_ids"] = torch.tensor(history_ids)
        batch["memory_attention_mask"] = torch.ones_like(batch["memory_input_ids"])
    return batch


def answer_accuracy(logits: torch.Tensor, answers: torch.Tensor) -> float:
    """Share of episodes whose most likely next token after the question is the answer."""
    return (logits[:, -2].argmax(-1) == answers).float().mean().item()


def train_steps(
    model, tokenizer, steps: int, *, in_context: bool, seed: int, lr: float = 3e-3, batch_size: int = 32
) -> float:
    """AdamW over fresh batches of the task, trainable parameters only; returns the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = sample_batch(tokenizer, batch_size, generator, in_context=in_context)
        batch.pop("answers")
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def evaluate(model, tokenizer, seed: int, *, in_context: bool = False, memory: bool = True, n: int = 256) -> float:
    """Held-out answer accuracy. ``memory=False`` asks a δ-mem model with an empty memory instead."""
    model.eval()
    batch = sample_batch(tokenizer, n, torch.Generator().manual_seed(seed), in_context=in_context)
    answers = batch.pop("answers")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    if memory:
        return answer_accuracy(model(**batch).logits.cpu(), answers)
    batch.pop("memory_input_ids", None)
    batch.pop("memory_attention_mask", None)
    return answer_accuracy(model(**batch, memory_writes=False).logits.cpu(), answers)  # an empty memory

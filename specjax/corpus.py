"""Training text: reading plain-text files, the byte-level BPE tokenizer, token streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"


def text_files(path: str | Path) -> list[Path]:
    """List the .txt files under `path` (or `path` itself), sorted so that splits are reproducible."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"training data {path} not found; pass a .txt file or a folder of them")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ValueError(f"no .txt files under {path}")
    return files


def split_files(files: list[Path], every: int = 20) -> tuple[list[Path], list[Path]]:
    """Hold out every `every`-th file (whole documents, so held-out text is unseen)."""
    held_out = files[every // 2 :: every]
    train = [f for f in files if f not in held_out]
    if not held_out or not train:
        raise ValueError(f"need at least {every} files to hold some out, got {len(files)}")
    return train, held_out


def read_text(file: Path) -> str:
    text = file.read_text(encoding="utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def train_tokenizer(files: list[Path], vocab_size: int):
    """Train a byte-level BPE tokenizer whose id 0 is the end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_text(f) for f in files), trainer=trainer)
    return tokenizer


def encode_files(tokenizer, files: list[Path]) -> np.ndarray:
    """Token ids of all files, each document followed by the end-of-text token."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    pieces = []
    for file in files:
        pieces.append(np.asarray(tokenizer.encode(read_text(file)).ids, np.int32))
        pieces.append(np.asarray([eos], np.int32))
    return np.concatenate(pieces)


def sample_windows(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`batch` random windows of `length` + 1 tokens (inputs plus next-token targets)."""
    starts = rng.integers(0, len(stream) - length - 1, size=batch)
    return np.stack([stream[s : s + length + 1] for s in starts])


def eval_windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """Up to `count` evenly spaced, non-overlapping windows of `length` + 1 tokens."""
    total = (len(stream) - 1) // length
    picks = np.linspace(0, total - 1, num=min(count, total)).astype(int)
    return np.stack([stream[i * length : i * length + length + 1] for i in picks])

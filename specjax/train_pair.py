"""Train the shipped model pair: tokenizer, target, then a draft distilled from the target.

    python -m specjax.train_pair --data TEXT_DIR --run runs/pair --export models

Every stage resumes from its checkpoint under --run, so the same command continues a
stopped run. --export writes both models in float16 as Hugging Face folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from specjax import corpus
from specjax.checkpoint import save
from specjax.config import ModelConfig
from specjax.model import Model
from specjax.train import Schedule, cross_entropy, model_logits, run_stage

SEQ_LEN = 512


def target_config(vocab_size: int, eos: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=384, intermediate_size=1024, num_layers=6,
        num_heads=6, num_kv_heads=2, head_dim=64, max_position_embeddings=SEQ_LEN,
        rope_theta=10000.0, eos_token_ids=(eos,),
    )


def draft_config(vocab_size: int, eos: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_layers=3,
        num_heads=2, num_kv_heads=1, head_dim=64, max_position_embeddings=SEQ_LEN,
        rope_theta=10000.0, eos_token_ids=(eos,),
    )


def prepare_data(data: Path, run: Path, vocab_size: int):
    """Train (or reload) the tokenizer and cache the token streams of both splits."""
    from tokenizers import Tokenizer

    train_files, held_out_files = corpus.split_files(corpus.text_files(data))
    run.mkdir(parents=True, exist_ok=True)
    tokenizer_file = run / "tokenizer.json"
    if tokenizer_file.is_file():
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    else:
        print(f"training a {vocab_size}-token BPE tokenizer on {len(train_files)} files", flush=True)
        tokenizer = corpus.train_tokenizer(train_files, vocab_size)
        tokenizer.save(str(tokenizer_file))
    streams = {}
    for split, files in (("train", train_files), ("held_out", held_out_files)):
        cached = run / f"{split}_tokens.npy"
        if not cached.is_file():
            np.save(cached, corpus.encode_files(tokenizer, files))
        streams[split] = np.load(cached)
    (run / "split.json").write_text(json.dumps(
        {"train": [f.name for f in train_files], "held_out": [f.name for f in held_out_files]}, indent=1
    ))
    print(f"tokens: {len(streams['train'])} train, {len(streams['held_out'])} held out", flush=True)
    return tokenizer, streams["train"], streams["held_out"]


def held_out_loss(model: Model, windows: np.ndarray) -> float:
    fn = jax.jit(lambda p, w: cross_entropy(model_logits(model.graphdef, p, model.config, w[:, :-1]), w[:, 1:]))
    return float(np.mean([fn(model.params, jnp.asarray(w[None])) for w in windows]))


def top1_agreement(draft: Model, target: Model, windows: np.ndarray) -> float:
    """Fraction of held-out positions where the draft's argmax equals the target's."""
    def agree(dp, tp, w):
        d = model_logits(draft.graphdef, dp, draft.config, w)
        t = model_logits(target.graphdef, tp, target.config, w)
        return jnp.mean(jnp.argmax(d, -1) == jnp.argmax(t, -1))

    fn = jax.jit(agree)
    return float(np.mean([fn(draft.params, target.params, jnp.asarray(w[None, :-1])) for w in windows]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a .txt file or a folder of them")
    parser.add_argument("--run", type=Path, required=True, help="folder for checkpoints and token caches")
    parser.add_argument("--export", type=Path, help="write shakespeare-target/ and shakespeare-draft/ here")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--target-steps", type=int, default=1200)
    parser.add_argument("--draft-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args(argv)

    tokenizer, train, held_out = prepare_data(args.data, args.run, args.vocab_size)
    eos = tokenizer.token_to_id(corpus.EOS_TOKEN)
    windows = corpus.eval_windows(held_out, SEQ_LEN, args.eval_windows)

    target = Model.random(target_config(tokenizer.get_vocab_size(), eos), seed=0, tokenizer=tokenizer)
    print(f"target: {target.config.num_params / 1e6:.2f} M parameters", flush=True)
    schedule = Schedule(steps=args.target_steps, batch=args.batch, seq_len=SEQ_LEN, lr=1.5e-3, save_every=50)
    target = run_stage(args.run / "target", target, schedule, train,
                       lambda m: {"held_out_loss": held_out_loss(m, windows)})

    draft = Model.random(draft_config(tokenizer.get_vocab_size(), eos), seed=1, tokenizer=tokenizer)
    print(f"draft: {draft.config.num_params / 1e6:.2f} M parameters", flush=True)
    schedule = Schedule(steps=args.draft_steps, batch=args.batch, seq_len=SEQ_LEN, lr=3e-3, save_every=50)
    draft = run_stage(
        args.run / "draft", draft, schedule, train,
        lambda m: {"held_out_loss": held_out_loss(m, windows), "top1_agreement": top1_agreement(m, target, windows)},
        teacher=target, seed=1,
    )

    if args.export:
        for name, model in (("shakespeare-target", target), ("shakespeare-draft", draft)):
            save(dataclasses.replace(model, tokenizer=tokenizer), args.export / name, dtype="float16")
            print(f"wrote {args.export / name}", flush=True)


if __name__ == "__main__":
    main()

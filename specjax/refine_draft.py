"""Continue distilling a trained draft from its target, on text the target wrote.

    python -m specjax.refine_draft --data TEXT_DIR --models models --run runs/refine --steps 800

The draft is accepted more often on the text it is asked to draft, so this stage trains
it on the target's own continuations of corpus prompts, greedy and sampled, mixed with
corpus text. It starts from `--models/shakespeare-draft`, keeps the target and tokenizer
of `--models`, resumes from its checkpoint under --run, and with --export writes the new
draft only if its greedy acceptance on held-out prompts went up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from specjax import corpus
from specjax.checkpoint import load, save
from specjax.generate import generate
from specjax.model import Model
from specjax.train import Schedule, run_stage
from specjax.train_pair import SEQ_LEN, greedy_acceptance, held_out_loss, prepare_data, top1_agreement

PROMPT_TOKENS = 32


def target_text(target: Model, train: np.ndarray, cache: Path, temperature: float, rows: int, length: int,
                seed: int) -> np.ndarray:
    """Return a token stream of `rows` target continuations of 32-token corpus prompts,
    `length` tokens each with the prompt, then EOS. They are generated at `temperature`
    (0 for greedy) and cached in `cache`."""
    if cache.is_file():
        return np.load(cache)
    eos = target.eos_token_ids[0]
    rng = np.random.default_rng(seed)
    pieces = []
    for first in range(0, rows, 32):
        starts = rng.integers(0, len(train) - PROMPT_TOKENS, size=min(32, rows - first))
        prompts = [train[s : s + PROMPT_TOKENS].tolist() for s in starts]
        result = generate(target, prompts, max_new_tokens=length - PROMPT_TOKENS, temperature=temperature,
                          seed=seed + first, eos_token_id=[])
        for prompt, tokens in zip(prompts, result.tokens):
            pieces.append(np.asarray(prompt + tokens + [eos], np.int32))
        print(f"{cache.stem}: {first + len(prompts)}/{rows} target continuations", flush=True)
    stream = np.concatenate(pieces)
    np.save(cache, stream)
    return stream


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the corpus folder the pair was trained on")
    parser.add_argument("--models", type=Path, required=True, help="folder with shakespeare-target/ and shakespeare-draft/")
    parser.add_argument("--run", type=Path, required=True, help="folder for checkpoints and token caches")
    parser.add_argument("--export", type=Path, help="write the refined shakespeare-draft/ here")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--rows", type=int, default=256, help="target continuations per temperature")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per training sequence")
    args = parser.parse_args(argv)

    target = load(args.models / "shakespeare-target", dtype="float32")
    start = load(args.models / "shakespeare-draft", dtype="float32")
    args.run.mkdir(parents=True, exist_ok=True)
    # prepare_data reuses a tokenizer it finds in the run folder, so the token streams
    # match the shipped pair's vocabulary.
    shutil.copy(args.models / "shakespeare-target" / "tokenizer.json", args.run / "tokenizer.json")
    _, train, held_out = prepare_data(args.data, args.run, target.config.vocab_size)
    windows = corpus.eval_windows(held_out, args.seq_len, args.eval_windows)

    greedy = target_text(target, train, args.run / "greedy_tokens.npy", 0.0, args.rows, args.seq_len, seed=10)
    sampled = target_text(target, train, args.run / "sampled_tokens.npy", 0.8, args.rows, args.seq_len, seed=20)
    offset = np.random.default_rng(4).integers(0, len(train) - len(sampled))
    stream = np.concatenate([greedy, sampled, train[offset : offset + len(sampled)]])
    print(f"refining on {len(stream)} tokens: target greedy, target sampled and corpus text", flush=True)

    schedule = Schedule(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=50, save_every=100)
    draft = run_stage(
        args.run / "draft_refined", start, schedule, stream,
        lambda m: {"held_out_loss": held_out_loss(m, windows), "top1_agreement": top1_agreement(m, target, windows)},
        teacher=target, seed=5,
    )
    before = greedy_acceptance(target, start, held_out)
    after = greedy_acceptance(target, draft, held_out)
    print(f"greedy acceptance at K=4 on held-out prompts: {before:.3f} before, {after:.3f} after", flush=True)
    if args.export is None:
        return
    if after <= before:
        print("the refined draft is not accepted more often; nothing written", flush=True)
        return
    source_card = args.models / "shakespeare-draft" / "README.md"
    card = source_card.read_text() if source_card.is_file() else ""
    folder = args.export / "shakespeare-draft"
    save(dataclasses.replace(draft, tokenizer=target.tokenizer), folder, dtype="float16")
    stage = json.loads((args.run / "draft_refined" / "state.json").read_text())
    command = "python -m specjax.refine_draft " + " ".join(argv if argv is not None else sys.argv[1:])
    note = refinement_note(stage["history"][-1], before, after, command, args)
    (folder / "README.md").write_text(card + note)
    print(f"wrote {folder}", flush=True)


def refinement_note(metrics: dict, before: float, after: float, command: str, args) -> str:
    """Return the model-card section that records the refinement stage."""
    return "\n".join([
        "",
        "## Refinement",
        "",
        f"- Command: `{command}`",
        f"- Data: {args.rows} greedy and {args.rows} temperature-0.8 continuations by the target of",
        f"  {PROMPT_TOKENS}-token training-corpus prompts, {args.seq_len - PROMPT_TOKENS} tokens each, mixed with as much",
        "  corpus text as the sampled part; loss KL(target || draft) per token.",
        f"- Steps: {metrics['step']} of batch {args.batch} x {args.seq_len} tokens; final training KL",
        f"  {metrics['train_loss']:.3f}; held-out cross-entropy {metrics['held_out_loss']:.3f} nats per token;",
        f"  top-1 agreement with the target on held-out text {metrics['top1_agreement']:.3f}.",
        "- Greedy acceptance at K=4 on the held-out prompts above, with `generate`'s default",
        f"  adaptive drafting: {before:.3f} before, {after:.3f} after.",
        "",
    ])


if __name__ == "__main__":
    main()

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
from specjax.train import Schedule, run_stage
from specjax.train_pair import (
    PROMPT_TOKENS, SEQ_LEN, greedy_acceptance, held_out_loss, prepare_data, target_text, top1_agreement,
)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line. Exits with a usage message on invalid values."""
    parser = argparse.ArgumentParser(prog="python -m specjax.refine_draft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True,
                        help="the corpus folder the pair was trained on (at least 20 .txt files)")
    parser.add_argument("--models", type=Path, required=True,
                        help="folder with shakespeare-target/ and shakespeare-draft/")
    parser.add_argument("--run", type=Path, required=True, help="folder for checkpoints and token caches")
    parser.add_argument("--export", type=Path, help="write the refined shakespeare-draft/ here")
    parser.add_argument("--steps", type=int, default=800,
                        help="training steps in all, counting resumed ones (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=256,
                        help="target continuations per temperature (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=16,
                        help="held-out windows per evaluation (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN,
                        help="tokens per training sequence (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "rows", "eval_windows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.seq_len <= PROMPT_TOKENS:
        parser.error(f"--seq-len={args.seq_len} must exceed the {PROMPT_TOKENS}-token prompts")
    if not args.lr > 0:
        parser.error(f"--lr={args.lr} must be positive")
    return args


def check_run_settings(run: Path, settings: dict) -> None:
    """Record `settings` in `run`, or raise ValueError when the folder was started with
    others, because its token caches and checkpoints would not match them."""
    path = run / "refine_settings.json"
    if path.is_file():
        started = json.loads(path.read_text())
        changed = sorted(key for key in settings if started.get(key) != settings[key])
        if changed:
            raise ValueError(
                f"--run {run} was started with other settings ({', '.join(changed)}); "
                "pass the same ones or a new --run folder"
            )
        return
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        refine(args, argv)
    except ValueError as error:  # also CheckpointError, from loading the models
        print(f"refine_draft: error: {error}", file=sys.stderr)
        return 1
    return 0


def refine(args: argparse.Namespace, argv=None) -> None:
    """Run the refinement stage that `args` describe."""
    try:
        files = corpus.text_files(args.data)
        corpus.split_files(files)
    except ValueError as error:
        raise ValueError(f"--data {args.data}: {error}") from None
    if not (args.models / "shakespeare-draft").is_dir():
        raise ValueError(f"--models {args.models} has no shakespeare-draft/ folder; pass the folder that "
                         "contains shakespeare-target/ and shakespeare-draft/")
    target = load(args.models / "shakespeare-target", dtype="float32")
    start = load(args.models / "shakespeare-draft", dtype="float32")
    if args.seq_len > target.config.max_position_embeddings:
        raise ValueError(f"--seq-len={args.seq_len} exceeds the target's context of "
                         f"{target.config.max_position_embeddings} tokens; pass a smaller one")
    check_run_settings(args.run, {"data": [f.name for f in files], "rows": args.rows, "seq_len": args.seq_len})
    # prepare_data reuses a tokenizer it finds in the run folder, so the token streams
    # match the shipped pair's vocabulary.
    shutil.copy(args.models / "shakespeare-target" / "tokenizer.json", args.run / "tokenizer.json")
    _, train, held_out = prepare_data(args.data, args.run, target.config.vocab_size)
    if len(held_out) <= args.seq_len:
        raise ValueError(f"the held-out files of --data {args.data} have {len(held_out)} tokens, too few for one "
                         f"--seq-len={args.seq_len} window; pass more text or a smaller --seq-len")
    windows = corpus.eval_windows(held_out, args.seq_len, args.eval_windows)

    greedy = target_text(target, train, args.run / "greedy_tokens.npy", temperature=0.0, rows=args.rows,
                         length=args.seq_len, prompt_seed=10, sample_seed=10)
    sampled = target_text(target, train, args.run / "sampled_tokens.npy", temperature=0.8, rows=args.rows,
                          length=args.seq_len, prompt_seed=20, sample_seed=20)
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
        f"  {PROMPT_TOKENS}-token training-corpus prompts, {args.seq_len - PROMPT_TOKENS} tokens each, mixed",
        "  with as much corpus text as the sampled part; loss KL(target || draft) per token.",
        f"- Steps: {metrics['step']} of batch {args.batch} x {args.seq_len} tokens; final training KL",
        f"  {metrics['train_loss']:.3f}; held-out cross-entropy {metrics['held_out_loss']:.3f} nats per token;",
        f"  top-1 agreement with the target on held-out text {metrics['top1_agreement']:.3f}.",
        "- Greedy acceptance at K=4 on the held-out prompts above, with `generate`'s default",
        f"  adaptive drafting: {before:.3f} before, {after:.3f} after.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())

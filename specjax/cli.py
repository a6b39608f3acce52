"""The `specjax` command: `specjax generate` and `specjax bench`, on the shipped model pair
or any Hugging Face folders."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from pathlib import Path

from specjax.arguments import integer, number, positive_integer

DEFAULT_PROMPT = "ROMEO:"
# Defaults of the drafting options, which `generate` notes as unused with --no-draft.
DRAFT_DEFAULTS = {"num_draft_tokens": 6, "fixed_k": False, "min_acceptance": 0.4, "confidence_threshold": 0.0,
                  "max_verify_rows": None, "draft_quantize": None}


def shipped_models_dir() -> Path:
    """Folder with the shipped pair: $SPECJAX_MODELS, else models/ next to the package."""
    override = os.environ.get("SPECJAX_MODELS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "models"


def enable_compile_cache() -> None:
    """Keep traced and compiled programs on disk, so a new process skips most of the work.

    The caches live in $XDG_CACHE_HOME/specjax (default ~/.cache/specjax): `jax` for JAX's
    compilation cache, `programs` for `specjax.program_cache`. SPECJAX_COMPILE_CACHE=0
    turns both off.
    """
    if os.environ.get("SPECJAX_COMPILE_CACHE", "1") == "0":
        return
    import jax

    from specjax import program_cache

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    program_cache.enable(base / "specjax" / "programs")
    jax.config.update("jax_compilation_cache_dir", str(base / "specjax" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _group_size(text: str) -> int | str:
    """Parse --group-size: 32, 64 or 128 rows per scale, or "channel" for one scale per column."""
    from specjax.kernels.formats import SUPPORTED_GROUP_SIZES

    if text == "channel":
        return text
    if text.isdigit() and int(text) in SUPPORTED_GROUP_SIZES:
        return int(text)
    allowed = ", ".join(str(size) for size in SUPPORTED_GROUP_SIZES)
    raise argparse.ArgumentTypeError(
        f"{text!r} is not supported; use {allowed}, or channel for one scale per output column"
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors take one line, in the form of specjax's other errors.
    Its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"specjax: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specjax", description="Lossless speculative decoding in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text, speculatively by default")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt text (default {DEFAULT_PROMPT!r})")
    gen.add_argument("--target", type=Path, help="target model folder (default: the shipped target)")
    gen.add_argument("--draft", type=Path, help="draft model folder (default: the shipped draft, unless --target is given)")
    gen.add_argument("--no-draft", action="store_true", help="plain decoding with the target alone")
    gen.add_argument("--max-new-tokens", type=positive_integer, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--num-draft-tokens", type=integer, default=DRAFT_DEFAULTS["num_draft_tokens"], help="maximum draft tokens per step, K (default %(default)s)")
    gen.add_argument("--fixed-k", action="store_true",
                     help="draft K tokens every step instead of adapting the number to the acceptance rate")
    gen.add_argument("--min-acceptance", type=number, default=DRAFT_DEFAULTS["min_acceptance"],
                     help="pause drafting while the acceptance rate is below this (default 0.4; 0 never pauses)")
    gen.add_argument("--confidence-threshold", type=number, default=DRAFT_DEFAULTS["confidence_threshold"],
                     help="stop a row's drafts after a token whose draft probability is below this "
                          "(default 0: off)")
    gen.add_argument("--max-verify-rows", type=integer,
                     help="without --fixed-k, lower K so that a verify forward scores at most this "
                          "many tokens (default 8 on CPU; 0 sets no limit)")
    gen.add_argument("--temperature", type=number, default=0.0, help="sampling temperature; 0 is greedy (default)")
    gen.add_argument("--top-k", type=integer, default=0, help="keep the k most likely tokens; 0 disables (default)")
    gen.add_argument("--top-p", type=number, default=1.0,
                     help="keep the smallest set of tokens with this mass; 1 disables (default)")
    gen.add_argument("--seed", type=integer, default=0, help="random seed for sampling (default 0)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default float32 on CPU)")
    gen.add_argument("--quantize", choices=["int4", "int8"],
                     help="quantize the linear layers of target and draft at load time by rounding to nearest")
    gen.add_argument("--quantize-embeddings", action="store_true",
                     help="with --quantize, quantize the token embeddings too (smaller, slightly less exact)")
    gen.add_argument("--group-size", type=_group_size,
                     help="input rows per quantization scale with --quantize or --draft-quantize: "
                          "32, 64, 128 (default), "
                          "or channel for one scale per output column")
    gen.add_argument("--draft-quantize", choices=["int8", "int4", "none"],
                     help="quantize the draft alone, which never changes the output (default: as "
                          "--quantize, else int8 for a float32 draft on CPU)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text and statistics")
    from specjax import bench

    bench.add_parser(commands)
    return parser


def _stats_line(stats) -> str:
    parts = [
        f"{stats.generated_tokens} tokens in {stats.seconds:.2f} s ({stats.tokens_per_second:.1f} tokens/s)",
        f"{stats.mean_accepted_length:.2f} tokens per target call",
    ]
    if stats.acceptance_rate is not None:
        parts.append(
            f"acceptance {stats.acceptance_rate:.2f}, {stats.mean_draft_tokens:.2f} drafts per call "
            f"(K up to {stats.num_draft_tokens})"
        )
    parts.append(f"compile {stats.compile_seconds:.1f} s")
    return ", ".join(parts)


def run_generate(args: argparse.Namespace) -> int:
    import specjax
    from specjax.inputs import validate_draft_settings, validate_seed, validate_settings

    models = shipped_models_dir()
    if args.draft is not None and args.no_draft:
        raise ValueError("--draft and --no-draft contradict each other; pass one of them")
    if args.quantize is None and args.draft_quantize in (None, "none") and args.group_size is not None:
        raise ValueError("--group-size needs --quantize or --draft-quantize int4 or int8 (the default "
                         "int8 draft on CPU picks its own group size)")
    if args.quantize is None and args.quantize_embeddings:
        raise ValueError("--quantize-embeddings needs --quantize int4 or int8")
    # Check the settings before the slow model load, so a typo fails at once.
    validate_settings(args.max_new_tokens, args.num_draft_tokens, args.temperature, args.top_k, args.top_p)
    validate_draft_settings(not args.fixed_k, args.confidence_threshold, args.min_acceptance, args.max_verify_rows)
    validate_seed(args.seed)
    if not args.prompt:
        raise ValueError(f"the prompt is empty; pass some text, or leave it out for {DEFAULT_PROMPT!r}")
    sampling_only = _changed_options(args, {"top_k": 0, "top_p": 1.0, "seed": 0})
    if args.temperature == 0 and sampling_only:
        print(f"note: {_options_apply(sampling_only)} only when sampling; with --temperature 0 the output "
              "is greedy", file=sys.stderr)
    target_dir = args.target or models / "shakespeare-target"
    draft_dir = args.draft
    if draft_dir is None and args.target is None and not args.no_draft:
        draft_dir = models / "shakespeare-draft"
    unused = _changed_options(args, DRAFT_DEFAULTS)
    if draft_dir is None and unused:
        reason = "--no-draft decodes" if args.no_draft else "--target without --draft decodes"
        print(f"note: {', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} only with a draft; "
              f"{reason} with the target alone", file=sys.stderr)
    elif args.fixed_k:
        adaptive_defaults = {name: DRAFT_DEFAULTS[name] for name in ("min_acceptance", "max_verify_rows")}
        adaptive_only = _changed_options(args, adaptive_defaults)
        if adaptive_only:
            print(f"note: {_options_apply(adaptive_only)} only to adaptive drafting; --fixed-k drafts K every step",
                  file=sys.stderr)

    _check_folder("--target", target_dir)
    if draft_dir is not None:
        _check_folder("--draft", draft_dir)
    print(f"loading {target_dir}" + (f" and {draft_dir}" if draft_dir else ""), file=sys.stderr, flush=True)
    group_size = {None: 128, "channel": None}.get(args.group_size, args.group_size)
    quantization = {"quantize": args.quantize, "group_size": group_size,
                    "quantize_embeddings": args.quantize_embeddings}
    target = specjax.load(target_dir, dtype=args.dtype, **quantization)
    if target.tokenizer is None:
        raise ValueError(f"--target {target_dir} has no tokenizer.json, which the command line needs "
                         "to encode the prompt; add it to the folder, or call specjax.generate with "
                         "token ids from Python")
    draft = specjax.load(draft_dir, dtype=args.dtype, **draft_quantization(args, draft_dir)) if draft_dir else None
    enable_compile_cache()
    with warnings.catch_warnings():
        # The note below reports the lowered K in option terms instead.
        warnings.filterwarnings("ignore", message="K lowered")
        result = specjax.generate(
            target,
            args.prompt,
            draft=draft,
            max_new_tokens=args.max_new_tokens,
            num_draft_tokens=args.num_draft_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            adaptive=not args.fixed_k,
            confidence_threshold=args.confidence_threshold,
            min_acceptance=args.min_acceptance,
            max_verify_rows=args.max_verify_rows,
        )
    stats = result.stats
    if draft is not None and stats.num_draft_tokens < args.num_draft_tokens:
        limit = "--max-verify-rows, default 8 on CPU" if args.max_verify_rows is None else (
            f"--max-verify-rows {args.max_verify_rows}")
        lowered = f"{stats.num_draft_tokens}" + (" (plain decoding)" if stats.num_draft_tokens == 0 else "")
        print(f"note: K lowered from {args.num_draft_tokens} to {lowered} by the limit on "
              f"tokens per verify forward ({limit}); --max-verify-rows 0 lifts it, "
              "--fixed-k keeps K", file=sys.stderr)
    if args.json:
        record = {
            "text": result.text[0] if result.text else None,
            "tokens": result.tokens[0],
            "finish_reason": result.finish_reasons[0],
            "stats": dataclasses.asdict(stats),
        }
        print(json.dumps(record))
    else:
        text = result.text[0] if result.text else " ".join(map(str, result.tokens[0]))
        print(args.prompt + text)
        print(_stats_line(stats), file=sys.stderr)
    return 0


def _changed_options(args: argparse.Namespace, defaults: dict) -> list[str]:
    """Return the command-line names of the options in `defaults` that differ from their default."""
    return ["--" + name.replace("_", "-") for name, default in defaults.items() if getattr(args, name) != default]


def _options_apply(options: list[str]) -> str:
    """Return "--a applies" for one option and "--a and --b apply" for more."""
    return " and ".join(options) + (" applies" if len(options) == 1 else " apply")


def draft_quantization(args: argparse.Namespace, folder: Path) -> dict:
    """Return the quantization keywords of `specjax.load` for the draft: --draft-quantize
    when given, else those of --quantize, else int8 for a float32 draft on CPU, where the
    draft's smaller weights leave more of the cache to the target's."""
    import jax

    from specjax.checkpoint import load_config

    choice, quantize = args.draft_quantize, getattr(args, "quantize", None)
    group_size = getattr(args, "group_size", None)
    if choice is None and quantize is not None:
        choice = quantize
    elif choice is None:
        float32_draft = getattr(args, "dtype", None) in (None, "float32")
        choice = "int8" if float32_draft and jax.default_backend() == "cpu" else "none"
        group_size = None
    if choice == "none":
        return {}
    if group_size is None:
        # 128 rows per scale where every layer's input width allows it, else one per column.
        config = load_config(folder)
        widths = (config.hidden_size, config.intermediate_size, config.num_heads * config.head_dim)
        group_size = 128 if all(width % 128 == 0 for width in widths) else "channel"
    return {"quantize": choice, "group_size": None if group_size == "channel" else group_size,
            "quantize_embeddings": getattr(args, "quantize_embeddings", False)}


def _check_folder(option: str, folder: Path) -> None:
    """Raise ValueError, naming `option`, unless `folder` is a folder with a config.json."""
    expected = "pass a Hugging Face model folder (config.json, model.safetensors, tokenizer.json)"
    if not Path(folder).exists():
        raise ValueError(f"{option} {folder}: folder not found; {expected}")
    if not Path(folder).is_dir():
        raise ValueError(f"{option} {folder} is a file; {expected}")
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{option} {folder} has no config.json; {expected}")


def run_bench(args: argparse.Namespace) -> int:
    import specjax
    from specjax import bench

    bench.validate(args)
    models = shipped_models_dir()
    target_dir = args.target or models / "shakespeare-target"
    draft_dir = args.draft or models / "shakespeare-draft"
    _check_folder("--target", target_dir)
    _check_folder("--draft", draft_dir)
    print(f"loading {target_dir} and {draft_dir}", file=sys.stderr, flush=True)
    target, draft = specjax.load(target_dir), specjax.load(draft_dir, **draft_quantization(args, draft_dir))
    bench.check_length(args, target)
    enable_compile_cache()
    with warnings.catch_warnings():
        # The table names the K that each batch used.
        warnings.filterwarnings("ignore", message="K lowered")
        lines = bench.run(args, target, draft)
    print("\n".join(lines))
    return 0


# `generate` settings that the command line takes as --name-with-dashes.
_OPTION_SETTINGS = ("max_new_tokens", "num_draft_tokens", "min_acceptance", "confidence_threshold",
                    "max_verify_rows", "temperature", "top_k", "top_p", "seed")


def _in_option_terms(message: str) -> str:
    """Return `message` with the names of `generate` settings written as their command-line
    options (`max_new_tokens` as `--max-new-tokens`), and its one prompt row as the prompt."""
    for name in _OPTION_SETTINGS:
        message = re.sub(rf"(?<![-\w]){name}\b", "--" + name.replace("_", "-"), message)
    return message.replace("prompt row 0 ", "the prompt ").replace("pass draft=None", "pass --no-draft")


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"specjax: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    # Warnings (a kernel build that failed, say) take one line, without a source line.
    warnings.formatwarning = _warning_line
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        words = args.command == "generate" and any(not item.startswith("-") for item in extra)
        hint = "; the prompt is one argument, so quote text with spaces" if words else ""
        parser.exit(2, f"specjax: error: unrecognized arguments: {' '.join(extra)}{hint} "
                       f"(see 'specjax {args.command} --help')\n")
    try:
        return run_bench(args) if args.command == "bench" else run_generate(args)
    except (ValueError, OSError) as error:  # CheckpointError and ConfigError are ValueErrors
        print(f"specjax: error: {_in_option_terms(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The `specjax generate` and `specjax bench` commands on tiny model folders made by the test."""

import argparse
import json
import re
import subprocess
import sys
import warnings

import pytest

from specjax import Model, ModelConfig, save
from specjax.cli import draft_quantization, main

def test_generate_prints_text_and_stats(shipped, capsys):
    assert main(["generate", "ROMEO:", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ROMEO:")
    stats_line = captured.err.strip().splitlines()[-1]
    assert "8 tokens in" in stats_line
    assert "acceptance" in stats_line


def test_generate_json_record(shipped, capsys):
    assert main(["generate", "ROMEO:", "--json", "--max-new-tokens", "6", "--temperature", "0.8",
                 "--top-k", "20", "--top-p", "0.9", "--seed", "3"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record) == {"text", "tokens", "finish_reason", "stats"}
    assert record["finish_reason"] in ("stop", "length")
    assert 1 <= len(record["tokens"]) <= 6
    assert 0.0 <= record["stats"]["acceptance_rate"] <= 1.0


def test_no_draft_reports_no_acceptance(shipped, capsys):
    assert main(["generate", "ROMEO:", "--no-draft", "--json", "--max-new-tokens", "4"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["stats"]["acceptance_rate"] is None
    assert record["stats"]["mean_accepted_length"] == 1.0


def test_explicit_folders_match_defaults(shipped, capsys):
    main(["generate", "ROMEO:", "--json", "--max-new-tokens", "6"])
    default = json.loads(capsys.readouterr().out)
    main(["generate", "ROMEO:", "--json", "--max-new-tokens", "6",
          "--target", str(shipped / "shakespeare-target"), "--draft", str(shipped / "shakespeare-draft")])
    explicit = json.loads(capsys.readouterr().out)
    assert explicit["tokens"] == default["tokens"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--top-p", "1.5"], "--top-p=1.5"),
        (["--temperature", "-1"], "--temperature=-1.0"),
        (["--num-draft-tokens", "0"],
         "--num-draft-tokens=0 must be an integer from 1 to 32; for plain decoding, pass --no-draft"),
        (["--top-k", "-2"], "--top-k=-2"),
        (["--max-new-tokens", "500"], "max_position_embeddings=128"),
        (["--target", "/nonexistent/model"], "--target /nonexistent/model: folder not found"),
        (["--draft", "/nonexistent/model"], "--draft /nonexistent/model: folder not found"),
        (["--min-acceptance", "2"], "--min-acceptance=2.0"),
        (["--confidence-threshold", "-0.1"], "--confidence-threshold=-0.1"),
        (["--max-verify-rows", "-1"], "--max-verify-rows=-1 must be an integer >= 0 (0 sets no limit)"),
    ],
)
def test_bad_input_one_line_error(shipped, capsys, arguments, message):
    assert main(["generate", "ROMEO:"] + arguments) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_bad_argument_exits_without_traceback(shipped):
    process = subprocess.run(
        [sys.executable, "-m", "specjax.cli", "generate", "--max-new-tokens", "zero"],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert "--max-new-tokens" in process.stderr
    assert "Traceback" not in process.stderr


@pytest.mark.parametrize(
    "option, value, problem, fix",
    [
        ("--temperature", "hot", "'hot' is not a number", "pass a decimal such as 0.8"),
        ("--seed", "x", "'x' is not an integer", "pass a whole number such as 4"),
        ("--max-new-tokens", "0", "0 is not >= 1", "pass a whole number of at least 1"),
    ],
)
def test_option_type_error_names_fix(capsys, option, value, problem, fix):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "ROMEO:", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {problem}; {fix}" in err
    assert err.startswith("specjax: error: ")
    assert len(err.strip().splitlines()) == 1  # no usage block before it


def test_greedy_notes_unused_top_p(shipped, capsys):
    assert main(["generate", "ROMEO:", "--max-new-tokens", "4", "--top-p", "0.5"]) == 0
    assert "note: --top-p applies only when sampling" in capsys.readouterr().err
    assert main(["generate", "ROMEO:", "--max-new-tokens", "4", "--top-k", "5", "--seed", "3"]) == 0
    assert "note: --top-k and --seed apply only when sampling" in capsys.readouterr().err
    assert main(["generate", "ROMEO:", "--max-new-tokens", "4"]) == 0
    assert "apply only when sampling" not in capsys.readouterr().err


def test_settings_checked_before_loading(monkeypatch, capsys):
    monkeypatch.setenv("SPECJAX_MODELS", "/nonexistent/models")
    assert main(["generate", "ROMEO:", "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["specjax: error: --top-p=0.0 must be in (0, 1] (1 disables it)"]


def test_fixed_k_drafts_k_every_call(shipped, capsys):
    # The tiny draft is random, so adaptive drafting pauses it and fixed K does not.
    assert main(["generate", "ROMEO:", "--json", "--max-new-tokens", "24", "--fixed-k"]) == 0
    fixed = json.loads(capsys.readouterr().out)["stats"]
    assert main(["generate", "ROMEO:", "--json", "--max-new-tokens", "24"]) == 0
    adaptive = json.loads(capsys.readouterr().out)["stats"]
    assert fixed["mean_draft_tokens"] == 6.0
    assert fixed["draft_steps"] == fixed["target_calls"]
    assert adaptive["draft_steps"] < adaptive["target_calls"]
    assert adaptive["mean_draft_tokens"] < 4.0


def test_bench_prints_table(shipped, capsys):
    arguments = ["bench", "--max-new-tokens", "4", "--ks", "1", "2", "--batches", "1", "2", "--repeats", "1"]
    assert main(arguments) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("one forward: target")
    assert "cost ratio c = " in lines[0]
    labels = [line.split()[0] for line in lines if re.match(r"(K=|adaptive<=)\d+ ", line)]
    assert labels == ["K=1", "K=2", "adaptive<=2"]
    batch_rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in batch_rows] == ["1", "2"]
    assert all(float(value) > 0 for row in batch_rows for value in row[1:3])
    assert [row[3] for row in batch_rows] == ["6", "6"]  # the K used; conftest lifts the CPU limit
    assert "10/10" in captured.err


def test_bench_rejects_bad_repeats(shipped, capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert capsys.readouterr().err.strip() == "specjax: error: --repeats=0 must be >= 1; pass a whole number of at least 1"


def test_bench_rejects_long_drafts_before_loading(shipped, capsys):
    assert main(["bench", "--ks", "4", "40"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "specjax: error: --ks value 40 must be <= 32; pass draft lengths from 1 to 32"
    assert "loading" not in err


def test_model_option_given_a_file(shipped, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("not a model")
    assert main(["generate", "ROMEO:", "--target", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"--target {file} is a file" in err
    assert "config.json" in err


def test_model_option_given_a_folder_without_config(shipped, tmp_path, capsys):
    assert main(["generate", "ROMEO:", "--draft", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--draft {tmp_path} has no config.json; pass a Hugging Face model folder" in err
    assert "Traceback" not in err


def test_empty_prompt_names_default(shipped, capsys):
    assert main(["generate", ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "specjax: error: the prompt is empty; pass some text, or leave it out for 'ROMEO:'"
    )


def test_second_prompt_hints_quoting(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "ROMEO:", "JULIET:"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: JULIET:; the prompt is one argument, so quote text with spaces" in err


def test_long_request_in_option_terms(shipped, capsys):
    assert main(["generate", "ROMEO:", "--max-new-tokens", "500"]) == 2
    err = capsys.readouterr().err
    assert "the prompt has" in err
    assert "--max-new-tokens=500" in err
    assert "use --max-new-tokens <=" in err
    assert "max_new_tokens" not in err


def test_no_draft_notes_unused_drafting_options(shipped, capsys):
    assert main(["generate", "ROMEO:", "--no-draft", "--fixed-k", "--num-draft-tokens", "8",
                 "--max-new-tokens", "4"]) == 0
    assert "note: --num-draft-tokens, --fixed-k apply only with a draft; --no-draft decodes" in capsys.readouterr().err
    assert main(["generate", "ROMEO:", "--no-draft", "--max-new-tokens", "4"]) == 0
    assert "apply only with a draft" not in capsys.readouterr().err


def test_ignored_drafting_options_noted(shipped, capsys):
    assert main(["generate", "ROMEO:", "--fixed-k", "--max-verify-rows", "4", "--max-new-tokens", "4"]) == 0
    assert "note: --max-verify-rows applies only to adaptive drafting" in capsys.readouterr().err
    assert main(["generate", "ROMEO:", "--fixed-k", "--min-acceptance", "0.6", "--max-new-tokens", "4"]) == 0
    assert "note: --min-acceptance applies only to adaptive drafting" in capsys.readouterr().err
    assert main(["generate", "ROMEO:", "--fixed-k", "--max-new-tokens", "4"]) == 0
    assert "adaptive drafting" not in capsys.readouterr().err
    target = str(shipped / "shakespeare-target")
    assert main(["generate", "ROMEO:", "--target", target, "--draft-quantize", "int4", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "note: --draft-quantize applies only with a draft; --target without --draft decodes" in err


def test_bench_length_in_option_terms(shipped, capsys):
    assert main(["bench", "--max-new-tokens", "600"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens=600 does not fit" in err
    assert "use --max-new-tokens <=" in err
    assert "the prompt has" not in err


def test_seed_out_of_range_without_traceback(shipped, capsys):
    assert main(["generate", "ROMEO:", "--max-new-tokens", "2", "--seed", "9" * 23]) != 0
    err = capsys.readouterr().err
    assert f"is out of range; use an integer from {-(2**63)} to {2**63 - 1}" in err
    assert "loading" not in err  # rejected before the models load
    assert "Traceback" not in err


def test_k_lowered_to_plain_is_named(shipped, capsys, monkeypatch):
    monkeypatch.setattr("specjax.schedule.CPU_VERIFY_ROWS", 8)
    assert main(["generate", "ROMEO:", "--max-new-tokens", "4", "--max-verify-rows", "1"]) == 0
    assert "note: K lowered from 6 to 0 (plain decoding)" in capsys.readouterr().err


def test_lowered_k_is_noted(shipped, capsys, monkeypatch):
    monkeypatch.setattr("specjax.schedule.CPU_VERIFY_ROWS", 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", "ROMEO:", "--num-draft-tokens", "8", "--max-new-tokens", "4", "--json"]) == 0
    captured = capsys.readouterr()
    assert "note: K lowered from 8 to 7" in captured.err
    assert not [w for w in caught if "K lowered" in str(w.message)]  # the note replaces the warning
    assert json.loads(captured.out)["stats"]["num_draft_tokens"] == 7
    assert main(["generate", "ROMEO:", "--num-draft-tokens", "8", "--max-new-tokens", "4", "--json",
                 "--max-verify-rows", "0"]) == 0
    captured = capsys.readouterr()
    assert "K lowered" not in captured.err
    assert json.loads(captured.out)["stats"]["num_draft_tokens"] == 8


def test_target_without_tokenizer(shipped, tmp_path, capsys):
    folder = tmp_path / "ids-only"
    folder.mkdir()
    for file in (shipped / "shakespeare-target").iterdir():
        if file.name != "tokenizer.json":
            (folder / file.name).symlink_to(file)
    assert main(["generate", "ROMEO:", "--target", str(folder), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert f"--target {folder} has no tokenizer.json" in err
    assert "Traceback" not in err


def test_warnings_take_one_line(shipped, monkeypatch):
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored afterwards
    assert main(["generate", "ROMEO:", "--max-new-tokens", "2", "--no-draft"]) == 0
    line = warnings.formatwarning("a test warning", RuntimeWarning, "cli.py", 8, "sys.exit(main())")
    assert line == "specjax: warning: a test warning\n"


def _namespace(**settings):
    defaults = dict(draft_quantize=None, quantize=None, group_size=None, dtype=None, quantize_embeddings=False)
    return argparse.Namespace(**(defaults | settings))


def test_draft_quantization_defaults(shipped, tmp_path):
    draft = shipped / "shakespeare-draft"  # widths 32 and 64: one scale per column
    assert draft_quantization(_namespace(), draft) == {"quantize": "int8", "group_size": None,
                                                       "quantize_embeddings": False}
    assert draft_quantization(_namespace(draft_quantize="none"), draft) == {}
    assert draft_quantization(_namespace(dtype="bfloat16"), draft) == {}
    follows = draft_quantization(_namespace(quantize="int4", group_size=32), draft)
    assert follows == {"quantize": "int4", "group_size": 32, "quantize_embeddings": False}
    wide = tmp_path / "wide"
    save(Model.random(ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=1,
                                  num_heads=2, num_kv_heads=1, head_dim=64), seed=0), wide)
    assert draft_quantization(_namespace(), wide)["group_size"] == 128


def test_draft_quantize_keeps_greedy_output(shipped, capsys):
    outputs = []
    for choice in ("none", "int8", "int4"):
        group = [] if choice == "none" else ["--group-size", "channel"]
        arguments = ["generate", "ROMEO:", "--max-new-tokens", "8", "--json", "--draft-quantize", choice]
        assert main(arguments + group) == 0
        outputs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert outputs[1] == outputs[0]
    assert outputs[2] == outputs[0]

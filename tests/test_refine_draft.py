"""The draft refinement stage on the tiny model pair: its target text, and when it exports."""

import numpy as np
import pytest

from conftest import TEXT
from specjax import refine_draft
from specjax.checkpoint import load

SEQ_LEN = 64


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Twenty text files, enough for the corpus split to hold one out."""
    folder = tmp_path_factory.mktemp("corpus")
    for index in range(20):
        (folder / f"play_{index:02d}.txt").write_text(f"ACT {index}.\n" + TEXT)
    return folder


def run_refinement(models_dir, corpus_dir, run, export, monkeypatch, acceptances, rows=4):
    """Run two refinement steps. Greedy acceptance before and after comes from `acceptances`."""
    values = iter(acceptances)
    monkeypatch.setattr(refine_draft, "greedy_acceptance", lambda target, draft, held_out: next(values))
    status = refine_draft.main([
        "--data", str(corpus_dir), "--models", str(models_dir), "--run", str(run), "--export", str(export),
        "--steps", "2", "--batch", "2", "--rows", str(rows), "--seq-len", str(SEQ_LEN), "--eval-windows", "2",
    ])
    assert status == 0


def test_refine_target_text_rows(models_dir, corpus_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run_refinement(models_dir, corpus_dir, run, tmp_path / "export", monkeypatch, [0.5, 0.4])
    eos = load(models_dir / "shakespeare-target").eos_token_ids[0]
    for name in ("greedy_tokens.npy", "sampled_tokens.npy"):
        stream = np.load(run / name)
        rows = stream.reshape(-1, SEQ_LEN + 1)
        assert len(rows) == 4, name
        assert np.all(rows[:, -1] == eos), name


def test_refine_exports_only_when_acceptance_rises(models_dir, corpus_dir, tmp_path, monkeypatch):
    run, export = tmp_path / "run", tmp_path / "export"
    run_refinement(models_dir, corpus_dir, run, export, monkeypatch, [0.5, 0.5])
    assert not (export / "shakespeare-draft").exists()

    # A second run resumes from the finished checkpoint and only measures and exports.
    run_refinement(models_dir, corpus_dir, run, export, monkeypatch, [0.5, 0.6])
    folder = export / "shakespeare-draft"
    refined = load(folder)
    assert refined.config == load(models_dir / "shakespeare-draft").config
    card = (folder / "README.md").read_text()
    assert "## Refinement" in card
    assert "0.500 before, 0.600 after" in card


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--batch", "-1"), ("--rows", "0"),
                                           ("--eval-windows", "0"), ("--seq-len", "32"), ("--lr", "0")])
def test_refine_rejects_invalid_option(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        refine_draft.main(["--data", str(tmp_path), "--models", str(tmp_path), "--run", str(tmp_path / "run"),
                           option, value])
    assert exit_info.value.code == 2
    assert f"{option}={value}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refine_names_missing_folders(models_dir, corpus_dir, tmp_path, capsys):
    base = ["--run", str(tmp_path / "run"), "--steps", "2", "--seq-len", str(SEQ_LEN)]
    assert refine_draft.main(["--data", str(tmp_path / "missing"), "--models", str(models_dir), *base]) == 1
    assert "--data" in capsys.readouterr().err
    assert refine_draft.main(["--data", str(corpus_dir), "--models", str(tmp_path), *base]) == 1
    assert "--models" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_refine_rejects_run_with_other_rows(models_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    """Token caches from another --rows would otherwise be reused without notice."""
    run = tmp_path / "run"
    run_refinement(models_dir, corpus_dir, run, tmp_path / "export", monkeypatch, [0.5, 0.4])
    status = refine_draft.main(["--data", str(corpus_dir), "--models", str(models_dir), "--run", str(run),
                                "--steps", "2", "--rows", "8", "--seq-len", str(SEQ_LEN)])
    assert status == 1
    assert "rows" in capsys.readouterr().err

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


def run_refinement(models_dir, corpus_dir, run, export, monkeypatch, acceptances):
    """Run two refinement steps. Greedy acceptance before and after comes from `acceptances`."""
    values = iter(acceptances)
    monkeypatch.setattr(refine_draft, "greedy_acceptance", lambda target, draft, held_out: next(values))
    refine_draft.main([
        "--data", str(corpus_dir), "--models", str(models_dir), "--run", str(run), "--export", str(export),
        "--steps", "2", "--batch", "2", "--rows", "4", "--seq-len", str(SEQ_LEN), "--eval-windows", "2",
    ])


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

"""`generate` rejects invalid arguments and mismatched vocabularies before compiling anything."""

import re

import numpy as np
import pytest

from generation_helpers import VOCAB_SIZE, tiny_config, word_tokenizer
from specjax import Model, generate


@pytest.fixture(scope="module")
def target():
    return Model.random(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def draft():
    return Model.random(tiny_config(), seed=1)


@pytest.fixture(scope="module")
def tokenized_target():
    return Model.random(tiny_config(), seed=0, tokenizer=word_tokenizer())


@pytest.mark.parametrize("value, hint", [(0, "for plain decoding, pass draft=None"), (-1, "pass draft=None"),
                                         (33, "only slows them"), (1000, "only slows them")])
def test_num_draft_tokens_out_of_range(target, draft, value, hint):
    message = re.escape(f"num_draft_tokens={value} must be an integer from 1 to 32")
    with pytest.raises(ValueError, match=message) as error:
        generate(target, [1, 2, 3], draft=draft, num_draft_tokens=value)
    assert hint in str(error.value)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_invalid_temperature(target, value):
    with pytest.raises(ValueError, match=re.escape(f"temperature={value!r}")):
        generate(target, [1, 2, 3], temperature=value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5])
def test_top_p_outside_unit_interval(target, value):
    with pytest.raises(ValueError, match=re.escape(f"top_p={value!r}")):
        generate(target, [1, 2, 3], temperature=1.0, top_p=value)


@pytest.mark.parametrize("value", [-1, 2.5])
def test_invalid_top_k(target, value):
    with pytest.raises(ValueError, match=re.escape(f"top_k={value!r}")):
        generate(target, [1, 2, 3], temperature=1.0, top_k=value)


@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_invalid_max_new_tokens(target, value):
    with pytest.raises(ValueError, match=re.escape(f"max_new_tokens={value!r}")):
        generate(target, [1, 2, 3], max_new_tokens=value)


def test_empty_string_prompt(tokenized_target):
    with pytest.raises(ValueError, match="prompt row 0 is empty"):
        generate(tokenized_target, "")


def test_empty_prompt_list(target):
    with pytest.raises(ValueError, match=re.escape("prompt=[] is empty")):
        generate(target, [])


@pytest.mark.parametrize(
    ("prompt", "row"), [([[]], 0), ([[1, 2], []], 1)], ids=["only-row", "second-row"]
)
def test_empty_prompt_row(target, prompt, row):
    with pytest.raises(ValueError, match=f"prompt row {row} is empty"):
        generate(target, prompt)


def test_array_prompt_not_reported_empty(target):
    with pytest.raises(ValueError) as excinfo:
        generate(target, np.array([1, 2, 3]))
    message = str(excinfo.value)
    assert "prompt must be" in message
    assert "empty" not in message


def test_prompt_beyond_position_limit(target):
    with pytest.raises(ValueError, match="prompt row 0 has 100 tokens") as excinfo:
        generate(target, [1] * 100, max_new_tokens=29)
    message = str(excinfo.value)
    assert "max_new_tokens=29" in message
    assert "max_position_embeddings=128" in message


@pytest.mark.parametrize("length", [128, 300])
def test_prompt_alone_beyond_position_limit(target, length):
    with pytest.raises(ValueError, match=f"prompt row 0 has {length} tokens") as excinfo:
        generate(target, [1] * length, max_new_tokens=1)
    message = str(excinfo.value)
    assert "shorten it to at most 127 tokens" in message
    assert "<= -" not in message


@pytest.mark.parametrize("seed", ["x", 1.5, None, True])
def test_invalid_seed(target, seed):
    with pytest.raises(ValueError, match=f"seed={seed!r} must be an integer"):
        generate(target, [1, 2], seed=seed)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**23])
def test_seed_out_of_range(target, seed):
    with pytest.raises(ValueError, match=f"seed={seed} is out of range"):
        generate(target, [1, 2], seed=seed)


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_seed_range_ends_accepted(target, seed):
    result = generate(target, [1, 2], seed=seed, max_new_tokens=2, temperature=1.0)
    assert len(result.tokens[0]) == 2


def test_prompt_beyond_draft_position_limit(target):
    short_draft = Model.random(tiny_config(max_position_embeddings=32), seed=1)
    with pytest.raises(ValueError, match="draft's max_position_embeddings=32"):
        generate(target, [1] * 10, draft=short_draft, max_new_tokens=23)


def test_prompt_at_position_limit_accepted(target):
    result = generate(target, [1] * 16, max_new_tokens=112)
    assert len(result.tokens[0]) == 112


@pytest.mark.parametrize("token", [VOCAB_SIZE, -1])
def test_token_id_out_of_range(target, token):
    message = f"token id {token} outside the target's vocabulary [0, {VOCAB_SIZE})"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(target, [[1, 2], [3, token]])


def test_string_prompt_without_tokenizer(target):
    with pytest.raises(ValueError, match="no tokenizer"):
        generate(target, "t1 t2")


def test_draft_vocabulary_larger_than_target(target):
    large_draft = Model.random(tiny_config(VOCAB_SIZE + 8), seed=1)
    message = f"draft vocab_size={VOCAB_SIZE + 8} exceeds the target's vocab_size={VOCAB_SIZE}"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(target, [1, 2, 3], draft=large_draft)


def test_draft_vocabulary_checked_before_prompt(target):
    """A prompt id beyond a smaller draft's vocabulary is reported as a vocabulary error."""
    small_draft = Model.random(tiny_config(VOCAB_SIZE - 8), seed=1)
    with pytest.raises(ValueError, match=f"draft vocab_size={VOCAB_SIZE - 8} differs"):
        generate(target, [VOCAB_SIZE - 1], draft=small_draft)


def test_padded_target_without_tokenizers(draft):
    padded_target = Model.random(tiny_config(VOCAB_SIZE + 8), seed=0)
    message = f"draft vocab_size={VOCAB_SIZE} differs from the target's {VOCAB_SIZE + 8}"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(padded_target, [1, 2, 3], draft=draft)


def test_draft_without_tokenizer_rejected(draft):
    padded_target = Model.random(tiny_config(VOCAB_SIZE + 8), seed=0, tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        generate(padded_target, [1, 2, 3], draft=draft)


def test_draft_with_different_tokenizer(tokenized_target):
    other = word_tokenizer()
    other.add_tokens(["extra"])
    other_draft = Model.random(tiny_config(), seed=1, tokenizer=other)
    message = r"draft's tokenizer \(65 tokens\) differs from the target's \(64 tokens\); use a draft trained"
    with pytest.raises(ValueError, match=message):
        generate(tokenized_target, [1, 2, 3], draft=other_draft)


def test_tokenizer_changed_after_check(tokenized_target):
    """A draft accepted once is checked again after a token is added to its tokenizer."""
    tokenizer = word_tokenizer()
    draft = Model.random(tiny_config(), seed=1, tokenizer=tokenizer)
    generate(tokenized_target, [1, 2, 3], draft=draft, max_new_tokens=2)
    tokenizer.add_tokens(["extra"])
    with pytest.raises(ValueError, match=r"tokenizer \(65 tokens\) differs"):
        generate(tokenized_target, [1, 2, 3], draft=draft, max_new_tokens=2)


def test_draft_smaller_than_tokenizer():
    tokenizer = word_tokenizer()
    padded_target = Model.random(tiny_config(VOCAB_SIZE + 8), seed=0, tokenizer=tokenizer)
    small_draft = Model.random(tiny_config(48), seed=1, tokenizer=tokenizer)
    message = f"tokenizer has {VOCAB_SIZE} tokens but the draft's vocab_size is 48"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(padded_target, [1, 2, 3], draft=small_draft)


def test_numpy_scalars_accepted(target):
    result = generate(target, [1, 2, 3], max_new_tokens=np.int64(4), temperature=np.float32(0.5),
                      top_p=np.float64(0.9), top_k=np.int32(5), eos_token_id=np.int64(3))
    assert len(result.tokens[0]) <= 4


@pytest.mark.parametrize("value", [-2, VOCAB_SIZE, [1, VOCAB_SIZE + 5]])
def test_eos_outside_vocabulary(target, value):
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(target, [1, 2, 3], max_new_tokens=4, eos_token_id=value)


def test_model_given_as_path(target):
    with pytest.raises(TypeError, match=re.escape("target must be a specjax.Model, such as specjax.load(folder); got str 'models/x'")):
        generate("models/x", "ROMEO:")
    with pytest.raises(TypeError, match="draft must be a specjax.Model"):
        generate(target, [1, 2], draft="models/y")

"""RingTokenizer: the tiny tokenizer asset, special ids, round trips and the Ring chat format."""
from __future__ import annotations

import pytest

from ringkern.config import PRESETS
from ringkern.tokenizer import RingTokenizer, build_tiny_tokenizer, load_tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> RingTokenizer:
    return load_tiny_tokenizer()


SAMPLE = ("<role>HUMAN</role>Tom has 12 apples and buys 35 more. How many apples?<role>ASSISTANT</role>"
          "<think>\nFirst, 12 + 35 = 47.\nWait, let me check: 47 - 35 = 12.\n</think>\n\n"
          "The answer is \\boxed{47}.<|endoftext|>")


def test_vocab_and_fixed_ids(tok):
    tiny = PRESETS["tiny"]
    assert tok.vocab_size == len(tok) == tiny["vocab_size"] == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        tiny["bos_token_id"], tiny["eos_token_id"], tiny["pad_token_id"]) == (1, 2, 2)
    assert tok.role_end_token_id == 3
    fixed = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|role_end|>", "<role>", "</role>", "<think>", "</think>"]
    for i, t in enumerate(fixed):
        assert tok.token_to_id(t) == i
        assert tok.encode(t) == [i]
    assert (tok.think_start_id, tok.think_end_id) == (6, 7)
    assert max(max(tok.encode(SAMPLE)), 0) < 512


def test_round_trip_text(tok):
    for text in ["", "0123456789", "x = 3.14159 * 2^10 - (7/3)", "héllo wörld, naïve café", "日本語のテキスト 🚀✓∑",
                 "  leading and trailing  \n\ttabs\n", SAMPLE]:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    for d in "0123456789":
        assert len(tok.encode(d)) == 1
    assert [tok.decode([i]) for i in tok.encode("2025")] == ["2", "0", "2", "5"]


def test_no_special_tokens_added(tok):
    ids = tok.encode("hello")
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_decode_skip_special_tokens(tok):
    ids = tok.encode(SAMPLE)
    text = tok.decode(ids, skip_special_tokens=True)
    assert "<role>" not in text and "<|endoftext|>" not in text
    assert "<think>" in text and "</think>" in text  # reasoning markers are kept


def test_chat_template_exact(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    assert tok.apply_chat_template(msgs) == "<role>HUMAN</role>What is 2+3?<role>ASSISTANT</role><think>\n"
    assert tok.apply_chat_template(msgs, enable_thinking=False) == "<role>HUMAN</role>What is 2+3?<role>ASSISTANT</role>"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<role>HUMAN</role>What is 2+3?"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello!"}, {"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(convo) == (
        "<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi<role>ASSISTANT</role><think>\nGreet.\n</think>\n\nHello!"
        "<|endoftext|><role>HUMAN</role>2+2?<role>ASSISTANT</role><think>\n")


def test_encode_chat_markup_single_ids(tok):
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == tok.token_to_id("<role>") and ids[-2:] == [tok.think_start_id, tok.encode("\n")[0]]
    assert tok.decode(ids) == tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_format_sft_example(tok):
    prompt_ids, response_ids = tok.format_sft_example(
        "What is 2+3?", "<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}.")
    assert tok.decode(prompt_ids) == "<role>HUMAN</role>What is 2+3?<role>ASSISTANT</role><think>\n"
    assert response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in response_ids[:-1]
    assert tok.decode(response_ids) == "2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}.<|endoftext|>"
    # Without the <think> prefix in the response, same result; an explicit eos is not doubled.
    assert tok.format_sft_example("What is 2+3?", "2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}.<|endoftext|>") == (
        prompt_ids, response_ids)
    # The concatenation is exactly the rendered conversation.
    full = tok.decode(prompt_ids + response_ids)
    assert full == tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}."}],
        add_generation_prompt=False)


def test_build_is_deterministic_and_matches_asset(tok):
    built = build_tiny_tokenizer()
    assert built.vocab_size == 512
    assert built.encode(SAMPLE) == tok.encode(SAMPLE)
    assert built.tokenizer.get_vocab() == tok.tokenizer.get_vocab()
    assert built.to_str() == tok.to_str()


def test_save_and_from_file(tok, tmp_path):
    path = tok.save(tmp_path)  # a directory: writes tokenizer.json in it
    assert path.name == "tokenizer.json"
    for src in (tmp_path, path):
        again = RingTokenizer.from_file(src)
        assert again.encode(SAMPLE) == tok.encode(SAMPLE) and again.eos_token_id == 2
    with pytest.raises(FileNotFoundError):
        RingTokenizer.from_file(tmp_path / "nope")

"""Reward model: Bradley-Terry loss, last-token pooling, preference data, training on generated pairs,
save/load, and use as an RL reward."""
import json
import math

import pytest
import torch

from ringkern.config import RingConfig
from ringkern.model import RingFlashModel
from ringkern.reward_model import (HEAD_FILE, PreferenceDataset, PreferencePair, RewardModel, RewardModelReward,
                                   bradley_terry_loss, evaluate_reward_model, generate_preference_pairs,
                                   last_token_index, read_preference_jsonl, train_reward_model,
                                   write_preference_jsonl)
from ringkern.rewards import CompositeReward, VerifiableReward, is_correct, make_split
from ringkern.tokenizer import load_tiny_tokenizer

# The tiny preset's vocabulary and tokenizer with a smaller body, so that training fits a unit test on 2 CPU cores.
SMALL = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=8, num_experts_per_tok=2,
             n_group=2, topk_group=1, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def split():
    return make_split(["chain_sum"], train_size=96, eval_size=48, seed=5)


def small_model() -> RewardModel:
    return RewardModel(RingConfig.from_preset("tiny", **SMALL))


# ---------------------------------------------------------------- loss and pooling
def test_bradley_terry_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    loss = bradley_terry_loss(chosen, rejected)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731  -log sigmoid(d) = softplus(-d)
    assert loss.item() == pytest.approx((softplus(-2.0) + math.log(2.0) + softplus(2.0)) / 3, rel=1e-6)
    loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-(1 - sigmoid(d)) / 3 for d in (2.0, 0.0, -2.0)]
    assert chosen.grad.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="chosen_scores"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_last_token_index_right_left_and_no_padding():
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(ids, mask).tolist() == [2, 4, 4]
    assert last_token_index(ids, None).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="no token"):
        last_token_index(ids, torch.tensor([[1, 0, 0, 0, 0], [0] * 5, [1] * 5]))
    with pytest.raises(ValueError, match="attention_mask"):
        last_token_index(ids, mask[:, :4])


def test_right_padded_scores_equal_unpadded(tokenizer):
    model = small_model().eval()
    short = tokenizer.encode("<role>HUMAN</role>1 + 2 =<role>ASSISTANT</role><think>\n3\n</think>")
    long = tokenizer.encode("<role>HUMAN</role>10 - 4 + 7 =<role>ASSISTANT</role>"
                            "<think>\n10 - 4 = 6\n6 + 7 = 13\n</think>")
    ids = torch.full((2, len(long)), tokenizer.pad_token_id)
    ids[0, : len(short)], ids[1] = torch.tensor(short), torch.tensor(long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, : len(short)], mask[1] = True, True
    with torch.no_grad():
        batched = model(ids, mask)
        alone = torch.cat([model(torch.tensor([short])), model(torch.tensor([long]))])
    assert batched.shape == (2,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- data
def test_generated_pairs_prefer_the_correct_solution(split):
    train, _ = split
    pairs = generate_preference_pairs(list(train), seed=3)
    assert pairs == generate_preference_pairs(list(train), seed=3)
    for problem, pair in zip(train, pairs):
        assert pair.prompt == problem.prompt and pair.chosen != pair.rejected
        assert is_correct(pair.chosen, problem) and not is_correct(pair.rejected, problem)
    with pytest.raises(ValueError, match="kinds"):
        generate_preference_pairs(list(train), kinds=["nonsense"])


def test_preference_jsonl_round_trip_and_chat_encoding(tmp_path, tokenizer):
    pairs = [PreferencePair("What is 1 + 2?", "<think>\n1 + 2 = 3\n</think>\n\n\\boxed{3}", "<think>\nno\n"),
             PreferencePair("Say hi", "hi", "bye")]
    path = write_preference_jsonl(pairs, tmp_path / "prefs.jsonl")
    assert read_preference_jsonl(path) == pairs
    data = PreferenceDataset(path, tokenizer)
    chosen_ids, rejected_ids = data[0]
    assert tokenizer.decode(chosen_ids) == (
        "<role>HUMAN</role>What is 1 + 2?<role>ASSISTANT</role><think>\n1 + 2 = 3\n</think>\n\n\\boxed{3}<|endoftext|>")
    assert rejected_ids[-1] == tokenizer.eos_token_id
    ids, mask = data.collate([0, 1])
    assert ids.shape[0] == 4 and mask.sum(-1).tolist() == [len(data[0][0]), len(data[1][0]), len(data[0][1]),
                                                            len(data[1][1])]
    assert len(PreferenceDataset(pairs, tokenizer, max_length=6)[0][0]) == 6
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_preference_jsonl(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------- training
def test_training_raises_held_out_accuracy(split, tokenizer):
    train, held_out = split
    # Truncated reasoning is the flaw a model this small learns in a few steps; the other kinds need more.
    # max_length keeps the last 40 tokens, where the two responses differ, to halve the compute.
    train_pairs = PreferenceDataset(generate_preference_pairs(list(train), seed=1, kinds=["truncated"]), tokenizer,
                                    max_length=40)
    eval_pairs = PreferenceDataset(generate_preference_pairs(list(held_out), seed=2, kinds=["truncated"]), tokenizer,
                                   max_length=40)
    model = small_model()
    before = evaluate_reward_model(model, eval_pairs, batch_size=48)
    logs = []
    metrics = train_reward_model(model, train_pairs, steps=8, lr=3e-3, batch_size=8, warmup_steps=2,
                                 eval_pairs=eval_pairs, eval_every=4, log=logs.append)
    assert len(logs) == 8 and all(math.isfinite(r["loss"]) for r in logs)
    assert [step for step, _ in metrics["eval_history"]] == [4, 8]
    assert metrics["eval_accuracy"] >= 0.75 and metrics["eval_accuracy"] > before
    assert metrics["final_loss"] < math.log(2.0)


# ---------------------------------------------------------------- files and RL use
def test_save_load_round_trip(tmp_path, tokenizer):
    model = small_model().eval()
    with torch.no_grad():
        model.score_head.bias.fill_(0.25)
    model.save_pretrained(tmp_path / "rm", tokenizer=tokenizer)
    head = (tmp_path / "rm" / HEAD_FILE).read_bytes()
    header = json.loads(head[8: 8 + int.from_bytes(head[:8], "little")])  # safetensors: a JSON header, no pickle
    assert set(header) == {"weight", "bias", "__metadata__"}
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    texts = [("1 + 1 =", "<think>\n1 + 1 = 2\n</think>\n\n\\boxed{2}"), ("3 - 5 =", "<think>\n")]
    torch.testing.assert_close(loaded.score(tokenizer, texts), model.score(tokenizer, texts), atol=0, rtol=0)
    RingFlashModel(model.config).save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match=HEAD_FILE):
        RewardModel.from_pretrained(tmp_path / "plain")


def test_reward_model_as_rl_reward(split, tokenizer):
    problems = list(split[1][:3])
    completions = ["<think>\n" + problems[0].answer, "garbage }}}{", None]
    rm_reward = RewardModelReward(small_model(), tokenizer, temperature=2.0)
    scores = rm_reward(problems, completions)
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    mixed = CompositeReward({"rule": (VerifiableReward(), 1.0), "rm": (rm_reward, 1.0)})
    totals, parts = mixed.score_parts(problems, completions)
    assert totals == pytest.approx([(r + m) / 2 for r, m in zip(parts["rule"], parts["rm"])])
    with pytest.raises(ValueError, match="exactly one"):
        RewardModel()

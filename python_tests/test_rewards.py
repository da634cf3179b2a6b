"""Verifiable rewards: answer extraction, math-verify, reasoning-gym scoring, splits, worked solutions,
and reward mixing. Every scorer returns a float in [0, 1] and scores garbage 0 without raising."""
import pytest

from ringkern.rewards import (CODE_SOURCE, MATH_SOURCE, CompositeReward, Problem, ReasoningGymSource, RewardTerm,
                              VerifiableReward, arithmetic_steps, extract_answer, format_solution, is_correct,
                              last_boxed, make_split, math_reward, reasoning_gym_reward, worked_solution)
from ringkern.tokenizer import load_tiny_tokenizer

TASKS = ["chain_sum", "basic_arithmetic"]
GARBAGE = ["", "\\boxed{", "}}}{{{", "\\boxed{}", "Answer:", "\x00\xff" * 50, "\\boxed{\\frac{", "<think>\n" * 100]


@pytest.fixture(scope="module")
def split():
    return make_split(TASKS, train_size=120, eval_size=40, seed=11)


# ---------------------------------------------------------------- extraction
def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b}}") == "{a}{b}"
    assert last_boxed("\\boxed{7} and an unfinished \\boxed{\\frac{1}{") == "7"
    assert last_boxed("no box") is None and last_boxed(None) is None


def test_extract_answer_falls_back_to_answer_line():
    assert extract_answer("The answer is \\boxed{ 42 }.") == "42"
    assert extract_answer("so...\nAnswer: -17.\n") == "-17"
    assert extract_answer("Answer: 3\nAnswer: 5") == "5"
    for text in GARBAGE + [None, 12]:
        answer = extract_answer(text)
        assert answer is None or isinstance(answer, str)
    assert extract_answer("\\boxed{}") is None and extract_answer("Answer:  .") is None


# ---------------------------------------------------------------- math-verify
@pytest.mark.parametrize("gold, completion, expected", [
    ("0.5", "<think>\nhalf\n</think>\n\n\\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
    ("3", "\\boxed{3.0}", 1.0),
    ("x^2+1", "\\boxed{1 + x\\cdot x}", 1.0),
    ("5", "\\boxed{5} wait, no: \\boxed{15}", 0.0),
    ("5", "the answer is 5", 0.0),  # no \boxed{}: math_reward only reads boxed answers
])
def test_math_reward(gold, completion, expected):
    assert math_reward(completion, gold) == expected


def test_math_reward_never_raises():
    for text in GARBAGE + [None, 3.5]:
        assert math_reward(text, "1") == 0.0
    assert math_reward("\\boxed{1}", "") == 0.0 and math_reward("\\boxed{1}", None) == 0.0


# ---------------------------------------------------------------- reasoning-gym
def test_reasoning_gym_reward_uses_the_task_scorer(split):
    train, _ = split
    problem = train[0]
    assert problem.source == "chain_sum"
    assert reasoning_gym_reward(worked_solution(problem), problem) == 1.0
    wrong = str(int(problem.answer) + 1000)
    assert reasoning_gym_reward(format_solution("guess", wrong), problem) < 1.0
    # chain_sum gives partial credit when the gold string occurs inside a wrong answer; binary removes it
    padded = format_solution("guess", "9" + problem.answer.lstrip("-") + "9")
    assert 0.0 <= reasoning_gym_reward(padded, problem, binary=True) == 0.0
    for text in GARBAGE + [None]:
        assert reasoning_gym_reward(text, problem) == 0.0


def test_split_is_disjoint_deterministic_and_interleaved(split):
    train, held_out = split
    assert (len(train), len(held_out)) == (120, 40)
    assert not train.prompts & held_out.prompts
    assert [p.source for p in train[:4]] == TASKS * 2
    assert [p.index for p in train] == list(range(120))
    again, _ = make_split(TASKS, train_size=120, eval_size=40, seed=11)
    assert [p.prompt for p in again] == [p.prompt for p in train]
    other, _ = make_split(TASKS, train_size=120, eval_size=40, seed=12)
    assert [p.prompt for p in other] != [p.prompt for p in train]


def test_source_configs_and_errors():
    easy = ReasoningGymSource(["chain_sum"], seed=0, size=30, configs={"chain_sum": dict(min_terms=2, max_terms=2,
                                                                                          min_digits=1, max_digits=1)})
    assert all(p.metadata["num_terms"] == 2 and p.metadata["num_digits"] == 1 for p in easy)
    with pytest.raises(ValueError, match="task_names"):
        ReasoningGymSource("chain_sum", seed=0, size=3)
    with pytest.raises(ValueError, match="size"):
        ReasoningGymSource(["chain_sum"], seed=0, size=0)
    with pytest.raises(ValueError, match="not registered"):
        ReasoningGymSource(["no_such_task"], seed=0, size=3)
    with pytest.raises(ValueError, match="configs"):
        ReasoningGymSource(["chain_sum"], seed=0, size=3, configs={"basic_arithmetic": {}})
    with pytest.raises(ValueError, match="distinct new problems"):  # only 10 one-term one-digit problems exist
        ReasoningGymSource(["chain_sum"], seed=0, size=20, configs={"chain_sum": dict(min_terms=1, max_terms=1,
                                                                                       min_digits=1, max_digits=1)})


# ---------------------------------------------------------------- worked solutions
def test_arithmetic_steps_follow_precedence_and_floor_division():
    assert arithmetic_steps("2 + 3 * 4") == (["3 * 4 = 12", "2 + 12 = 14"], 14)
    assert arithmetic_steps("-( 3 + 4 ) * -2 - 7 / 2") == (
        ["3 + 4 = 7", "-(7) = -7", "-7 * (-2) = 14", "7 / 2 = 3", "14 - 3 = 11"], 11)
    assert arithmetic_steps("8") == ([], 8)
    for bad in ("2 +", "import os", "2 ** 3", "1 / 0"):
        with pytest.raises(ValueError):
            arithmetic_steps(bad)


def test_worked_solutions_are_correct_for_every_item(split):
    tokenizer = load_tiny_tokenizer()
    for problem in list(split[0]) + list(split[1]):
        text = worked_solution(problem)
        assert text.startswith("<think>\nWe need to compute ") and "\n</think>\n\nThe answer is \\boxed{" in text
        assert extract_answer(text) == problem.answer
        assert is_correct(text, problem)
        prompt_ids, response_ids = tokenizer.format_sft_example(problem.prompt, text)
        assert tokenizer.decode(response_ids[:-1]) == text[len("<think>\n"):]
        assert response_ids[-1] == tokenizer.eos_token_id and len(prompt_ids) + len(response_ids) < 160


def test_worked_solution_rejects_unsupported_problems():
    with pytest.raises(ValueError, match="problem.source"):
        worked_solution(Problem("What is 1+1?", "2", {}, MATH_SOURCE, 0))
    with pytest.raises(ValueError, match="evaluates to 3"):
        worked_solution(Problem("1 + 2 =", "4", {"expression": "1 + 2"}, "chain_sum", 7))


# ---------------------------------------------------------------- reward functions
def test_verifiable_reward_dispatches_by_source(split):
    problem = split[0][1]
    math_problem = Problem("Half of one?", "\\frac{1}{2}", {}, MATH_SOURCE, 0)
    code_problem = Problem("Write add.", "", {"tests": ["assert add(2, 2) == 4", "assert add(1, 0) == 1"]},
                           CODE_SOURCE, 0)
    completions = [worked_solution(problem), "\\boxed{0.5}", "```python\ndef add(a, b):\n    return a * b\n```"]
    scores = VerifiableReward()([problem, math_problem, code_problem], completions)
    assert scores == [1.0, 1.0, 0.5]
    assert VerifiableReward(binary=True)([code_problem], completions[2:]) == [0.0]
    assert VerifiableReward()([problem] * len(GARBAGE), GARBAGE) == [0.0] * len(GARBAGE)
    with pytest.raises(ValueError, match="equal lengths"):
        VerifiableReward()([problem], [])


def test_composite_reward_is_the_weighted_mean():
    problems = [Problem("p", "1"), Problem("q", "2")]
    constant = lambda value: (lambda ps, cs: [value] * len(ps))  # noqa: E731
    mix = CompositeReward({"rule": (constant(1.0), 3.0), "rm": (constant(0.2), 1.0), "off": (constant(0.7), 0.0)})
    totals, parts = mix.score_parts(problems, ["a", "b"])
    assert totals == pytest.approx([0.8, 0.8])
    assert parts == {"rule": [1.0, 1.0], "rm": [0.2, 0.2], "off": [0.7, 0.7]}
    assert mix(problems, ["a", "b"]) == pytest.approx([0.8, 0.8])
    rule = CompositeReward([RewardTerm("rule", VerifiableReward(), 1.0)])
    assert rule([Problem("x", "0.5", {}, MATH_SOURCE)], ["\\boxed{1/2}"]) == [1.0]


def test_composite_reward_validates_terms():
    ok = lambda ps, cs: [0.0] * len(ps)  # noqa: E731
    with pytest.raises(ValueError, match="weight"):
        CompositeReward({"a": (ok, -1.0)})
    with pytest.raises(ValueError, match="sum to 0"):
        CompositeReward({"a": (ok, 0.0)})
    with pytest.raises(ValueError, match="at least one"):
        CompositeReward({})
    with pytest.raises(ValueError, match="not callable"):
        CompositeReward({"a": ("nope", 1.0)})
    short = CompositeReward({"a": (lambda ps, cs: [1.0], 1.0)})
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        short([Problem("p", "1")] * 2, ["a", "b"])

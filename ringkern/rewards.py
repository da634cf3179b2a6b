"""Verifiable rewards for RLVR/RLHF: reasoning-gym problems, math answers, code tests, and their mixes.

Answer format. A completion ends with its final answer in ``\\boxed{...}``; :func:`worked_solution`
writes exactly the Ring shape the SFT stage teaches (the chat prompt already ends ``<think>\\n``)::

    <think>
    We need to compute 7 + 12 - 5.
    7 + 12 = 19
    19 - 5 = 14
    So the answer is 14.
    </think>

    The answer is \\boxed{14}.

and :func:`extract_answer` reads the content of the last ``\\boxed{}`` (balanced braces), falling back to
the text after the last ``Answer:``.

Scorers, each a float in [0, 1] that never raises on a garbage completion (it scores 0):
  - :func:`reasoning_gym_reward`: the task's own ``score_answer(answer=..., entry=...)``. Some tasks give
    partial credit (``chain_sum`` scores ``len(gold) / len(answer)`` when the gold string occurs inside
    a wrong answer), so pass ``binary=True`` (or use :func:`is_correct`) to count exact answers only.
  - :func:`math_reward`: math-verify's ``parse`` + ``verify`` of the last ``\\boxed{}`` against the gold.
  - code: :func:`ringkern.sandbox.code_reward` (tests run in an isolated child process).

:class:`ReasoningGymSource` makes the problems (:class:`Problem`), :func:`make_split` a train/held-out
pair that shares no item, :class:`VerifiableReward` scores a batch by each problem's source, and
:class:`CompositeReward` mixes reward functions (rule rewards, a reward model) with weights.
"""
from __future__ import annotations

import ast
import functools
import math
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

MATH_SOURCE = "math"
CODE_SOURCE = "code"
BOXED = "\\boxed"

# Small, easy configurations for the tiny preset: few terms, small numbers, answers that stay short.
# basic_arithmetic keeps parentheses on: without them reasoning-gym evaluates mixed +,-,* left to
# right, which is not the usual precedence that the worked solutions (and the model) follow.
EASY_TASK_CONFIGS: dict[str, dict[str, Any]] = {
    "chain_sum": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
    "basic_arithmetic": dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1, operators=("+", "-", "*"),
                             allow_parentheses=True, allow_negation=False),
}
# Worked solutions need the item's arithmetic expression (metadata["expression"]) to evaluate to its answer.
WORKED_SOLUTION_TASKS = ("chain_sum", "basic_arithmetic")
_MAX_DRAWS_PER_ITEM = 50  # how far past `size` a source looks for items not in `exclude`


@dataclass(frozen=True)
class Problem:
    """One prompt with its gold answer. source: a reasoning-gym task name, ``"math"`` or ``"code"``
    (then ``metadata["tests"]`` holds the tests); index: position in its source."""

    prompt: str
    answer: str
    metadata: dict = field(default_factory=dict)
    source: str = MATH_SOURCE
    index: int = 0


# ====================================================================== answers
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` with balanced braces; None if none is complete."""
    if not isinstance(text, str):
        return None
    start = text.rfind(BOXED + "{")
    while start != -1:
        content = _balanced(text, start + len(BOXED))
        if content is not None:
            return content.strip()
        start = text.rfind(BOXED + "{", 0, start)
    return None


def _balanced(text: str, open_pos: int) -> str | None:
    """The text inside the brace group opening at ``open_pos``; None if it never closes."""
    depth = 0
    for i in range(open_pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1: i]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the last ``\\boxed{}``, else the rest of the line after the last
    ``Answer:`` (trailing period dropped); None if neither is there or the answer is empty."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed or None
    if not isinstance(completion, str):
        return None
    pos = completion.rfind("Answer:")
    if pos == -1:
        return None
    line = completion[pos + len("Answer:"):].split("\n", 1)[0].strip().rstrip(".").strip()
    return line or None


def _unit_interval(value: Any) -> float:
    """``value`` as a float clamped to [0, 1]; NaN and non-numbers become 0."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(max(x, 0.0), 1.0) if math.isfinite(x) else 0.0


# ====================================================================== math
def _math_verify_timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works on the main thread.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_reward(completion: str, gold: str) -> float:
    """1.0 if the last ``\\boxed{}`` of ``completion`` equals ``gold`` mathematically (math-verify), else 0.0.

    gold: a LaTeX or plain answer (``"\\frac{1}{2}"``, ``"0.5"``, ``"x^2+1"``); both sides are parsed
    as ``\\boxed{...}`` so plain numbers and LaTeX compare alike.
    """
    from math_verify import parse, verify

    answer = last_boxed(completion)
    if answer is None or not isinstance(gold, str) or not gold.strip():
        return 0.0
    timeout = _math_verify_timeout()
    try:
        gold_parsed = parse(f"{BOXED}{{{gold}}}", parsing_timeout=timeout)
        answer_parsed = parse(f"{BOXED}{{{answer}}}", parsing_timeout=timeout)
        return 1.0 if gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed,
                                                               timeout_seconds=timeout) else 0.0
    except Exception:  # math-verify and sympy raise many types on odd input; garbage scores 0
        return 0.0


# ====================================================================== reasoning-gym
@functools.lru_cache(maxsize=None)
def _score_fn(task: str):
    """The task's ``score_answer`` (bound to a default-config dataset, built once per task)."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def reasoning_gym_reward(completion: str, problem: Problem, *, binary: bool = False) -> float:
    """The task's own scorer on the extracted answer, in [0, 1]; 0 without an answer.

    binary: 1.0 only for a full score (reasoning-gym's partial credit becomes 0).
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    entry = {"question": problem.prompt, "answer": problem.answer, "metadata": problem.metadata}
    try:
        score = _unit_interval(_score_fn(problem.source)(answer=answer, entry=entry))
    except Exception:  # a task's scorer may choke on arbitrary text; that is a wrong answer
        return 0.0
    return (1.0 if score >= 1.0 else 0.0) if binary else score


def is_correct(completion: str, problem: Problem) -> bool:
    """Exact-answer check for held-out accuracy (full score from the problem's verifier)."""
    return VerifiableReward(binary=True)([problem], [completion])[0] >= 1.0


class ReasoningGymSource:
    """A fixed list of reasoning-gym problems from one or more task families.

    task_names: reasoning-gym dataset names (``chain_sum``, ``basic_arithmetic``, ...); configs: per-task
    config overrides (default :data:`EASY_TASK_CONFIGS` where it has the task, else the task's
    defaults). Problems alternate between tasks; task k's j-th problem is item j of
    ``reasoning_gym.create_dataset(name, seed=seed, **config)``. exclude: prompts to skip (a held-out
    split passes the training prompts); skipped items are replaced by later ones.
    """

    def __init__(self, task_names: Sequence[str], *, seed: int, size: int,
                 configs: Mapping[str, Mapping[str, Any]] | None = None, exclude: frozenset[str] = frozenset()):
        import reasoning_gym

        if isinstance(task_names, str) or not task_names:
            raise ValueError(f"task_names={task_names!r}: expected a non-empty list of reasoning-gym task names")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size={size!r}: expected a positive int")
        configs = dict(configs or {})
        unknown = set(configs) - set(task_names)
        if unknown:
            raise ValueError(f"configs: overrides for tasks not in task_names: {sorted(unknown)}")
        self.task_names, self.seed, self.size = list(task_names), seed, size
        self.configs = {t: dict(configs.get(t, EASY_TASK_CONFIGS.get(t, {}))) for t in self.task_names}
        per_task = -(-size // len(self.task_names))
        datasets = {}
        for task in self.task_names:
            try:
                datasets[task] = reasoning_gym.create_dataset(
                    task, seed=seed, size=per_task * _MAX_DRAWS_PER_ITEM, **self.configs[task])
            except (ValueError, TypeError, AssertionError) as err:
                raise ValueError(f"task {task!r} with config {self.configs[task]}: {err}") from None
        self.problems = self._draw(datasets, per_task, exclude)

    def _draw(self, datasets: dict, per_task: int, exclude: frozenset[str]) -> list[Problem]:
        by_task = {task: self._draw_task(task, ds, per_task, exclude) for task, ds in datasets.items()}
        interleaved = [by_task[t][j] for j in range(per_task) for t in self.task_names]
        return [Problem(p.prompt, p.answer, p.metadata, p.source, i) for i, p in enumerate(interleaved[: self.size])]

    @staticmethod
    def _draw_task(task: str, dataset, count: int, exclude: frozenset[str]) -> list[Problem]:
        out: list[Problem] = []
        seen = set(exclude)
        for j in range(len(dataset)):
            item = dataset[j]
            if item["question"] not in seen:
                seen.add(item["question"])
                out.append(Problem(item["question"], str(item["answer"]), dict(item["metadata"]), task, j))
                if len(out) == count:
                    return out
        raise ValueError(f"task {task!r}: only {len(out)} distinct new problems in {len(dataset)} draws, "
                         f"{count} needed; widen its config or ask for fewer")

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    @property
    def prompts(self) -> frozenset[str]:
        return frozenset(p.prompt for p in self.problems)

    def score(self, problem: Problem, completion: str, *, binary: bool = False) -> float:
        return reasoning_gym_reward(completion, problem, binary=binary)


def make_split(task_names: Sequence[str], *, train_size: int, eval_size: int, seed: int = 0,
               configs: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[ReasoningGymSource, ReasoningGymSource]:
    """(train, held-out) sources. The held-out one uses a seed past every training draw (reasoning-gym
    item j of seed s is generated from ``Random(s + j)``) and skips any prompt the training set has,
    so no held-out problem was seen in training, even in small problem spaces where values repeat."""
    train = ReasoningGymSource(task_names, seed=seed, size=train_size, configs=configs)
    eval_seed = seed + train_size * _MAX_DRAWS_PER_ITEM + 1
    held_out = ReasoningGymSource(task_names, seed=eval_seed, size=eval_size, configs=configs, exclude=train.prompts)
    return train, held_out


# ====================================================================== worked solutions
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "/"}


def _apply(op: str, a: int, b: int) -> int:
    if op == "/":
        if b == 0:
            raise ValueError("division by zero")
        return a // b  # reasoning-gym's basic_arithmetic divides with floor division
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _number(value: int) -> str:
    """A right operand, in parentheses when negative: ``3 - (-7)``."""
    return f"({value})" if value < 0 else str(value)


class _NegativeLiterals(ast.NodeTransformer):
    """``-5`` parses as a minus applied to 5; make it the number -5 (it is written as one)."""

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        node = self.generic_visit(node)
        if isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return ast.Constant(-node.operand.value)
        return node


def _reduce(node: ast.AST, steps: list[str], error_at: int | None, error: int) -> ast.AST:
    """Fold the leftmost innermost operation of ``node`` whose operands are numbers, recording it; the
    operation numbered ``error_at`` (0-based) gets ``error`` added to its result."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        if isinstance(node.operand, ast.Constant):
            value = -node.operand.value + (error if len(steps) == error_at else 0)
            steps.append(f"-({node.operand.value}) = {value}")
            return ast.Constant(value)
        return ast.UnaryOp(node.op, _reduce(node.operand, steps, error_at, error))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        if not isinstance(node.left, ast.Constant):
            return ast.BinOp(_reduce(node.left, steps, error_at, error), node.op, node.right)
        if not isinstance(node.right, ast.Constant):
            return ast.BinOp(node.left, node.op, _reduce(node.right, steps, error_at, error))
        op = _OPS[type(node.op)]
        value = _apply(op, node.left.value, node.right.value) + (error if len(steps) == error_at else 0)
        steps.append(f"{node.left.value} {op} {_number(node.right.value)} = {value}")
        return ast.Constant(value)
    raise ValueError(f"unsupported expression element {ast.dump(node)[:60]}")


def arithmetic_steps(expression: str, *, error_at: int | None = None, error: int = 0) -> tuple[list[str], int]:
    """(one line per operation, in evaluation order with the usual precedence, value) of an integer
    expression with + - * / (floor division) and parentheses.

    error_at, error: make operation number ``error_at`` (0-based) come out ``error`` off and carry the
    mistake through the later steps (for flawed solutions)."""
    try:
        node = _NegativeLiterals().visit(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"expression={expression!r}: not an arithmetic expression") from None
    steps: list[str] = []
    for _ in range(len(expression) + 1):  # every pass folds one operation; there are fewer than characters
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return steps, node.value
        node = _reduce(node, steps, error_at, error)
    raise ValueError(f"expression={expression!r}: did not reduce to an integer")


def format_solution(reasoning: str, answer: str) -> str:
    """The Ring response shape: thinking, then the boxed answer."""
    return f"<think>\n{reasoning}\n</think>\n\nThe answer is {BOXED}{{{answer}}}."


def _expression_of(problem: Problem) -> str:
    expression = problem.metadata.get("expression") if isinstance(problem.metadata, dict) else None
    if problem.source not in WORKED_SOLUTION_TASKS or not isinstance(expression, str):
        raise ValueError(f"problem.source={problem.source!r}: worked solutions exist for {WORKED_SOLUTION_TASKS} "
                         "items with metadata['expression']")
    return " ".join(expression.split())


def _solution_text(expression: str, steps: list[str], value: int, answer: int) -> str:
    lines = [f"We need to compute {expression}.", *(steps or [f"{expression} = {value}"]),
             f"So the answer is {answer}."]
    return format_solution("\n".join(lines), str(answer))


def worked_solution(problem: Problem) -> str:
    """A short deterministic worked solution of ``problem`` in the Ring format (module docstring).

    Supports the tasks in :data:`WORKED_SOLUTION_TASKS` (any item whose ``metadata["expression"]``
    evaluates to its answer); raises ValueError for other tasks or an answer the steps do not reach.
    """
    expression = _expression_of(problem)
    steps, value = arithmetic_steps(expression)
    if str(value) != problem.answer.strip():
        raise ValueError(f"problem {problem.index} ({problem.source}): {expression} evaluates to {value}, "
                         f"but the answer is {problem.answer!r}")
    return _solution_text(expression, steps, value, value)


FLAW_KINDS = ("wrong_answer", "wrong_step", "truncated")


def flawed_solution(problem: Problem, kind: str, rng: random.Random) -> str:
    """A plausible but wrong version of :func:`worked_solution` (rejected side of a preference pair).

    kind: ``"wrong_answer"`` (right steps, a different stated and boxed answer), ``"wrong_step"`` (one
    operation off by a few, the mistake carried to the answer; a problem without operations gets a
    wrong answer instead), ``"truncated"`` (cut after a random reasoning line: no ``</think>``, no answer).
    rng: chooses the offset, the step and the cut.
    """
    if kind not in FLAW_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {FLAW_KINDS}")
    expression = _expression_of(problem)
    steps, value = arithmetic_steps(expression)
    error = rng.choice([d for d in range(-9, 10) if d != 0])
    if kind == "truncated":
        lines = worked_solution(problem).split("\n")
        # lines: <think>, "We need...", steps..., "So the answer...", </think>, "", "The answer is..."
        return "\n".join(lines[: rng.randint(2, len(lines) - 4)]) + "\n"
    if kind == "wrong_step" and steps:
        bad_steps, bad_value = arithmetic_steps(expression, error_at=rng.randrange(len(steps)), error=error)
        if bad_value != value:
            return _solution_text(expression, bad_steps, bad_value, bad_value)
    return _solution_text(expression, steps, value, value + error)


# ====================================================================== reward functions
class RewardFn(Protocol):
    """Scores a batch: one float per (problem, completion) pair; the completion excludes the prompt."""

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]: ...


def _check_batch(problems: Sequence[Problem], completions: Sequence[str]) -> None:
    if len(problems) != len(completions):
        raise ValueError(f"problems ({len(problems)}) and completions ({len(completions)}): expected equal lengths")


class VerifiableReward:
    """Rule reward by each problem's source: ``"math"`` -> :func:`math_reward`, ``"code"`` ->
    :func:`ringkern.sandbox.code_reward` on ``metadata["tests"]``, otherwise the reasoning-gym task's
    scorer. Each score is in [0, 1]; a scorer failure scores 0.

    binary: reasoning-gym partial credit becomes 0; code_limits: keyword limits for the sandbox.
    """

    def __init__(self, *, binary: bool = False, code_limits: Mapping[str, float] | None = None):
        self.binary = binary
        self.code_limits = dict(code_limits or {})

    def score(self, problem: Problem, completion: str) -> float:
        if problem.source == MATH_SOURCE:
            return math_reward(completion, problem.answer)
        if problem.source == CODE_SOURCE:
            from .sandbox import code_reward

            score = code_reward(completion, problem.metadata["tests"], **self.code_limits)
            return (1.0 if score >= 1.0 else 0.0) if self.binary else score
        return reasoning_gym_reward(completion, problem, binary=self.binary)

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        _check_batch(problems, completions)
        return [_unit_interval(self.score(p, c)) for p, c in zip(problems, completions)]


@dataclass(frozen=True)
class RewardTerm:
    name: str
    fn: RewardFn
    weight: float


class CompositeReward:
    """Weighted mean of reward functions: sum_i w_i r_i / sum_i w_i (in [0, 1] if every r_i is).

    terms: ``{"rule": (VerifiableReward(), 1.0), "rm": (reward_model_fn, 0.5)}`` or a list of
    :class:`RewardTerm`. :meth:`score_parts` also returns each term's scores, for logging.
    """

    def __init__(self, terms: Mapping[str, tuple[RewardFn, float]] | Sequence[RewardTerm]):
        items = ([RewardTerm(n, fn, w) for n, (fn, w) in terms.items()] if isinstance(terms, Mapping)
                 else list(terms))
        if not items:
            raise ValueError("terms: expected at least one reward function")
        for term in items:
            if not callable(term.fn):
                raise ValueError(f"terms[{term.name!r}]: the reward function is not callable")
            if not (isinstance(term.weight, (int, float)) and math.isfinite(term.weight) and term.weight >= 0):
                raise ValueError(f"terms[{term.name!r}]: weight={term.weight!r}, expected a finite number >= 0")
        if len({t.name for t in items}) != len(items):
            raise ValueError(f"terms: duplicate names in {[t.name for t in items]}")
        self.total_weight = sum(t.weight for t in items)
        if self.total_weight <= 0:
            raise ValueError("terms: the weights sum to 0")
        self.terms = items

    def score_parts(self, problems: Sequence[Problem],
                    completions: Sequence[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted totals, {term name: that term's scores})."""
        _check_batch(problems, completions)
        parts = {}
        for term in self.terms:
            scores = [float(s) for s in term.fn(problems, completions)]
            if len(scores) != len(problems):
                raise ValueError(f"terms[{term.name!r}]: returned {len(scores)} scores for {len(problems)} completions")
            parts[term.name] = scores
        totals = [sum(t.weight * parts[t.name][i] for t in self.terms) / self.total_weight
                  for i in range(len(problems))]
        return totals, parts

    def __call__(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        return self.score_parts(problems, completions)[0]


__all__ = ["Problem", "ReasoningGymSource", "make_split", "EASY_TASK_CONFIGS", "WORKED_SOLUTION_TASKS",
           "worked_solution", "flawed_solution", "FLAW_KINDS", "format_solution", "arithmetic_steps",
           "last_boxed", "extract_answer", "math_reward", "reasoning_gym_reward", "is_correct", "RewardFn",
           "VerifiableReward", "RewardTerm", "CompositeReward", "MATH_SOURCE", "CODE_SOURCE"]

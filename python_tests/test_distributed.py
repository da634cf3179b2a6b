"""ringkern.distributed on the CPU with gloo: 2 and 4 processes against the single-process result.

Each world size is one spawned job (process start-up dominates on a 2-core machine): every rank runs
the checks below in order and records "ok" or its traceback; each test reads its check's records from
all ranks. A rank that dies or hangs (60 s collective timeout) fails every check it did not finish.
The NCCL versions of these checks: benchmarks/test_distributed_nccl.py.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from ringkern import Engine, RingConfig, RingFlashModel, SamplingParams, ops
from ringkern.checkpoint import load_pretrained
from ringkern.distributed import (dcp_to_pretrained, dispatch_plan, expert_parallel_moe, init_mesh,
                                  load_pretrained_sharded, load_sharded, parallelize, parallelize_for_inference,
                                  pretrained_to_dcp, save_pretrained_sharded, save_sharded)
from ringkern.distributed import mesh as mesh_module
from ringkern.reward_model import PreferenceDataset, PreferencePair, RewardModel, train_reward_model
from ringkern.rewards import Problem
from ringkern.tokenizer import load_tiny_tokenizer
from ringkern.train.common import make_optimizer, make_scheduler
from ringkern.train.config import GRPOConfig
from ringkern.train.grpo import Rollout, RolloutPolicy, attach_logprobs, grpo_update, sample_rollouts
from ringkern.train.state import NonFiniteGuard, optimizer_step

JOB_TIMEOUT_S = 240
# Where the checks run: the CPU with gloo here; benchmarks/test_distributed_nccl.py sets cuda:LOCAL_RANK.
DEVICE = torch.device("cpu")


# --------------------------------------------------------------------------- helpers used in the workers
def tiny_config() -> RingConfig:
    return RingConfig.from_preset("tiny")


def seeded_model(seed: int = 0) -> RingFlashModel:
    torch.manual_seed(seed)
    return RingFlashModel(tiny_config()).to(DEVICE)


def rank_batch(i: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank i's batch: a different length per rank (uneven token counts), one right-padded row."""
    g = torch.Generator().manual_seed(100 + i)
    T = 5 + 3 * i
    ids = torch.randint(3, vocab, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, T - 2:] = False
    labels = ids.masked_fill(~mask, -100)
    return ids.to(DEVICE), labels.to(DEVICE), mask.to(DEVICE)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    """Max abs error at most rtol x the reference's max magnitude (fp32 sums in another order)."""
    err = (actual.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol} x {scale:.3e}"


def train_step(model, batch, optimizer, scheduler) -> dict[str, float]:
    ids, labels, mask = batch
    loss, _ = model.sft_loss(ids, labels, attention_mask=mask)
    loss.backward()
    return optimizer_step(model, optimizer, scheduler, loss.detach(), NonFiniteGuard(), 1, grad_clip=1.0)


# --------------------------------------------------------------------------------------------- checks
def check_forward_backward(rank: int, world: int, _: Path) -> None:
    """EP + FSDP2 forward, backward, global token counts and one clipped AdamW step equal one process
    computing the mean of the ranks' losses."""
    mesh = init_mesh(DEVICE.type)
    vocab = tiny_config().vocab_size
    reference, model = seeded_model(), parallelize(seeded_model(), mesh)
    ids, labels, mask = rank_batch(rank, vocab)
    with torch.no_grad():
        out, ref_out = model(ids, attention_mask=mask), reference(ids, attention_mask=mask)
    # after a forward, which leaves FSDP's root unsharded: make_optimizer must still take the shards
    optimizer = make_optimizer(model, 1e-2, 0.1, DEVICE)
    ref_optimizer = make_optimizer(reference, 1e-2, 0.1, DEVICE)
    assert_close(out.logits, ref_out.logits, "logits")
    assert_close(out.mtp_logits[0], ref_out.mtp_logits[0], "mtp logits")

    loss, parts = model.sft_loss(ids, labels, attention_mask=mask)
    loss.backward()
    ref_total, ref_counts = 0.0, {}
    for i in range(world):
        ref_loss, ref_parts = reference.sft_loss(*rank_batch(i, vocab)[:2], attention_mask=rank_batch(i, vocab)[2])
        (ref_loss / world).backward()
        ref_total += float(ref_loss.detach()) / world
        for layer, counts in ref_parts["tokens_per_expert"].items():
            ref_counts[layer] = ref_counts.get(layer, 0) + counts.long()
        if i == rank:
            assert_close(loss.detach(), ref_loss.detach(), "loss", 1e-5)
    for layer, counts in parts["tokens_per_expert"].items():
        assert torch.equal(counts.long(), ref_counts[layer]), f"layer {layer}: global tokens_per_expert differ"
    ref_params = dict(reference.named_parameters())
    ref_grads = {name: p.grad.clone() for name, p in ref_params.items()}
    for name, p in model.named_parameters():
        assert_close(full(p.grad), ref_grads[name], f"grad of {name}")

    sched, ref_sched = make_scheduler(optimizer, 0, 1), make_scheduler(ref_optimizer, 0, 1)
    result = optimizer_step(model, optimizer, sched, loss.detach(), NonFiniteGuard(), 1, grad_clip=0.5)
    ref_result = optimizer_step(reference, ref_optimizer, ref_sched, torch.tensor(ref_total), NonFiniteGuard(), 1,
                                grad_clip=0.5)
    assert abs(result["grad_norm"] - ref_result["grad_norm"]) <= 1e-4 * ref_result["grad_norm"]
    for name, p in model.named_parameters():  # Adam's first step is about lr * sign(g): compare where g
        grad = ref_grads[name]  # is well above roundoff, which the step would amplify to +-lr
        clear = grad.abs() > 1e-3 * grad.abs().max()
        assert_close(full(p.detach())[clear], ref_params[name].detach()[clear], f"{name} after the step", 1e-4)


def check_dispatch_uneven(rank: int, world: int, _: Path) -> None:
    """expert_parallel_moe with uneven token counts, a rank with no tokens, experts with no tokens and
    a rank whose experts get none: exact counts, outputs and gradients equal ops.moe_experts."""
    mesh = init_mesh(DEVICE.type)
    group = mesh.get_group()
    E, H, I, k = 4 * world, 24, 16, 3
    local = E // world
    g = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) * 0.2).to(DEVICE)
    down = (torch.randn(E, H, I, generator=g) * 0.2).to(DEVICE)
    sizes = [[7, 0, 3, 11][i % 4] for i in range(world)]  # rank 1 routes nothing

    def rank_inputs(i):
        gi = torch.Generator().manual_seed(1000 + i)
        T = sizes[i]
        ids = torch.randint(0, E - local, (T, k), generator=gi)  # the last rank's experts get no token
        ids[: T // 2, 0] = 0  # skew: half the tokens pick expert 0 first
        return tuple(t.to(DEVICE) for t in (torch.randn(T, H, generator=gi), torch.rand(T, k, generator=gi),
                                            ids.int(), torch.randn(T, H, generator=gi)))

    x, w, ids, grad_y = rank_inputs(rank)
    plan = dispatch_plan(ids, E, group)
    everyone = [rank_inputs(i) for i in range(world)]
    all_ids = torch.cat([inp[2].reshape(-1).long() for inp in everyone])
    expected = torch.bincount(all_ids, minlength=E)[rank * local:(rank + 1) * local]
    assert torch.equal(plan.tokens_per_local_expert, expected), (plan.tokens_per_local_expert, expected)
    assert plan.send_splits == torch.bincount(ids.reshape(-1).long(), minlength=E).view(world, local).sum(1).tolist()
    assert sum(plan.recv_splits) == int(expected.sum())

    x.requires_grad_(True)
    w.requires_grad_(True)
    gu_local = gate_up[rank * local:(rank + 1) * local].clone().requires_grad_(True)
    dn_local = down[rank * local:(rank + 1) * local].clone().requires_grad_(True)
    y = expert_parallel_moe(x, w, ids, gu_local, dn_local, E, group)
    (y * grad_y).sum().backward()

    xs = torch.cat([inp[0] for inp in everyone]).requires_grad_(True)
    ws = torch.cat([inp[1] for inp in everyone]).requires_grad_(True)
    gu_ref, dn_ref = gate_up.clone().requires_grad_(True), down.clone().requires_grad_(True)
    y_ref = ops.moe_experts(xs, ws, torch.cat([inp[2] for inp in everyone]), gu_ref, dn_ref)
    (y_ref * torch.cat([inp[3] for inp in everyone])).sum().backward()
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    assert_close(y.detach(), y_ref.detach()[rows], "y")
    assert_close(x.grad, xs.grad[rows], "grad x")
    assert_close(w.grad, ws.grad[rows], "grad weights")
    assert_close(gu_local.grad, gu_ref.grad[rank * local:(rank + 1) * local], "grad gate_up_proj")
    assert_close(dn_local.grad, dn_ref.grad[rank * local:(rank + 1) * local], "grad down_proj")
    if rank == world - 1:
        assert plan.tokens_per_local_expert.sum() == 0 and not gu_local.grad.any()


def check_checkpoint_round_trip(rank: int, world: int, tmp: Path) -> None:
    """DCP save/load of the sharded model and AdamW state; DCP -> published -> DCP conversion."""
    mesh = init_mesh(DEVICE.type)
    vocab = tiny_config().vocab_size
    model = parallelize(seeded_model(0), mesh)
    optimizer = make_optimizer(model, 1e-2, 0.1, DEVICE)
    train_step(model, rank_batch(rank, vocab), optimizer, make_scheduler(optimizer, 0, 1))
    save_sharded(tmp / "dcp", model, optimizer, extra={"step": 3})

    restored = parallelize(seeded_model(1), mesh)
    restored_opt = make_optimizer(restored, 1e-2, 0.1, DEVICE)
    extra = load_sharded(tmp / "dcp", restored, restored_opt, with_extra=True)
    assert extra == {"step": 3}, extra
    for (name, p), q in zip(model.named_parameters(), restored.parameters()):
        assert torch.equal(full(p.detach()), full(q.detach())), f"{name} differs after load_sharded"
        for key, value in optimizer.state[p].items():
            assert torch.equal(full(value), full(restored_opt.state[q][key])), f"optimizer {key} of {name}"
    # a step from the restored state equals a step from the original
    batch = rank_batch(rank + 1, vocab)
    loss_a = float(model.sft_loss(*batch[:2], attention_mask=batch[2])[0])
    loss_b = float(restored.sft_loss(*batch[:2], attention_mask=batch[2])[0])
    assert loss_a == loss_b

    save_pretrained_sharded(model, tmp / "published_gathered")
    if rank == 0:
        dcp_to_pretrained(tmp / "dcp", tmp / "published")
        pretrained_to_dcp(tmp / "published", tmp / "dcp_again")
    dist.barrier()
    full_state = {name: full(t) for name, t in model.state_dict().items()}
    for source in ("published", "published_gathered"):
        loaded = load_pretrained(tmp / source, device="cpu").state_dict()
        assert loaded.keys() == full_state.keys()
        for name, t in loaded.items():
            assert torch.equal(t, full_state[name].to("cpu", t.dtype)), f"{source}: {name} differs"
    again = parallelize(seeded_model(2), mesh)
    load_sharded(tmp / "dcp_again", again)
    for (name, p), q in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(full(p.detach()), full(q.detach())), f"{name} differs after the conversion round trip"


def check_sharded_load(rank: int, world: int, tmp: Path) -> None:
    """load_pretrained_sharded (each rank reads its shards) == parallelize(load_pretrained(...)): every
    rank's shards, the gathered weights and a training forward."""
    mesh = init_mesh(DEVICE.type)
    if rank == 0:
        seeded_model(5).save_pretrained(tmp / "published")
    dist.barrier()
    got = load_pretrained_sharded(tmp / "published", mesh, dtype=torch.float32, device=DEVICE)
    expected = parallelize(load_pretrained(tmp / "published", dtype=torch.float32, device=DEVICE), mesh)
    got_state, expected_state = got.state_dict(), expected.state_dict()
    assert got_state.keys() == expected_state.keys()
    for name, t in got_state.items():
        want = expected_state[name]
        local = (t.to_local(), want.to_local()) if isinstance(t, DTensor) else (t, want)
        assert torch.equal(*local), f"{name}: this rank's shard differs"
        assert torch.equal(full(t), full(want)), f"{name} differs"
    batch = rank_batch(rank, tiny_config().vocab_size)
    assert float(got.sft_loss(*batch[:2], attention_mask=batch[2])[0]) == float(
        expected.sft_loss(*batch[:2], attention_mask=batch[2])[0])


def check_greedy_decode(rank: int, world: int, _: Path) -> None:
    """Engine greedy decode with expert-parallel experts gives the single-process tokens (and log-probs)."""
    init_mesh(DEVICE.type)
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True, n=2, seed=0)
    prompts = [[5, 17, 99, 3], [42] * 9, [7, 300, 11]]
    reference = seeded_model()
    expected = Engine(copy.deepcopy(reference), max_batch=4, max_seq_len=32).generate(prompts, params)
    model = parallelize_for_inference(reference, mesh_module.current_mesh())
    got = Engine(model, max_batch=4, max_seq_len=32).generate(prompts, params)
    for c, e in zip(got, expected):
        assert c.token_ids == e.token_ids, (c.prompt_index, c.token_ids, e.token_ids)
        assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), "logprobs", 1e-4)


def check_reward_model_data_parallel(rank: int, world: int, _: Path) -> None:
    """A reward model from the sharded policy is the whole policy on every rank; data-parallel training keeps
    the ranks' copies identical and moves them (each rank trains on its own pairs)."""
    mesh = init_mesh(DEVICE.type)
    reference = RewardModel.from_policy(seeded_model(0))
    model = RewardModel.from_policy(parallelize(seeded_model(0), mesh))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if name != "score_head.weight":  # the head is freshly drawn
            assert torch.equal(p.detach(), q.detach()), f"{name} differs from the unsharded policy"
    pairs = [PreferencePair(f"What is {i} + 1?", f"\\boxed{{{i + 1}}}", f"\\boxed{{{i + 2}}}") for i in range(8)]
    data = PreferenceDataset(pairs, load_tiny_tokenizer(), max_length=48)
    before = [p.detach().clone() for p in model.parameters()]
    result = train_reward_model(model, data, steps=2, batch_size=2, seed=rank)  # ranks draw in their own order
    assert all(math.isfinite(x) for x in result["losses"])
    assert any(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]
                     + [b.float().reshape(-1) for b in model.buffers()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    assert all(torch.equal(c, flat) for c in copies), "the ranks' reward models differ after training"


def check_data_parallel_rollouts(rank: int, world: int, _: Path) -> None:
    """GRPO rollouts with rollout_parallelism="data": each rank decodes only its share of the prompts (5 over
    the ranks: uneven) on a whole copy of the sharded policy, and every rank gets all the rollouts in
    prompt order, equal to one process decoding them all (greedy, so the draws are comparable)."""
    mesh = init_mesh(DEVICE.type)
    tokenizer = load_tiny_tokenizer()
    problems = [Problem(f"What is {i} + 1?", str(i + 1)) for i in range(5)]
    prompt_ids = [tokenizer.encode_chat([{"role": "user", "content": p.prompt}]) for p in problems]
    cfg = GRPOConfig(group_size=2, max_new_tokens=6, temperature=0.0)

    def reward(_problems, texts):
        return [float(len(t)) for t in texts]

    single = RolloutPolicy(seeded_model(0), torch.float32, max_batch=10, max_seq_len=64, tokenizer=tokenizer)
    expected, expected_texts = sample_rollouts(single, tokenizer, problems, prompt_ids, reward, cfg, seed=0)
    policy = RolloutPolicy(parallelize(seeded_model(0), mesh), torch.float32, max_batch=6, max_seq_len=64,
                           tokenizer=tokenizer, data_parallel=True)
    got, texts = sample_rollouts(policy, tokenizer, problems, prompt_ids, reward, cfg, seed=0)
    assert texts == expected_texts
    assert ([(r.prompt_ids, r.response_ids, r.reward) for r in got]
            == [(r.prompt_ids, r.response_ids, r.reward) for r in expected])
    for a, b in zip(got, expected):
        assert_close(a.rollout_logprobs, b.rollout_logprobs, "rollout log-probs")
    assert policy.engine.stats.prefill_tokens == sum(len(prompt_ids[i]) for i in range(rank, 5, world))


def check_data_parallel_update(rank: int, world: int, _: Path) -> None:
    """GRPO's old log-probs and minibatch updates split over the ranks (rank_share / loss_shares) equal one
    process on all the rollouts: same log-probs, same weights and expert biases after two SGD minibatch
    steps (4 and 3 sequences: uneven shares, padded differently; with 4 ranks one rank gets no sequence
    of the second and runs a stand-in that must not count in the expert load), for both aggregations and
    with a KL term."""
    mesh = init_mesh(DEVICE.type)
    vocab = tiny_config().vocab_size
    g = torch.Generator().manual_seed(11)
    rollouts = [Rollout(torch.randint(3, vocab, (3 + i % 3,), generator=g).tolist(),
                        torch.randint(3, vocab, (2 + 2 * i % 5,), generator=g).tolist(),
                        -torch.rand(2 + 2 * i % 5, generator=g), 0.0, True,
                        advantage=float(torch.randn(1, generator=g)))
                for i in range(7)]
    for aggregation in ("seq-mean-token-mean", "token-mean"):
        cfg = GRPOConfig(minibatch_size=4, aggregation=aggregation, kl_coef=0.1, bias_update_rate=0.05)
        results = []
        for parallel in (False, True):
            model = parallelize(seeded_model(0), mesh) if parallel else seeded_model(0)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # before any forward: FSDP's root stays
            trained = copy.deepcopy(rollouts)                         # unsharded after one (as in train_grpo)
            attach_logprobs(model, trained, cfg, 0, DEVICE, data_parallel=parallel)
            for r in trained:
                r.ref_logprobs = r.old_logprobs - 0.05
            metrics = grpo_update(model, optimizer, make_scheduler(optimizer, 0, 1), trained, cfg, NonFiniteGuard(),
                                  1, 0, 0, DEVICE, data_parallel=parallel)
            state = {n: full(p.detach()) for n, p in model.named_parameters()}
            state.update((n, b.clone()) for n, b in model.named_buffers() if n.endswith("expert_bias"))
            results.append((trained, state, metrics))
        (single, single_weights, single_metrics), (split, split_weights, split_metrics) = results
        for a, b in zip(single, split):
            assert_close(b.old_logprobs, a.old_logprobs, "old log-probs")
        for name, w in single_weights.items():
            assert_close(split_weights[name], w, f"{aggregation}: {name} after the update")
        assert split_metrics["train_tokens"] == single_metrics["train_tokens"]
        assert abs(split_metrics["loss"] - single_metrics["loss"]) <= 1e-4 * max(1.0, abs(single_metrics["loss"]))


CHECKS = {f.__name__: f for f in (check_forward_backward, check_dispatch_uneven, check_checkpoint_round_trip,
                                  check_sharded_load, check_greedy_decode, check_reward_model_data_parallel,
                                  check_data_parallel_rollouts, check_data_parallel_update)}


# ------------------------------------------------------------------------------------------ the harness
def _worker(rank: int, world: int, port: int, names: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name in names:
            work = Path(out_dir) / name
            work.mkdir(exist_ok=True)
            try:
                CHECKS[name](rank, world, work)
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
            (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        mesh_module.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(world: int, names: list[str], out_dir: Path) -> dict[int, dict[str, str]]:
    """Spawn ``world`` gloo ranks running ``names``; returns rank -> check -> "ok" or a traceback."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_worker, args=(world, _free_port(), names, str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    error = None
    try:
        while not ctx.join(timeout=JOB_TIMEOUT_S):
            pass
    except Exception as e:  # a rank crashed or timed out: report it with every unfinished check
        error = f"{type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = {}
    for r in range(world):
        path = out_dir / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.is_file() else {}
        for name in names:
            results[r].setdefault(name, f"rank {r} did not finish this check ({error or 'no result'})")
    return results


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One spawned job per world size, run on first use."""
    cache: dict[int, dict] = {}
    plan = {2: list(CHECKS), 4: ["check_forward_backward", "check_dispatch_uneven", "check_data_parallel_update"]}

    def results(world: int) -> dict[int, dict[str, str]]:
        if world not in cache:
            cache[world] = run_job(world, plan[world], tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]

    return results


def assert_check(results: dict[int, dict[str, str]], name: str) -> None:
    failures = {r: res[name] for r, res in results.items() if res[name] != "ok"}
    assert not failures, "\n".join(f"--- rank {r}:\n{tb}" for r, tb in failures.items())


@pytest.mark.parametrize("world", [2, 4])
def test_forward_backward_and_step_match_single_process(job, world):
    assert_check(job(world), "check_forward_backward")


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_dispatch_uneven_and_empty(job, world):
    assert_check(job(world), "check_dispatch_uneven")


def test_dcp_round_trip_and_published_conversion(job):
    assert_check(job(2), "check_checkpoint_round_trip")


def test_published_checkpoint_loads_sharded(job):
    assert_check(job(2), "check_sharded_load")


def test_expert_parallel_greedy_decode_matches_single_process(job):
    assert_check(job(2), "check_greedy_decode")


def test_reward_model_from_sharded_policy_trains_data_parallel(job):
    assert_check(job(2), "check_reward_model_data_parallel")


def test_data_parallel_rollouts_match_single_process(job):
    assert_check(job(2), "check_data_parallel_rollouts")


@pytest.mark.parametrize("world", [2, 4])  # 4 ranks: a minibatch of 3 sequences leaves one rank a stand-in
def test_data_parallel_grpo_update_matches_single_process(job, world):
    assert_check(job(world), "check_data_parallel_update")


TRAIN_YAML = """
run: {{out_dir: {out}, seed: 0, threads: 1, save_every: 2, progress: false}}
model:
  preset: tiny
  max_seq_len: 96
  overrides: {{hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 32, num_hidden_layers: 2,
    num_attention_heads: 2, num_key_value_heads: 1, head_dim: 32, num_experts: 8, num_experts_per_tok: 2}}
task:
  families: [basic_arithmetic]
  configs:
    basic_arithmetic: {{min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1, operators: [+],
                        allow_parentheses: false, allow_negation: false}}
  train_size: 32
  eval_size: 2
  eval_samples: 1
  eval_max_new_tokens: 4
sft: {{num_examples: 32, steps: 2, batch_size: 4, warmup_steps: 1}}
"""


def train_under_torchrun(tmp_path: Path, config_yaml: str, stage: str) -> tuple[Path, list[dict]]:
    """`torchrun -m ringkern train --stage STAGE` with 2 gloo ranks on ``config_yaml`` (its ``{out}`` filled in);
    asserts it exits cleanly and returns (the run directory, its metrics records)."""
    out = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(config_yaml.format(out=out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "ringkern", "train", "--config", str(config), "--stage", stage]
    # CPU ranks on any machine (a one-GPU machine cannot give each rank a device of its own)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-4000:]
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_trainer_runs_under_torchrun(tmp_path):
    """`torchrun -m ringkern train` with 2 gloo ranks: one metrics log (rank 0), a DCP training state,
    a published model that loads."""
    out, records = train_under_torchrun(tmp_path, TRAIN_YAML, "sft")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert all(r["loss"] is not None for r in records if r["kind"] == "train")
    state = out / "sft" / "state" / "step-000002.dcp"
    assert (state / ".metadata").is_file() and len(list(state.glob("*.distcp"))) == 2
    model = load_pretrained(out / "sft" / "model")
    assert model.config.num_experts == 8


RLHF_YAML = TRAIN_YAML + """reward_model: {{num_pairs: 16, eval_fraction: 0.25, steps: 2, batch_size: 2}}
rlhf:
  grpo: {{steps: 1, prompts_per_step: 2, group_size: 2, max_new_tokens: 4, minibatch_size: 4,
         rollout_parallelism: data}}
"""


def test_rlhf_stage_runs_under_torchrun(tmp_path):
    """`torchrun -m ringkern train --stage rlhf` with 2 gloo ranks: the reward model (gathered from the sharded
    policy, trained data parallel) is logged and saved once, then one GRPO step on its scores with
    data-parallel rollouts (one prompt per rank)."""
    out, records = train_under_torchrun(tmp_path, RLHF_YAML, "rlhf")
    rm_train = [r for r in records if r.get("stage") == "reward_model" and r["kind"] == "train"]
    assert [r["step"] for r in rm_train] == [1, 2] and all(math.isfinite(r["loss"]) for r in rm_train)
    assert any(r.get("stage") == "rlhf" and r["kind"] == "eval" for r in records)
    reward_model = RewardModel.from_pretrained(out / "rlhf" / "reward_model")
    assert reward_model.config.num_experts == 8
    assert load_pretrained(out / "rlhf" / "model").config.num_experts == 8

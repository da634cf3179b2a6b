"""ringkern.train: group advantages, the correction modes of the trainer's loss against hand-computed values,
an all-masked batch, exact resume, the NaN guard, config parsing, and a few-step smoke run of every stage."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from ringkern import RingConfig, RingFlashModel
from ringkern.train.config import GRPOConfig, SFTConfig, TrainConfig, config_from_dict, load_config
from ringkern.train.grpo import (Rollout, collate_rollouts, group_advantages, informative_groups, k3_kl,
                                 policy_loss, response_logprobs)
from ringkern.train.sft import collate, train_sft
from ringkern.train.state import NonFiniteError, NonFiniteGuard, optimizer_step

REPO = Path(__file__).resolve().parents[1]
# A model small enough that a training step takes milliseconds: 1 dense + 1 MoE layer + MTP.
MICRO = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "num_experts": 4,
         "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}


def micro_model(seed: int = 0) -> RingFlashModel:
    torch.manual_seed(seed)
    return RingFlashModel(RingConfig.from_preset("tiny", **MICRO))


# ------------------------------------------------------------------------------ advantages
def test_group_advantages_normalize_within_groups_and_zero_spread_gives_zero():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]))  # mean 0.5, population std 0.5
    assert torch.equal(adv[4:8], torch.zeros(4))  # all equal: exactly zero, no 0/0
    expected = (torch.tensor([0.0, 0.0, 0.0, 1.0]) - 0.25) / math.sqrt(0.25 * 0.75)
    assert torch.allclose(adv[8:], expected)
    assert informative_groups(rewards, 4).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards[:5], group_size=4)


def test_zero_advantage_sequences_give_no_gradient():
    model = micro_model()
    batch = _batch(model, advantages=(0.0, 0.0))
    loss, _, _ = policy_loss(model, batch, GRPOConfig())
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# ------------------------------------------------------------------- loss vs hand computation
def _rollouts(adv=(1.0, -0.5)) -> list[Rollout]:
    prompts = [[4, 20, 21, 5], [4, 30, 5]]
    responses = [[40, 41, 42], [50, 51]]
    return [Rollout(p, r, torch.zeros(len(r)), 0.0, True, advantage=a) for p, r, a in zip(prompts, responses, adv)]


def _batch(model, advantages=(1.0, -0.5), ratio_log=None, k_log=None):
    """A 2-sequence batch (3 + 2 response tokens) whose log r and log k per token are chosen."""
    rollouts = _rollouts(advantages)
    batch = collate_rollouts(rollouts, pad_id=2, device=torch.device("cpu"))
    logp = response_logprobs(model, batch, temperature=1.0)
    ratio_log = torch.zeros(5) if ratio_log is None else torch.tensor(ratio_log)
    k_log = torch.zeros(5) if k_log is None else torch.tensor(k_log)
    batch.old_logprobs = logp - ratio_log  # r = exp(logp - old)
    batch.rollout_logprobs = batch.old_logprobs - k_log  # k = exp(old - rollout)
    return batch


RATIO = [0.5, -0.5, 0.1, 0.3, -0.05]  # r = e^0.5 (clipped for A>0), e^-0.5, ...
K = [math.log(0.3), 0.0, math.log(6.0), math.log(3.0), math.log(1.5)]  # below, in, above, in, in the band


def _hand_loss(correction: str, adv=(1.0, -0.5), eps=0.2, alpha=0.5, beta=5.0, cap=2.0) -> float:
    per_seq = []
    for seq, a in ((range(0, 3), adv[0]), (range(3, 5), adv[1])):
        terms = []
        for t in seq:
            r, k = math.exp(RATIO[t]), math.exp(K[t])
            surrogate = min(r * a, min(max(r, 1 - eps), 1 + eps) * a)
            weight = {"none": 1.0, "tis": min(k, cap), "icepop": k if alpha <= k <= beta else 0.0}[correction]
            terms.append(weight * surrogate)
        per_seq.append(sum(terms) / len(terms))  # masked tokens still count in |y_i|
    return -sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("correction", ["icepop", "tis", "none"])
def test_policy_loss_matches_hand_computed_values(correction):
    model = micro_model()
    batch = _batch(model, ratio_log=RATIO, k_log=K)
    loss, metrics, counts = policy_loss(model, batch, GRPOConfig(correction=correction))
    assert loss.item() == pytest.approx(_hand_loss(correction), abs=1e-5)
    assert metrics["masked_low_frac"].item() == pytest.approx(1 / 5)
    assert metrics["masked_high_frac"].item() == pytest.approx(1 / 5)
    assert metrics["num_tokens"].item() == 5
    assert metrics["mean_abs_logp_diff"].item() == pytest.approx(sum(abs(k) for k in K) / 5, abs=1e-5)
    # clipped: only token 0 (r = e^0.5 > 1.2 with A > 0); token 3 has r > 1.2 but A < 0
    assert metrics["clip_frac"].item() == pytest.approx(1 / 5)
    assert set(counts) == {1}  # RL runs no MTP layer: the counts are the one MoE decoder layer's
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_update_raises_the_log_prob_of_positive_advantage_sequences():
    model = micro_model()
    batch = _batch(model, advantages=(1.0, -1.0))
    before = response_logprobs(model, batch, 1.0)
    loss, _, _ = policy_loss(model, batch, GRPOConfig())
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    change = response_logprobs(model, batch, 1.0) - before
    assert change[:3].sum() > 0 > change[3:].sum()


def test_kl_term_is_added_with_its_coefficient():
    model = micro_model()
    batch = _batch(model, ratio_log=RATIO, k_log=K)
    logp = batch.old_logprobs + torch.tensor(RATIO)
    batch.ref_logprobs = logp - 0.25
    base, _, _ = policy_loss(model, batch, GRPOConfig())
    with_kl, metrics, _ = policy_loss(model, batch, GRPOConfig(kl_coef=0.1))
    k3 = math.exp(-0.25) + 0.25 - 1
    assert metrics["kl_ref"].item() == pytest.approx(k3, abs=1e-6)
    assert with_kl.item() == pytest.approx(base.item() + 0.1 * k3, abs=1e-6)
    assert k3_kl(logp, logp, torch.ones(5, dtype=torch.bool)).item() == 0.0


def test_all_masked_batch_gives_zero_loss_and_finite_metrics():
    model = micro_model()
    batch = _batch(model, ratio_log=RATIO, k_log=[math.log(100.0)] * 5)  # every k far above beta
    loss, metrics, _ = policy_loss(model, batch, GRPOConfig(correction="icepop"))
    loss.backward()
    assert loss.item() == 0.0
    assert metrics["masked_high_frac"].item() == 1.0
    assert all(math.isfinite(v.item()) for v in metrics.values())
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)
    batch.loss_mask = torch.zeros_like(batch.loss_mask)  # no loss token at all
    loss, metrics, _ = policy_loss(model, batch, GRPOConfig(correction="icepop"))
    assert loss.item() == 0.0 and all(math.isfinite(v.item()) for v in metrics.values())


def test_routing_replay_reuses_the_rollout_experts():
    model = micro_model()
    rollouts = _rollouts()
    free = collate_rollouts(rollouts, 2, torch.device("cpu"))
    recorded = model(free.input_ids, attention_mask=free.attention_mask, compute_mtp=False).expert_ids[1]
    forced = torch.zeros_like(recorded)
    forced[..., 1] = 1  # every token to experts (0, 1)
    for i, r in enumerate(rollouts):
        r.expert_ids = {1: forced[i, : len(r.prompt_ids) + len(r.response_ids) - 1]}
    replay = collate_rollouts(rollouts, 2, torch.device("cpu"), routing_replay=True, top_k=2)
    out = model(replay.input_ids, attention_mask=replay.attention_mask, expert_ids=replay.expert_ids,
                compute_mtp=False)
    assert torch.equal(out.expert_ids[1], forced)
    assert not torch.allclose(response_logprobs(model, replay, 1.0), response_logprobs(model, free, 1.0))


# ------------------------------------------------------------------ resume and the NaN guard
def _examples(n=24):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        p = torch.randint(8, 500, (int(torch.randint(3, 7, (), generator=gen)),), generator=gen).tolist()
        r = torch.randint(8, 500, (int(torch.randint(2, 9, (), generator=gen)),), generator=gen).tolist()
        out.append((p, r))
    return out


def _sft(tmp_path, steps, *, resume=False, save_every=0, lr=3e-3, max_bad_steps=3):
    model = micro_model()
    cfg = SFTConfig(steps=steps, batch_size=4, warmup_steps=2, lr=lr)
    return train_sft(model, _examples(), cfg, out_dir=tmp_path / "sft", run_dir=tmp_path, seed=0, pad_id=2,
                     device=torch.device("cpu"), save_every=save_every, resume=resume, progress=False,
                     max_bad_steps=max_bad_steps)


def test_resume_continues_bit_identically(tmp_path):
    straight = _sft(tmp_path / "a", 5, save_every=3)  # leaves the state after step 3 as the newest
    torch.manual_seed(1234)  # a different global RNG state: the checkpoint must restore it
    resumed = _sft(tmp_path / "a", 5, resume=True)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight[3:]]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight[3:]]


def test_non_finite_step_is_skipped_and_the_run_aborts_after_k(tmp_path):
    model = micro_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    batch = collate(_examples(4), pad_id=2)
    loss, _ = model.sft_loss(batch.input_ids, batch.labels, attention_mask=batch.attention_mask)
    (loss * float("nan")).backward()
    guard = NonFiniteGuard(max_bad_steps=2)
    result = optimizer_step(model, opt, sched, loss * float("nan"), guard, step=1, grad_clip=1.0)
    assert result["skipped"] == 1.0 and guard.in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NonFiniteError, match="2 non-finite"):
        guard.record(False, step=2)
    # Through the trainer: a huge lr blows the weights up at step 1, steps 2 and 3 are skipped, then abort.
    with pytest.raises(NonFiniteError):
        _sft(tmp_path, 6, lr=1e30, max_bad_steps=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0.0, 1.0]
    assert None in (records[1]["loss"], records[1]["grad_norm"])  # NaN/Inf is written as null


# ---------------------------------------------------------------------------------- config
def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"run": {"seed": 7}, "rlvr": {"lr": 1e-4, "correction": "tis"},
                                     "rlhf": {"grpo": {"steps": 3}}, "model": {"overrides": {"hidden_size": 64}}}))
    cfg = load_config(path, ["rlvr.alpha=0.25", "rlvr.routing_replay=true", "sft.lr=1", "rlhf.grpo.lr=3e-5", "task.families=[gcd]",
                             "model.overrides.num_experts=8", "model.init_from=null"])
    assert (cfg.run.seed, cfg.rlvr.lr, cfg.rlvr.correction, cfg.rlhf.grpo.steps) == (7, 1e-4, "tis", 3)
    assert cfg.rlvr.alpha == 0.25 and cfg.rlvr.routing_replay is True
    assert cfg.sft.lr == 1.0 and isinstance(cfg.sft.lr, float) and cfg.rlhf.grpo.lr == 3e-5
    assert cfg.task.families == ["gcd"] and cfg.model.overrides == {"hidden_size": 64, "num_experts": 8}
    assert cfg.rlvr.beta == GRPOConfig().beta  # untouched defaults stay
    with pytest.raises(ValueError, match="unknown"):
        load_config(None, ["rlvr.betta=3"])
    with pytest.raises(ValueError, match="expected"):
        load_config(None, ["sft.steps=many"])
    with pytest.raises(ValueError, match="section.field=value"):
        load_config(None, ["sft.steps"])


def test_demo_yaml_matches_the_demo_settings():
    from ringkern.train.demo import DEMO_SETTINGS, demo_config

    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()) == DEMO_SETTINGS
    assert demo_config().to_dict() == load_config(REPO / "configs" / "demo.yaml").to_dict()
    assert load_config(REPO / "configs" / "ring_flash_2.0.yaml").model.preset == "ring-flash-2.0"


def test_demo_rl_updates_span_many_prompts():
    """At the demo's size an update over a few prompts fits those prompts and lowers held-out accuracy
    (docs/demo_rlvr.md): each RL step of the demo makes one update over all of its prompts' rollouts."""
    from ringkern.train.demo import demo_config

    cfg = demo_config()
    for grpo in (cfg.rlvr, cfg.rlhf.grpo):
        assert grpo.prompts_per_step >= 64
        assert grpo.minibatch_size >= grpo.prompts_per_step * grpo.group_size


# ----------------------------------------------------------------------------- smoke runs
def _smoke_config(out_dir) -> TrainConfig:
    grpo = {"steps": 2, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6, "minibatch_size": 4,
            "lr": 1e-3}
    return config_from_dict({
        "run": {"out_dir": str(out_dir), "progress": False, "save_every": 1},
        "model": {"overrides": MICRO, "max_seq_len": 96},
        "task": {"families": ["chain_sum"], "train_size": 24, "eval_size": 3, "eval_max_new_tokens": 6, "eval_samples": 2,
                 "configs": {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}},
        "sft": {"num_examples": 16, "steps": 2, "batch_size": 4},
        "rlvr": {**grpo, "routing_replay": True, "kl_coef": 0.05, "rollout_logprob_noise": 0.1},
        "reward_model": {"num_pairs": 8, "steps": 2, "batch_size": 4},
        "rlhf": {"rule_weight": 0.5, "grpo": {**grpo, "steps": 1}},
    })


def test_every_stage_runs_a_few_steps_and_plots(tmp_path):
    from ringkern.cli import main
    from ringkern.train import run_stages

    out = tmp_path / "run"
    summaries = run_stages(_smoke_config(out), "all")
    assert set(summaries) == {"sft", "rlvr", "rlhf"}
    assert 0.0 <= summaries["rlhf"]["rm_accuracy"] <= 1.0
    for stage in ("sft", "rlvr", "rlhf"):
        assert (out / stage / "model" / "config.json").is_file()
    assert (out / "rlhf" / "reward_model" / "score_head.safetensors").is_file()
    assert list((out / "rlvr" / "state").glob("step-*.pt"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in records if r["stage"] == "rlvr" and r["kind"] == "train"]
    assert len(rl) == 2 and all("reward" in r and "informative_group_frac" in r for r in rl)
    assert any((out / "tensorboard").iterdir())
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "accuracy.png").is_file() and (out / "plots" / "sft_loss.png").is_file()

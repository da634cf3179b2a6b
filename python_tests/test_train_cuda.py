"""The trainer's CUDA path: bf16 autocast over fp32 master weights, the fused loss kernels, the sync-free MoE
kernels and the Engine's rollouts, on the tiny preset. (`ringkern demo` itself needs reasoning-gym, which the
offline GPU machine lacks.) Skipped on the CPU."""
import math

import torch

from conftest import requires_cuda
from ringkern import Engine, RingConfig, RingFlashModel, SamplingParams
from ringkern.train.config import GRPOConfig, SFTConfig
from ringkern.train.grpo import Rollout, collate_rollouts, policy_loss, response_logprobs
from ringkern.train.sft import train_sft

CUDA = torch.device("cuda")


def _model(seed=0):
    torch.manual_seed(seed)
    return RingFlashModel(RingConfig.from_preset("tiny")).to(CUDA)


@requires_cuda
def test_cuda_sft_steps_lower_the_loss(tmp_path):
    model = _model()
    # a learnable pattern: the response repeats the prompt's last token
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(64):
        p = torch.randint(8, 500, (5,), generator=gen).tolist()
        examples.append((p, [p[-1]] * 4))
    metrics = train_sft(model, examples, SFTConfig(steps=40, batch_size=16, warmup_steps=2, lr=3e-3),
                        out_dir=tmp_path / "sft", run_dir=tmp_path, seed=0, pad_id=2, device=CUDA, progress=False)
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


@requires_cuda
def test_cuda_grpo_update_from_engine_rollouts():
    model = _model(1)
    prompts = [[4, 20, 21, 5], [4, 30, 5]]
    comps = Engine(model, max_batch=4, max_seq_len=64).generate(
        prompts, SamplingParams(temperature=1.0, n=2, seed=0, max_new_tokens=6, ignore_eos=True))
    advantages = [1.0, -1.0, 1.0, -1.0]
    rollouts = [Rollout(prompts[i // 2], c.token_ids, torch.tensor(c.logprobs), 0.0, False, advantage=a)
                for i, (c, a) in enumerate(zip(comps, advantages))]
    batch = collate_rollouts(rollouts, pad_id=2, device=CUDA)
    batch.old_logprobs = response_logprobs(model, batch, 1.0)
    batch.rollout_logprobs = torch.cat([r.rollout_logprobs for r in rollouts]).to(CUDA)
    # fp32 engine vs the bf16-autocast training path: a small, nonzero mismatch
    gap = (batch.old_logprobs - batch.rollout_logprobs).abs()
    assert 0 < gap.mean().item() < 0.1
    loss, metrics, counts = policy_loss(model, batch, GRPOConfig())
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v.item()) for v in metrics.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    change = response_logprobs(model, batch, 1.0) - batch.old_logprobs
    lengths = [len(r.response_ids) for r in rollouts]
    per_seq = [c.sum().item() for c in change.split(lengths)]
    assert per_seq[0] + per_seq[2] > 0 > per_seq[1] + per_seq[3]

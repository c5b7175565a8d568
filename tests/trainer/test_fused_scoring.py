"""The fused scoring pass: where TRL runs its own no-gradient forward over the completions (old log-probs, or
reference log-probs with `mig_likelihood_model="reference"`), MIG's scoring pass computes those log-probs as well and
TRL's forward is skipped. Fused and unfused trainers, on the same weights and the same scripted completions, must give
the same old/reference log-probs, l_k, advantages and loss; the fused one must not call TRL's forward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer

from trl_mig import MIGGRPOTrainer
from trl_mig.builtin.tiny import build_tiny_model

from helpers import build_bpe_tokenizer, cpu_config, scripted_batch, scripted_rollout, SCRIPT, save_tiny_model

ATOL = 1e-5
# Advantages divide the l_k gains by their group's spread (~1e-2 with these tiny models): the l_k's float32 rounding
# (~1e-7; where the completion continues a step with the scaffold, the fused pass takes those tokens from the
# completion, a different summation order) can come out ~100x larger there.
ADVANTAGE_ATOL = 1e-4


@contextlib.contextmanager
def counting_trl_forwards():
    """Count the no-gradient calls of GRPOTrainer's own log-prob forward (old and reference log-probs)."""
    calls = []
    original = GRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            calls.append(kwargs.get("batch_size"))
        return original(self, *args, **kwargs)

    GRPOTrainer._get_per_token_logps_and_entropies = counted
    try:
        yield calls
    finally:
        GRPOTrainer._get_per_token_logps_and_entropies = original


def trainer_pair(tmp_path, tokenizer, model_factory, **overrides):
    """Two trainers on identical weights, one fused and one not; `model_factory()` gives a fresh model or path."""
    made = []
    for fuse in (True, False):
        trainer = MIGGRPOTrainer(
            model_factory(),
            args=cpu_config(tmp_path / f"fuse{fuse}", mig_fuse_scoring=fuse, **overrides),
            train_dataset=Dataset.from_list(scripted_batch()),
            processing_class=tokenizer,
            rollout_func=scripted_rollout(SCRIPT),
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        made.append(trainer)
    return made


def generate_both(fused, plain, batch=None):
    batch = batch or scripted_batch()
    outputs, calls = [], []
    for trainer in (fused, plain):
        with counting_trl_forwards() as counted:
            outputs.append(trainer._generate_and_score_completions(batch))
        calls.append(len(counted))
    return outputs, calls


def assert_same_batch(fused_out, plain_out, key):
    mask = plain_out["completion_mask"].bool()
    assert key in fused_out and key in plain_out
    got, expected = fused_out[key], plain_out[key]
    assert got.shape == expected.shape
    assert torch.allclose(got[mask], expected[mask], atol=ATOL), (got[mask] - expected[mask]).abs().max()
    assert torch.isfinite(got).all()
    assert torch.allclose(fused_out["advantages"], plain_out["advantages"], atol=ADVANTAGE_ATOL)


def assert_same_loss(fused, plain, fused_out, plain_out):
    losses = [trainer._compute_loss(trainer.model, out) for trainer, out in ((fused, fused_out), (plain, plain_out))]
    assert torch.allclose(losses[0], losses[1], atol=ATOL), losses


def same_logliks(fused, plain):
    """Both trainers' per-completion MIG gains (sum over steps of the l_k watermark gains), from the completions
    table."""
    return fused._logs["extra"]["mig_gain"], plain._logs["extra"]["mig_gain"]


@pytest.mark.parametrize(
    "tokenizer_kind, options",
    [
        ("char", dict(steps_per_generation=2)),  # generation not aligned with optimizer steps: old log-probs
        ("char", dict(num_iterations=2, temperature=0.7)),  # TRL's temperature on the old log-probs, not on l_k
        # the text after a step: a completion that wrote the answer scores l_K from its own logits, with no copy
        ("char", dict(num_iterations=2, mig_scaffold="</think>\n<answer>")),
        ("char", dict(steps_per_generation=2, mask_truncated_completions=True, mig_scoring_batch_size=3)),
        ("char", dict(gradient_accumulation_steps=2, steps_per_generation=3)),
        # micro-batches: the fused pass takes TRL's rows per forward (4) when mig_scoring_batch_size is smaller
        ("bpe", dict(steps_per_generation=2, per_device_train_batch_size=4, mig_scoring_batch_size=1)),
    ],
)
def test_fused_old_logps_equal_trls(tmp_path, char_tokenizer, tokenizer_kind, options):
    tokenizer = char_tokenizer if tokenizer_kind == "char" else build_bpe_tokenizer()
    fused, plain = trainer_pair(tmp_path, tokenizer, lambda: build_tiny_model(tokenizer).float(), **options)
    (fused_out, plain_out), calls = generate_both(fused, plain)
    assert calls == [0, 1], "fused: TRL's old-logp forward is not run; unfused: it is"
    assert_same_batch(fused_out, plain_out, "old_per_token_logps")
    gains = same_logliks(fused, plain)
    assert torch.allclose(torch.tensor(gains[0]), torch.tensor(gains[1]), atol=ATOL, equal_nan=True)
    assert_same_loss(fused, plain, fused_out, plain_out)
    # the completions of a prompt share l_0 (the second prompt's four are identical): both passes score it once
    shared = [trainer._metrics["train"]["mig/scored_prefix_frac"][-1] for trainer in (fused, plain)]
    assert shared[0] == shared[1] < 0.6


def test_without_trls_forward_nothing_is_fused(tmp_path, char_tokenizer):
    """The default configuration: TRL runs no old-logp forward, so the scoring pass runs alone, as before."""
    fused, plain = trainer_pair(tmp_path, char_tokenizer, lambda: build_tiny_model(char_tokenizer).float())
    (fused_out, plain_out), calls = generate_both(fused, plain)
    assert calls == [0, 0]
    assert "old_per_token_logps" not in fused_out
    assert torch.allclose(fused_out["advantages"], plain_out["advantages"], atol=ADVANTAGE_ATOL)


def test_prefix_scoring_falls_back_to_trls_forward(tmp_path, char_tokenizer):
    fused, plain = trainer_pair(
        tmp_path, char_tokenizer, lambda: build_tiny_model(char_tokenizer).float(),
        steps_per_generation=2, mig_scoring_method="prefix",
    )
    (fused_out, plain_out), calls = generate_both(fused, plain)
    assert calls == [1, 1]
    assert_same_batch(fused_out, plain_out, "old_per_token_logps")


def test_reference_model_forward_is_fused(tmp_path, char_tokenizer):
    """beta > 0 with a reference model and mig_likelihood_model='reference': one reference pass gives both."""
    path = str(save_tiny_model(tmp_path / "tiny", char_tokenizer))
    fused, plain = trainer_pair(tmp_path, char_tokenizer, lambda: path, beta=0.1, mig_likelihood_model="reference")
    with torch.no_grad():  # policy and reference must differ, or the test could not tell them apart
        for parameter in list(fused.model.parameters()) + list(plain.model.parameters()):
            parameter.mul_(1.01)
    (fused_out, plain_out), calls = generate_both(fused, plain)
    assert calls == [0, 1]
    assert_same_batch(fused_out, plain_out, "ref_per_token_logps")
    assert_same_loss(fused, plain, fused_out, plain_out)


@pytest.mark.parametrize("likelihood_model", ["policy", "reference"])
def test_lora_adapters_on_and_off(tmp_path, char_tokenizer, likelihood_model):
    """LoRA: old log-probs with the adapters on; reference log-probs (beta > 0) with them off, each fused into the
    pass that scores l_k with the same adapters."""
    from peft import LoraConfig

    def make(fuse):
        trainer = MIGGRPOTrainer(
            build_tiny_model(char_tokenizer).float(),
            args=cpu_config(tmp_path / f"lora{fuse}", mig_fuse_scoring=fuse, steps_per_generation=2, beta=0.1,
                            mig_likelihood_model=likelihood_model),
            train_dataset=Dataset.from_list(scripted_batch()),
            processing_class=char_tokenizer,
            rollout_func=scripted_rollout(SCRIPT),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        torch.manual_seed(3)
        with torch.no_grad():  # trained-looking adapters, so that adapters on and off differ
            for name, parameter in trainer.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.5)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        return trainer

    fused, plain = make(True), make(False)
    (fused_out, plain_out), calls = generate_both(fused, plain)
    assert calls == [1, 2], "one of TRL's two forwards (old, reference) is replaced"
    assert_same_batch(fused_out, plain_out, "old_per_token_logps")
    assert_same_batch(fused_out, plain_out, "ref_per_token_logps")
    assert not torch.allclose(plain_out["old_per_token_logps"], plain_out["ref_per_token_logps"], atol=1e-3)
    assert_same_loss(fused, plain, fused_out, plain_out)


def test_agent_turns_with_tool_mask(tmp_path, char_tokenizer):
    """A rollout_func with an env_mask (TRL's tool_mask): steps follow turns, tool results are in the pass."""
    from test_agent_trainer import make_trainer as agent_trainer, batch as agent_batch

    fused, plain = (
        agent_trainer(tmp_path / f"agent{fuse}", char_tokenizer, steps_per_generation=2, mig_fuse_scoring=fuse)
        for fuse in (True, False)
    )
    plain.model.load_state_dict(fused.model.state_dict())
    (fused_out, plain_out), calls = generate_both(fused, plain, agent_batch())
    assert calls == [0, 1]
    assert (fused_out["tool_mask"] == 0).any()
    assert_same_batch(fused_out, plain_out, "old_per_token_logps")
    assert fused._logs["extra"]["mig_steps"] == plain._logs["extra"]["mig_steps"]
    assert_same_loss(fused, plain, fused_out, plain_out)


@pytest.mark.parametrize("architecture", ["llava"])
def test_image_prompts(tmp_path, architecture):
    """Image prompts, LoRA, sampled completions: both trainers sample the same completions from the same seed.
    (The tiny Qwen2-VL of test_vision cannot take this path: TRL's own old-logp forward fails on its batch, whose
    processor pads mm_token_type_ids differently from the prompt ids.)"""
    from test_vision import vlm_trainer

    made = []
    for fuse in (True, False):
        torch.manual_seed(0)
        trainer, _ = vlm_trainer(tmp_path / f"vlm{fuse}", architecture, steps_per_generation=2,
                                 mig_fuse_scoring=fuse)
        trainer.current_gradient_accumulation_steps = 1
        made.append(trainer)
    fused, plain = made
    plain.model.load_state_dict(fused.model.state_dict())
    batch = [fused.train_dataset[i] for i in range(8)]
    outputs, calls = [], []
    for trainer in made:
        torch.manual_seed(1)
        with counting_trl_forwards() as counted:
            outputs.append(trainer._generate_and_score_completions(batch))
        calls.append(len(counted))
    assert calls == [0, 1]
    assert torch.equal(outputs[0]["completion_ids"], outputs[1]["completion_ids"])
    assert_same_batch(outputs[0], outputs[1], "old_per_token_logps")
    assert_same_loss(fused, plain, *outputs)


# ------------------------------------------------------------------------ the default configuration: the generation cache
def sampling_pair(tmp_path, tokenizer, lora=False, **overrides):
    """Two trainers that sample with transformers' generate (no rollout_func), identical weights."""
    from peft import LoraConfig

    from helpers import addition_dataset

    made = []
    for fuse in (True, False):
        torch.manual_seed(0)
        trainer = MIGGRPOTrainer(
            build_tiny_model(tokenizer).float(),
            args=cpu_config(tmp_path / f"gen{fuse}", mig_fuse_scoring=fuse, **overrides),
            train_dataset=addition_dataset(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
            if lora else None,
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        made.append(trainer)
    made[1].model.load_state_dict(made[0].model.state_dict())
    return made


def sample_both(trainers, batch):
    outputs, block_forwards = [], []
    for trainer in trainers:
        torch.manual_seed(7)
        before = trainer.mig_scorer.forward_count
        calls = []
        forward_block = trainer.mig_scorer._forward_block
        trainer.mig_scorer._forward_block = lambda *a, **k: calls.append(1) or forward_block(*a, **k)
        outputs.append(trainer._generate_and_score_completions(batch))
        block_forwards.append(len(calls))
        assert trainer.mig_scorer.forward_count > before
    return outputs, block_forwards


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        # truncated completions whose last step ends at the last token: the cache is extended by that token
        dict(mig_scoring_batch_size=3, max_completion_length=12),
        # LoRA with beta > 0: TRL's reference forward runs (adapters off); l_k come from the policy's cache
        dict(lora=True, beta=0.1, temperature=0.7),
    ],
)
def test_default_configuration_scores_from_the_generation_cache(tmp_path, char_tokenizer, options):
    """No forward of TRL's to fold into: the answer copies run against generate's key/value cache, and give the
    block pass's l_k (same advantages), without a block forward over prompt + completion."""
    fused, plain = sampling_pair(tmp_path, char_tokenizer, **options)
    batch = [fused.train_dataset[i] for i in range(8)]
    (fused_out, plain_out), block_forwards = sample_both((fused, plain), batch)
    assert torch.equal(fused_out["completion_ids"], plain_out["completion_ids"])
    assert block_forwards[0] == 0 and block_forwards[1] > 0
    gains = same_logliks(fused, plain)
    assert torch.allclose(torch.tensor(gains[0]), torch.tensor(gains[1]), atol=ATOL, equal_nan=True)
    assert torch.allclose(fused_out["advantages"], plain_out["advantages"], atol=ADVANTAGE_ATOL)


def generating_rollout(extra_prompt_tokens=0):
    """A `rollout_func` that samples with the policy's own `generate`, from each prompt with `extra_prompt_tokens`
    tokens put before it (0: the prompt TRL is given back), and returns the prompt without them."""

    def rollout(prompts, trainer):
        tokenizer = trainer.processing_class
        prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        fed = [ids[:1] * extra_prompt_tokens + ids for ids in prompt_ids]
        width, pad = max(map(len, fed)), tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in fed])
        with torch.no_grad():
            out = trainer.model.generate(
                input_ids=input_ids, attention_mask=(input_ids != pad).long(), do_sample=True, max_new_tokens=12,
                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
            )
        completions = []
        for row in out[:, width:].tolist():
            cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            completions.append(row[:cut])
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout


@pytest.mark.parametrize("extra_prompt_tokens, from_cache", [(0, True), (2, False)])
def test_a_rollout_func_cache_is_used_only_if_it_holds_the_scored_tokens(
    tmp_path, char_tokenizer, extra_prompt_tokens, from_cache
):
    """A rollout_func that generates with the policy leaves a cache too: it is used when it holds exactly the prompt
    and completion that are scored, and left alone (the block pass scores) when the rollout generated from another
    prompt, whose cache would give other l_k."""
    from helpers import addition_dataset

    made = []
    for fuse in (True, False):
        trainer = MIGGRPOTrainer(
            build_tiny_model(char_tokenizer).float(),
            args=cpu_config(tmp_path / f"roll{fuse}", mig_fuse_scoring=fuse),
            train_dataset=addition_dataset(),
            processing_class=char_tokenizer,
            rollout_func=generating_rollout(extra_prompt_tokens),
        )
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        made.append(trainer)
    made[1].model.load_state_dict(made[0].model.state_dict())
    batch = [made[0].train_dataset[i] for i in range(8)]
    (fused_out, plain_out), block_forwards = sample_both(made, batch)
    assert torch.equal(fused_out["completion_ids"], plain_out["completion_ids"])
    assert (block_forwards[0] == 0) == from_cache and block_forwards[1] > 0
    gains = same_logliks(*made)
    assert torch.allclose(torch.tensor(gains[0]), torch.tensor(gains[1]), atol=ATOL, equal_nan=True)
    assert torch.allclose(fused_out["advantages"], plain_out["advantages"], atol=ADVANTAGE_ATOL)

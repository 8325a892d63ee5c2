"""Flow-GRPO: online GRPO for flow-matching text-to-image models (arXiv 2505.05470), in one file.

Read top to bottom next to the paper, after the notation below:
  1. the math: one small function per equation (sde_step, cps_step, gaussian_log_prob, gaussian_kl,
     group_advantages, normalised_log_ratio), the rollout loop (rollout) and the whole per-step objective
     (grpo_step_objective); plain torch, shared with toy_2d.py;
  2. Config: every command-line flag with its default;
  3. the policy: Stable Diffusion 3.5 Medium + LoRA (diffusers, peft): text, guided velocity, rollout, decode,
     and the model seam SD3Policy that FLUX.1's FluxPolicy (in 5) implements too;
  4. train(), the paper's Algorithm 1 in five numbered phases, after the pieces of one step it calls;
  5. plumbing, out of the reader's path: setup, validation, run folder, checkpoints, text cache, data
     parallelism, EMA and evaluation, metrics, GPU speed, built-in prompts;
  6. the tiny random SD3 and FLUX for CPUs and tests (--model tiny, --model tiny-flux);
  7. main, the command line.
Rewards live in rewards.py.

Conventions (as diffusers' FlowMatchEulerDiscreteScheduler): sigma in [0, 1], sigma = 1 is noise,
x_sigma = (1 - sigma) * x0 + sigma * eps, the model predicts the velocity v ~ eps - x0, sampling goes
from sigma = 1 down to 0, so dt = sigma_next - sigma < 0 and the ODE (Euler) step is x + v * dt.

Notation, paper symbol -> code name (the paper writes a denoising step x_t -> x_{t-1}; the code counts
steps j = 0 .. T-1 from noise, x_j -> x_{j+1}, with x_j at sigmas[j]):
  t (the noise level of x_t)        sigma, sigmas[j];  the next one: sigma_next, sigmas[j + 1]
  Delta t                           dt = sigma_next - sigma (negative)
  sigma_t (diffusion coefficient)   sigma_t = noise_level * sqrt(sigma / (1 - sigma))
  a (noise level)                   noise_level (--noise-level)
  x_{t-1} (the next sample)         prev_x (StepOutput), trajectory.latents[:, j + 1]
  epsilon ~ N(0, I)                 gaussian_noise(...)
  G (group size), c (prompt)        group_size (--group-size), prompts
  A_i (advantage)                   group_advantages(...)
  r_t = pi_theta / pi_old           ratio, formed in grpo_step_objective
  epsilon (clip range)              clip_range (--clip-range)
  beta (KL weight)                  beta (--beta)
  pi_ref                            the same transformer with its LoRA switched off (disable_adapter)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import glob
import io
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
import time
import urllib.parse
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple


def default_cuda_allocator(environ=os.environ):
    """Expandable segments for PyTorch's CUDA caching allocator, unless the user configured it. With fixed-size
    segments the 24 GB recipe fragments its cache: measured on one H100 (issue 13), 14.3 GiB of live tensors held
    21.3 GiB reserved and 22.5 GB by nvidia-smi; with expandable_segments:True 14.55 GiB and 15.7 GB."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


# The allocator reads the variable once, when CUDA first allocates: set it before torch is even imported.
default_cuda_allocator()

import torch  # noqa: E402 (after the allocator's variable, on purpose)

# --------------------------------------------------------------------------------------------------
# 1. The math: one function per equation, plain torch, shared with toy_2d.py
# --------------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    prev_x: torch.Tensor  # x_{j+1}: the next (less noisy) sample
    log_prob: torch.Tensor  # log pi(x_{j+1} | x_j, c), per sample, averaged over non-batch dims
    mean: torch.Tensor  # mean of the Gaussian transition
    std: torch.Tensor  # std of the Gaussian transition (broadcastable to x)


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A float or a [B] tensor as a float tensor that broadcasts over the non-batch dims of `like`."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *[1] * (like.ndim - 1)) if value.ndim else value


def _sde_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 overflow in sigma_t^2 / sigma and lose the tiny log-prob differences GRPO trains on.
    return torch.promote_types(x.dtype, torch.float32)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) per element, averaged over the non-batch dims (one number per sample).

        log p = -(x - mean)^2 / (2 std^2) - log std - 1/2 log(2 pi)

    x is detached: the policy gradient flows through the mean only (paper Sec. 4, "the policy
    pi_theta(x_{t-1} | x_t, c) is an isotropic Gaussian"). Averaging rather than summing follows the
    official code; it makes exp(delta log p) the per-dimension geometric mean of the true ratio,
    which is why the clip range is 1e-4. Where std == 0 (a deterministic ODE step) there is no
    density: 0 is returned so that such steps can be recorded next to SDE steps; they are never trained.
    """
    std = std.expand_as(mean)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_p = -((x.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_p = torch.where(std > 0, log_p, torch.zeros_like(log_p))
    return log_p.mean(dim=tuple(range(1, x.ndim)))


def gaussian_noise(shape, generator, device, dtype):
    """eps ~ N(0, I) drawn on the generator's device (a seeded CPU generator gives the same noise on
    any accelerator), then moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def sde_step(v, x, sigma, sigma_next, noise_level, prev_x=None, generator=None) -> StepOutput:
    """One Euler-Maruyama step of the marginal-preserving reverse SDE (paper Eq. 7-9).

    The reverse-time SDE with the same marginals as the flow ODE dx = v dt is, for rectified flow,
        dx = [ v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v) ] dt + sigma_t dw          (Eq. 8)
    with sigma_t = a * sqrt(sigma / (1 - sigma)), a = noise_level. Discretised (Eq. 9):
        mean     = x + [ v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v) ] dt
        std      = sigma_t * sqrt(|dt|)
        x_{j+1}  = mean + std * eps,   eps ~ N(0, I)
    At sigma = 1, 1 - sigma = 0: as the official code, sigma_next stands in the denominator there,
    sigma_t = a / sqrt(1 - sigma_next), so the first step's std is about a. With a = 0 this is exactly
    the Euler ODE step x + v dt.

    v, x: [B, ...]; sigma, sigma_next: floats or [B] tensors. If prev_x is given, it is scored
    instead of drawn (recomputing the log-prob of a stored rollout). Arithmetic is float32 at least.
    """
    dtype = _sde_dtype(x)
    v, x = v.to(dtype), x.to(dtype)
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = sigma_next - sigma
    one_minus_sigma = torch.where(sigma >= 1, 1 - sigma_next, 1 - sigma)
    sigma_t = noise_level * torch.sqrt(sigma / one_minus_sigma)
    mean = x + (v + sigma_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    std = sigma_t * torch.sqrt(-dt)
    if prev_x is None:
        prev_x = mean + std * gaussian_noise(x.shape, generator, x.device, dtype)
    prev_x = prev_x.to(dtype)
    return StepOutput(prev_x, gaussian_log_prob(prev_x, mean, std), mean, std)


def cps_step(v, x, sigma, sigma_next, noise_level, prev_x=None, generator=None) -> StepOutput:
    """One step of Coefficients-Preserving Sampling (CPS, arXiv 2509.05952), the fix for noisy images.

    With the predicted data x0_hat = x - sigma v and predicted noise x1_hat = x + (1 - sigma) v:
        std      = sigma_next * sin(a pi / 2)
        mean     = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat
        x_{j+1}  = mean + std * eps
    so x_{j+1} carries exactly (1 - sigma_next) of the data and sigma_next of total (unit) noise,
    which is what the model expects at sigma_next. a = 0 is the Euler ODE step.
    Unlike sde_step it is not a discretised SDE (its noise does not vanish as steps shrink): with a
    posterior-mean velocity it keeps the marginal's mean but shrinks its variance (by ~20% in std
    for a Gaussian at a = 0.8; test_cps_keeps_the_mean_and_follows_its_variance_recursion).
    log_prob is the proper Gaussian log-density. The official code (`flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py`, `sde_step_with_logprob()`, sde_type 'cps') uses -mean((x_{j+1} - mean)^2)
    instead, i.e. 2 std^2 * our log_prob up to a constant. std runs from ~0.9 to ~0.008 over the
    schedule, so the two weight the steps up to ~10^4 apart; training uses the official weighting
    (grpo_step_objective with sde_type 'cps'), since its clip range and beta were tuned for it.
    """
    dtype = _sde_dtype(x)
    v, x = v.to(dtype), x.to(dtype)
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * x1_hat
    if prev_x is None:
        prev_x = mean + std * gaussian_noise(x.shape, generator, x.device, dtype)
    prev_x = prev_x.to(dtype)
    return StepOutput(prev_x, gaussian_log_prob(prev_x, mean, std), mean, std)


class Trajectory(NamedTuple):
    latents: torch.Tensor  # [B, T+1, ...]: x at every sigma, from noise to the final sample
    log_probs: torch.Tensor  # [B, T]: log pi_old(x_{j+1} | x_j) recorded in the rollout
    means: torch.Tensor  # [B, T, ...]: mean of pi_old(. | x_j), which RatioNorm needs


def rollout(velocity, x, sigmas, noise_levels, step_fn=sde_step, generator=None) -> Trajectory:
    """Sample from x at sigmas[0] = 1 down to sigmas[-1] = 0 with step_fn (the SDE of Eq. 9, CPS, or the
    ODE where the noise level is 0), recording every x_j and log pi(x_{j+1} | x_j): the trajectory the
    policy gradient is computed on. velocity(x, j) -> v is the policy's velocity at step j (the full run:
    SD3 with CFG; the toy: an MLP); noise_levels: one a for every step, or a single float."""
    xs, log_probs, means = [x], [], []
    for j in range(len(sigmas) - 1):
        a = noise_levels if isinstance(noise_levels, (int, float)) else noise_levels[j]
        out = step_fn(velocity(x, j), x, sigmas[j], sigmas[j + 1], a, generator=generator)
        x = out.prev_x
        xs.append(x)
        log_probs.append(out.log_prob)
        means.append(out.mean)
    return Trajectory(torch.stack(xs, dim=1), torch.stack(log_probs, dim=1), torch.stack(means, dim=1))


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std) -> torch.Tensor:
    """KL(pi_theta || pi_ref) of one step, exact: both are Gaussians with the same std (paper Eq. 10).

        KL = ||mean_theta - mean_ref||^2 / (2 std^2)
           = (|dt| / 2) * (sigma_t (1 - sigma) / (2 sigma) + 1 / sigma_t)^2 * ||v_theta - v_ref||^2

    per sample, averaged over non-batch dims like gaussian_log_prob (the paper sums). std: a float or
    a tensor broadcastable to mean. For the SDE the official code divides by 2 sigma_t^2 instead
    (official `scripts/train_sd3.py`, `main()`, kl_loss), i.e. it leaves |dt| out of the variance:
    official = |dt| * ours, and its beta values are tuned for that scale (see Config.kl_dt_scale).
    For CPS the official std is the full transition std: official = ours.
    """
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    kl = (mean - ref_mean) ** 2 / (2 * std.expand_as(mean) ** 2)
    return kl.mean(dim=tuple(range(1, mean.ndim)))


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, global_std: bool = True, eps: float = 1e-4):
    """Group-relative advantage of each sample (paper Eq. 4).

        A_i = (r_i - mean(r of i's group)) / (std + eps)

    The paper divides by the std of the group; the official configs by the std of all rewards of the
    batch (global_std=True). Both are population stds (ddof 0). A group whose rewards are all equal
    carries no signal and gets exactly 0. Groups may have different sizes.
    """
    rewards = rewards.double()  # the mean of equal float32 rewards is not always exactly that reward
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1
    count = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, group, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(count).index_add_(0, group, rewards) / count
    centred = rewards - mean[group]
    if global_std:
        std = rewards.std(correction=0).expand_as(rewards)
    else:
        std = (torch.zeros_like(count).index_add_(0, group, centred**2) / count).sqrt()[group]
    group_max = torch.full_like(count, -math.inf).scatter_reduce(0, group, rewards, "amax")
    group_min = torch.full_like(count, math.inf).scatter_reduce(0, group, rewards, "amin")
    constant_group = (group_max == group_min)[group]
    advantages = torch.where(constant_group, torch.zeros_like(centred), centred / (std + eps))
    return advantages.float()


def normalised_log_ratio(log_prob, old_log_prob, mean, old_mean, std) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (arXiv 2510.22319, Eq. 8 as other implementations cite it): the per-step
    log-ratio, re-centred and rescaled.

    With x_{j+1} = mean_old + std * eps drawn by the rollout policy and delta = mean_theta - mean_old,
    the plain log-ratio of two Gaussians with the same std is (averaged over dims, as gaussian_log_prob)
        log r_j = mean(eps * delta) / std - mean(delta^2) / (2 std^2)
    Its mean over the noise is -mean(delta^2) / (2 std^2) < 0 (the ratio is biased below 1, so a
    positive advantage rarely reaches the clip at 1 + eps), and its spread ~ |delta| / std changes with
    the step's std. RatioNorm adds the bias back and multiplies by std:
        log r^_j = std * (log r_j + mean(delta^2) / (2 std^2)) = mean(eps * delta)
    which has mean 0 at every step. Official `scripts/train_sd3_GRPO_Guard.py`, `main()` (config.rationorm; fork
    ltt0716/flow_grpo_official at f9a5c45; std there is sqrt_dt * sigma_t), with one difference kept on purpose: its
    bias is `.mean(dim=tuple(range(1, log_prob.ndim)))` of the squared mean difference, an empty tuple for the
    per-sample log_prob, which torch reads as every dim: ONE batch mean per micro-batch, where ours (the paper's)
    is each sample's own.
    log_prob, old_log_prob: [B]; mean, old_mean: [B, ...]; std: a float or one value per sample.
    """
    std = _one_per_sample(std, log_prob)
    bias = ((mean - old_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std**2)
    return (log_prob - old_log_prob + bias) * std


class StepObjective(NamedTuple):
    loss: torch.Tensor  # policy_loss + beta * kl: what is minimised
    policy_loss: torch.Tensor  # the clipped surrogate
    kl: torch.Tensor  # the KL term on the recipe's scale, before multiplication by beta
    approx_kl: torch.Tensor  # 1/2 mean(rho^2) of the recipe's log-ratio rho (before RatioNorm), detached
    clip_fraction: torch.Tensor  # fraction of ratios outside [1 - eps, 1 + eps]: clipfrac_gt_one + clipfrac_lt_one
    clipfrac_gt_one: torch.Tensor  # fraction with r - 1 > eps, detached
    clipfrac_lt_one: torch.Tensor  # fraction with 1 - r > eps, detached
    ratio: torch.Tensor  # [B] the ratio r the surrogate used, detached


def _one_per_sample(value, like: torch.Tensor) -> torch.Tensor:
    """A float, [B] or [B, 1, ...] value (a step's std or dt) as a scalar or a [B] tensor like `like`."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(value.shape[0], -1)[:, 0] if value.ndim else value


def _batch_mean(values: torch.Tensor, weights) -> torch.Tensor:
    return values.mean() if weights is None else (values * weights).sum()


def grpo_step_objective(
    log_prob,
    old_log_prob,
    advantages,
    clip_range: float,
    adv_clip: float = 5.0,
    *,
    sde_type: str = "sde",
    mean=None,
    std=None,
    dt=None,
    ref_mean=None,
    beta: float = 0.0,
    kl_dt_scale: bool = True,
    ratio_norm: bool = False,
    old_mean=None,
    weights=None,
) -> StepObjective:
    """The whole Flow-GRPO objective of one denoising step j, to minimise (paper Eq. 5-6 and Eq. 10):

        L_j = sum_i w_i max( -A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps) ) / d_i  +  beta * sum_i w_i c_i KL_i

    A_i: advantage clipped to +-adv_clip (official); w_i: weights, uniform 1/B by default (a caller
    that masks samples passes weights that sum to 1); eps: clip_range.

    Where the ratio is formed: r_i = exp(rho_i), one per sample, from the log-probs of x_{j+1}
    (averaged over dims, see gaussian_log_prob) under pi_theta (log_prob, with gradient) and under the
    rollout policy pi_old (old_log_prob):
      sde_type 'sde': rho = log pi_theta - log pi_old, the Gaussian ratio of Eq. 5.
      sde_type 'cps': rho = 2 std^2 (log pi_theta - log pi_old), which is the official CPS surrogate's
        difference, -mean((x_{j+1} - mean_theta)^2) + mean((x_{j+1} - mean_old)^2) (see cps_step).
      ratio_norm (GRPO-Guard, SDE only): rho = normalised_log_ratio(...) and d_i = |dt| (its gradient
        reweighting, arXiv 2510.22319 Eq. 12 as cited elsewhere; official `scripts/train_sd3_GRPO_Guard.py`,
        `main()`: policy_loss / sqrt_dt^2); otherwise d_i = 1.
    Where the KL enters: KL_i = gaussian_kl(mean, ref_mean, std), the exact KL of Eq. 10 to the reference
    policy (the frozen model), times c_i = |dt| for the SDE with kl_dt_scale (the official SDE scale,
    which beta was tuned for), else 1 (the official CPS KL is the exact one). No ref_mean: no KL term.
    Inputs: log_prob, old_log_prob, advantages: [B]; mean, ref_mean, old_mean: [B, ...]; std and
    dt = sigma_next - sigma of the step: floats or one value per sample.
    """
    advantages = advantages.clamp(-adv_clip, adv_clip)
    log_ratio = log_prob - old_log_prob
    if sde_type == "cps":
        log_ratio = 2 * _one_per_sample(std, log_prob) ** 2 * log_ratio
    recipe_log_ratio = log_ratio
    if ratio_norm:
        log_ratio = normalised_log_ratio(log_prob, old_log_prob, mean, old_mean, std)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    surrogate = torch.maximum(unclipped, clipped)
    if ratio_norm:
        surrogate = surrogate / _one_per_sample(dt, log_prob).abs()
    policy_loss = _batch_mean(surrogate, weights)
    kl = torch.zeros(())
    if ref_mean is not None:
        per_sample_kl = gaussian_kl(mean, ref_mean, std)
        scale = _one_per_sample(dt, log_prob).abs() if sde_type == "sde" and kl_dt_scale else None
        if scale is not None and scale.ndim:
            per_sample_kl = per_sample_kl * scale
        kl = _batch_mean(per_sample_kl, weights)
        if scale is not None and not scale.ndim:  # one dt for the batch: scaled after the mean, as before
            kl = kl * scale
    loss = policy_loss + beta * kl
    with torch.no_grad():
        approx_kl = 0.5 * _batch_mean(recipe_log_ratio**2, weights)
        # The official clipfrac_gt_one / clipfrac_lt_one (`scripts/train_sd3.py`, `main()`): r - 1 > eps, 1 - r > eps
        above = _batch_mean((ratio - 1 > clip_range).float(), weights)
        below = _batch_mean((1 - ratio > clip_range).float(), weights)
    return StepObjective(loss, policy_loss, kl, approx_kl, above + below, above, below, ratio.detach())


# --------------------------------------------------------------------------------------------------
# 2. The configuration: every field is a command-line flag, its default visible here
# --------------------------------------------------------------------------------------------------


def config_field(default, help, choices=None, repeatable=False):
    """A Config field: its flag's help (saying its default in words where the value alone would not, as
    'default: a built-in set'), the values it takes (choices) and whether the flag may be repeated (its
    values then joined by commas)."""
    return field(default=default, metadata={"help": help, "choices": choices, "repeatable": repeatable})


@dataclass
class Config:
    """Every field is a CLI flag (--group-size 8). Defaults: the official SD3.5-M PickScore recipe
    adapted to one GPU (README maps them to the official 32-GPU numbers); FLUX_RECIPE's for a FLUX model."""

    model: str = config_field(
        "sd3.5-medium",
        "alias (sd3.5-medium, sd3.5-large, sd3-medium, flux.1-dev), hub id, local diffusers folder (SD3 or FLUX), "
        "or 'tiny' / 'tiny-flux' (random CPU models); a FLUX model takes FLUX_RECIPE's defaults",
    )
    reward: str = config_field("pickscore", "reward name, weighted mix 'pickscore=1,aesthetic=0.2', or module:function")
    eval_reward: str = config_field(
        "", "spec as --reward, scored on the evaluation images next to the training reward (default: --reward)"
    )
    reward_model_dir: str = config_field(
        "",
        "NAME=FOLDER: load a model reward's model from a local folder, not the hub; several comma-separated or with "
        "the flag repeated (default: none, every model from the hub)",
        repeatable=True,
    )
    reward_server: str = config_field(
        "127.0.0.1:18085", "HOST:PORT of the GenEval reward server for --reward geneval (yifan123/reward-server)"
    )
    reward_timeout: float = config_field(120.0, "seconds to wait for one answer of a reward server (geneval, vlm)")
    reward_retry_minutes: float = config_field(
        10.0, "a reward server lost mid-run is retried this long (doubling waits), then the run stops, resumable"
    )
    vlm_url: str = config_field(
        "http://127.0.0.1:17140/v1",
        "base URL of the OpenAI-compatible endpoint of --reward vlm (API key: $VLM_API_KEY)",
    )
    vlm_model: str = config_field("UnifiedReward-7b-v1.5", "model name the --reward vlm endpoint serves")
    vlm_template: str = config_field("", "file with the judge's question, {prompt} in it (default: UnifiedReward's)")
    vlm_concurrency: int = config_field(8, "requests to the --reward vlm endpoint at once")
    prompts: str = config_field(
        "", "training prompts, one per line, or a .jsonl of objects with a 'prompt' field (default: a built-in set)"
    )
    eval_prompts: str = config_field("", "held-out prompts for evaluation, as --prompts (default: a built-in set)")
    out: str = config_field("runs/flow_grpo", "output folder")
    seed: int = config_field(0, "seed of the prompt stream, the noise and the LoRA init")
    # Sampling (paper Sec. 4.1 and 4.2)
    resolution: int = config_field(512, "image side in pixels")
    num_steps: int = config_field(10, "denoising steps of a training rollout (denoising reduction: 10, not 40)")
    eval_num_steps: int = config_field(40, "denoising steps of the evaluation ODE")
    guidance_scale: float = config_field(
        4.5, "classifier-free guidance in rollout, training and eval; 1 turns CFG off (FLUX: the guidance embedding's)"
    )
    sde_type: str = config_field(
        "sde", "sde (Flow-GRPO, Eq. 9) or cps (coefficients-preserving sampling)", choices=("sde", "cps")
    )
    noise_level: float = config_field(
        0.7, "a in sigma_t = a sqrt(sigma / (1 - sigma)); for cps, a in std = sigma_next sin(a pi / 2)"
    )
    sde_window: int = config_field(
        0, "Flow-GRPO-Fast: only K consecutive SDE steps (ODE elsewhere), and only they are trained; 0 = all"
    )
    # GRPO (paper Sec. 4.3, Eq. 4-6)
    group_size: int = config_field(8, "images per prompt, G (official: 24)")
    groups_per_step: int = config_field(8, "prompts per step, summed over all ranks (official: 48)")
    batch_size: int = config_field(8, "images per forward pass and rank; a group may span batches and ranks")
    updates_per_step: int = config_field(
        2, "optimizer steps per rollout step, each the mean over an equal share of the informative samples"
    )
    clip_range: float = config_field(
        1e-4, "epsilon of the clipped ratio (log-probs are averaged over dims, hence tiny)"
    )
    adv_clip: float = config_field(5.0, "advantages are clamped to +-adv_clip")
    global_std: bool = config_field(
        True, "normalise advantages by the std of all rewards of the step (official) instead of the group's (paper)"
    )
    beta: float = config_field(0.01, "KL weight (official: 0.01 PickScore, 0.04 GenEval/OCR)")
    kl_dt_scale: bool = config_field(
        True, "sde: KL as the official code, |dt| x the exact KL (beta was tuned for it); cps: exact, as official"
    )
    ratio_norm: bool = config_field(
        False, "GRPO-Guard (arXiv 2510.22319): RatioNorm of the log-ratio, 1/|dt| gradient reweighting (sde only)"
    )
    train_fraction: float = config_field(
        0.99, "train the first int(num_steps * fraction) steps: the last (sigma 0.009 -> 0) never"
    )
    # Optimiser and LoRA
    lr: float = config_field(3e-4, "AdamW learning rate (constant)")
    weight_decay: float = config_field(1e-4, "AdamW weight decay")
    max_grad_norm: float = config_field(1.0, "gradient-norm clip")
    lora_rank: int = config_field(32, "LoRA rank r")
    lora_alpha: int = config_field(64, "LoRA alpha")
    ema: bool = config_field(True, "evaluate and save an EMA of the LoRA (decay min((1+k)/(10+k), 0.9))")
    ema_every: int = config_field(8, "update the EMA every this many optimizer steps")
    # Run
    max_steps: int = config_field(300, "rollout-and-update steps")
    eval_every: int = config_field(10, "evaluate every this many steps (and at the start and the end)")
    save_every: int = config_field(20, "write a checkpoint (LoRA, EMA, optimizer, step) every this many steps")
    keep_checkpoints: int = config_field(3, "keep only the newest this many checkpoints")
    resume: bool = config_field(False, "continue the run in --out from its newest checkpoint")
    log_with: str = config_field(
        "",
        "also log to experiment trackers: tensorboard (in OUT/tensorboard), wandb, or both: tensorboard,wandb "
        "(default: none, metrics.jsonl only)",
    )
    dtype: str = config_field(
        "auto",
        "base weights: fp32, bf16 or fp16; auto = bf16 on GPU, fp32 on CPU (LoRA weights and SDE math stay fp32)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    # Memory (a 24 GB GPU: README)
    precompute_text_embeds: bool = config_field(
        False,
        "encode the prompts the run draws and the eval prompts once into OUT/text_embeds on disk (1.7 MB each for "
        "SD3.5), then free the encoders",
    )
    gradient_checkpointing: bool = config_field(False, "recompute transformer activations in the backward pass")
    # Speed (README)
    compile: bool = config_field(False, "torch.compile each transformer block (compiled in the first step)")


# The official FLUX.1-dev recipe (ltt0716 fork f9a5c45: config/grpo.py, pickscore_flux(); scripts/train_flux.py, main(),
# the LoRA): the defaults of these flags when --model is FLUX (is_flux). A flag given on the command line wins.
FLUX_RECIPE = dict(num_steps=6, eval_num_steps=28, guidance_scale=3.5, noise_level=0.9, beta=0.0, resolution=512)
FLUX_RECIPE.update(lora_rank=64, lora_alpha=128)


# --------------------------------------------------------------------------------------------------
# 3. The policy: SD3.5 + LoRA (text, guided velocity, rollout, decode)
# Heavy libraries are imported inside the functions that need them: `import flow_grpo` and the toy cost only torch.
# --------------------------------------------------------------------------------------------------


# The joint-attention projections of every MMDiT block. A bare "to_q" would also hit SD3.5's attn2.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]  # the image tokens' attention
LORA_TARGETS += ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]  # the text tokens'


def load_pipeline(model: str, dtype: torch.dtype):
    """SD3 or FLUX pipeline (is_flux) from an alias, a hub id, a local diffusers folder or 'tiny' / 'tiny-flux', its
    models in dtype but the VAE,
    loaded in fp32: it decodes in fp32 as the official `scripts/train_sd3.py`, main(), does, and a VAE loaded in
    bf16 and then cast up would decode with rounded weights. Under fp16 transformers keeps T5's `wo` in fp32
    (T5EncoderModel._keep_in_fp32_modules); the official code casts it to fp16 with `.to()` and relies on T5's
    clamping of overflowed activations: we keep transformers' choice, the encoder's output without the clamp."""
    if model == "tiny":
        return cast_as_loaded(build_tiny_pipeline(), dtype)
    if model == "tiny-flux":
        return cast_as_loaded(build_tiny_flux_pipeline(), dtype)
    from diffusers import AutoencoderKL, FluxPipeline, StableDiffusion3Pipeline

    pipeline_class = FluxPipeline if is_flux(model) else StableDiffusion3Pipeline
    model = resolve_model(model)
    try:
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=torch.float32)
        return pipeline_class.from_pretrained(model, vae=vae, dtype=dtype)
    except OSError as error:
        if os.path.isdir(model):
            raise UsageError(f"could not load {model} ({str(error).splitlines()[0][:120]})") from None
        import rewards

        advice = rewards.hub_advice(model, error, "a local folder with --model PATH")
        raise UsageError(advice) from None


def add_lora(transformer, cfg: Config, bf16_lora_arithmetic: bool = True, targets=LORA_TARGETS):
    """Wrap the transformer with a trainable LoRA; the frozen base is the reference policy. The LoRA weights
    are fp32 whatever the base dtype; over bf16 base weights they are applied in bf16 (lora_in_base_dtype)
    unless bf16_lora_arithmetic is False (peft's default: fp32 LoRA arithmetic on fp32 copies of the inputs).
    targets: the policy's lora_targets."""
    from peft import LoraConfig, get_peft_model

    base_dtype = transformer.dtype
    transformer.requires_grad_(False)
    lora_config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=targets
    )
    torch.manual_seed(cfg.seed)
    # autocast_adapter_dtype (default) keeps the LoRA in fp32 over bf16/fp16 base weights.
    model = get_peft_model(transformer, lora_config)
    # Not fp16: the weight gradient, a sum over every token, would be computed in fp16 under a loss scale
    # of up to 2^16, where it can overflow while the activations' gradients do not.
    if base_dtype == torch.bfloat16 and bf16_lora_arithmetic:
        lora_in_base_dtype(model)
    return model, lora_config


def lora_parameters(transformer):
    return [p for p in transformer.parameters() if p.requires_grad]


class TextEmbeddings(NamedTuple):
    embeds: torch.Tensor  # [2B or B, tokens, dim]: negative first when CFG is on, as the pipeline
    pooled: torch.Tensor


def encode_text(pipe, prompts, device) -> TextEmbeddings:
    """The embeddings of each prompt once, no negative: one row per prompt, the rows encode_prompts repeats."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=128,
        )
    return TextEmbeddings(embeds, pooled)


def per_image(prompts, repeats: int = 1):
    """One prompt per image: each of `prompts` repeated `repeats` times (a group's G images)."""
    return [p for p in prompts for _ in range(repeats)]


def guided_velocity(transformer, x, timestep, text: TextEmbeddings, guidance_scale: float):
    """v = v_uncond + w (v_cond - v_uncond), in fp32 whatever the model's dtype."""
    cfg = guidance_scale > 1
    model_input = torch.cat([x, x]) if cfg else x
    dtype = text.embeds.dtype
    v = transformer(
        hidden_states=model_input.to(dtype),
        timestep=timestep.expand(model_input.shape[0]),
        encoder_hidden_states=text.embeds,
        pooled_projections=text.pooled,
        return_dict=False,
    )[0].float()
    if cfg:
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return v


def schedule(pipe, num_steps: int, device):
    """sigmas [T+1] and transformer timesteps [T] of SD3's shifted FlowMatchEulerDiscreteScheduler."""
    pipe.scheduler.set_timesteps(num_steps, device=device)
    return pipe.scheduler.sigmas.float(), pipe.scheduler.timesteps.float()


@torch.no_grad()
def sample(
    transformer, text, latents, sigmas, timesteps, guidance_scale, noise_levels, step_fn=sde_step, generator=None,
    velocity=None,
) -> Trajectory:  # fmt: skip
    """The rollout from pure noise: step j uses noise level noise_levels[j] (0 = ODE); the velocity is the
    policy's (Policy.velocity), SD3's guided_velocity by default."""
    velocity = velocity or guided_velocity

    def velocity_at(x, j):
        return velocity(transformer, x, timesteps[j], text, guidance_scale)

    return rollout(velocity_at, latents.float(), sigmas, noise_levels, step_fn, generator)


def decode_images(pipe, latents):
    """Final latents -> list of PIL images (uint8: round(255 x), clamped), as the reward models take them."""
    from PIL import Image

    with torch.no_grad():
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0].float()
    pixels = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


class SD3Policy:
    """The seam between the algorithm and a model: all that train() asks of one. encode_text(prompts) -> one text
    row per prompt; velocity(transformer, x_j, t_j, text, w) -> the guided velocity; latent_shape(); schedule(T) ->
    (sigmas [T+1], timesteps [T]); decode(latents) -> images; lora_targets. uses_cfg: whether a guidance scale w > 1
    means classifier-free guidance, with the negative prompt's rows first. FluxPolicy (below) is the second one."""

    lora_targets = LORA_TARGETS
    uses_cfg = True

    def __init__(self, pipe, resolution: int):
        self.pipe, self.resolution = pipe, resolution

    def encode_text(self, prompts, device) -> TextEmbeddings:
        return encode_text(self.pipe, prompts, device)

    def velocity(self, transformer, x, timestep, text: TextEmbeddings, guidance_scale: float):
        return guided_velocity(transformer, x, timestep, text, guidance_scale)

    def latent_shape(self):
        scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        return (self.pipe.transformer.config.in_channels, self.resolution // scale, self.resolution // scale)

    def schedule(self, num_steps: int, device):
        return schedule(self.pipe, num_steps, device)

    def decode(self, latents):
        return decode_images(self.pipe, latents)


def model_policy(pipe, resolution: int = 0):
    """The policy of a loaded pipeline: FLUX's for a FluxPipeline, else SD3's (resolution 0: for its text only)."""
    return (FluxPolicy if type(pipe).__name__ == "FluxPipeline" else SD3Policy)(pipe, resolution)


# --------------------------------------------------------------------------------------------------
# 4. Training: one step at scale, then train(), the paper's Algorithm 1
# --------------------------------------------------------------------------------------------------


def sde_and_trained_steps(cfg: Config, generator):
    """Which steps are stochastic (SDE) and which are trained, for one rollout batch.

    Flow-GRPO: all steps are SDE; the first int(T * train_fraction) are trained (not the last one,
    whose std ~0.006 makes its log-prob meaningless). Flow-GRPO-Fast (sde_window K): a window of K
    SDE steps, ODE elsewhere; only the window is trained. The whole window lies in the first half,
    start uniform in [0, T // 2 - K], as the official sde_window_range (0, T // 2) (official
    `config/grpo.py`, the *_fast configs; `flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py`,
    `pipeline_with_logprob()`: start = randint(range[0], range[1] - K); ltt0716 fork at f9a5c45, the
    paper-era repository has no fast code). That function draws a window at each call, i.e. per rollout batch
    and process (Python's `random`, seeded per process by `set_seed(config.seed, device_specific=True)` in
    `scripts/train_sd3_fast.py`, `main()`), and each sample is trained on its own window. train() draws one per
    rollout batch too, from a generator seeded by the batch's place in the step instead of the process, so
    that any process count draws the same windows."""
    if cfg.sde_window:
        start = int(torch.randint(0, cfg.num_steps // 2 - cfg.sde_window + 1, (1,), generator=generator))
        window = list(range(start, start + cfg.sde_window))
        return window, window
    return list(range(cfg.num_steps)), list(range(int(cfg.num_steps * cfg.train_fraction)))


def prompts_for_step(prompts, count: int, step: int, seed: int):
    """The count prompts of a step in an endless stream of seeded shuffles of the prompt list. A pure
    function of (step, seed): a resumed run continues exactly where it stopped."""
    orders = {}  # one shuffle per pass over the prompt list
    chosen = []
    for position in range(step * count, (step + 1) * count):
        epoch, index = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        chosen.append(prompts[int(orders[epoch][index])])
    return chosen


def prompt_groups(image_prompts) -> torch.Tensor:
    """Group id of each image: its prompt (the official code's per-prompt stat tracker, `flow_grpo/stat_tracking.py`,
    `PerPromptStatTracker.update`), so a prompt drawn twice in one step forms one group."""
    index = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in image_prompts])


def step_advantages(all_rewards: torch.Tensor, image_prompts, cfg: Config) -> torch.Tensor:
    """The advantages of every image of the step (all ranks, in rank order), grouped by prompt: exactly
    what one process holding every sample would compute, global std included."""
    return group_advantages(all_rewards, prompt_groups(image_prompts), cfg.global_std)


def constant_group_fraction(advantages: torch.Tensor, image_prompts) -> float:
    """Fraction of prompts whose rewards were all equal (all their advantages are exactly 0)."""
    groups = prompt_groups(image_prompts)
    informative = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, (advantages != 0).float())
    return (informative == 0).float().mean().item()


def group_reward_std(rewards: torch.Tensor, image_prompts) -> float:
    """The population std of each prompt group's rewards, averaged over the groups: the official reward_std_mean
    (`scripts/train_sd3.py`, `calculate_zero_std_ratio()`, np.std of each group's rewards, then the mean)."""
    groups = prompt_groups(image_prompts)
    return torch.stack([rewards[groups == g].double().std(correction=0) for g in groups.unique()]).mean().item()


def loss_weights(advantages: torch.Tensor, updates: int, num_trained_steps: int, world: int, batch_size: int):
    """Weight of each sample's loss in each optimizer step of the step, [updates, world, batches, batch_size].

    The official loop (`scripts/train_sd3.py`, `main()`, at ac4c86e and the ltt0716 fork's f9a5c45) drops the
    samples of constant-reward groups (A = 0), shuffles the others and cuts them into num_batches_per_epoch /
    gradient_accumulation_steps equal parts (2 in its configs), one optimizer step each, whose loss is the mean
    over the part's samples and trained steps. Here the informative samples (A != 0) of all ranks, in rollout
    order (rank after rank, as `advantages`), are cut into `updates` contiguous parts as equal as possible (their
    sizes differ by one at most), and part k weighs each of its samples 1 / (its size * num_trained_steps), every
    other sample 0. So each optimizer step averages as many samples as the official one, however the constant
    groups fall in the rollout batches. What differs, and why: the first update must stay exactly on-policy (its
    forwards are the rollout's own batches, ratio 1), so samples are masked, not dropped and re-batched; hence
      - no shuffle: a part is a run of the rollout order (prompt after prompt; with several processes, one
        process's share after the other's), where the official part is a random half of each GPU's samples;
      - a rollout batch holding samples of two parts is forwarded in each of their optimizer steps;
      - the official loop keeps back a few constant-group samples at random so that its count divides into its
        micro-batches (no policy gradient, but their KL and a larger denominator); none are kept here.
    Fewer informative samples than updates leave parts empty: those make no optimizer step. Gradients are summed
    over ranks (sum_gradients), so every optimizer step is the single-process one."""
    informative = torch.nonzero(advantages != 0).flatten()
    bounds = [k * len(informative) // updates for k in range(updates + 1)]
    weights = torch.zeros(updates, advantages.numel())
    for k in range(updates):
        part = informative[bounds[k] : bounds[k + 1]]
        if len(part):
            weights[k, part] = 1 / (len(part) * num_trained_steps)
    return weights.view(updates, world, -1, batch_size)


class RolloutBatch(NamedTuple):
    prompts: list  # one per image
    text: TextEmbeddings
    trajectory: Trajectory  # latents [B, T+1, C, H, W]
    noise_levels: list  # a at each step j, 0 (the ODE) outside Flow-GRPO-Fast's window
    trained_steps: list  # the steps j trained on: the same K for every batch, the window drawn for this one


def score_batches(policy, reward_fn, batches, dist: Distributed, step: int) -> dict:
    """Each reward component of every image of the step (all ranks, in rank order): decode the final latents
    and score them, one batched reward call per rollout batch."""
    scores = {}
    for batch in progress(batches, f"step {step} reward", dist):
        images = policy.decode(batch.trajectory.latents[:, -1])
        for name, value in score(reward_fn, images, batch.prompts).items():
            scores.setdefault(name, []).append(value)
    return {name: all_gather(torch.cat(v).to(dist.device), dist).cpu() for name, v in scores.items()}


def step_loss(
    transformer, batch, j, advantages, weights, sigmas, timesteps, noise_levels, step_fn, cfg: Config, velocity=None
):
    """The objective of denoising step j of one rollout batch (grpo_step_objective: Eq. 5-6 + beta KL, Eq. 10),
    weighted per sample; returns the loss, its parts for the log and the ratio of each sample. The parts are sums
    weighted as the loss (StepStats adds them up over an optimizer step), and the extreme ratios of the samples
    with a weight. velocity: the policy's (Policy.velocity), SD3's guided_velocity by default."""
    velocity = velocity or guided_velocity
    latents = batch.trajectory.latents
    if weights is None:  # the plain mean over the batch
        weights = torch.full_like(advantages, 1 / len(advantages))
    x = latents[:, j]
    v = velocity(transformer, x, timesteps[j], batch.text, cfg.guidance_scale)
    out = step_fn(v, x, sigmas[j], sigmas[j + 1], noise_levels[j], prev_x=latents[:, j + 1])
    ref_mean = None
    if cfg.beta > 0:  # pi_ref: the same network with the LoRA switched off, same CFG
        with torch.no_grad(), transformer.disable_adapter():
            v_ref = velocity(transformer, x, timesteps[j], batch.text, cfg.guidance_scale)
        ref_mean = step_fn(v_ref, x, sigmas[j], sigmas[j + 1], noise_levels[j], prev_x=out.prev_x).mean
    objective = grpo_step_objective(
        out.log_prob,
        batch.trajectory.log_probs[:, j],
        advantages,
        cfg.clip_range,
        cfg.adv_clip,
        sde_type=cfg.sde_type,
        mean=out.mean,
        std=out.std,
        dt=sigmas[j + 1] - sigmas[j],
        ref_mean=ref_mean,
        beta=cfg.beta,
        kl_dt_scale=cfg.kl_dt_scale,
        ratio_norm=cfg.ratio_norm,
        old_mean=batch.trajectory.means[:, j],
        weights=weights,
    )
    ratio, trained = objective.ratio, weights > 0
    parts = {name: getattr(objective, name) for name in OBJECTIVE_PARTS}
    parts["ratio_mean"] = (weights * ratio).sum()
    parts["ratio_min"] = torch.where(trained, ratio, math.inf).min()
    parts["ratio_max"] = torch.where(trained, ratio, -math.inf).max()
    values = torch.stack([v.detach().double().to(ratio.device) for v in parts.values()]).tolist()  # one sync
    return objective.loss, dict(zip(parts, values)), ratio


def optimizer_update(params, optimizer, scaler, dist: Distributed, max_grad_norm: float):
    """All-reduce, unscale, clip and apply the accumulated gradient. Returns the outcome and the gradient's norm
    before clipping (of the all-reduced, unscaled gradient: the same on every rank). The outcome is "applied";
    "nonfinite" when the gradient is NaN/inf and nothing was applied; or, with fp16 loss scaling, "overflow": the
    scaler skipped the step and lowered the scale, which is how dynamic loss scaling works, not divergence."""
    sum_gradients(params, dist)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item()
    finite = math.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(optimizer)  # skipped when unscale_ found inf/NaN
        scaler.update()
        outcome = "applied" if finite else "overflow"
    else:
        if finite:  # a NaN/inf loss leaves a non-finite gradient: never apply it
            optimizer.step()
        outcome = "applied" if finite else "nonfinite"
    optimizer.zero_grad(set_to_none=False)
    return outcome, grad_norm


def update_policy(learner: Learner, stats: StepStats, cfg: Config, dist: Distributed, step: int):
    """One optimizer step on the accumulated gradient (optimizer_update: all-reduce, unscale, clip, AdamW), the
    EMA every ema_every applied steps, and the guard: a non-finite update is skipped and counted, and
    MAX_NONFINITE_IN_A_ROW of them in a row stop the run. An fp16 overflow (the loss scaler skipped the step and
    lowered its scale) is how dynamic loss scaling works, counted apart."""
    outcome, grad_norm = optimizer_update(learner.params, learner.optimizer, learner.scaler, dist, cfg.max_grad_norm)
    losses_finite = stats.losses_finite
    stats.end_update(grad_norm, dist)
    if outcome == "applied":
        learner.optimizer_step += 1
        learner.nonfinite_in_a_row = 0
        if learner.optimizer_step % cfg.ema_every == 0:
            ema_update(learner.ema_params, learner.params, learner.optimizer_step)
    elif outcome == "overflow" and losses_finite:
        stats.overflow_updates += 1
    else:
        stats.nonfinite_updates += 1
        learner.nonfinite_in_a_row += 1
        print(f"warning: step {step}: non-finite loss or gradient, update skipped", flush=True)
        if learner.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingDiverged(
                f"{learner.nonfinite_in_a_row} non-finite updates in a row at step {step}: lower --lr or "
                f"check the reward; the last good checkpoint is in {cfg.out}/checkpoints"
            )


def step_record(step: int, learner: Learner, scores, advantages, image_prompts, stats: StepStats, seconds) -> dict:
    """The step's line of metrics.jsonl: rewards (mean and std of each component over all ranks), the share of
    constant groups and the mean within-group std, the objective's parts, ratios and gradient norms (StepStats),
    the on-policy check, the skipped updates, and the seconds per phase."""
    record = {"step": step, "optimizer_steps": learner.optimizer_step, "skipped_update": not bool(advantages.any())}
    for name, value in scores.items():
        record[f"{name}_mean"], record[f"{name}_std"] = value.mean().item(), value.std(correction=0).item()
    record["zero_std_group_ratio"] = constant_group_fraction(advantages, image_prompts)
    record["group_reward_std"] = group_reward_std(scores["reward"], image_prompts)
    record.update(stats.summary())
    record["nonfinite_updates"] = stats.nonfinite_updates
    if learner.scaler.is_enabled():
        record["fp16_overflow_updates"], record["loss_scale"] = stats.overflow_updates, learner.scaler.get_scale()
    record.update({f"seconds_{k}": v for k, v in seconds.items()})
    return record


def holding_the_output_lock(train_fn):
    """Release --out's lock (unlock_output_folder) when train() ends, also by an exception, so that a later run in
    the same process (a notebook, the tests) can take the folder."""

    @functools.wraps(train_fn)
    def run(cfg, *args, **kwargs):
        try:
            return train_fn(cfg, *args, **kwargs)
        finally:
            unlock_output_folder(cfg.out)

    return run


@holding_the_output_lock
def train(cfg: Config):
    """Flow-GRPO, the paper's Algorithm 1. Each step: 1. sample a group of G images for each prompt with the SDE,
    keeping every x_j and log pi_old(x_{j+1} | x_j); 2. score the final images; 3. group-relative advantages
    (Eq. 4); 4. clipped policy-gradient steps with beta * KL to pi_ref (Eq. 5-6, 10); 5. log, evaluate, save."""
    dist = setup_distributed()
    run = start_run(cfg, dist)  # checks, run folder, reward model, SD3 + LoRA, AdamW, resume (plumbing, below)
    policy, transformer, learner = model_policy(run.pipe, cfg.resolution), run.transformer, run.learner
    step_fn = sde_step if cfg.sde_type == "sde" else cps_step
    sigmas, timesteps = policy.schedule(cfg.num_steps, dist.device)  # sigmas[0] = 1 (noise) ... sigmas[T] = 0
    images_per_rank = cfg.groups_per_step * cfg.group_size // dist.world
    num_batches = images_per_rank // cfg.batch_size
    if run.start_step == 0:  # the base model, for comparison (printed only: metrics.jsonl has one line per step)
        base = evaluate_policy(run, cfg, dist, 0)
        if dist.main:
            print(f"step 0 | eval reward {base['eval_reward']:.5g}", flush=True)
    for step in range(run.start_step, cfg.max_steps):
        watch = Stopwatch(dist.device)
        # G images per prompt, prompt after prompt; each rank takes a contiguous share, so a group may span
        # batches and ranks (the official recipe spreads a group of 24 over GPUs).
        image_prompts = per_image(prompts_for_step(run.prompts, cfg.groups_per_step, step, cfg.seed), cfg.group_size)
        my_prompts = image_prompts[dist.rank * images_per_rank : (dist.rank + 1) * images_per_rank]

        # 1. Rollout: G images per prompt with the SDE, recording x_j and log pi_old at every step j.
        batches = []
        for b in progress(range(num_batches), f"step {step + 1} rollout", dist):
            batch_prompts = my_prompts[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            text = run.text_for(batch_prompts, 1)
            # Seeded by the batch's place in the step, not by the rank: any process count draws the same window
            # (Flow-GRPO-Fast draws one per rollout batch) and the same images.
            generator = seeded(cfg.seed, step, dist.rank * num_batches + b)
            sde_steps, trained_steps = sde_and_trained_steps(cfg, generator)
            noise_levels = [cfg.noise_level if j in sde_steps else 0.0 for j in range(cfg.num_steps)]
            noise = torch.randn(cfg.batch_size, *policy.latent_shape(), generator=generator).to(dist.device)
            trajectory = sample(
                transformer, text, noise, sigmas, timesteps, cfg.guidance_scale, noise_levels, step_fn, generator,
                policy.velocity,
            )  # fmt: skip
            batches.append(RolloutBatch(batch_prompts, text, trajectory, noise_levels, trained_steps))
        watch.lap("rollout")

        # 2. Reward of each final image.
        scores = score_batches(policy, run.reward_fn, batches, dist, step + 1)  # {component: [all images of the step]}
        watch.lap("reward")

        # 3. Group-relative advantages (Eq. 4) over the rewards of all ranks, a group = one prompt.
        advantages = step_advantages(scores["reward"], image_prompts, cfg)  # [all images of the step]
        num_trained = len(batches[0].trained_steps)  # K per sample, the same for every batch
        weights = loss_weights(advantages, cfg.updates_per_step, num_trained, dist.world, cfg.batch_size)
        my_advantages = advantages.view(dist.world, num_batches, cfg.batch_size)[dist.rank].to(dist.device)

        # 4. Policy update (Eq. 5-6, 10) on the rollout's own batches, so the first forward reproduces the
        #    rollout's exactly (ratio 1); each optimizer step averages an equal share of the informative samples.
        stats = StepStats()
        for update in weights:  # [world, batches, B]: this optimizer step's share, 0 elsewhere
            if not update.any():
                continue  # no informative sample on any rank: no optimizer step
            my_weights = update[dist.rank].to(dist.device)
            informative = [b for b in range(num_batches) if my_weights[b].any()]  # the others' gradient would be 0
            trained = [(b, j) for b in informative for j in batches[b].trained_steps]
            for b, j in progress(trained, f"step {step + 1} train", dist):
                loss, parts, ratio = step_loss(
                    transformer,
                    batches[b],
                    j,
                    my_advantages[b],
                    my_weights[b],
                    sigmas,
                    timesteps,
                    batches[b].noise_levels,
                    step_fn,
                    cfg,
                    policy.velocity,
                )
                learner.scaler.scale(loss).backward()
                stats.add(parts, ratio)
            update_policy(learner, stats, cfg, dist, step + 1)
        watch.lap("train")

        # 5. Log, evaluate (the EMA, 40-step ODE), save.
        record = step_record(step + 1, learner, scores, advantages, image_prompts, stats, watch.seconds)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            record.update(evaluate_policy(run, cfg, dist, step + 1))
            save_rollout_groups(run, cfg, dist, step + 1, batches, image_prompts, scores["reward"], advantages)
        end_step(record, run, cfg, dist)
    return finish_run(run, cfg, dist)


# --------------------------------------------------------------------------------------------------
# 5. Plumbing, out of the reader's path
# --------------------------------------------------------------------------------------------------


# A second model family: FLUX.1 (--model tiny-flux), the same algorithm behind the same seam -----------------

# The official FLUX LoRA (`scripts/train_flux.py`, main(), ltt0716 fork f9a5c45): SD3's attention projections (a bare
# "attn.to_q" also hits the single blocks' attention) and the feed-forward layers of the image and text streams.
FLUX_LORA_TARGETS = LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


class FluxPolicy(SD3Policy):
    """FLUX.1 behind SD3Policy's seam, as diffusers' FluxPipeline.__call__ and the official
    `flow_grpo/diffusers_patch/flux_pipeline_with_logprob.py`, pipeline_with_logprob() (ltt0716 fork f9a5c45), run
    it. The latents stay [B, C, H, W] between steps (the SDE step is elementwise and its log-density a mean over
    elements, so packing changes nothing there) and are packed into 2x2 patches for the transformer only. FLUX.1-dev
    is guidance-distilled: the guidance scale is an input of the network (the guidance embedding), one forward per
    step, no negative prompt. Text: CLIP-L's pooled output and T5's embeddings at the official 128 tokens
    (`scripts/train_flux.py`, compute_text_embeddings(), max_sequence_length=128)."""

    lora_targets = FLUX_LORA_TARGETS
    uses_cfg = False

    def encode_text(self, prompts, device) -> TextEmbeddings:
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompts, prompts, device=device, num_images_per_prompt=1, max_sequence_length=128
            )
        return TextEmbeddings(embeds, pooled)

    def velocity(self, transformer, x, timestep, text: TextEmbeddings, guidance_scale: float):
        """The velocity at (x, t) in fp32: x packed as FluxPipeline._pack_latents does, each 2x2 patch one token of
        4C channels, with the (0, row, column) position ids of _prepare_latent_image_ids, the text's all 0; the
        timestep divided by 1000 as the pipeline does."""
        from einops import rearrange

        batch, _, height, width = x.shape
        tokens = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
        image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(x.device)
        dtype = text.embeds.dtype
        guided = transformer.config.guidance_embeds  # FLUX.1-dev's; FLUX.1-schnell has no guidance input
        v = transformer(
            hidden_states=tokens.to(dtype),
            timestep=timestep.expand(batch).to(dtype) / 1000,
            guidance=torch.full((batch,), guidance_scale, device=x.device, dtype=torch.float32) if guided else None,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.embeds,
            txt_ids=torch.zeros(text.embeds.shape[1], 3, device=x.device, dtype=dtype),
            img_ids=image_ids.to(dtype),
            return_dict=False,
        )[0].float()
        return rearrange(v, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)

    def latent_shape(self):
        """FluxPipeline.prepare_latents' unpacked shape: the VAE's channels, its grid rounded down to even."""
        side = 2 * (self.resolution // (2 * 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)))
        return (self.pipe.vae.config.latent_channels, side, side)

    def schedule(self, num_steps: int, device):
        """FluxPipeline's schedule: sigmas linspace(1, 1/T, T), shifted by mu, which grows linearly with the image's
        token count from base_shift at base_image_seq_len to max_shift at max_image_seq_len (pipeline_flux.py,
        calculate_shift(), written as it is there), then a final 0."""
        import numpy as np

        config = self.pipe.scheduler.config
        _, height, width = self.latent_shape()
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = (height // 2) * (width // 2) * slope + (config.base_shift - slope * config.base_image_seq_len)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        self.pipe.scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        return self.pipe.scheduler.sigmas.float(), self.pipe.scheduler.timesteps.float()


# Setting up, ending a step, ending the run -------------------------------------------------------


class Run(NamedTuple):
    """What train() works with, built by start_run."""

    pipe: object
    transformer: torch.nn.Module  # the LoRA-wrapped transformer
    lora_config: object
    learner: Learner
    reward_fn: object  # the training reward (--reward)
    eval_reward_fn: object  # its components and those of --eval-reward, "reward" still the training one
    text_for: object  # text_for(prompts, repeats) -> TextEmbeddings, one row per image
    prompts: list
    eval_prompts: list
    start_step: int
    compiles: object  # CompileCounter with --compile, else None
    trackers: object = None  # Trackers with --log-with, on rank 0; else None


@dataclass
class Learner:
    """The LoRA parameters theta and what updates them: AdamW, the fp16 loss scaler, the EMA copy, and the
    counts that survive a step (optimizer steps taken, non-finite updates in a row)."""

    params: list
    ema_params: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    optimizer_step: int = 0
    nonfinite_in_a_row: int = 0


def start_run(cfg: Config, dist: Distributed) -> Run:
    """Everything before the first step, in the order that fails cheapest first: the flags, the prompts, the
    run folder, the reward model, then SD3 (text encoders first: with precompute_text_embeds they leave before
    the transformer arrives), the LoRA, AdamW, and the checkpoint to resume from."""
    import rewards

    check_config(cfg, dist)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if dist.device.type == "cuda" else torch.float32
    )
    prompts, eval_prompts = read_prompt_sets(cfg)
    try:  # a served reward (geneval) answers once before anything is loaded or written
        rewards.check_servers(cfg.reward, server_options(cfg))
        if cfg.eval_reward:  # a served monitor too
            rewards.check_servers(cfg.eval_reward, server_options(cfg))
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_output_folder(cfg, lock=dist.main)
    if dist.world > 1:
        torch.distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    # Before the models load: a tracker that refuses to start (wandb not logged in) stops the run here.
    trackers = Trackers(cfg) if dist.main and cfg.log_with else None
    try:
        reward_fn, eval_reward_fn = load_rewards(cfg, dist.device)
    except ValueError as error:
        raise UsageError(str(error)) from None

    pipe = load_pipeline(cfg.model, dtype)
    drawn = prompts_drawn(cfg, prompts) if cfg.precompute_text_embeds else []  # what a text cache must hold
    text_for = text_encoder_for(pipe, cfg, drawn + eval_prompts, dist.device, dist.rank, dist.world)
    pipe.to(dist.device)
    pipe.set_progress_bar_config(disable=True)
    check_resolution(pipe, cfg)
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    transformer, lora_config = add_lora(pipe.transformer, cfg, targets=model_policy(pipe, cfg.resolution).lora_targets)
    compiles = compile_blocks(transformer) if cfg.compile else None
    params = lora_parameters(transformer)
    learner = Learner(
        params, [p.detach().clone() for p in params], make_optimizer(params, cfg), grad_scaler(dtype, dist.device)
    )
    start_step = 0
    if cfg.resume:
        start_step, learner.optimizer_step = resume_checkpoint(
            cfg.out, params, learner.ema_params, learner.optimizer, dist.main, learner.scaler
        )
    if dist.main:
        write_run_files(cfg, start_step)
    for p in params:  # a rank with nothing to train in an update still takes part in the all-reduce
        p.grad = torch.zeros_like(p)
    return Run(
        pipe,
        transformer,
        lora_config,
        learner,
        reward_fn,
        eval_reward_fn,
        text_for,
        prompts,
        eval_prompts,
        start_step,
        compiles,
        trackers,
    )


def load_rewards(cfg: Config, device):
    """(training reward, evaluation reward), loaded together so that a model both name loads once. The
    evaluation's components are the training ones, then those only --eval-reward names at weight 0: its "reward"
    stays the training reward (what eval_reward, the effect size and the paper's numbers compare), and each
    component is scored once. Every model stays on the device: a monitor costs its weights and nothing else."""
    import rewards

    trained = [name for name, _ in rewards.parse_reward_spec(cfg.reward)]
    watched = [name for name, _ in rewards.parse_reward_spec(cfg.eval_reward)] if cfg.eval_reward else []
    spec = ",".join([cfg.reward] + [f"{name}=0" for name in watched if name not in trained])
    evaluation = rewards.load_reward(
        spec, device=device, model_dirs=reward_model_dirs(cfg.reward_model_dir), servers=server_options(cfg)
    )
    return rewards.Reward(evaluation.components[: len(trained)]), evaluation


def make_optimizer(params, cfg: Config):
    """AdamW with the official settings (`config/base.py`: betas (0.9, 0.999), eps 1e-8), constant learning rate."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)


def grad_scaler(dtype, device):
    """Dynamic loss scaling for fp16 base weights (as the official fp16 runs, through accelerate's GradScaler):
    the gradient at the transformer's output is ~|A| / (std B D), which underflows fp16 without it."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


class Stopwatch:
    """Seconds per phase: lap(name) records the time since the previous lap (or the start)."""

    def __init__(self, device):
        self.device, self.seconds = device, {}
        self.last = clock(device)

    def lap(self, name: str):
        now = clock(self.device)
        self.seconds[name], self.last = now - self.last, now


def seeded(*keys) -> torch.Generator:
    """A CPU generator for one purpose (rollout noise of a step on a rank, ...): hash of int keys is stable."""
    return torch.Generator().manual_seed(hash(keys) % 2**63)


def evaluate_policy(run: Run, cfg: Config, dist: Distributed, step: int) -> dict:
    """evaluate() with the EMA of the LoRA weights loaded (with --ema, the default), else the weights as they are;
    with geneval, the GenEval score and each tag's accuracy (rewards.geneval_summary)."""
    import rewards

    learner = run.learner
    with shown_weights(learner.params, learner.ema_params, cfg):
        means = evaluate(run.pipe, run.transformer, cfg, dist, run.eval_reward_fn, run.eval_prompts, run.text_for, step)
    return {**means, **rewards.geneval_summary(means, [prompt_metadata(p) for p in run.eval_prompts])}


def end_step(record: dict, run: Run, cfg: Config, dist: Distributed):
    """The end of a step: GPU memory and compile counts into its record, the record into metrics.jsonl (rank 0),
    curves.png redrawn after an evaluation, the printed line, and a checkpoint every save_every steps."""
    step = record["step"]
    record.update(gpu_memory(dist.device))
    if run.compiles:  # the phases' seconds include compiling
        record.update(run.compiles.record())
    if not dist.main:
        return
    with open(f"{cfg.out}/metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if "eval_reward" in record:
        write_curves([cfg.out], f"{cfg.out}/curves.png")
    if run.trackers:
        run.trackers.log(record)
    if run.compiles and record["seconds_compile"]:  # once, unless something recompiles
        where = f"step {step}" + (" and the evaluation at step 0" if step == 1 else "")
        print(
            f"compile: {record['seconds_compile']:.1f}s, part of the time of {where};"
            f" {record['compilations']} graphs so far",
            flush=True,
        )
    evaluated = f" | eval reward {record['eval_reward']:.5g}" if "eval_reward" in record else ""
    evaluated += f" | monitor {record['eval_monitor']:.5g}" if "eval_monitor" in record else ""
    seconds = record["seconds_rollout"] + record["seconds_reward"] + record["seconds_train"]
    print(
        f"step {step} | reward {record['reward_mean']:.5g} ± {record['reward_std']:.2g} | kl {record['kl']:.2e}"
        f" | clip {record['clip_fraction']:.2f} | {seconds:.1f}s{evaluated}",
        flush=True,
    )
    if step % cfg.save_every == 0 or step == cfg.max_steps:
        learner = run.learner
        save_checkpoint(
            cfg,
            step,
            learner.optimizer_step,
            learner.params,
            learner.ema_params,
            learner.optimizer,
            run.transformer,
            run.lora_config,
            learner.scaler,
        )


def progress(iterable, desc: str, dist: Distributed):
    """A progress bar on rank 0 that disappears when done: the printed lines stay one per step."""
    from tqdm import tqdm

    return tqdm(list(iterable), desc=desc, leave=False, disable=not dist.main)


def finish_run(run: Run, cfg: Config, dist: Distributed) -> TrainedRun:
    """The run's last line (effect_size) and the final LoRA (the EMA with --ema) in diffusers' format in OUT/lora."""
    learner = run.learner
    if dist.main:
        print(effect_size_line(read_metrics(cfg.out)), flush=True)
        with shown_weights(learner.params, learner.ema_params, cfg):
            save_lora(run.transformer, run.lora_config, f"{cfg.out}/lora")
    if run.trackers:
        run.trackers.close()
    return TrainedRun(run.pipe, run.transformer, learner.params, learner.ema_params)


class TrainedRun(NamedTuple):
    pipe: object
    transformer: torch.nn.Module  # the LoRA-wrapped transformer
    params: list  # the LoRA parameters
    ema_params: list


# Validation: every flag and input checked before any work ----------------------------------------


class UsageError(Exception):
    """Bad input: reported as one line and exit status 2, never a traceback. every_rank: every process
    sees the same flags, files and models, so under torchrun rank 0 alone reports it; False where
    only this process's own data shows it (a reward on its own images)."""

    def __init__(self, message, every_rank: bool = True):
        super().__init__(message)
        self.every_rank = every_rank


def check_flags(cfg: Config):
    """Every flag, before a model is loaded or anything is written to --out: a value that would crash
    the run after its first evaluation, or silently train nothing, stops here with one line saying
    what to use. (The geometry of groups and batches, the sampler and the dtype: check_config.)"""
    import rewards

    def flag(name):
        return "--" + name.replace("_", "-")

    for f in fields(Config):
        value = getattr(cfg, f.name)
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(f.type) if isinstance(f.type, str) else f.type
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{flag(f.name)} {value!r}: use a number")
            if not math.isfinite(value):
                raise UsageError(f"{flag(f.name)} {value}: use a finite number")
        elif not isinstance(value, kind):
            raise UsageError(f"{flag(f.name)} {value!r}: use a value of type {kind.__name__}")

    def need(ok, name, advice):
        if not ok:
            value = getattr(cfg, name)
            raise UsageError(f"{flag(name)} {repr(value) if isinstance(value, str) else value}: {advice}")

    resolve_model(cfg.model)
    need(cfg.out.strip(), "out", "name an output folder, e.g. runs/flow_grpo")
    need(0 <= cfg.seed < 2**32, "seed", "use 0 to 4294967295")
    need(cfg.resolution > 0, "resolution", "use a positive image side in pixels (512 for SD3.5-M)")
    need(cfg.num_steps >= 1, "num_steps", "use 1 or more denoising steps (10 is the official)")
    need(cfg.eval_num_steps >= 1, "eval_num_steps", "use 1 or more denoising steps (40 is the official)")
    need(cfg.guidance_scale >= 1, "guidance_scale", "use 1 (no CFG) or more (4.5 is the official)")
    need(cfg.groups_per_step >= 1, "groups_per_step", "use 1 or more prompts per step")
    need(cfg.batch_size >= 1, "batch_size", "use 1 or more images per forward pass")
    need(cfg.updates_per_step >= 1, "updates_per_step", "use 1 or more optimizer steps per step (2 is the official)")
    need(cfg.clip_range > 0, "clip_range", "use a positive clip range (1e-4 is the official)")
    need(cfg.adv_clip > 0, "adv_clip", "use a positive advantage clip (5 is the official)")
    need(cfg.beta >= 0, "beta", "use 0 (no KL) or a positive KL weight (0.01 is the official for PickScore)")
    need(0 < cfg.train_fraction <= 1, "train_fraction", "use a fraction in (0, 1] (0.99: every step but the last)")
    if not cfg.sde_window:  # Flow-GRPO-Fast trains its window, whatever the fraction
        need(
            int(cfg.num_steps * cfg.train_fraction) >= 1,
            "train_fraction",
            f"of --num-steps {cfg.num_steps} is no step to train: raise either",
        )
    need(cfg.lr > 0, "lr", "use a positive learning rate (3e-4 is the official)")
    need(cfg.weight_decay >= 0, "weight_decay", "use 0 or a positive weight decay (1e-4 is the official)")
    need(cfg.max_grad_norm > 0, "max_grad_norm", "use a positive gradient-norm clip (1.0 is the official)")
    need(cfg.lora_rank >= 1, "lora_rank", "use a rank of 1 or more (32 is the official)")
    need(cfg.lora_alpha > 0, "lora_alpha", "use a positive alpha (64 is the official)")
    need(cfg.ema_every >= 1, "ema_every", "use 1 or more optimizer steps between EMA updates (8 is the official)")
    need(cfg.max_steps >= 1, "max_steps", "use 1 or more steps")
    need(cfg.eval_every >= 1, "eval_every", "use 1 or more steps between evaluations")
    need(cfg.save_every >= 1, "save_every", "use 1 or more steps between checkpoints")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "keep 1 or more (the newest is what --resume needs)")
    try:
        weights = [weight for _, weight in rewards.parse_reward_spec(cfg.reward)]
    except ValueError as error:
        raise UsageError(str(error)) from None
    need(any(weights), "reward", "every weight is 0, so every advantage is 0 and nothing trains: give a nonzero weight")
    if cfg.eval_reward:  # "" scores the evaluation with the training reward alone
        try:
            rewards.parse_reward_spec(cfg.eval_reward)
        except ValueError as error:
            raise UsageError(f"--eval-reward: {error}") from None
    unknown = [name for name in reward_model_dirs(cfg.reward_model_dir) if name not in rewards.MODEL_REWARDS]
    need(not unknown, "reward_model_dir", f"only {', '.join(rewards.MODEL_REWARDS)} load a model from a folder")
    host, _, port = cfg.reward_server.rpartition(":")
    need(host and port.isdigit() and 0 < int(port) < 65536, "reward_server", "write HOST:PORT, e.g. 127.0.0.1:18085")
    need(cfg.reward_timeout > 0, "reward_timeout", "use a positive number of seconds (120 as the official client)")
    need(cfg.reward_retry_minutes >= 0, "reward_retry_minutes", "use 0 (no retries) or more minutes (10 by default)")
    url = urllib.parse.urlsplit(cfg.vlm_url)
    need(url.scheme in ("http", "https") and url.hostname, "vlm_url", "write e.g. http://127.0.0.1:17140/v1")
    need(cfg.vlm_model.strip(), "vlm_model", "name the model the endpoint serves, e.g. UnifiedReward-7b-v1.5")
    need(cfg.vlm_concurrency >= 1, "vlm_concurrency", "use 1 or more requests at once")
    if cfg.vlm_template:
        try:
            with open(cfg.vlm_template, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as error:
            need(False, "vlm_template", f"cannot read it ({getattr(error, 'strerror', None) or error})")
        need("{prompt}" in template, "vlm_template", "write {prompt} where the image's prompt goes")
    check_trackers(cfg.log_with)


def check_config(cfg: Config, dist: Distributed):
    check_flags(cfg)
    if cfg.group_size < 2:
        raise UsageError(f"--group-size {cfg.group_size}: GRPO compares samples of a prompt, a group needs at least 2")
    images = cfg.groups_per_step * cfg.group_size
    if cfg.batch_size < 1 or images % (cfg.batch_size * dist.world):
        raise UsageError(
            f"--groups-per-step {cfg.groups_per_step} x --group-size {cfg.group_size} = {images} images must split "
            "into "
            f"batches of --batch-size {cfg.batch_size} on {dist.world} process(es)"
        )
    batches = images // (cfg.batch_size * dist.world)
    if not 1 <= cfg.updates_per_step <= batches:
        raise UsageError(
            f"--updates-per-step {cfg.updates_per_step}: use 1..{batches}, the rollout batches per process "
            "(as the official gradient accumulation: at least one batch per optimizer step)"
        )
    if cfg.sde_type not in choices_of("sde_type"):
        raise UsageError(f"--sde-type {cfg.sde_type}: use sde or cps")
    largest = 1.5 if cfg.sde_type == "sde" else 1.0  # cps: sin(a pi / 2) peaks at a = 1
    if not 0 < cfg.noise_level <= largest:
        raise UsageError(
            f"--noise-level {cfg.noise_level}: use (0, {largest}] for {cfg.sde_type} (0.7 for sde, 0.8 for cps)"
        )
    if cfg.sde_window < 0 or cfg.sde_window > cfg.num_steps // 2:
        raise UsageError(f"--sde-window {cfg.sde_window}: use 0 (all steps) or 1..{cfg.num_steps // 2}")
    if cfg.ratio_norm and cfg.sde_type != "sde":
        raise UsageError("--ratio-norm is defined for --sde-type sde only (as in the official GRPO-Guard script)")
    if cfg.dtype not in choices_of("dtype"):
        raise UsageError(f"--dtype {cfg.dtype}: use auto, fp32, bf16 or fp16")
    if is_flux(cfg.model) and cfg.dtype == "fp16":  # (auto is bf16 on a GPU)
        raise UsageError(
            "--dtype fp16: FLUX.1's activations exceed fp16's largest value 65504 (diffusers clips two of them "
            "there, changing the velocity); the official FLUX runs are bf16: use --dtype bf16 or fp32"
        )


def choices_of(name: str):
    return next(f.metadata["choices"] for f in fields(Config) if f.name == name)


MODEL_ALIASES = {
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "flux.1-dev": "black-forest-labs/FLUX.1-dev",
}
PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")  # what a local folder's model_index.json may name


def folder_pipeline_class(folder: str) -> str:
    """The pipeline class a diffusers folder's model_index.json names ('' if none can be read)."""
    try:
        with open(os.path.join(folder, "model_index.json")) as index:
            return str(json.load(index).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def is_flux(model: str) -> bool:
    """Whether --model is a FLUX.1 model, told before loading it: tiny-flux, a folder whose model_index.json names
    FluxPipeline, or an alias or hub id whose name says FLUX (as every black-forest-labs FLUX.1 repository's does)."""
    if os.path.isdir(model):
        return folder_pipeline_class(model) == "FluxPipeline"
    return "flux" in MODEL_ALIASES.get(model, model).lower()


def resolve_model(model: str) -> str:
    """The hub id or local folder that --model names, checked without loading anything."""

    if model in ("tiny", "tiny-flux"):
        return model
    if os.path.isdir(model):
        if folder_pipeline_class(model) not in PIPELINE_CLASSES:
            raise UsageError(
                f"{model} is not a diffusers SD3 or FLUX pipeline folder (no model_index.json naming "
                f"{' or '.join(PIPELINE_CLASSES)})"
            )
        return model
    if model in MODEL_ALIASES:
        return MODEL_ALIASES[model]
    if model.count("/") != 1:
        raise UsageError(
            f"unknown model '{model}': use an alias ({', '.join(MODEL_ALIASES)}, tiny, tiny-flux), a hub id org/name "
            "or a local folder"
        )
    return model


def check_resolution(pipe, cfg: Config):
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = pipe.transformer.config.patch_size
    if isinstance(model_policy(pipe), FluxPolicy):  # 2x2 latent patches, rotary positions: no largest size
        patch, largest = 2, math.inf
    else:
        largest = pipe.transformer.config.pos_embed_max_size * patch * scale
    if cfg.resolution % (scale * patch) or cfg.resolution > largest:
        raise UsageError(
            f"--resolution {cfg.resolution}: this model takes multiples of {scale * patch} up to {largest} px"
        )


def reward_model_dirs(spec: str):
    """{name: folder} of --reward-model-dir, NAME=FOLDER items comma-separated (a repeated flag arrives joined so)."""
    dirs = {}
    for item in filter(None, spec.split(",")):
        name, sep, folder = (part.strip() for part in item.partition("="))
        if not sep or not folder:
            raise UsageError(f"--reward-model-dir '{item}': write NAME=FOLDER, e.g. pickscore=/models/pickscore")
        if name in dirs:
            raise UsageError(f"--reward-model-dir names {name} twice ({dirs[name]}, {folder}): give one folder each")
        dirs[name] = folder
    return dirs


class Prompt(str):
    """A prompt read from JSON Lines: its text, with the line's whole object as `.metadata` (GenEval's `tag`,
    `include`, ...). A str, so everything that handles prompt text (text encoders, the text cache, grouping by
    prompt) works unchanged, and the metadata travels with the prompt to the reward (score)."""

    def __new__(cls, text: str, metadata: dict):
        prompt = super().__new__(cls, text)
        prompt.metadata = metadata
        return prompt


def prompt_metadata(prompt) -> dict:
    """The metadata of a prompt: its JSON Lines object, or {} for a line of a plain text file (as the official
    `TextPromptDataset` in `scripts/train_sd3.py`)."""
    return getattr(prompt, "metadata", {})


def read_prompts(path: str, builtin):
    """The prompts of a file: one per line, or with a .jsonl name one JSON object per line with a "prompt" field
    and any others (the official `dataset/geneval/*_metadata.jsonl`), each a Prompt carrying its object."""
    if not path:
        return list(builtin)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(
            f"cannot read prompt file {path}: {error.strerror if isinstance(error, OSError) else error}"
        ) from None
    if not lines:
        raise UsageError(f"prompt file {path} has no prompts: write one prompt per line")
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            item = error
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            problem = f"not JSON ({item.msg})" if isinstance(item, Exception) else 'no "prompt" text'
            raise UsageError(
                f'{path}, line {number}: {problem}; write one JSON object per line with a "prompt" field, '
                'e.g. {"prompt": "a photo of a bench", "tag": "single_object"}'
            )
        prompts.append(Prompt(item["prompt"].strip(), item))
    return prompts


def server_options(cfg: Config):
    import rewards

    return rewards.ServerOptions(
        geneval=cfg.reward_server,
        vlm_url=cfg.vlm_url,
        vlm_model=cfg.vlm_model,
        vlm_template=cfg.vlm_template,
        vlm_concurrency=cfg.vlm_concurrency,
        timeout=cfg.reward_timeout,
        retry_minutes=cfg.reward_retry_minutes,
    )


def read_prompt_sets(cfg: Config):
    """(training, evaluation) prompts: the files given, else the built-in sets, the OCR ones where a reward
    scoring them names ocr (--reward: both sets; --eval-reward: the evaluation's). Those prompts must quote their
    text: checked here, before any work."""
    import rewards

    def names(spec):
        return [item.partition("=")[0].strip() for item in spec.split(",")]

    ocr = "ocr" in names(cfg.reward)
    eval_ocr = ocr or "ocr" in names(cfg.eval_reward)
    prompts = read_prompts(cfg.prompts, BUILTIN_OCR_PROMPTS if ocr else BUILTIN_PROMPTS)
    eval_prompts = read_prompts(cfg.eval_prompts, BUILTIN_OCR_EVAL_PROMPTS if eval_ocr else BUILTIN_EVAL_PROMPTS)
    for path, chosen, checked in ((cfg.prompts, prompts, ocr), (cfg.eval_prompts, eval_prompts, eval_ocr)):
        if checked:
            for prompt in chosen:
                try:
                    rewards.ocr_target(prompt)
                except ValueError as error:
                    raise UsageError(f"{error} (in {path or 'the built-in prompts'})") from None
    geneval = "geneval" in names(cfg.reward)
    for flag, path, chosen, checked in (
        ("--prompts", cfg.prompts, prompts, geneval),
        ("--eval-prompts", cfg.eval_prompts, eval_prompts, geneval or "geneval" in names(cfg.eval_reward)),
    ):
        if checked and not all("tag" in prompt_metadata(prompt) for prompt in chosen):
            raise UsageError(
                f"{flag} {path or '(the built-in prompts)'}: reward geneval needs GenEval metadata ('tag', 'include') "
                "with every prompt: pass the official dataset/geneval/train_metadata.jsonl and test_metadata.jsonl"
            )
    return prompts, eval_prompts


def score(reward_fn, images, prompts):
    """The reward of each image, with its prompt and its prompt's metadata (prompt_metadata)."""
    try:
        return reward_fn(images, prompts, metadata=[prompt_metadata(prompt) for prompt in prompts])
    except ValueError as error:  # e.g. a custom reward that returned the wrong shape or non-finite values
        raise UsageError(str(error), every_rank=False) from None


MAX_NONFINITE_IN_A_ROW = 3


class TrainingDiverged(Exception):
    """Too many non-finite updates in a row: stop rather than train on garbage."""


# The run folder ----------------------------------------------------------------------------------


_FOLDER_LOCKS = {}  # real path of an --out this process runs in -> descriptor holding its lock


def lock_output_folder(out: str):
    """An exclusive flock on the --out folder itself (no lock file is written), held for the run, so a
    second run on the same folder is refused instead of writing into it. The kernel drops the lock when
    the process ends, however it ends: a killed run never leaves a stale lock behind."""

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    fd = os.open(os.path.realpath(out), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"{out} is in use by another run (it holds the folder's lock): wait for it to end, or choose another --out"
        ) from None
    except OSError as error:  # a file system without flock
        os.close(fd)
        print(f"warning: cannot lock {out} ({error.strerror}): nothing stops a second run writing into it", flush=True)
        return
    _FOLDER_LOCKS[os.path.realpath(out)] = fd


def unlock_output_folder(out: str):
    fd = _FOLDER_LOCKS.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)


# out: the folder may have been moved or named by another path since.
# What a resumed run may change: none of them changes training (--eval-reward adds or drops a monitor, --log-with
# a tracker; a served reward may move or answer slower: where it lives and how long to wait for it do not change
# the math).
RESUMABLE_CHANGES = {"resume", "out", "max_steps", "eval_every", "save_every", "keep_checkpoints", "eval_reward"}
RESUMABLE_CHANGES |= {"log_with"}
RESUMABLE_CHANGES |= {"reward_server", "reward_timeout", "reward_retry_minutes", "vlm_url", "vlm_concurrency"}


def check_output_folder(cfg: Config, lock: bool = True):
    """Never overwrite a run; resume only a run with the same config; fail before any work if the
    folder cannot be written or another run holds it (lock: rank 0 alone takes the folder's lock)."""

    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = f"{cfg.out}/.write_test_{os.getpid()}"
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write to output folder {cfg.out}: {error.strerror}") from None
    if lock:  # before looking at the folder: two runs started together cannot both find it free
        lock_output_folder(cfg.out)
    config_path = f"{cfg.out}/config.json"
    if os.path.exists(config_path) and finished_a_step(cfg.out):
        if not cfg.resume:
            raise UsageError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
        with open(config_path) as f:
            saved = json.load(f)
        differ = [k for k, v in vars(cfg).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in differ)
            raise UsageError(
                f"--resume: {cfg.out} holds a run with a different config ({detail}): "
                "use the same flags or another --out"
            )
    elif cfg.resume and not os.path.exists(config_path):
        raise UsageError(f"--resume: {cfg.out} holds no run (no config.json): drop --resume to start one")


def finished_a_step(out: str) -> bool:
    """Whether the run in out finished a step (a line in metrics.jsonl, or a checkpoint). config.json is
    written before the first evaluation, so a run that failed before its first step (a reward that
    raised, an out-of-memory, Ctrl-C) leaves one; it has nothing worth keeping or resuming, and must
    not make the corrected command refuse to start."""

    metrics = f"{out}/metrics.jsonl"
    return (os.path.exists(metrics) and os.path.getsize(metrics) > 0) or latest_checkpoint(out) is not None


def write_run_files(cfg: Config, start_step: int):
    """config.json for a new run; on resume, drop the metrics of steps that will be redone."""

    with open(f"{cfg.out}/config.json.tmp", "w") as f:
        json.dump({k: v for k, v in vars(cfg).items() if k != "resume"}, f, indent=1)
    os.replace(f"{cfg.out}/config.json.tmp", f"{cfg.out}/config.json")
    metrics = f"{cfg.out}/metrics.jsonl"
    if cfg.resume and os.path.exists(metrics):
        with open(metrics) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def read_metrics(folder: str) -> list:
    """The records of a run's metrics.jsonl, one per step (a missing file reads as no steps)."""

    path = f"{folder}/metrics.jsonl"
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Checkpoints and the LoRA in diffusers' format ---------------------------------------------------


def save_lora(transformer, lora_config, folder):
    """The LoRA in diffusers' format: StableDiffusion3Pipeline.load_lora_weights(folder) loads it."""
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    state = {k.removeprefix("base_model.model."): v.detach().cpu().contiguous() for k, v in state.items()}
    # Without the adapter metadata diffusers would scale by 1 instead of alpha / r.
    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=lora_config.to_dict()
    )


def latest_checkpoint(out: str):
    found = sorted(glob.glob(f"{out}/checkpoints/step_*"))
    return found[-1] if found else None


def save_checkpoint(
    cfg: Config, step: int, optimizer_step: int, params, ema_params, optimizer, transformer, lora_config, scaler=None
):
    """Written under a temporary name, then renamed: a killed run never leaves a half checkpoint. It also
    holds the (EMA) LoRA in diffusers' format, as lora/ at the end of a run, so the weights of a run
    that died are usable with load_lora_weights(CHECKPOINT) without resuming it."""

    from safetensors.torch import save_file

    final = f"{cfg.out}/checkpoints/step_{step:06d}"
    tmp = f"{cfg.out}/checkpoints/.tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(params)}, f"{tmp}/lora.safetensors")
    save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema_params)}, f"{tmp}/ema.safetensors")
    with shown_weights(params, ema_params, cfg):
        save_lora(transformer, lora_config, tmp)
    torch.save(optimizer.state_dict(), f"{tmp}/optimizer.pt")
    # All sampling noise comes from generators seeded by (seed, step, rank), so the step restores it;
    # the global states are kept for anything else that draws from them.
    torch.save(
        {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        f"{tmp}/rng.pt",
    )
    with open(f"{tmp}/state.json", "w") as f:
        state = {"step": step, "optimizer_step": optimizer_step}
        if scaler is not None and scaler.is_enabled():  # fp16: the loss scale reached, for an exact resume
            state["grad_scaler"] = scaler.state_dict()
        json.dump(state, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(os.listdir(f"{cfg.out}/checkpoints"))[: -cfg.keep_checkpoints]:
        if old.startswith("step_"):
            shutil.rmtree(f"{cfg.out}/checkpoints/{old}")


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be read back (truncated by a full disk, garbage, missing)."""


def read_checkpoint(folder: str) -> dict:
    """Every file of a checkpoint read in full, so that damage shows here, before anything is restored."""

    from safetensors.torch import load_file

    def read_json(path):
        with open(path) as f:
            return json.load(f)

    readers = {
        "lora.safetensors": load_file,
        "ema.safetensors": load_file,
        "optimizer.pt": lambda path: torch.load(path, weights_only=True),
        "rng.pt": lambda path: torch.load(path, weights_only=True),
        "state.json": read_json,
    }
    saved = {}
    for name, read in readers.items():
        try:
            saved[name] = read(f"{folder}/{name}")
        except Exception as error:  # noqa: BLE001 (safetensors, pickle, zip, json, OS errors alike mean: damaged)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:100]
            raise DamagedCheckpoint(f"{folder}/{name} ({reason})") from None
    return saved


def load_checkpoint(folder: str, params, ema_params, optimizer, scaler=None):
    """Restore a checkpoint; a damaged one raises DamagedCheckpoint and changes nothing."""
    saved = read_checkpoint(folder)
    for target, name in ((params, "lora.safetensors"), (ema_params, "ema.safetensors")):
        values = saved[name]
        shapes = {k: v.shape for k, v in values.items()}
        if shapes != {str(i): p.shape for i, p in enumerate(target)}:
            raise DamagedCheckpoint(f"{folder}/{name} (does not hold this run's LoRA tensors)")
    try:
        optimizer.load_state_dict(saved["optimizer.pt"])
        step, optimizer_step = saved["state.json"]["step"], saved["state.json"]["optimizer_step"]
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedCheckpoint(f"{folder} ({type(error).__name__}: {str(error)[:100]})") from None
    for target, name in ((params, "lora.safetensors"), (ema_params, "ema.safetensors")):
        with torch.no_grad():
            for i, p in enumerate(target):
                p.copy_(saved[name][str(i)])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in saved["state.json"]:
        scaler.load_state_dict(saved["state.json"]["grad_scaler"])
    rng = saved["rng.pt"]
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return step, optimizer_step


def resume_checkpoint(out: str, params, ema_params, optimizer, warn: bool = True, scaler=None):
    """Restore the newest intact checkpoint of out and return its (step, optimizer_step), (0, 0) if it
    has none. A damaged newer one (a full disk, a copy cut short) is skipped with a one-line warning;
    if every one is damaged the run stops with one line rather than silently start again."""

    damaged = []
    for folder in sorted(glob.glob(f"{out}/checkpoints/step_*"), reverse=True):
        try:
            steps = load_checkpoint(folder, params, ema_params, optimizer, scaler)
        except DamagedCheckpoint as error:
            damaged.append(str(error))
            continue
        if damaged and warn:
            more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
            print(f"warning: damaged checkpoint {damaged[0]}{more} skipped: resuming from {folder}", flush=True)
        return steps
    if damaged:
        raise UsageError(
            f"--resume: every checkpoint in {out}/checkpoints is damaged (the newest: {damaged[0]}): "
            f"move them away to start again from step 0"
        )
    return 0, 0


# The text encoders, live or cached on disk (--precompute-text-embeds) ----------------------------


def text_encoder_for(pipe, cfg: Config, all_prompts, device, rank: int = 0, world: int = 1):
    """The text of a batch: a function text_for(prompts, repeats=1) -> TextEmbeddings with one row per image
    (prompt i repeated `repeats` times; a plain per-image list with the default repeats=1, so a batch may hold
    several prompts with any counts). The negative prompt "" is encoded once, not once per prompt.

    Live (default): the encoders stay on the device and each call encodes its distinct prompts. The official
    `scripts/train_sd3.py`, `main()`, does the same: it encodes each sampling batch's prompts, and "" once.
    precompute_text_embeds: each distinct prompt of all_prompts (the run's drawn prompts and the eval prompts,
    prompts_drawn) that OUT/text_embeds lacks is encoded once into it on disk (each process of a torchrun
    encodes a share), the encoders are freed, and each call reads its rows from the files (TextCache): a
    process's memory does not grow with the number of prompts. A resumed run reuses the rows it has, without
    loading the encoders onto the device unless it needs new ones (a larger --max-steps).
    """

    policy = model_policy(pipe)
    guided = policy.uses_cfg and cfg.guidance_scale > 1  # FLUX's guidance is an input of the network: no negative
    if not cfg.precompute_text_embeds:
        for encoder in text_encoders(pipe):
            encoder.to(device)
        negative = policy.encode_text([""], device) if guided else None

        def live(prompts, repeats=1):
            prompts = per_image(prompts, repeats)
            row = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
            index = torch.tensor([row[p] for p in prompts], device=device)
            return images_text(policy.encode_text(list(row), device), index, negative)

        return live

    folder = f"{cfg.out}/text_embeds"
    prompts = list(dict.fromkeys(["", *all_prompts]))  # "" first: row 0 of a new cache
    encoder = text_encoders(pipe)[-1]  # T5: its dtype is the rows'
    fingerprint = text_cache_fingerprint(cfg.model, encoder.dtype)
    if not all_ranks_agree(TextCache.holds(folder, fingerprint, prompts), device, world):
        for encoder in text_encoders(pipe):
            encoder.to(device)
        write_text_cache(pipe, folder, prompts, fingerprint, device, rank, world)
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if not TextCache.holds(folder, fingerprint, prompts):
        raise UsageError(
            f"the text cache {folder} written by rank 0 is not visible to rank {rank}: "
            "--out must be on a filesystem that every process (every node) shares"
        )
    return TextCache(folder, device, guided)


def text_encoders(pipe) -> list:
    """SD3's CLIP-L, CLIP-G and T5, or FLUX's CLIP-L and T5, those not freed."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]


def prompts_drawn(cfg: Config, prompts) -> list:
    """The distinct training prompts of the steps this run may take, known before its first step since
    prompts_for_step is a pure function of (step, seed): from step 0, or with --resume from the oldest
    checkpoint's step (resume_checkpoint takes the newest intact one, never an older one), to --max-steps."""
    first = 0
    if cfg.resume and (found := sorted(glob.glob(f"{cfg.out}/checkpoints/step_*"))):
        first = int(os.path.basename(found[0]).removeprefix("step_"))
    steps = range(first, cfg.max_steps)
    return list(
        dict.fromkeys(p for step in steps for p in prompts_for_step(prompts, cfg.groups_per_step, step, cfg.seed))
    )


def encode_prompts(pipe, prompts, group_size: int, guidance_scale: float, device) -> TextEmbeddings:
    """CLIP-L + CLIP-G + T5 (128 tokens) embeddings, each prompt repeated group_size times; with CFG
    the embeddings of the negative prompt "" come first. What StableDiffusion3Pipeline itself does
    (it encodes "" once per prompt), or FluxPipeline (CLIP-L pooled + T5, no negative whatever the guidance
    scale: FLUX's is an input of the network): the reference that text_encoder_for's functions are tested against."""
    if not model_policy(pipe).uses_cfg:
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompts, prompts, device=device, num_images_per_prompt=group_size, max_sequence_length=128
            )
        return TextEmbeddings(embeds, pooled)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=device,
            num_images_per_prompt=group_size,
            do_classifier_free_guidance=guidance_scale > 1,
            negative_prompt="",
            max_sequence_length=128,
        )
    if guidance_scale > 1:
        return TextEmbeddings(torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled]))
    return TextEmbeddings(embeds, pooled)


def images_text(rows: TextEmbeddings, index: torch.Tensor, negative) -> TextEmbeddings:
    """Row index[i] of `rows` for image i; with CFG (negative given) the negative's copies come first."""
    embeds, pooled = rows.embeds[index], rows.pooled[index]
    if negative is not None:
        n = len(index)
        embeds = torch.cat([negative.embeds.expand(n, -1, -1), embeds])
        pooled = torch.cat([negative.pooled.expand(n, -1), pooled])
    return TextEmbeddings(embeds, pooled)


TEXT_CACHE_VERSION = 2


def text_cache_fingerprint(model: str, dtype: torch.dtype) -> dict:
    """What every row depends on: a cache with another fingerprint is rebuilt; one with this fingerprint is
    reused row by row, and grows by the prompts it lacks."""

    return {"version": TEXT_CACHE_VERSION, "model": model, "dtype": str(dtype), "max_sequence_length": 128}


def read_text_cache_index(folder) -> dict:
    """index.json of a text cache ({} if none or unreadable): fingerprint, dtype, row shapes and the prompt of
    each row, in row order. It is written last, under a temporary name and renamed: rows it does not list do
    not exist (a killed run may leave some in the files; the next one cuts them off)."""
    try:
        with open(f"{folder}/index.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_text_cache(pipe, folder, prompts, fingerprint, device, rank: int, world: int, chunk: int = 32):
    """Encode once each prompt of `prompts` that the cache lacks, appended as rows of two flat files,
    embeds.bin [rows, tokens, dim] and pooled.bin [rows, dim] in the encoders' dtype. A new cache (none, or
    another fingerprint) starts with the negative "", row 0, encoded alone by rank 0; the new rows go in chunks
    of `chunk` prompts, process r of `world` encoding chunks r, r + world, ... and writing them in place.
    index.json, rewritten last by rank 0, is what makes the new rows part of the cache."""

    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm

    index = read_text_cache_index(folder)
    fresh = index.get("fingerprint") != fingerprint
    barrier(world)  # every process has read the index before rank 0 changes anything
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    if fresh:
        if rank == 0:  # a stale cache (another model or dtype) or a half-written one is of no use: free its space
            shutil.rmtree(folder, ignore_errors=True)
        barrier(world)
        probe = model_policy(pipe).encode_text(
            [prompts[0]], device
        )  # "", row 0: gives the row shapes before anything is written
        shapes = {"embeds": list(probe.embeds.shape[1:]), "pooled": list(probe.pooled.shape[1:])}
        dtype, held, new = probe.embeds.dtype, [], prompts
    else:
        shapes, dtype = index["shapes"], getattr(torch, index["dtype"].removeprefix("torch."))
        held = index["prompts"]
        known = set(held)
        new = [p for p in prompts if p not in known]
    row_bytes = {k: math.prod(shape) * dtype.itemsize for k, shape in shapes.items()}
    needed = len(new) * sum(row_bytes.values())
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(folder))).free
    if free < needed:  # every process sees the same disk, so all of them stop here: no one waits at a barrier
        raise UsageError(
            f"--precompute-text-embeds: the embeddings of {len(new)} prompts need "
            f"{needed / 1e9:.1f} GB in {folder}, {free / 1e9:.1f} GB are free: free some space or "
            "choose another --out"
        )
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        for name in shapes:  # cut off the rows of a growth that was killed before its index was written
            with open(f"{folder}/{name}.bin", "ab") as f:
                f.truncate(len(held) * row_bytes[name])
    barrier(world)
    verbosity = diffusers_logging.get_verbosity()
    # CLIP keeps 77 tokens of each prompt (as in every SD3 run); diffusers would say so for every chunk of the
    # official set's long prompts, thousands of warnings.
    diffusers_logging.set_verbosity_error()
    try:

        def put(row, text):
            for name, value in zip(shapes, text):
                with open(f"{folder}/{name}.bin", "r+b") as f:
                    f.seek(row * row_bytes[name])
                    f.write(value.cpu().contiguous().view(-1).view(torch.uint8).numpy())

        if fresh and rank == 0:
            put(0, probe)
        starts = range(int(fresh) + rank * chunk, len(new), world * chunk)
        for start in tqdm(starts, desc=f"encoding {len(new)} prompts", leave=False, disable=rank != 0):
            # Every chunk padded to `chunk` prompts: a row's last bits depend on the batch size (CLIP's pooled
            # projection picks its matmul kernel by it), so a row grown on --resume equals the row a run that
            # was never interrupted would have: the resumed run stays bit for bit the same.
            prompts_of_chunk = new[start : start + chunk]
            text = model_policy(pipe).encode_text(prompts_of_chunk + [""] * (chunk - len(prompts_of_chunk)), device)
            put(len(held) + start, TextEmbeddings(*(part[: len(prompts_of_chunk)] for part in text)))
    finally:
        diffusers_logging.set_verbosity(verbosity)
    barrier(world)
    if rank == 0:
        index = {"fingerprint": fingerprint, "dtype": str(dtype), "shapes": shapes, "prompts": held + new}
        with open(f"{folder}/index.json.tmp", "w") as f:
            json.dump(index, f, indent=0)
        os.replace(f"{folder}/index.json.tmp", f"{folder}/index.json")
    barrier(world)


class TextCache:
    """Text embeddings read row by row from the files write_text_cache wrote. In memory: the prompt -> row
    index and the negative prompt's embeddings (with CFG), nothing per prompt; the rows read for a batch live
    as long as the batch. Each prompt's row is the same bits whatever batch it is read in."""

    def __init__(self, folder, device, guidance: bool):
        index = read_text_cache_index(folder)
        self.dtype = getattr(torch, index["dtype"].removeprefix("torch."))
        self.shapes = index["shapes"]
        self.row_bytes = {k: math.prod(s) * self.dtype.itemsize for k, s in self.shapes.items()}
        self.folder = folder
        self.row = {p: i for i, p in enumerate(index["prompts"])}
        self.device = device
        self.negative = self.read([0]) if guidance else None  # row 0 is ""

    @staticmethod
    def holds(folder, fingerprint, prompts) -> bool:
        index = read_text_cache_index(folder)
        return index.get("fingerprint") == fingerprint and set(prompts) <= set(index["prompts"])

    def read(self, rows) -> TextEmbeddings:
        """The embeddings of the given rows, [len(rows), ...] on the device."""
        out = []
        for name, shape in self.shapes.items():
            value = torch.empty(len(rows), *shape, dtype=self.dtype)
            buffer = memoryview(value.view(-1).view(torch.uint8).numpy())
            size = self.row_bytes[name]
            # Plain reads into a fresh tensor, not a memory map: mapped pages would count in the process's
            # memory and grow with the number of prompts a long run touches.
            with open(f"{self.folder}/{name}.bin", "rb", buffering=0) as f:
                for i, row in enumerate(rows):
                    f.seek(row * size)
                    if f.readinto(buffer[i * size : (i + 1) * size]) != size:
                        raise OSError(f"text cache file {f.name} is truncated: delete {self.folder} to rebuild it")
            out.append(value.to(self.device))
        return TextEmbeddings(*out)

    def __call__(self, prompts, repeats: int = 1) -> TextEmbeddings:
        prompts = per_image(prompts, repeats)
        distinct = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        missing = [p for p in distinct if p not in self.row]
        if missing:
            raise KeyError(f"prompt not in the text cache: {missing[0]!r}")
        index = torch.tensor([distinct[p] for p in prompts], device=self.device)
        return images_text(self.read([self.row[p] for p in distinct]), index, self.negative)


# Data parallelism (torchrun) ---------------------------------------------------------------------


class Distributed(NamedTuple):
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Under torchrun: one process per GPU (NCCL), or per CPU process (gloo). Otherwise one process."""

    if "RANK" not in os.environ:
        return Distributed(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # a second train() in the same processes keeps the first's group
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, device)


def all_gather(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    if dist.world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_reduce(tensor: torch.Tensor, op: str, dist: Distributed) -> torch.Tensor:
    """The elementwise "sum" or "max" of tensor over all ranks, in place."""
    if dist.world > 1:
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
        torch.distributed.all_reduce(tensor, op=ops[op])
    return tensor


def sum_gradients(params, dist: Distributed):
    """Data parallelism by hand: one all-reduce (sum) of the flattened LoRA gradients per optimizer step. The
    losses are already divided by the sample count of all ranks (loss_weights), so the sum is the mean.
    (DDP's wrapper adds nothing here but hooks that fight with disable_adapter and accumulation.)"""
    if dist.world == 1:
        return
    grads = torch.cat([p.grad.flatten() for p in params])
    torch.distributed.all_reduce(grads)
    offset = 0
    for p in params:
        p.grad.copy_(grads[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def all_ranks_agree(flag: bool, device, world: int) -> bool:
    """True only if flag is True on every process (all of them then take the same branch)."""
    if world == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


# EMA and evaluation ------------------------------------------------------------------------------


def ema_update(ema_params, params, optimizer_step: int):
    """EMA of the LoRA weights with the official warm-up decay min((1 + k) / (10 + k), 0.9)."""
    decay = min((1 + optimizer_step) / (10 + optimizer_step), 0.9)
    with torch.no_grad():
        for ema, p in zip(ema_params, params):
            ema.mul_(decay).add_(p.detach(), alpha=1 - decay)


class swap_in:
    """Temporarily load other values (the EMA) into the LoRA parameters."""

    def __init__(self, params, values):
        self.params, self.values = params, values

    def __enter__(self):
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, v in zip(self.params, self.values):
                p.copy_(v)

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, v in zip(self.params, self.saved):
                p.copy_(v)


def shown_weights(params, ema_params, cfg: Config) -> swap_in:
    """The weights a run evaluates and saves (lora/, checkpoints), swapped into the LoRA: the EMA with --ema."""
    return swap_in(params, ema_params if cfg.ema else params)


def evaluate(pipe, transformer, cfg: Config, dist: Distributed, reward_fn, eval_prompts, text_for, step: int):
    """The paper's evaluation: a 40-step ODE (a = 0) with CFG on held-out prompts, one image each,
    prompts split over the ranks. Returns the mean over all ranks of every component of reward_fn (load_rewards:
    the training reward's and the monitors'), of the training reward (eval_reward) and, with --eval-reward, of
    its weighted sum (eval_monitor)."""
    from tqdm import tqdm

    import rewards

    policy = model_policy(pipe, cfg.resolution)
    sigmas, timesteps = policy.schedule(cfg.eval_num_steps, dist.device)
    mine = eval_prompts[dist.rank :: dist.world]
    names = list(reward_fn.names) + ["reward"]
    images, scores = [], []
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="eval", leave=False, disable=not dist.main):
        prompts = mine[start : start + cfg.batch_size]
        noise = torch.randn(len(prompts), *policy.latent_shape(), generator=seeded(cfg.seed, -1, dist.rank, start))
        out = sample(
            transformer,
            text_for(prompts, 1),
            noise.to(dist.device),
            sigmas,
            timesteps,
            cfg.guidance_scale,
            [0.0] * cfg.eval_num_steps,
            velocity=policy.velocity,
        )
        batch_images = policy.decode(out.latents[:, -1])
        images += batch_images
        result = score(reward_fn, batch_images, prompts)
        scores.append(torch.stack([result[name] for name in names], dim=1))
    scores = torch.cat(scores) if scores else torch.zeros(0, len(names))
    counts = all_gather(torch.tensor([float(len(scores))], device=dist.device), dist)
    totals = all_gather(scores.sum(0, keepdim=True).to(dist.device), dist).sum(0)
    if dist.main and images:
        save_image_grid(images, mine, f"{cfg.out}/eval_{step:05d}.png")
    means = {f"eval_{name}": (totals[i] / counts.sum()).item() for i, name in enumerate(names)}
    if cfg.eval_reward:  # the mean of sum_k w_k r_k is sum_k w_k (mean of r_k)
        watched = rewards.parse_reward_spec(cfg.eval_reward)
        means["eval_monitor"] = sum(weight * means[f"eval_{name}"] for name, weight in watched)
    return means


ROLLOUT_GROUPS_SHOWN = 2


def save_rollout_groups(
    run: Run, cfg: Config, dist: Distributed, step: int, batches, image_prompts, image_rewards, advantages
):
    """rollout_NNNNN.png: the step's first ROLLOUT_GROUPS_SHOWN groups (all G images of each prompt) as the SDE
    rollout drew them, each image captioned with its reward and advantage: what the policy samples, next to the
    ODE evaluation. A group may span ranks, so each rank sends the final latents of its first images (as many as
    are shown, or all it has) and rank 0 decodes the shown ones, in batches as the rollout did."""
    shown = min(ROLLOUT_GROUPS_SHOWN, cfg.groups_per_step) * cfg.group_size
    mine = torch.cat([batch.trajectory.latents[:, -1] for batch in batches])[:shown]
    latents = all_gather(mine, dist)[:shown]  # rank after rank: the step's first `shown` images
    if not dist.main:
        return
    images = [
        image
        for b in range(0, shown, cfg.batch_size)
        for image in model_policy(run.pipe, cfg.resolution).decode(latents[b : b + cfg.batch_size])
    ]
    captions = [
        f"reward {float(image_rewards[i]):.5g}, advantage {float(advantages[i]):+.4f}\n{image_prompts[i]}"
        for i in range(shown)
    ]
    save_image_grid(images, captions, f"{cfg.out}/rollout_{step:05d}.png", columns=min(cfg.group_size, 8))


def save_image_grid(images, captions, path, columns=4):
    """A PNG of images with their captions (a prompt; lines of text) underneath, for a person to look at."""

    from PIL import Image, ImageDraw

    side = max(256, images[0].width)
    caption = 48
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(zip(images, captions)):
        x, y = (i % columns) * side, (i // columns) * (side + caption)
        grid.paste(image.resize((side, side)), (x, y))
        lines = [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, side // 7)]
        draw.multiline_text((x + 4, y + side + 2), "\n".join(lines[:3]), fill="black")
    grid.save(path)


# Metrics: the statistics of a step, the effect size and the curves -------------------------------


OBJECTIVE_PARTS = ("loss", "policy_loss", "kl", "approx_kl", "clip_fraction", "clipfrac_gt_one", "clipfrac_lt_one")


class StepStats:
    """What the updates of one step measured, for its log record. Each optimizer step's value of a part of the
    objective (OBJECTIVE_PARTS) and of ratio_mean is its mean over the informative (sample, trained step) pairs of
    all ranks, weighted as the loss is (loss_weights); ratio_min/max are its extremes there, grad_norm is its norm
    before clipping. summary(): the mean over the step's optimizer steps (extremes: min, max; grad norm: mean, max of
    the finite ones), and first_ratio_error, max |r - 1| over every ratio of any rank before the step's first
    optimizer step (0: on-policy). The official code (`scripts/train_sd3.py`, `main()`) logs each optimizer step: each
    rank's mean over its micro-batches and trained steps, accelerator.reduce(mean) over ranks: the same where every
    rank holds as many samples (it also averages the few zero-advantage samples that fill its micro-batches). It logs
    no ratio or gradient norm."""

    SUMMED = OBJECTIVE_PARTS + ("ratio_mean",)

    def __init__(self):
        self.updates = []  # one dict per optimizer step, reduced over the ranks
        self.first_ratio_error = None
        self.nonfinite_updates = self.overflow_updates = 0
        self._clear()

    def _clear(self):
        self.sums = torch.zeros(len(self.SUMMED), dtype=torch.float64)
        self.peaks = torch.full((3,), -math.inf, dtype=torch.float64)  # max r, max -r, max |r - 1| before an update
        self.losses_finite = True  # of the gradient being accumulated

    def add(self, parts: dict, ratio: torch.Tensor):
        self.sums += torch.tensor([parts[name] for name in self.SUMMED], dtype=torch.float64)
        first = (ratio - 1).abs().max().item() if not self.updates else -math.inf
        self.peaks = torch.maximum(self.peaks, torch.tensor([parts["ratio_max"], -parts["ratio_min"], first]))
        self.losses_finite = self.losses_finite and math.isfinite(parts["loss"])

    def end_update(self, grad_norm: float, dist: Distributed):
        """Every rank calls it at each optimizer step: the sums and extremes are reduced over the ranks here."""
        sums = all_reduce(self.sums.to(dist.device), "sum", dist).tolist()
        ratio_max, minus_ratio_min, first = all_reduce(self.peaks.to(dist.device), "max", dist).tolist()
        self.updates.append(dict(zip(self.SUMMED, sums), ratio_min=-minus_ratio_min, ratio_max=ratio_max))
        self.updates[-1]["grad_norm"] = grad_norm
        self.first_ratio_error = first if len(self.updates) == 1 else self.first_ratio_error
        self._clear()

    def summary(self) -> dict:
        updates, norms = self.updates, [u["grad_norm"] for u in self.updates if math.isfinite(u["grad_norm"])]
        summary = {name: sum(u[name] for u in updates) / len(updates) if updates else 0.0 for name in self.SUMMED}
        summary["ratio_mean"] = summary["ratio_mean"] if updates else None
        summary["ratio_min"] = min((u["ratio_min"] for u in updates), default=None)
        summary["ratio_max"] = max((u["ratio_max"] for u in updates), default=None)
        summary["grad_norm_mean"] = sum(norms) / len(norms) if norms else None
        summary["grad_norm_max"] = max(norms, default=None)
        return {**summary, "first_ratio_error": self.first_ratio_error}


def effect_size(records) -> dict:
    """How far a run raised its rollout reward, in within-step standard deviations:

        effect = (mean reward_mean of the last tenth of steps - mean reward_mean of the first tenth)
                 / mean reward_std over all steps

    a tenth being max(1, n // 10) of the n logged steps and reward_std the (population) std of the
    rewards of one step. The first and last logged evaluation rewards (40-step ODE) come along."""
    steps = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_reward" in r]
    if not steps:
        return {}
    k = max(1, len(steps) // 10)
    first = sum(r["reward_mean"] for r in steps[:k]) / k
    last = sum(r["reward_mean"] for r in steps[-k:]) / k
    spread = sum(r["reward_std"] for r in steps) / len(steps)
    return {
        "first": first,
        "last": last,
        "std": spread,
        "effect": (last - first) / spread if spread > 0 else math.nan,
        "first_steps": (steps[0]["step"], steps[k - 1]["step"]),
        "last_steps": (steps[-k]["step"], steps[-1]["step"]),
        "eval_first": (evals[0]["step"], evals[0]["eval_reward"]) if evals else None,
        "eval_last": (evals[-1]["step"], evals[-1]["eval_reward"]) if evals else None,
    }


def effect_size_line(records) -> str:
    """effect_size as the one line printed at the end of a run."""
    e = effect_size(records)
    if not e:
        return "effect size: no steps logged"
    line = (
        f"effect size: {e['effect']:+.2f} within-step stds (rollout reward {e['first']:.5g} over steps "
        f"{e['first_steps'][0]}-{e['first_steps'][1]} -> {e['last']:.5g} over steps {e['last_steps'][0]}-"
        f"{e['last_steps'][1]}; mean within-step std {e['std']:.2g})"
    )
    if e["eval_first"]:
        line += f"; eval reward {e['eval_first'][1]:.5g} at step {e['eval_first'][0]}"
        line += f" -> {e['eval_last'][1]:.5g} at step {e['eval_last'][0]}"
    return line


_NOTED_NO_MATPLOTLIB = []  # the note is printed once per process, not at every evaluation


def write_curves(folders, path: str) -> bool:
    """Draw the metrics.jsonl of one run, or of several overlaid, into the PNG `path` (curves_figure). Without
    matplotlib: one line saying so, no figure, False."""

    try:  # the object API: no pyplot, so no global backend switch in the training process
        import matplotlib.figure  # noqa: F401
    except ImportError:
        if not _NOTED_NO_MATPLOTLIB:
            print(f"note: matplotlib is not installed, so no {path} (pip install matplotlib)", flush=True)
            _NOTED_NO_MATPLOTLIB.append(True)
        return False
    fig = curves_figure(folders)
    fig.savefig(path + ".tmp", format="png", dpi=100)
    os.replace(path + ".tmp", path)  # a viewer never sees half a PNG
    return True


def _series(records, key):
    """The steps and values of `key` in the records that logged it (older runs lack the newer keys)."""
    kept = [r for r in records if r.get(key) is not None]
    return [r["step"] for r in kept], [r[key] for r in kept]


def eval_components(records) -> list:
    """The eval_<name> keys other than eval_reward, less one that repeats eval_reward at every evaluation (the
    single component of a training reward, weight 1)."""
    keys = sorted({k for r in records for k in r if k.startswith("eval_") and k != "eval_reward"})
    evals = [r for r in records if "eval_reward" in r]
    return [k for k in keys if not evals or any(r.get(k) != r["eval_reward"] for r in evals)]


def curves_figure(folders):
    """The figure of write_curves, one panel per question against the step: the rollout reward (mean ± std band)
    with the evaluation reward; the reward's std over the step and within prompt groups; the KL terms; the clip
    fractions (above 1 + eps, below 1 - eps, all); the ratio (mean, min-max band, 1 ± eps); the gradient norm
    before clipping (mean, max, the clipping threshold); the seconds per phase; then one panel per evaluated
    reward component (eval_components, with its rollout mean where it is a training component)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    if len(set(names)) < len(names):  # runs/a/out and runs/b/out: the whole paths tell them apart
        names = [os.path.normpath(f) for f in folders]
    runs = [[r for r in read_metrics(folder) if "reward_mean" in r] for folder in folders]
    components = sorted({k for records in runs for k in eval_components(records)})
    rows = math.ceil((7 + len(components)) / 3)
    fig = Figure(figsize=(15, 3.4 * rows), layout="constrained")
    axes = list(fig.subplots(rows, 3, sharex=True).flat)
    reward_ax, spread_ax, kl_ax, clip_ax, ratio_ax, norm_ax, time_ax = axes[:7]
    component_axes = dict(zip(components, axes[7:]))
    for i, (folder, records) in enumerate(zip(folders, runs)):
        colour, name = f"C{i}", (names[i] + ": " if len(folders) > 1 else "")
        config = {}
        if os.path.isfile(f"{folder}/config.json"):
            with open(f"{folder}/config.json") as f:
                config = json.load(f)
        eval_steps = f"{config['eval_num_steps']}-step ODE" if "eval_num_steps" in config else "ODE"
        step = [r["step"] for r in records]
        mean, std = torch.tensor([r["reward_mean"] for r in records]), torch.tensor([r["reward_std"] for r in records])
        reward_ax.plot(step, mean, color=colour, label=f"{name}rollout (SDE), mean ± std")
        reward_ax.fill_between(step, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
        reward_ax.plot(*_series(records, "eval_reward"), "o--", color=colour, label=f"{name}eval ({eval_steps})")
        spread_ax.plot(step, std, color=colour, label=name + "over the step's images")
        spread_ax.plot(*_series(records, "group_reward_std"), "--", color=colour, label=name + "within groups, mean")
        kls = (("kl", "-", "kl to the frozen model (β term)"), ("approx_kl", "--", "approx_kl to the rollout policy"))
        for key, style, label in kls:
            if any(r[key] > 0 for r in records):  # log axis: an all-zero series (β = 0) has nothing to draw
                kl_ax.plot(step, [r[key] for r in records], style, color=colour, label=name + label)
        clip_ax.plot(step, [r["clip_fraction"] for r in records], color=colour, label=name + "all")
        clip_ax.plot(*_series(records, "clipfrac_gt_one"), "--", color=colour, label=name + "r > 1 + ε")
        clip_ax.plot(*_series(records, "clipfrac_lt_one"), ":", color=colour, label=name + "r < 1 − ε")
        ratio_ax.plot(*_series(records, "ratio_mean"), color=colour, label=name + "mean, min to max")
        lows, highs = _series(records, "ratio_min"), _series(records, "ratio_max")
        ratio_ax.fill_between(lows[0], lows[1], highs[1], color=colour, alpha=0.2, linewidth=0)
        if "clip_range" in config:
            for bound in (1 - config["clip_range"], 1 + config["clip_range"]):
                ratio_ax.axhline(bound, color=colour, linestyle=":", linewidth=0.8)
        norm_ax.plot(*_series(records, "grad_norm_mean"), color=colour, label=name + "mean over optimizer steps")
        norm_ax.plot(*_series(records, "grad_norm_max"), "--", color=colour, label=name + "max")
        if "max_grad_norm" in config:
            norm_ax.axhline(config["max_grad_norm"], color=colour, linestyle=":", label=name + "clipping threshold")
        for phase, style in (("rollout", "-"), ("reward", ":"), ("train", "--")):
            time_ax.plot(step, [r[f"seconds_{phase}"] for r in records], style, color=colour, label=name + phase)
        for key, ax in component_axes.items():
            ax.plot(*_series(records, key), "o--", color=colour, label=f"{name}eval ({eval_steps})")
            if any(f"{key[5:]}_mean" in r for r in records):
                ax.plot(*_series(records, f"{key[5:]}_mean"), color=colour, alpha=0.5, label=f"{name}rollout mean")
    reward_ax.set(title="reward", ylabel="reward")
    spread_ax.set(title="reward std: all images, within groups", ylim=(0, None))
    kl_ax.set(title="KL per dimension")
    clip_ax.set(title="fraction of clipped ratios", ylim=(0, None))
    ratio_ax.set(title="ratio π_θ / π_old (dotted: 1 ± ε)")
    norm_ax.set(title="gradient norm before clipping")
    time_ax.set(title="seconds per phase of a step", ylim=(0, None))
    for key, ax in component_axes.items():
        ax.set(title=f"{key} (reward component)")
    for ax in (kl_ax, norm_ax):
        if any(y > 0 for line in ax.get_lines() for y in line.get_ydata()):  # a log axis needs a positive value
            ax.set_yscale("log")
    for ax in axes[7 + len(components) :]:
        ax.remove()
    shown = axes[: 7 + len(components)]
    for k, ax in enumerate(shown):
        ax.grid(alpha=0.3)
        ax.tick_params(labelbottom=True)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if k + 3 >= len(shown):  # the last panel of each column
            ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(names))
    return fig


# Experiment trackers (--log-with): TensorBoard, Weights & Biases ---------------------------------


TRACKERS = ("tensorboard", "wandb")  # each is also the name of its pip package and of the module imported


def tracker_names(log_with: str) -> list:
    return list(dict.fromkeys(name.strip() for name in log_with.split(",") if name.strip()))


def check_trackers(log_with: str):
    """--log-with before any work: only trackers this file offers, each one's package installed."""
    import importlib

    names = tracker_names(log_with)
    if (log_with.strip() and not names) or any(name not in TRACKERS for name in names):
        raise UsageError(f"--log-with {log_with!r}: use tensorboard, wandb, or both: tensorboard,wandb")
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(
                f"--log-with {name} needs the {name} package, which is not installed: pip install {name}"
            ) from None


class Trackers:
    """The trackers --log-with names, on rank 0: each step, every number of its metrics.jsonl record (the same
    keys, bools as 0/1) and, at an evaluation, the images it wrote (eval_NNNNN.png, rollout_NNNNN.png when
    present, curves.png), the step-0 evaluation's image with the first step."""

    def __init__(self, cfg: Config):
        self.out = cfg.out
        self.trackers = [
            {"tensorboard": TensorBoardLog, "wandb": WandbLog}[n](cfg) for n in tracker_names(cfg.log_with)
        ]

    def log(self, record: dict):
        step = record["step"]
        if step == 1 and os.path.isfile(f"{self.out}/eval_00000.png"):  # the base model, evaluated before step 1
            self._log(0, {}, {"images/eval": f"{self.out}/eval_00000.png"})
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        images = {}
        if "eval_reward" in record:  # a file of an earlier, unevaluated attempt at this step is not this step's
            for name, file in (
                ("eval", f"eval_{step:05d}.png"),
                ("rollout", f"rollout_{step:05d}.png"),
                ("curves", "curves.png"),
            ):
                if os.path.isfile(f"{self.out}/{file}"):
                    images[f"images/{name}"] = f"{self.out}/{file}"
        self._log(step, scalars, images)

    def _log(self, step: int, scalars: dict, images: dict):
        for tracker in self.trackers:
            tracker.log(step, scalars, images)

    def close(self):
        for tracker in self.trackers:
            tracker.close()


class TensorBoardLog:
    """Event files in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`). A resumed run writes to the same
    folder with purge_step = the first step it logs: TensorBoard then hides what the earlier attempt logged at
    and after that step (the steps after the newest checkpoint, redone), so no step appears twice."""

    def __init__(self, cfg: Config):
        self.folder, self.resume, self.writer = f"{cfg.out}/tensorboard", cfg.resume, None

    def log(self, step: int, scalars: dict, images: dict):
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is None:  # a new run purges whatever a run that failed before its first step left
            self.writer = SummaryWriter(self.folder, purge_step=step if self.resume else 0)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for key, path in images.items():
            with Image.open(path) as image:
                self.writer.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()  # a killed run keeps every step it logged

    def close(self):
        if self.writer is not None:
            self.writer.close()


class WandbLog:
    """A Weights & Biases run (files in OUT/wandb; WANDB_MODE=offline logs locally, `wandb sync` uploads later).
    Its id and the last step logged are kept in OUT/wandb/flow_grpo_run.json, so --resume continues the same run.
    wandb cannot take back a step it holds: the steps a resumed run redoes (those after its newest checkpoint)
    keep the first attempt's values there (equal on a CPU), and are not logged twice."""

    def __init__(self, cfg: Config):
        import wandb

        self.path = f"{cfg.out}/wandb/flow_grpo_run.json"
        saved = {}
        if cfg.resume and os.path.isfile(self.path):
            with open(self.path) as f:
                saved = json.load(f)
        self.logged_through = saved.get("logged_through", -1)
        os.makedirs(f"{cfg.out}/wandb", exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "flow_grpo"),
                name=os.path.basename(os.path.normpath(cfg.out)),
                id=saved.get("id"),  # None: a new run, its id chosen by wandb
                resume="allow",
                dir=cfg.out,
                reinit="finish_previous",  # a run that failed in this process (a notebook) left its run open
            )
        except wandb.errors.Error as error:
            raise UsageError(
                f"--log-with wandb: {error} (or WANDB_MODE=offline: log here, `wandb sync` later)"
            ) from None
        self.run.config.update({k: v for k, v in vars(cfg).items() if k != "resume"}, allow_val_change=True)
        self.id = self.run.id
        self._save()

    def log(self, step: int, scalars: dict, images: dict):
        import wandb

        if step <= self.logged_through:
            return
        self.run.log({**scalars, **{key: wandb.Image(path) for key, path in images.items()}}, step=step)
        self.logged_through = step
        self._save()

    def _save(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump({"id": self.id, "logged_through": self.logged_through}, f)
        os.replace(self.path + ".tmp", self.path)

    def close(self):
        self.run.finish()


# The trained LoRA next to the base model (--compare) ---------------------------------------------


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file save_lora writes, as diffusers names it


def read_run_config(run: str) -> Config:
    """The Config of the run in folder `run`, from its config.json (a field added since takes its default)."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{run} is not a run folder (no config.json): pass the --out folder of a run")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} ({str(error)[:100]}): pass the --out folder of an intact run") from None
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in saved.items() if k in known})


def compared_lora_folder(run: str, checkpoint: str) -> str:
    """The folder of the diffusers-format LoRA that --checkpoint names: RUN/lora (the final EMA LoRA) when empty,
    RUN/checkpoints/step_N for a step number N, else the folder given."""
    found = sorted(int(os.path.basename(p).removeprefix("step_")) for p in glob.glob(f"{run}/checkpoints/step_*"))
    steps = ", ".join(map(str, found)) or "none yet"
    if not checkpoint:
        folder = os.path.join(run, "lora")
        if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
            raise UsageError(
                f"{run} has no lora/ (the run has not finished): pass --checkpoint N to compare the LoRA of one of "
                f"its checkpoints (steps: {steps})"
            )
        return folder
    if checkpoint.isdigit():
        folder = os.path.join(run, "checkpoints", f"step_{int(checkpoint):06d}")
        if not os.path.isdir(folder):
            raise UsageError(f"--checkpoint {checkpoint}: {run} has no checkpoint of that step (steps: {steps})")
    else:
        folder = checkpoint
    if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
        raise UsageError(
            f"--checkpoint {checkpoint}: {folder} holds no {LORA_WEIGHTS}: pass a step number or a folder "
            "RUN/checkpoints/step_N"
        )
    return folder


def base_dtype(name: str, device) -> torch.dtype:
    """The dtype of the base weights that --dtype names: auto is bf16 on a GPU, fp32 on a CPU."""
    auto = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(name, auto)


def compare_noise(count: int, shape, seed: int) -> torch.Tensor:
    """The initial noise of image i: its own seeded draw, so the first images are the same whatever --count."""
    return torch.stack([torch.randn(shape, generator=seeded(seed, -2, i)) for i in range(count)])  # eval's is -1


def compare_lora(
    run, checkpoint="", prompts_file="", count=None, seed=0, scale=1.0, reward="", reward_model_dir=None, output=""
):
    """python flow_grpo.py --compare RUN: the base model and the run's (EMA) LoRA, each from the same initial noise
    with the run's evaluation sampler (eval_num_steps ODE steps, a = 0, its guidance scale) through its model's
    policy (SD3's or FLUX's), side by side in one PNG with each image's reward, and the mean reward of each
    printed. The LoRA is loaded the way a user does in plain diffusers (load_lora_weights, set_adapters for the
    scale): what is compared is what a user gets. Under bf16 diffusers applies the LoRA in fp32 where training
    applied it in bf16 (lora_in_base_dtype)."""
    import rewards

    cfg = read_run_config(run)
    resolve_model(cfg.model)
    lora = compared_lora_folder(run, checkpoint)
    if not math.isfinite(scale):
        raise UsageError(f"--scale {scale}: use a finite number (1: the LoRA as trained, 0: the base model)")
    if prompts_file:
        prompts = read_prompts(prompts_file, ())
    else:  # the run's evaluation prompts; its training prompts play no part here
        _, prompts = read_prompt_sets(replace(cfg, prompts=""))
    count = min(8, len(prompts)) if count is None else count
    if not 1 <= count <= len(prompts):
        raise UsageError(f"--count {count}: use 1..{len(prompts)}, the number of prompts")
    prompts = prompts[:count]
    output = output or os.path.join(run, "compare.png")
    if not output.lower().endswith(".png"):
        raise UsageError(f"--output {output}: name a .png file")
    probe = os.path.join(os.path.dirname(os.path.abspath(output)), f".write_test_{os.getpid()}")
    try:
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write {output}: {error.strerror}: pass --output FILE in a writable folder") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward = reward or cfg.reward
    model_dirs = reward_model_dirs(cfg.reward_model_dir if reward_model_dir is None else reward_model_dir)
    try:
        reward_fn = rewards.load_reward(reward, device=device, model_dirs=model_dirs)
    except ValueError as error:
        raise UsageError(str(error)) from None

    pipe = load_pipeline(cfg.model, base_dtype(cfg.dtype, device))
    pipe.to(device)
    pipe.vae.to(torch.float32)  # as training decodes
    pipe.set_progress_bar_config(disable=True)
    batches = range(0, count, cfg.batch_size)
    texts = [encode_prompts(pipe, prompts[i : i + cfg.batch_size], 1, cfg.guidance_scale, device) for i in batches]
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None  # the prompts are encoded: free their memory
    policy = model_policy(pipe, cfg.resolution)  # SD3's or FLUX's text (above), velocity, shapes, schedule, decoder
    noise = compare_noise(count, policy.latent_shape(), seed)
    sigmas, timesteps = policy.schedule(cfg.eval_num_steps, device)

    def draw():
        images, scores = [], []
        for i, text in zip(batches, texts):
            x = noise[i : i + cfg.batch_size].to(device)
            out = sample(
                pipe.transformer, text, x, sigmas, timesteps, cfg.guidance_scale, [0.0] * cfg.eval_num_steps,
                velocity=policy.velocity,
            )  # fmt: skip
            batch_images = policy.decode(out.latents[:, -1])
            images += batch_images
            result = score(reward_fn, batch_images, prompts[i : i + cfg.batch_size])
            scores.append(torch.stack([result[name] for name in [*reward_fn.names, "reward"]], dim=1))
        return images, torch.cat(scores).double()

    base_images, base = draw()
    pipe.load_lora_weights(lora, weight_name=LORA_WEIGHTS, adapter_name="flow_grpo")
    pipe.set_adapters("flow_grpo", scale)
    lora_images, tuned = draw()

    captions, images = [], []
    for i, prompt in enumerate(prompts):
        images += [base_images[i], lora_images[i]]
        captions += [f"base: {base[i, -1]:.4g} | {prompt}", f"LoRA: {tuned[i, -1]:.4g} | {prompt}"]
    save_image_grid(images, captions, output, columns=min(4, 2 * count))

    def means(scores):
        line = f"mean reward {scores[:, -1].mean():.5g}"
        if len(reward_fn.names) > 1:
            line += " (" + ", ".join(f"{n} {scores[:, k].mean():.5g}" for k, n in enumerate(reward_fn.names)) + ")"
        return line

    difference = tuned[:, -1] - base[:, -1]
    spread = f" ± {difference.std() / math.sqrt(count):.2g} (standard error)" if count > 1 else ""
    guidance = "CFG" if policy.uses_cfg else "guidance"  # FLUX's: the guidance embedding's input
    print(
        f"{count} prompts, seed {seed}, {cfg.eval_num_steps}-step ODE, {guidance} {cfg.guidance_scale}, reward {reward}"
    )
    print(f"base: {means(base)}")
    print(f"LoRA ({lora}, scale {scale:g}): {means(tuned)}")
    print(
        f"LoRA - base: {difference.mean():+.5g}{spread}; the LoRA scores higher on {int((difference > 0).sum())} "
        f"of {count} prompts"
    )
    print(f"wrote {output}")


# Speed and memory on a GPU: bf16 LoRA arithmetic, --compile, timers ------------------------------


class LinearInInputDtype(torch.nn.Linear):
    """A LoRA factor whose weight stays fp32 (the master copy AdamW updates, the EMA and checkpoints keep)
    but is applied in the dtype of its input: the cast is part of autograd, so the matmul and the tensors
    saved for backward are bf16, and the cast's backward hands the weight an fp32 gradient."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def lora_in_base_dtype(model):
    """Run every LoRA of a peft model in the base weights' dtype, with fp32 master weights.

    peft's default (autocast_adapter_dtype) casts each LoRA layer's input to the fp32 of the LoRA weights:
    an fp32 copy of every targeted activation, made in the forward and saved for the backward, and fp32
    matmuls (+38 % on SD3.5-M's forward, issue 13). Here peft's input cast is switched off
    (`cast_input_dtype_enabled`, the flag peft's `helpers.disable_input_dtype_casting` sets) and the weights
    are cast instead. The class swap keeps the modules, their parameters and their state-dict names."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            layer.cast_input_dtype_enabled = False
            for factor in (*layer.lora_A.values(), *layer.lora_B.values()):
                if type(factor) is torch.nn.Linear:
                    factor.__class__ = LinearInInputDtype


class CompileCounter:
    """The compilations of this process from now on, counted and timed by dynamo's compile callbacks: a graph
    traced (a first call, or a recompilation after a guard failed) or a backward compiled at its first use.
    torch.compile is lazy, so this is how compiling is told apart from a slow first step."""

    def __init__(self):
        self.graphs, self.seconds, self.reported, self.started = 0, 0.0, 0.0, 0.0
        torch._dynamo.callback_handler.register_start_callback(self.start)
        torch._dynamo.callback_handler.register_end_callback(self.end)

    def start(self, args=None):  # older torch calls the callbacks without arguments
        self.started = time.perf_counter()

    def end(self, args=None):
        self.seconds += time.perf_counter() - self.started
        if getattr(args, "callback_trigger", None) is None or args.callback_trigger.name == "DYNAMO":
            self.graphs += 1

    def record(self):
        """For the log: the graphs compiled so far, and the seconds spent compiling since the previous record."""
        seconds, self.reported = self.seconds - self.reported, self.seconds
        return {"compilations": self.graphs, "seconds_compile": seconds}


def compile_blocks(transformer, backend: str = "inductor") -> CompileCounter:
    """--compile: regional compilation, torch.compile of each transformer block (fullgraph), not the whole model:
    SD3's MMDiT blocks; FLUX's double-stream and single-stream blocks.

    Blocks of one kind share one compiled graph, so compiling costs a few graphs: one per block kind (SD3.5-M:
    dual-attention, plain, and the last, context-free block; FLUX.1: double-stream, the first single-stream block,
    whose inputs come contiguous from the double blocks, and the other single blocks, whose inputs are slices of
    the previous one's joint sequence: other strides, a guard) and per way a run calls them: with grad (training,
    gradient checkpointing included), without (rollout, evaluation, the EMA swapped in: parameters are graph
    inputs, so new values need no new graph), and without with the adapter disabled (the reference policy);
    with grad, the first block also gets its own graph when its inputs, unlike the next blocks', need no
    gradient (guards check requires_grad). SD3.5-M and FLUX.1-dev: 10 graphs whatever their depth. All of them
    are compiled in the first step (and the evaluation before it); the count is logged so that a recompilation
    shows. Shapes are static: a run's shapes never change, except the last evaluation batch when the eval prompts
    do not fill it, which costs a graph more per block kind, at step 0.
    nn.Module.compile compiles in place: modules, parameters and state-dict names stay, so peft's
    disable_adapter, the EMA swap and save_lora work as before. diffusers' compile_repeated_blocks would do the
    same, but it needs `_repeated_blocks`, which SD3Transformer2DModel does not set (diffusers 0.42)."""
    import torch._dynamo

    if not hasattr(torch._dynamo, "callback_handler"):
        raise UsageError(f"--compile needs a newer torch: {torch.__version__} has no torch._dynamo.callback_handler")
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    # Dynamo compiles no more than the limit of graphs per code object, here a block class's forward (with
    # fullgraph: an error past it), 8 by default: SD3.5-M's blocks are one class and need 10 (FLUX.1-dev: 4 + 6).
    setattr(config, limit, max(getattr(config, limit), 64))
    counter = CompileCounter()
    base = transformer.get_base_model()
    for block in [*base.transformer_blocks, *getattr(base, "single_transformer_blocks", [])]:
        block.compile(fullgraph=True, dynamic=False, backend=backend)
    return counter


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: count them in the phase that launched them
    return time.perf_counter()


def gpu_memory(device) -> dict:
    """GPU memory for the log, in GiB, as the allocator sees it and as the device does: the peak of live tensors
    (allocated) and of the allocator's cache (reserved) since the last call, whose peaks it then resets so that
    each step reports its own; and the memory in use on the whole device now (torch.cuda.mem_get_info: every
    process, the CUDA context, the cache; what nvidia-smi shows). Empty on a CPU."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    memory = {
        "gpu_allocated_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "gpu_reserved_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        "gpu_device_used_gib": (total - free) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return memory


# The built-in prompts ----------------------------------------------------------------------------


BUILTIN_PROMPTS = [
    "a red fox curled up asleep in fresh snow",
    "a lighthouse on a rocky cliff during a thunderstorm",
    "a bowl of ramen with a soft-boiled egg, studio lighting",
    "an astronaut reading a newspaper on a park bench",
    "a watercolor painting of a quiet canal in Venice at dawn",
    "three green apples on a wooden table",
    "a cyberpunk street market at night, neon signs reflected in puddles",
    "a tiny house built inside a hollow tree",
    "an origami crane made of newspaper",
    "a golden retriever wearing sunglasses on a surfboard",
    "a medieval library with towering bookshelves and a spiral staircase",
    "a glass of orange juice next to a blue mug",
    "a snow leopard walking along a mountain ridge",
    "an oil painting of sunflowers in a clay vase",
    "a steam locomotive crossing a stone viaduct in autumn",
    "a robot watering plants in a greenhouse",
    "a close-up of a hummingbird drinking from a purple flower",
    "a bicycle leaning against a yellow wall",
    "a bustling harbour with fishing boats at sunrise",
    "a cozy reading nook with a cat and a knitted blanket",
    "a desert with a single cactus under a starry sky",
    "a plate of sushi arranged like a chessboard",
    "a koi pond with lily pads seen from above",
    "a vintage red car parked in front of a diner",
    "a pencil sketch of an old man laughing",
    "a hot air balloon festival over green hills",
    "an owl perched on a lantern in a misty forest",
    "a slice of chocolate cake with raspberries",
    "a futuristic city floating above the clouds",
    "two pandas sharing bamboo in the rain",
    "a wooden sailboat on a calm turquoise lake",
    "a child building a sandcastle, photographed from low angle",
]


BUILTIN_EVAL_PROMPTS = [
    "a corgi running on a beach at sunset",
    "a teapot shaped like a pumpkin",
    "a mountain village covered in snow at night",
    "a portrait of a woman with freckles in soft window light",
    "a blue butterfly resting on a white rose",
    "a stack of pancakes with maple syrup and blueberries",
    "an isometric illustration of a tiny island with a windmill",
    "a black cat sitting on a stack of old books",
]


# For --reward ocr without prompt files: the text to render stands in double quotes (rewards.ocr_target).
BUILTIN_OCR_PROMPTS = [
    'a storefront sign that says "OPEN"',
    'a coffee cup with the word "Monday" printed on it',
    'a chalkboard menu that reads "Soup of the Day"',
    'a neon sign glowing "Late Night" above a bar door',
    'a birthday cake with "Happy 30th" written in icing',
    'a road sign that says "STOP" at a snowy crossing',
    'a vintage poster with the title "Moon Trip"',
    'a T-shirt with the slogan "Stay Curious"',
    'a wooden signpost pointing to "Beach" in the dunes',
    'a book cover titled "The Last Orchard"',
    'a protest banner that says "Save the Bees"',
    'a cereal box with the brand name "Crunchos"',
    'a license plate that reads "GRPO 42"',
    'a street mural with the words "Hello World"',
    'a cinema marquee showing "Now Playing"',
    'a handwritten note on the fridge saying "Buy Milk"',
    'a laptop sticker that says "Ship It"',
    'a bakery window with "Fresh Bread" painted on the glass',
    'a train station board showing "Platform 9"',
    'a graduation cap decorated with "Class of 2025"',
    'a welcome mat that says "Go Away"',
    'a tin can labelled "Tomato Soup" on a shelf',
    'a rocket with "Mars One" painted on its side',
    'a pizza box with "Hot and Fresh" printed on the lid',
    'a lighthouse with "North Point" written on its base',
    'a kite shaped like a dragon with "Fly High" on its wing',
    'a gym wall with the motto "No Excuses"',
    'a vintage radio with the brand "Sonora" on its grille',
    'a dog collar tag engraved "Biscuit"',
    'a library stamp that reads "Overdue"',
    'a sand drawing on a beach that spells "Summer"',
    'a green exit sign that reads "EXIT"',
]


BUILTIN_OCR_EVAL_PROMPTS = [
    'a hotel door hanger that says "Do Not Disturb"',
    'a food truck with "Taco Time" on its side',
    'a museum plaque reading "Ancient Egypt"',
    'a skateboard deck with the word "Rebel"',
    'a festival wristband printed "VIP Pass"',
    'a classroom whiteboard that says "Quiz Today"',
    'a flag waving with the word "Freedom"',
    'a bottle label that reads "Olive Oil"',
]


# --------------------------------------------------------------------------------------------------
# 6. A tiny SD3 for CPUs and tests (--model tiny): nothing downloaded, tokenizers built here
# --------------------------------------------------------------------------------------------------


def build_tiny_clip_tokenizer(folder):
    """A byte-level CLIP BPE tokenizer written from scratch (256 bytes, their `</w>` forms, a few
    merges), so the CLIP text path runs with nothing downloaded."""

    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    # GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others map past 255.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n</w>"), ("i", "n")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # from_pretrained, not the constructor: transformers 5 ignores vocab_file/merges_file there.
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_tiny_t5_tokenizer(folder):
    """A T5-style Unigram tokenizer (<pad>=0, </s>=1, <unk>=2, then letters) built without sentencepiece."""

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    os.makedirs(folder, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'!?-"]
    pieces += [("\u2581" + w, -1.0) for w in ("a", "the", "of", "photo", "cat", "dog", "on", "in", "with")]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path = os.path.join(folder, "tokenizer.json")
    tokenizer.save(path)
    return T5TokenizerFast(
        tokenizer_file=path, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_clip_text_config(tokenizer, hidden_size=32, projection_dim=32):
    from transformers import CLIPTextConfig

    # CLIP pools at eos_token_id: ids that differ from the tokenizer's would pool the wrong token, silently.
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def to_loaded_dtype(model, dtype: torch.dtype):
    """A model built in fp32, in the dtypes from_pretrained(dtype=...) would load it in: every floating tensor in dtype
    but, under fp16, the modules transformers keeps in fp32 (T5's `wo`: T5EncoderModel._keep_in_fp32_modules)."""
    torch.nn.Module.to(model, dtype=dtype)  # nn.Module's: diffusers' .to() warns about an empty fp32 list
    if dtype == torch.float16:
        keep = getattr(model, "_keep_in_fp32_modules", None) or []
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in keep:
                module.float()
    return model


def cast_as_loaded(pipe, dtype: torch.dtype):
    """The tiny pipeline in the dtypes load_pipeline gives a real one: the VAE fp32, the other models as loaded."""
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:  # FLUX has no third text encoder
            to_loaded_dtype(getattr(pipe, name), dtype)
    return pipe


def tiny_vae(shift_factor: float, scaling_factor: float):
    """A 16-channel VAE of 3 blocks (4x down-scaling, not the real 8x: with four random up-blocks the decoded texture
    hardly depends on the latents, and no image reward could be learned on a tiny model), with the family's scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def tiny_t5(tokenizer):
    """A one-layer T5 encoder of width 64 for the tiny T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def build_tiny_pipeline(seed: int = 0):
    """A randomly initialised SD3.5-shaped pipeline small enough for a CPU (about 0.2 M parameters):
    MMDiT with a dual-attention layer and RMS qk-norm as SD3.5, a 4x VAE, two CLIPs and a T5.
    Images of 32 to 128 px (8x8 to 32x32 latents)."""

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        clip_tokenizer = build_tiny_clip_tokenizer(folder + "/clip")
        t5_tokenizer = build_tiny_t5_tokenizer(folder + "/t5")
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's
    t5 = tiny_t5(t5_tokenizer)
    for module in (transformer, vae, t5):
        module.eval()  # as from_pretrained leaves them: T5's dropout would make the text embeddings random
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer)).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer)).eval(),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


# FLUX.1-dev's scheduler_config.json: the shift grows with the image's token count (FluxPolicy.schedule).
FLUX1_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
FLUX1_DEV_SCHEDULER.update(base_image_seq_len=256, max_image_seq_len=4096)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A randomly initialised FLUX.1-dev-shaped pipeline for a CPU: a FluxTransformer2DModel with one double-stream
    and one single-stream block, the guidance embedding and 3-axis rotary position ids; a 16-channel VAE with
    FLUX's scaling and shift factors (4x down-scaling, as the tiny SD3, so an image reward can be learned); CLIP
    (pooled) and T5 with the tokenizers built here; FLUX.1-dev's scheduler (resolution-dependent shift)."""

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        clip_tokenizer = build_tiny_clip_tokenizer(folder + "/clip")
        t5_tokenizer = build_tiny_t5_tokenizer(folder + "/t5")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width
        pooled_projection_dim=32,  # CLIP's width
        guidance_embeds=guidance_embeds,  # FLUX.1-dev's (guidance-distilled); False: FLUX.1-schnell's
        axes_dims_rope=(4, 2, 2),
    )
    vae = tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX's
    t5 = tiny_t5(t5_tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX1_DEV_SCHEDULER)
    for module in (transformer, vae, t5):
        module.eval()
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel(tiny_clip_text_config(clip_tokenizer)).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


# --------------------------------------------------------------------------------------------------
# 7. The command line
# --------------------------------------------------------------------------------------------------


# The sections of --help, each Config field in exactly one (a test checks that a new field is placed).
FLAG_GROUPS = {
    "model and reward": ["model", "dtype", "reward", "eval_reward", "reward_model_dir"],
    "served rewards (GenEval server, VLM judge)": ["reward_server", "reward_timeout", "reward_retry_minutes"]
    + ["vlm_url", "vlm_model", "vlm_template", "vlm_concurrency"],
    "data": ["prompts", "eval_prompts"],
    "algorithm (paper Sec. 4: sampling, GRPO)": [
        *["resolution", "num_steps", "eval_num_steps", "guidance_scale", "sde_type", "noise_level", "sde_window"],
        *["group_size", "groups_per_step", "clip_range", "adv_clip", "global_std", "beta", "kl_dt_scale"],
        *["ratio_norm", "train_fraction"],
    ],
    "optimiser and LoRA": ["lr", "weight_decay", "max_grad_norm", "updates_per_step", "lora_rank", "lora_alpha"]
    + ["ema", "ema_every"],
    "memory and speed (a 24 GB GPU: README)": ["batch_size", "precompute_text_embeds", "gradient_checkpointing"]
    + ["compile"],
    "run folder": ["out", "seed", "max_steps", "eval_every", "save_every", "keep_checkpoints", "resume", "log_with"],
}

# The README's official-set commands (its prompt files downloaded as it says), each with its own --out.
RECIPES = """recipes (SD3.5-M, PickScore, the official prompt set; README "Train SD3.5-Medium" has the table):
  one 24 GB GPU (15.7 GB peak by nvidia-smi, measured on one H100):
    python flow_grpo.py --model sd3.5-medium --reward pickscore --prompts pickscore_train.txt \\
      --eval-prompts pickscore_test_256.txt --precompute-text-embeds --gradient-checkpointing \\
      --out runs/ps_1x24gb
  one 80 GB GPU (the defaults: 58.6 GiB peak allocated, measured on one H100):
    python flow_grpo.py --model sd3.5-medium --reward pickscore --prompts pickscore_train.txt \\
      --eval-prompts pickscore_test_256.txt --out runs/ps_1x80gb
  8 GPUs of 80 GB (the official group 24 x 48 prompts; about 60 GB per GPU, computed from the one-GPU peak):
    torchrun --nproc_per_node=8 flow_grpo.py --model sd3.5-medium --reward pickscore --prompts pickscore_train.txt \\
      --eval-prompts pickscore_test.txt --group-size 24 --groups-per-step 48 --out runs/ps_8x80gb

FLUX.1 (--model flux.1-dev, tiny-flux, or a FLUX folder or hub id) takes the official FLUX recipe as the defaults of
the flags not given: {flux}.

python flow_grpo.py --plot RUN [RUN ...] draws the curves of finished runs (see --plot --help);
python flow_grpo.py --compare RUN draws a run's LoRA next to the base model (see --compare --help)"""
RECIPES = RECIPES.replace(
    "{flux}", " ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in FLUX_RECIPE.items())
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The recipes' line breaks kept; a flag's help wrapped at spaces only, never inside --no-flag."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class JoinRepeats(argparse.Action):
    """A flag given several times keeps every value, joined by commas (never only the last one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        previous = getattr(namespace, self.dest)
        setattr(namespace, self.dest, f"{previous},{values}" if previous else values)


def parse_config(argv=None, config_class=None, description=None, epilog=None):
    """The CLI of a config dataclass: every field a flag (--group-size 8), its help from config_field, its
    default shown once, its choices as the metavar. toy_2d.py uses it for its own Config (no groups)."""

    config_class = config_class or Config
    groups = {}
    if config_class is Config:
        description = "Flow-GRPO LoRA training of SD3 and FLUX.1 (arXiv 2505.05470)"
        epilog, groups = RECIPES, FLAG_GROUPS
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
    sections = {}
    for title, names in groups.items():
        sections.update(dict.fromkeys(names, parser.add_argument_group(title)))
    for f in fields(config_class):
        flag, help, choices = "--" + f.name.replace("_", "-"), f.metadata["help"], f.metadata.get("choices")
        where = sections.get(f.name, parser)
        if type(f.default) is bool:
            action = where.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            shown = flag if f.default else "--no-" + flag[2:]
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else None
            repeat = {"action": JoinRepeats} if f.metadata.get("repeatable") else {}
            action = where.add_argument(flag, type=type(f.default), default=f.default, metavar=metavar, **repeat)
            shown = "%(default)s"
        # Set after add_argument: some Pythons' BooleanOptionalAction append a default of their own to the help.
        action.help = help if "default:" in help else f"{help} (default: {shown})"
    args = vars(parser.parse_args(argv))
    if config_class is Config and is_flux(args["model"]):  # the official FLUX recipe, for the flags not given
        for action in parser._actions:
            action.default = argparse.SUPPRESS if action.dest in FLUX_RECIPE else action.default
        args = {**FLUX_RECIPE, **vars(parser.parse_args(argv))}
    return config_class(**args)


def rerun_command(argv=None, resume: bool = True) -> str:
    """The command line of this run as it was launched, with --resume (or without it)."""

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--resume", "--no-resume")]
    args += ["--resume"] if resume else []
    if "RANK" in os.environ:  # a torchrun worker: its own command line is not the one typed
        local, world = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ["WORLD_SIZE"])
        nodes = ["--standalone"] if local == world else [f"--nnodes={world // local}", "YOUR-RENDEZVOUS-FLAGS"]
        launcher = ["torchrun", *nodes, f"--nproc_per_node={local}", sys.argv[0]]
    elif argv is None:  # the interpreter, its options and the script (or -m module) as typed
        launcher = sys.orig_argv[: len(sys.orig_argv) - len(sys.argv) + 1]
    else:
        launcher = [sys.executable, os.path.abspath(__file__)]
    return shlex.join(launcher + args)


def interrupted_message(cfg: Config, argv=None, event: str = "interrupted") -> str:
    """One line after Ctrl-C (or another event that stops the run): the last checkpoint, and the command that
    continues from it."""

    command = rerun_command(argv)
    checkpoint = latest_checkpoint(cfg.out)
    if checkpoint:
        step = int(os.path.basename(checkpoint).removeprefix("step_"))
        return f"{event}: the last checkpoint is {checkpoint} (step {step}); continue with: {command}"
    if os.path.exists(f"{cfg.out}/config.json"):
        return (
            f"{event} before the first checkpoint (every --save-every {cfg.save_every} steps): "
            f"{command} starts again from step 0"
        )
    return f"{event} before the run started, nothing to resume; start it again: {rerun_command(argv, resume=False)}"


def plot_main(argv):
    """python flow_grpo.py --plot RUN [RUN ...]: curves.png of finished runs."""

    parser = argparse.ArgumentParser(
        prog="flow_grpo.py --plot",
        description="Draw the curves of finished runs from their metrics.jsonl (the figure "
        "training writes to OUT/curves.png at each evaluation); several runs are overlaid, one colour each.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="the output folder (--out) of a run")
    parser.add_argument(
        "--output", default="", help="PNG to write (default: RUN/curves.png for one run, ./curves.png for several)"
    )
    args = parser.parse_args(argv)
    for run in args.runs:
        if not read_metrics(run):
            print(
                f"error: {run} holds no logged steps (no {os.path.join(run, 'metrics.jsonl')}): pass the --out "
                "folder of a run that has taken a step",
                file=sys.stderr,
            )
            sys.exit(2)
    output = args.output or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    try:
        drawn = write_curves(args.runs, output)
    except OSError as error:
        print(
            f"error: cannot write {output}: {error.strerror}: pass --output FILE in a writable folder", file=sys.stderr
        )
        sys.exit(2)
    if not drawn:
        sys.exit(1)
    print(f"wrote {output}")


def compare_main(argv):
    """python flow_grpo.py --compare RUN: the run's LoRA next to the base model (compare_lora)."""

    parser = argparse.ArgumentParser(
        prog="flow_grpo.py --compare",
        description="Draw the base model and a run's (EMA) LoRA from the same initial noise with the run's "
        "evaluation sampler (its --eval-num-steps ODE steps and --guidance-scale), side by side in one PNG with each "
        "image's reward, and print the mean reward of each.",
    )
    parser.add_argument("run", metavar="RUN", help="the output folder (--out) of a run")
    add = parser.add_argument
    add(
        "--checkpoint",
        default="",
        metavar="N|FOLDER",
        help="a step number (RUN/checkpoints/step_N) or a checkpoint folder (default: RUN/lora, the final LoRA)",
    )
    add("--prompts", default="", metavar="FILE", help="prompts, one per line (default: the run's evaluation prompts)")
    add("--count", type=int, metavar="N", help="compare on the first N prompts (default: 8, or all if fewer)")
    add("--seed", type=int, default=0, metavar="N", help="seed of the initial noise (default: 0)")
    add("--scale", type=float, default=1.0, help="LoRA scale: 1 as trained, 0 the base model (default: 1)")
    add("--reward", default="", metavar="SPEC", help="reward spec as in training (default: the run's --reward)")
    add("--reward-model-dir", metavar="NAME=FOLDER", help="as in training (default: the run's --reward-model-dir)")
    add("--output", default="", metavar="FILE", help="PNG to write (default: RUN/compare.png)")
    args = parser.parse_args(argv)
    try:
        compare_lora(
            args.run,
            args.checkpoint,
            args.prompts,
            args.count,
            args.seed,
            args.scale,
            args.reward,
            args.reward_model_dir,
            args.output,
        )
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    import rewards

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--plot"]:  # a figure of finished runs, not a training run
        return plot_main(args[1:])
    if args[:1] == ["--compare"]:  # the LoRA of a run next to the base model
        return compare_main(args[1:])
    # Under torchrun every process meets the same bad flag: rank 0 alone says it.
    rank = int(os.environ.get("RANK", "0"))
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        cfg = parse_config(argv)
    try:
        train(cfg)
    except UsageError as error:
        if rank == 0 or not error.every_rank:
            print(f"error: {error}" if rank == 0 else f"error (rank {rank}): {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        if rank == 0:  # the gradients are averaged: every rank diverges alike
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except rewards.RewardServerLost as error:  # like Ctrl-C, it leaves a run to resume once the server is back
        where = f" (rank {rank})" if rank else ""
        print(f"error{where}: {error}; {interrupted_message(cfg, argv, 'stopped')}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        if rank == 0:
            print(interrupted_message(cfg, argv), file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's code for a SIGINT


if __name__ == "__main__":
    main()

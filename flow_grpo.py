"""Flow-GRPO: online GRPO for flow-matching text-to-image models (arXiv 2505.05470), in one file.

Read top to bottom next to the paper:
  1. the math, one small function per equation (sde_step, cps_step, gaussian_kl, group_advantages,
     grpo_loss), plain torch, shared with toy_2d.py;
  2. the full run: Stable Diffusion 3.5 Medium + LoRA (diffusers, peft), rewards from rewards.py.

Conventions (as diffusers' FlowMatchEulerDiscreteScheduler): sigma in [0, 1], sigma = 1 is noise,
x_sigma = (1 - sigma) * x0 + sigma * eps, the model predicts the velocity v ~ eps - x0, sampling goes
from sigma = 1 down to 0, so dt = sigma_next - sigma < 0 and the ODE (Euler) step is x + v * dt.
"""
import math
from typing import NamedTuple

import torch

# --------------------------------------------------------------------------------------------------
# 1. The math
# --------------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    prev_x: torch.Tensor  # x_{t+1}: the next (less noisy) sample
    log_prob: torch.Tensor  # log pi(x_{t+1} | x_t, c), per sample, averaged over non-batch dims
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


def sde_step(v, x, sigma, sigma_next, noise_level, prev_x=None, generator=None) -> StepOutput:
    """One Euler-Maruyama step of the marginal-preserving reverse SDE (paper Eq. 7-9).

    The reverse-time SDE with the same marginals as the flow ODE dx = v dt is, for rectified flow,
        dx = [ v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v) ] dt + sigma_t dw          (Eq. 8)
    with sigma_t = a * sqrt(sigma / (1 - sigma)), a = noise_level. Discretised (Eq. 9):
        mean     = x + [ v + sigma_t^2 / (2 sigma) * (x + (1 - sigma) v) ] dt
        std      = sigma_t * sqrt(|dt|)
        x_{t+1}  = mean + std * eps,   eps ~ N(0, I)
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
        prev_x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    prev_x = prev_x.to(dtype)
    return StepOutput(prev_x, gaussian_log_prob(prev_x, mean, std), mean, std)


def cps_step(v, x, sigma, sigma_next, noise_level, prev_x=None, generator=None) -> StepOutput:
    """One step of Coefficients-Preserving Sampling (CPS, arXiv 2509.05952), the fix for noisy images.

    With the predicted data x0_hat = x - sigma v and predicted noise x1_hat = x + (1 - sigma) v:
        std      = sigma_next * sin(a pi / 2)
        mean     = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat
        x_{t+1}  = mean + std * eps
    so x_{t+1} carries exactly (1 - sigma_next) of the data and sigma_next of total (unit) noise,
    which is what the model expects at sigma_next. a = 0 is the Euler ODE step.
    Unlike sde_step it is not a discretised SDE (its noise does not vanish as steps shrink): with a
    posterior-mean velocity it keeps the marginal's mean but shrinks its variance (by ~20% in std
    for a Gaussian at a = 0.8; test_cps_keeps_the_mean_and_follows_its_variance_recursion).
    log_prob is the proper Gaussian log-density; the official code instead uses
    -mean((x_{t+1} - mean)^2), which equals our log_prob * 2 std^2 up to a constant: the same
    gradient direction per step, scaled by 2 std^2 (so its clip range and beta differ from ours).
    """
    dtype = _sde_dtype(x)
    v, x = v.to(dtype), x.to(dtype)
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * x1_hat
    if prev_x is None:
        prev_x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    prev_x = prev_x.to(dtype)
    return StepOutput(prev_x, gaussian_log_prob(prev_x, mean, std), mean, std)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(pi_theta || pi_ref) of one step, exact: both are Gaussians with the same std (paper Eq. 10).

        KL = ||mean_theta - mean_ref||^2 / (2 std^2)
           = (|dt| / 2) * (sigma_t (1 - sigma) / (2 sigma) + 1 / sigma_t)^2 * ||v_theta - v_ref||^2

    per sample, averaged over non-batch dims like gaussian_log_prob (the paper sums). The official
    code uses mean((mean_theta - mean_ref)^2) / (2 sigma_t^2), i.e. it leaves |dt| out of the
    variance: official = |dt| * ours. Its beta values are tuned for that scale (see Config.kl_dt_scale).
    """
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
    count = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, group, torch.ones_like(rewards))
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


def grpo_loss(log_prob, old_log_prob, advantages, clip_range: float, adv_clip: float = 5.0) -> torch.Tensor:
    """The clipped GRPO surrogate of one denoising step, to minimise (paper Eq. 5-6).

        ratio_t = pi_theta(x_{t+1} | x_t, c) / pi_old(x_{t+1} | x_t, c) = exp(log_prob - old_log_prob)
        L       = mean_i max( -A_i ratio_t,  -A_i clip(ratio_t, 1 - eps, 1 + eps) )

    with A clipped to [-adv_clip, adv_clip] as in the official code. The beta * KL term is added by
    the caller (gaussian_kl), since its scale is a choice of the recipe.
    """
    advantages = advantages.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean()

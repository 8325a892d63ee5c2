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
import time
from dataclasses import dataclass, field, fields
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
        prev_x = mean + std * gaussian_noise(x.shape, generator, x.device, dtype)
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
        prev_x = mean + std * gaussian_noise(x.shape, generator, x.device, dtype)
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


# --------------------------------------------------------------------------------------------------
# 2. The full run: SD3.5-Medium + LoRA
# --------------------------------------------------------------------------------------------------
# Heavy libraries are imported inside the functions that need them: `import flow_grpo` and the toy
# cost only torch.


MODEL_ALIASES = {
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
}
# The joint-attention projections of every MMDiT block. A bare "to_q" would also hit SD3.5's attn2.
LORA_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
]
BUILTIN_PROMPTS = [
    "a red fox curled up asleep in fresh snow", "a lighthouse on a rocky cliff during a thunderstorm",
    "a bowl of ramen with a soft-boiled egg, studio lighting", "an astronaut reading a newspaper on a park bench",
    "a watercolor painting of a quiet canal in Venice at dawn", "three green apples on a wooden table",
    "a cyberpunk street market at night, neon signs reflected in puddles", "a tiny house built inside a hollow tree",
    "an origami crane made of newspaper", "a golden retriever wearing sunglasses on a surfboard",
    "a medieval library with towering bookshelves and a spiral staircase", "a glass of orange juice next to a blue mug",
    "a snow leopard walking along a mountain ridge", "an oil painting of sunflowers in a clay vase",
    "a steam locomotive crossing a stone viaduct in autumn", "a robot watering plants in a greenhouse",
    "a close-up of a hummingbird drinking from a purple flower", "a bicycle leaning against a yellow wall",
    "a bustling harbour with fishing boats at sunrise", "a cozy reading nook with a cat and a knitted blanket",
    "a desert with a single cactus under a starry sky", "a plate of sushi arranged like a chessboard",
    "a koi pond with lily pads seen from above", "a vintage red car parked in front of a diner",
    "a pencil sketch of an old man laughing", "a hot air balloon festival over green hills",
    "an owl perched on a lantern in a misty forest", "a slice of chocolate cake with raspberries",
    "a futuristic city floating above the clouds", "two pandas sharing bamboo in the rain",
    "a wooden sailboat on a calm turquoise lake", "a child building a sandcastle, photographed from low angle",
]
BUILTIN_EVAL_PROMPTS = [
    "a corgi running on a beach at sunset", "a teapot shaped like a pumpkin",
    "a mountain village covered in snow at night", "a portrait of a woman with freckles in soft window light",
    "a blue butterfly resting on a white rose", "a stack of pancakes with maple syrup and blueberries",
    "an isometric illustration of a tiny island with a windmill", "a black cat sitting on a stack of old books",
]


def config_field(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every field is a CLI flag (--group-size 8). Defaults: the official SD3.5-M PickScore recipe
    adapted to one GPU (README maps them to the official 32-GPU numbers)."""

    model: str = config_field("sd3.5-medium", "alias (sd3.5-medium, sd3.5-large, sd3-medium), hub id, local diffusers folder, or 'tiny' (random CPU model)")
    reward: str = config_field("pickscore", "reward name, weighted mix 'pickscore=1,aesthetic=0.2', or module:function")
    reward_model_dir: str = config_field("", "NAME=FOLDER[,NAME=FOLDER]: load a reward model from a local folder")
    prompts: str = config_field("", "training prompts, one per line (default: a built-in set)")
    eval_prompts: str = config_field("", "held-out prompts for evaluation, one per line (default: a built-in set)")
    out: str = config_field("runs/flow_grpo", "output folder")
    seed: int = config_field(0, "seed of the prompt stream, the noise and the LoRA init")
    # Sampling (paper Sec. 4.1 and 4.2)
    resolution: int = config_field(512, "image side in pixels")
    num_steps: int = config_field(10, "denoising steps of a training rollout (denoising reduction: 10, not 40)")
    eval_num_steps: int = config_field(40, "denoising steps of the evaluation ODE")
    guidance_scale: float = config_field(4.5, "classifier-free guidance in rollout, training and eval; 1 turns CFG off")
    sde_type: str = config_field("sde", "'sde' (Flow-GRPO, Eq. 9) or 'cps' (coefficients-preserving sampling)")
    noise_level: float = config_field(0.7, "a in sigma_t = a sqrt(sigma / (1 - sigma)); for cps, a in std = sigma_next sin(a pi / 2)")
    sde_window: int = config_field(0, "Flow-GRPO-Fast: only K consecutive SDE steps (ODE elsewhere), and only they are trained; 0 = all")
    # GRPO (paper Sec. 4.3, Eq. 4-6)
    group_size: int = config_field(8, "images per prompt, G (official: 24)")
    groups_per_step: int = config_field(8, "prompts per step, summed over all ranks (official: 48)")
    batch_size: int = config_field(8, "images per forward pass and rank; a multiple of group_size")
    updates_per_step: int = config_field(2, "optimizer steps per rollout step (gradient accumulation in between)")
    clip_range: float = config_field(1e-4, "epsilon of the clipped ratio (log-probs are averaged over dims, hence tiny)")
    adv_clip: float = config_field(5.0, "advantages are clamped to +-adv_clip")
    global_std: bool = config_field(True, "normalise advantages by the std of all rewards of the step (official) instead of the group's (paper)")
    beta: float = config_field(0.01, "KL weight (official: 0.01 PickScore, 0.04 GenEval/OCR)")
    kl_dt_scale: bool = config_field(True, "KL as the official code, |dt| x the exact KL: the scale beta was tuned for")
    train_fraction: float = config_field(0.99, "train the first int(num_steps * fraction) steps: the last (sigma 0.009 -> 0) never")
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
    dtype: str = config_field("auto", "base weights: fp32, bf16 or fp16; auto = bf16 on GPU, fp32 on CPU (LoRA and SDE math stay fp32)")
    # Memory (a 24 GB GPU: README)
    precompute_text_embeds: bool = config_field(False, "encode every prompt once at the start, then free the text encoders (T5-XXL alone is 9.5 GB)")
    gradient_checkpointing: bool = config_field(False, "recompute transformer activations in the backward pass")


def parse_config(argv=None) -> Config:
    import argparse

    parser = argparse.ArgumentParser(
        description="Flow-GRPO LoRA training of SD3 (arXiv 2505.05470)",
        epilog="python flow_grpo.py --plot RUN [RUN ...] draws the curves of finished runs (see --plot --help)")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + " (default: %(default)s)")
    return Config(**vars(parser.parse_args(argv)))


class UsageError(Exception):
    """Bad input: reported as one line and exit status 2, never a traceback."""


def load_pipeline(model: str, dtype: torch.dtype):
    """SD3 pipeline from an alias, a hub id, a local diffusers folder or 'tiny'."""
    import os

    if model == "tiny":
        pipe = build_tiny_pipeline()
        return pipe if dtype == torch.float32 else pipe.to(dtype)
    from diffusers import StableDiffusion3Pipeline

    if os.path.isdir(model):
        index = os.path.join(model, "model_index.json")
        if not os.path.isfile(index) or "StableDiffusion3" not in open(index).read():
            raise UsageError(f"{model} is not a diffusers SD3 pipeline folder (no model_index.json naming StableDiffusion3Pipeline)")
    elif model in MODEL_ALIASES:
        model = MODEL_ALIASES[model]
    elif model.count("/") != 1:
        raise UsageError(f"unknown model '{model}': use an alias ({', '.join(MODEL_ALIASES)}, tiny), a hub id org/name or a local folder")
    try:
        return StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    except OSError as error:
        raise UsageError(f"could not load '{model}' ({str(error).splitlines()[0][:120]}): if the hub is out of reach, download the model elsewhere and pass its local folder with --model PATH") from None


def add_lora(transformer, cfg: Config):
    """Wrap the transformer with a trainable LoRA; the frozen base is the reference policy."""
    from peft import LoraConfig, get_peft_model

    transformer.requires_grad_(False)
    lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    torch.manual_seed(cfg.seed)
    # autocast_adapter_dtype (default) keeps the LoRA in fp32 over bf16/fp16 base weights.
    return get_peft_model(transformer, lora_config), lora_config


def lora_parameters(transformer):
    return [p for p in transformer.parameters() if p.requires_grad]


class TextEmbeddings(NamedTuple):
    embeds: torch.Tensor  # [2B or B, tokens, dim]: negative first when CFG is on, as the pipeline
    pooled: torch.Tensor


def encode_prompts(pipe, prompts, group_size: int, guidance_scale: float, device) -> TextEmbeddings:
    """CLIP-L + CLIP-G + T5 (128 tokens) embeddings, each prompt repeated group_size times; with CFG
    the embeddings of the negative prompt "" come first."""
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompts, prompts, prompts, device=device, num_images_per_prompt=group_size,
            do_classifier_free_guidance=guidance_scale > 1, negative_prompt="", max_sequence_length=128,
        )
    if guidance_scale > 1:
        return TextEmbeddings(torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled]))
    return TextEmbeddings(embeds, pooled)


def text_encoder_for(pipe, cfg: Config, all_prompts, device):
    """A function (prompts, repeats) -> TextEmbeddings. With precompute_text_embeds, every prompt is
    encoded once here and the three text encoders are freed; otherwise prompts are encoded per batch."""
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        if encoder is not None:
            encoder.to(device)
    if not cfg.precompute_text_embeds:
        return lambda prompts, repeats: encode_prompts(pipe, prompts, repeats, cfg.guidance_scale, device)
    import gc

    cache = {p: encode_prompts(pipe, [p], 1, cfg.guidance_scale, device) for p in dict.fromkeys(all_prompts)}
    cache = {p: TextEmbeddings(e.embeds.cpu(), e.pooled.cpu()) for p, e in cache.items()}
    pipe.text_encoder = pipe.text_encoder_2 = pipe.text_encoder_3 = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    def lookup(prompts, repeats):
        chosen = [cache[p] for p in prompts for _ in range(repeats)]
        embeds, pooled = torch.cat([c.embeds[-1:] for c in chosen]), torch.cat([c.pooled[-1:] for c in chosen])
        if cfg.guidance_scale > 1:  # the negative prompt "" is the same for every prompt
            n = len(chosen)
            embeds = torch.cat([chosen[0].embeds[:1].expand(n, -1, -1), embeds])
            pooled = torch.cat([chosen[0].pooled[:1].expand(n, -1), pooled])
        return TextEmbeddings(embeds.to(device), pooled.to(device))

    return lookup


def guided_velocity(transformer, x, timestep, text: TextEmbeddings, guidance_scale: float):
    """v = v_uncond + w (v_cond - v_uncond), in fp32 whatever the model's dtype."""
    cfg = guidance_scale > 1
    model_input = torch.cat([x, x]) if cfg else x
    dtype = text.embeds.dtype
    v = transformer(
        hidden_states=model_input.to(dtype), timestep=timestep.expand(model_input.shape[0]),
        encoder_hidden_states=text.embeds, pooled_projections=text.pooled, return_dict=False,
    )[0].float()
    if cfg:
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
    return v


class Trajectory(NamedTuple):
    latents: torch.Tensor  # [B, T+1, C, H, W]: x at every sigma, from noise to the final sample
    log_probs: torch.Tensor  # [B, T]: log pi_old(x_{j+1} | x_j) recorded in the rollout


def schedule(pipe, num_steps: int, device):
    """sigmas [T+1] and transformer timesteps [T] of SD3's shifted FlowMatchEulerDiscreteScheduler."""
    pipe.scheduler.set_timesteps(num_steps, device=device)
    return pipe.scheduler.sigmas.float(), pipe.scheduler.timesteps.float()


@torch.no_grad()
def sample(transformer, text, latents, sigmas, timesteps, guidance_scale, noise_levels, step_fn=sde_step, generator=None) -> Trajectory:
    """Run the sampler from pure noise: step j uses noise level noise_levels[j] (0 = ODE)."""
    trajectory, log_probs = [latents.float()], []
    x = latents.float()
    for j in range(len(timesteps)):
        v = guided_velocity(transformer, x, timesteps[j], text, guidance_scale)
        x, log_prob, _, _ = step_fn(v, x, sigmas[j], sigmas[j + 1], noise_levels[j], generator=generator)
        trajectory.append(x)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1))


def decode_images(pipe, latents):
    """Final latents -> list of PIL images (uint8: round(255 x), clamped), as the reward models take them."""
    from PIL import Image

    with torch.no_grad():
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0].float()
    pixels = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def sde_and_trained_steps(cfg: Config, generator):
    """Which steps are stochastic (SDE) and which are trained.

    Flow-GRPO: all steps are SDE; the first int(T * train_fraction) are trained (not the last one,
    whose std ~0.006 makes its log-prob meaningless). Flow-GRPO-Fast (sde_window K): a window of K
    SDE steps starting at random in the first half, ODE elsewhere; only the window is trained."""
    if cfg.sde_window:
        start = int(torch.randint(0, max(1, cfg.num_steps // 2), (1,), generator=generator))
        window = list(range(start, min(start + cfg.sde_window, cfg.num_steps - 1)))
        return window, window
    return list(range(cfg.num_steps)), list(range(int(cfg.num_steps * cfg.train_fraction)))


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


def save_lora(transformer, lora_config, folder):
    """The LoRA in diffusers' format: StableDiffusion3Pipeline.load_lora_weights(folder) loads it."""
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    state = {k.removeprefix("base_model.model."): v.detach().cpu().contiguous() for k, v in state.items()}
    # Without the adapter metadata diffusers would scale by 1 instead of alpha / r.
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=lora_config.to_dict())


def read_prompts(path: str, builtin):
    if not path:
        return list(builtin)
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read prompt file {path}: {error.strerror if isinstance(error, OSError) else error}") from None
    if not prompts:
        raise UsageError(f"prompt file {path} has no prompts: write one prompt per line")
    return prompts


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


def seeded(*keys) -> torch.Generator:
    """A CPU generator for one purpose (rollout noise of a step on a rank, ...): hash of int keys is stable."""
    return torch.Generator().manual_seed(hash(keys) % 2**63)


class Distributed(NamedTuple):
    rank: int
    world: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_distributed() -> Distributed:
    """Under torchrun: one process per GPU (NCCL), or per CPU process (gloo). Otherwise one process."""
    import os

    if "RANK" not in os.environ:
        return Distributed(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl")
        return Distributed(rank, world, torch.device("cuda", local_rank))
    torch.distributed.init_process_group("gloo")
    return Distributed(rank, world, torch.device("cpu"))


def all_gather(tensor: torch.Tensor, dist: Distributed) -> torch.Tensor:
    if dist.world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_gradients(params, dist: Distributed):
    """Data parallelism by hand: one all-reduce of the flattened LoRA gradients per optimizer step.
    (DDP's wrapper adds nothing here but hooks that fight with disable_adapter and accumulation.)"""
    if dist.world == 1:
        return
    grads = torch.cat([p.grad.flatten() for p in params])
    torch.distributed.all_reduce(grads)
    grads /= dist.world
    offset = 0
    for p in params:
        p.grad.copy_(grads[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def rank_advantages(all_rewards: torch.Tensor, cfg: Config, dist: Distributed) -> torch.Tensor:
    """This rank's advantages, from the rewards of all ranks (rank-major, group by group): exactly
    what one process holding every sample would compute, global std included."""
    group_ids = torch.arange(len(all_rewards) // cfg.group_size).repeat_interleave(cfg.group_size)
    advantages = group_advantages(all_rewards, group_ids, cfg.global_std)
    return advantages.view(dist.world, -1)[dist.rank]


def check_config(cfg: Config, dist: Distributed):
    if cfg.group_size < 2:
        raise UsageError(f"--group-size {cfg.group_size}: GRPO compares samples of a prompt, a group needs at least 2")
    if cfg.batch_size % cfg.group_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is not a multiple of --group-size {cfg.group_size}: a batch holds whole groups")
    if cfg.groups_per_step * cfg.group_size % (cfg.batch_size * dist.world):
        raise UsageError(
            f"--groups-per-step {cfg.groups_per_step} x --group-size {cfg.group_size} images must split into batches of "
            f"--batch-size {cfg.batch_size} on {dist.world} process(es)"
        )
    if cfg.sde_type not in ("sde", "cps"):
        raise UsageError(f"--sde-type {cfg.sde_type}: use sde or cps")
    largest = 1.5 if cfg.sde_type == "sde" else 1.0  # cps: sin(a pi / 2) peaks at a = 1
    if not 0 < cfg.noise_level <= largest:
        raise UsageError(f"--noise-level {cfg.noise_level}: use (0, {largest}] for {cfg.sde_type} (0.7 for sde, 0.8 for cps)")
    if cfg.sde_window < 0 or cfg.sde_window > cfg.num_steps // 2:
        raise UsageError(f"--sde-window {cfg.sde_window}: use 0 (all steps) or 1..{cfg.num_steps // 2}")
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise UsageError(f"--dtype {cfg.dtype}: use auto, fp32, bf16 or fp16")


def reward_model_dirs(spec: str):
    dirs = {}
    for item in filter(None, spec.split(",")):
        name, sep, folder = item.partition("=")
        if not sep or not folder:
            raise UsageError(f"--reward-model-dir '{item}': write NAME=FOLDER, e.g. pickscore=/models/pickscore")
        dirs[name.strip()] = folder.strip()
    return dirs


def score(reward_fn, images, prompts):
    try:
        return reward_fn(images, prompts)
    except ValueError as error:  # e.g. a custom reward that returned the wrong shape or non-finite values
        raise UsageError(str(error)) from None


def save_image_grid(images, prompts, path, columns=4):
    """A PNG of images with their prompts underneath, for a person to look at."""
    import textwrap

    from PIL import Image, ImageDraw

    side = max(256, images[0].width)
    caption = 48
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * side, rows * (side + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        x, y = (i % columns) * side, (i // columns) * (side + caption)
        grid.paste(image.resize((side, side)), (x, y))
        draw.multiline_text((x + 4, y + side + 2), "\n".join(textwrap.wrap(prompt, side // 7)[:3]), fill="black")
    grid.save(path)


def evaluate(pipe, transformer, cfg: Config, dist: Distributed, reward_fn, eval_prompts, text_for, step: int):
    """The paper's evaluation: a 40-step ODE (a = 0) with CFG on held-out prompts, one image each,
    prompts split over the ranks. Returns the mean of every reward component over all ranks."""
    from tqdm import tqdm

    sigmas, timesteps = schedule(pipe, cfg.eval_num_steps, dist.device)
    mine = eval_prompts[dist.rank :: dist.world]
    names = list(reward_fn.names) + ["reward"]
    images, scores = [], []
    for start in tqdm(range(0, len(mine), cfg.batch_size), desc="eval", leave=False, disable=not dist.main):
        prompts = mine[start : start + cfg.batch_size]
        noise = torch.randn(len(prompts), *latent_shape(pipe, cfg), generator=seeded(cfg.seed, -1, dist.rank, start))
        out = sample(transformer, text_for(prompts, 1), noise.to(dist.device), sigmas, timesteps, cfg.guidance_scale, [0.0] * cfg.eval_num_steps)
        batch_images = decode_images(pipe, out.latents[:, -1])
        images += batch_images
        result = score(reward_fn, batch_images, prompts)
        scores.append(torch.stack([result[name] for name in names], dim=1))
    scores = torch.cat(scores) if scores else torch.zeros(0, len(names))
    counts = all_gather(torch.tensor([float(len(scores))], device=dist.device), dist)
    totals = all_gather(scores.sum(0, keepdim=True).to(dist.device), dist).sum(0)
    if dist.main and images:
        save_image_grid(images, mine, f"{cfg.out}/eval_{step:05d}.png")
    return {f"eval_{name}": (totals[i] / counts.sum()).item() for i, name in enumerate(names)}


def latent_shape(pipe, cfg: Config):
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return (pipe.transformer.config.in_channels, cfg.resolution // scale, cfg.resolution // scale)


def train(cfg: Config):
    """Flow-GRPO (paper Algorithm 1): sample groups with the SDE, score them, compute group-relative
    advantages, and take clipped policy-gradient steps with a KL to the frozen model."""
    import json

    from tqdm import tqdm

    import rewards

    dist = setup_distributed()
    check_config(cfg, dist)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        cfg.dtype, torch.bfloat16 if dist.device.type == "cuda" else torch.float32)
    prompts, eval_prompts = read_prompts(cfg.prompts, BUILTIN_PROMPTS), read_prompts(cfg.eval_prompts, BUILTIN_EVAL_PROMPTS)
    check_output_folder(cfg)
    if dist.world > 1:
        torch.distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    try:
        reward_fn = rewards.load_reward(cfg.reward, device=dist.device, model_dirs=reward_model_dirs(cfg.reward_model_dir))
    except ValueError as error:
        raise UsageError(str(error)) from None

    pipe = load_pipeline(cfg.model, dtype)
    # Text first: with precompute_text_embeds the encoders leave before the transformer arrives.
    text_for = text_encoder_for(pipe, cfg, prompts + eval_prompts, dist.device)
    pipe.to(dist.device)
    pipe.set_progress_bar_config(disable=True)
    check_resolution(pipe, cfg)
    if cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    transformer, lora_config = add_lora(pipe.transformer, cfg)
    params = lora_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    ema_params = [p.detach().clone() for p in params]
    step_fn = sde_step if cfg.sde_type == "sde" else cps_step
    start_step, optimizer_step = 0, 0
    if cfg.resume and latest_checkpoint(cfg.out):
        start_step, optimizer_step = load_checkpoint(latest_checkpoint(cfg.out), params, ema_params, optimizer)
    if dist.main:
        write_run_files(cfg, start_step)

    def log(record):
        if dist.main:
            with open(f"{cfg.out}/metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def run_eval(step):
        with swap_in(params, ema_params if cfg.ema else params):
            return evaluate(pipe, transformer, cfg, dist, reward_fn, eval_prompts, text_for, step)

    groups_per_rank = cfg.groups_per_step // dist.world
    prompts_per_batch = cfg.batch_size // cfg.group_size
    sigmas, timesteps = schedule(pipe, cfg.num_steps, dist.device)
    nonfinite_in_a_row = 0
    if start_step == 0:
        eval_metrics = run_eval(0)
        if dist.main:
            print(f"step 0 | eval reward {eval_metrics['eval_reward']:.5g}", flush=True)
    for step in range(start_step, cfg.max_steps):
        timer = {}
        started = clock(dist.device)
        generator = seeded(cfg.seed, step, dist.rank)
        sde_steps, trained_steps = sde_and_trained_steps(cfg, seeded(cfg.seed, step))  # the same window on every rank
        noise_levels = [cfg.noise_level if j in sde_steps else 0.0 for j in range(cfg.num_steps)]
        step_prompts = prompts_for_step(prompts, cfg.groups_per_step, step, cfg.seed)
        my_prompts = step_prompts[dist.rank * groups_per_rank : (dist.rank + 1) * groups_per_rank]

        # 1. Rollout: G images per prompt with the SDE, recording x_t and log pi_old at every step.
        batches = []
        for start in tqdm(range(0, groups_per_rank, prompts_per_batch), desc=f"step {step + 1} rollout", leave=False, disable=not dist.main):
            batch_prompts = my_prompts[start : start + prompts_per_batch]
            text = text_for(batch_prompts, cfg.group_size)
            noise = torch.randn(cfg.batch_size, *latent_shape(pipe, cfg), generator=generator).to(dist.device)
            trajectory = sample(transformer, text, noise, sigmas, timesteps, cfg.guidance_scale, noise_levels, step_fn, generator)
            batches.append((batch_prompts, text, trajectory))
        timer["rollout"] = clock(dist.device) - started

        # 2. Reward of each final image, one batched call per rollout batch.
        started = clock(dist.device)
        scores = {}
        for batch_prompts, _, trajectory in tqdm(batches, desc=f"step {step + 1} reward", leave=False, disable=not dist.main):
            images = decode_images(pipe, trajectory.latents[:, -1])
            repeated = [p for p in batch_prompts for _ in range(cfg.group_size)]
            for name, value in score(reward_fn, images, repeated).items():
                scores.setdefault(name, []).append(value)
        scores = {name: all_gather(torch.cat(v).to(dist.device), dist).cpu() for name, v in scores.items()}
        timer["reward"] = clock(dist.device) - started

        # 3. Group-relative advantages (Eq. 4) over the rewards of all ranks.
        started = clock(dist.device)
        advantages = rank_advantages(scores["reward"], cfg, dist)
        mine = advantages.to(dist.device).split(cfg.batch_size)

        # 4. Policy update (Eq. 5-6, 10): the same batches as the rollout, so the first forward
        #    reproduces the rollout's exactly (ratio 1); gradients accumulated over updates_per_step.
        backwards = len(batches) * len(trained_steps)
        accumulate = math.ceil(backwards / cfg.updates_per_step)
        stats = {"loss": [], "policy_loss": [], "kl": [], "approx_kl": [], "clip_fraction": []}
        first_ratio_error = None
        nonfinite_updates = 0
        grouped = scores["reward"].view(-1, cfg.group_size)
        constant_groups = (grouped.max(1).values == grouped.min(1).values).float()
        skip = bool(constant_groups.all())  # every advantage is 0 on every rank: nothing to learn
        progress = tqdm(total=0 if skip else backwards, desc=f"step {step + 1} train", leave=False, disable=not dist.main)
        for count, ((_, text, trajectory), adv, j) in enumerate(
            (b, a, j) for b, a in ([] if skip else zip(batches, mine)) for j in trained_steps
        ):
            x = trajectory.latents[:, j]
            v = guided_velocity(transformer, x, timesteps[j], text, cfg.guidance_scale)
            out = step_fn(v, x, sigmas[j], sigmas[j + 1], noise_levels[j], prev_x=trajectory.latents[:, j + 1])
            old_log_prob = trajectory.log_probs[:, j]
            policy_loss = grpo_loss(out.log_prob, old_log_prob, adv, cfg.clip_range, cfg.adv_clip)
            kl = torch.zeros(())
            if cfg.beta > 0:
                with torch.no_grad(), transformer.disable_adapter():
                    v_ref = guided_velocity(transformer, x, timesteps[j], text, cfg.guidance_scale)
                ref_mean = step_fn(v_ref, x, sigmas[j], sigmas[j + 1], noise_levels[j], prev_x=out.prev_x).mean
                kl = gaussian_kl(out.mean, ref_mean, out.std).mean() * (abs(sigmas[j + 1] - sigmas[j]) if cfg.kl_dt_scale else 1)
            loss = policy_loss + cfg.beta * kl
            (loss / accumulate).backward()
            with torch.no_grad():
                delta = out.log_prob - old_log_prob
                if first_ratio_error is None:  # before any update: must be 0 (on-policy)
                    first_ratio_error = (delta.exp() - 1).abs().max().item()
                stats["loss"].append(loss.item())
                stats["policy_loss"].append(policy_loss.item())
                stats["kl"].append(kl.item())
                stats["approx_kl"].append(0.5 * (delta**2).mean().item())
                stats["clip_fraction"].append(((delta.exp() - 1).abs() > cfg.clip_range).float().mean().item())
            if (count + 1) % accumulate == 0 or count + 1 == backwards:
                average_gradients(params, dist)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if torch.isfinite(grad_norm):  # a NaN/inf loss leaves a non-finite gradient: never apply it
                    optimizer.step()
                    optimizer_step += 1
                    nonfinite_in_a_row = 0
                    if optimizer_step % cfg.ema_every == 0:
                        ema_update(ema_params, params, optimizer_step)
                else:
                    nonfinite_updates += 1
                    nonfinite_in_a_row += 1
                    print(f"warning: step {step + 1}: non-finite loss or gradient, update skipped", flush=True)
                    if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        raise TrainingDiverged(
                            f"{nonfinite_in_a_row} non-finite updates in a row at step {step + 1}: lower --lr or "
                            f"check the reward; the last good checkpoint is in {cfg.out}/checkpoints")
                optimizer.zero_grad(set_to_none=False)
            progress.update()
        progress.close()
        timer["train"] = clock(dist.device) - started

        # 5. Log, evaluate, save.
        record = {"step": step + 1, "optimizer_steps": optimizer_step, "skipped_update": skip}
        for name, value in scores.items():
            record[f"{name}_mean"], record[f"{name}_std"] = value.mean().item(), value.std(correction=0).item()
        record["zero_std_group_ratio"] = constant_groups.mean().item()
        record.update({k: sum(v) / len(v) if v else 0.0 for k, v in stats.items()})
        record["first_ratio_error"] = first_ratio_error
        record["nonfinite_updates"] = nonfinite_updates
        record.update({f"seconds_{k}": v for k, v in timer.items()})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            record.update(run_eval(step + 1))
        log(record)
        if dist.main and "eval_reward" in record:
            write_curves([cfg.out], f"{cfg.out}/curves.png")
        if dist.main:
            evaluated = f" | eval reward {record['eval_reward']:.5g}" if "eval_reward" in record else ""
            print(f"step {step + 1} | reward {record['reward_mean']:.5g} ± {record['reward_std']:.2g} | kl {record['kl']:.2e}"
                  f" | clip {record['clip_fraction']:.2f} | {sum(timer.values()):.1f}s{evaluated}", flush=True)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
                save_checkpoint(cfg, step + 1, optimizer_step, params, ema_params, optimizer)
    if dist.main:
        print(effect_size_line(read_metrics(cfg.out)), flush=True)
        with swap_in(params, ema_params if cfg.ema else params):
            save_lora(transformer, lora_config, f"{cfg.out}/lora")
    return TrainedRun(pipe, transformer, params, ema_params)


class TrainedRun(NamedTuple):
    pipe: object
    transformer: torch.nn.Module  # the LoRA-wrapped transformer
    params: list  # the LoRA parameters
    ema_params: list


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: count them in the phase that launched them
    return time.perf_counter()


def check_resolution(pipe, cfg: Config):
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = pipe.transformer.config.patch_size
    largest = pipe.transformer.config.pos_embed_max_size * patch * scale
    if cfg.resolution % (scale * patch) or cfg.resolution > largest:
        raise UsageError(f"--resolution {cfg.resolution}: this model takes multiples of {scale * patch} up to {largest} px")


MAX_NONFINITE_IN_A_ROW = 3


class TrainingDiverged(Exception):
    """Too many non-finite updates in a row: stop rather than train on garbage."""


RESUMABLE_CHANGES = {"resume", "max_steps", "eval_every", "save_every", "keep_checkpoints"}


def check_output_folder(cfg: Config):
    """Never overwrite a run; resume only a run with the same config; fail before any work if the
    folder cannot be written."""
    import json
    import os

    config_path = f"{cfg.out}/config.json"
    if os.path.exists(config_path) and not cfg.resume:
        raise UsageError(f"{cfg.out} already holds a run: pass --resume to continue it, or choose another --out")
    if cfg.resume:
        if not os.path.exists(config_path):
            raise UsageError(f"--resume: {cfg.out} holds no run (no config.json): drop --resume to start one")
        with open(config_path) as f:
            saved = json.load(f)
        differ = [k for k, v in vars(cfg).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in differ)
            raise UsageError(f"--resume: {cfg.out} holds a run with a different config ({detail}): use the same flags or another --out")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        probe = f"{cfg.out}/.write_test_{os.getpid()}"
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write to output folder {cfg.out}: {error.strerror}") from None


def write_run_files(cfg: Config, start_step: int):
    """config.json for a new run; on resume, drop the metrics of steps that will be redone."""
    import json
    import os

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
    import json
    import os

    path = f"{folder}/metrics.jsonl"
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
        "first": first, "last": last, "std": spread, "effect": (last - first) / spread if spread > 0 else math.nan,
        "first_steps": (steps[0]["step"], steps[k - 1]["step"]), "last_steps": (steps[-k]["step"], steps[-1]["step"]),
        "eval_first": (evals[0]["step"], evals[0]["eval_reward"]) if evals else None,
        "eval_last": (evals[-1]["step"], evals[-1]["eval_reward"]) if evals else None,
    }


def effect_size_line(records) -> str:
    """effect_size as the one line printed at the end of a run."""
    e = effect_size(records)
    if not e:
        return "effect size: no steps logged"
    line = (f"effect size: {e['effect']:+.2f} within-step stds (rollout reward {e['first']:.5g} over steps "
            f"{e['first_steps'][0]}-{e['first_steps'][1]} -> {e['last']:.5g} over steps {e['last_steps'][0]}-"
            f"{e['last_steps'][1]}; mean within-step std {e['std']:.2g})")
    if e["eval_first"]:
        line += f"; eval reward {e['eval_first'][1]:.5g} at step {e['eval_first'][0]}"
        line += f" -> {e['eval_last'][1]:.5g} at step {e['eval_last'][0]}"
    return line


_NOTED_NO_MATPLOTLIB = []  # the note is printed once per process, not at every evaluation


def write_curves(folders, path: str) -> bool:
    """Draw the metrics.jsonl of one run, or of several overlaid, into the PNG `path`: the rollout reward
    (mean ± std band) with the evaluation reward, the KL terms, the clip fraction and the seconds per phase
    against the step. Without matplotlib: one line saying so, no figure, False."""
    import json
    import os

    try:  # the object API: no pyplot, so no global backend switch in the training process
        from matplotlib.figure import Figure
    except ImportError:
        if not _NOTED_NO_MATPLOTLIB:
            print(f"note: matplotlib is not installed, so no {path} (pip install matplotlib)", flush=True)
            _NOTED_NO_MATPLOTLIB.append(True)
        return False
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (reward_ax, kl_ax), (clip_ax, time_ax) = fig.subplots(2, 2, sharex=True)
    names = [os.path.basename(os.path.normpath(f)) for f in folders]
    if len(set(names)) < len(names):  # runs/a/out and runs/b/out: the whole paths tell them apart
        names = [os.path.normpath(f) for f in folders]
    for i, folder in enumerate(folders):
        records = [r for r in read_metrics(folder) if "reward_mean" in r]
        colour, name = f"C{i}", (names[i] + ": " if len(folders) > 1 else "")
        eval_steps = "ODE"
        if os.path.isfile(f"{folder}/config.json"):
            with open(f"{folder}/config.json") as f:
                eval_steps = f"{json.load(f).get('eval_num_steps', '')}-step ODE"
        step = [r["step"] for r in records]
        mean, std = torch.tensor([r["reward_mean"] for r in records]), torch.tensor([r["reward_std"] for r in records])
        reward_ax.plot(step, mean, color=colour, label=f"{name}rollout (SDE), mean ± std")
        reward_ax.fill_between(step, mean - std, mean + std, color=colour, alpha=0.2, linewidth=0)
        evals = [r for r in records if "eval_reward" in r]
        reward_ax.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], "o--", color=colour,
                       label=f"{name}eval ({eval_steps})")
        kls = (("kl", "-", "kl to the frozen model (β term)"), ("approx_kl", "--", "approx_kl to the rollout policy"))
        for key, style, label in kls:
            if any(r[key] > 0 for r in records):  # log axes: an all-zero series (β = 0) has nothing to draw
                kl_ax.plot(step, [r[key] for r in records], style, color=colour, label=name + label)
        clip_ax.plot(step, [r["clip_fraction"] for r in records], color=colour, label=name + "clip fraction")
        for phase, style in (("rollout", "-"), ("reward", ":"), ("train", "--")):
            time_ax.plot(step, [r[f"seconds_{phase}"] for r in records], style, color=colour, label=name + phase)
    reward_ax.set(title="reward", ylabel="reward")
    kl_ax.set(title="KL per dimension (mean over the step's backward passes)", yscale="log")
    clip_ax.set(title="fraction of clipped ratios", xlabel="step")
    time_ax.set(title="seconds per phase of a step", xlabel="step", ylim=(0, None))
    for ax in (reward_ax, kl_ax, clip_ax, time_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(", ".join(names))
    fig.savefig(path + ".tmp", format="png", dpi=100)
    os.replace(path + ".tmp", path)  # a viewer never sees half a PNG
    return True


def plot_main(argv):
    """python flow_grpo.py --plot RUN [RUN ...]: curves.png of finished runs."""
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(
        prog="flow_grpo.py --plot", description="Draw the curves of finished runs from their metrics.jsonl (the figure "
        "training writes to OUT/curves.png at each evaluation); several runs are overlaid, one colour each.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="the output folder (--out) of a run")
    parser.add_argument("--output", default="", help="PNG to write (default: RUN/curves.png for one run, "
                        "./curves.png for several)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not read_metrics(run):
            print(f"error: {run} holds no logged steps (no {os.path.join(run, 'metrics.jsonl')}): pass the --out "
                  "folder of a run that has taken a step", file=sys.stderr)
            sys.exit(2)
    output = args.output or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    try:
        drawn = write_curves(args.runs, output)
    except OSError as error:
        print(f"error: cannot write {output}: {error.strerror}: pass --output FILE in a writable folder", file=sys.stderr)
        sys.exit(2)
    if not drawn:
        sys.exit(1)
    print(f"wrote {output}")


def latest_checkpoint(out: str):
    import glob

    found = sorted(glob.glob(f"{out}/checkpoints/step_*"))
    return found[-1] if found else None


def save_checkpoint(cfg: Config, step: int, optimizer_step: int, params, ema_params, optimizer):
    """Written under a temporary name, then renamed: a killed run never leaves a half checkpoint."""
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    final = f"{cfg.out}/checkpoints/step_{step:06d}"
    tmp = f"{cfg.out}/checkpoints/.tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(params)}, f"{tmp}/lora.safetensors")
    save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema_params)}, f"{tmp}/ema.safetensors")
    torch.save(optimizer.state_dict(), f"{tmp}/optimizer.pt")
    # All sampling noise comes from generators seeded by (seed, step, rank), so the step restores it;
    # the global states are kept for anything else that draws from them.
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, f"{tmp}/rng.pt")
    with open(f"{tmp}/state.json", "w") as f:
        json.dump({"step": step, "optimizer_step": optimizer_step}, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(os.listdir(f"{cfg.out}/checkpoints"))[: -cfg.keep_checkpoints]:
        if old.startswith("step_"):
            shutil.rmtree(f"{cfg.out}/checkpoints/{old}")


def load_checkpoint(folder: str, params, ema_params, optimizer):
    import json

    from safetensors.torch import load_file

    for target, name in ((params, "lora"), (ema_params, "ema")):
        values = load_file(f"{folder}/{name}.safetensors")
        with torch.no_grad():
            for i, p in enumerate(target):
                p.copy_(values[str(i)])
    optimizer.load_state_dict(torch.load(f"{folder}/optimizer.pt", weights_only=True))
    rng = torch.load(f"{folder}/rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    with open(f"{folder}/state.json") as f:
        state = json.load(f)
    return state["step"], state["optimizer_step"]


# --------------------------------------------------------------------------------------------------
# 3. A tiny SD3 for CPUs and tests (--model tiny): nothing downloaded, tokenizers built here
# --------------------------------------------------------------------------------------------------


def build_tiny_clip_tokenizer(folder):
    """A byte-level CLIP BPE tokenizer written from scratch (256 bytes, their `</w>` forms, a few
    merges), so the CLIP text path runs with nothing downloaded."""
    import json
    import os

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
    import os

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
    return T5TokenizerFast(tokenizer_file=path, extra_ids=0, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512)


def tiny_clip_text_config(tokenizer, hidden_size=32, projection_dim=32):
    from transformers import CLIPTextConfig

    # CLIP pools at eos_token_id: ids that differ from the tokenizer's would pool the wrong token, silently.
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_pipeline(seed: int = 0):
    """A randomly initialised SD3.5-shaped pipeline small enough for a CPU (about 0.2 M parameters):
    MMDiT with a dual-attention layer and RMS qk-norm as SD3.5, a 4x VAE, two CLIPs and a T5.
    Images of 32 to 128 px (8x8 to 32x32 latents)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        clip_tokenizer = build_tiny_clip_tokenizer(folder + "/clip")
        t5_tokenizer = build_tiny_t5_tokenizer(folder + "/t5")
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    # 4x down-scaling (3 blocks), not SD3's 8x: with four random up-blocks the decoded texture hardly
    # depends on the latents, and no image reward could be learned on this model.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    )
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    for module in (transformer, vae, t5):
        module.eval()  # as from_pretrained leaves them: T5's dropout would make the text embeddings random
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer)).eval(), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer)).eval(), tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def main(argv=None):
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--plot"]:  # a figure of finished runs, not a training run
        return plot_main(argv[1:])
    cfg = parse_config(argv)
    try:
        train(cfg)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

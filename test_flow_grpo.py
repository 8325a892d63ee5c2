"""Tests of Flow-GRPO: the math against independent computations, the toy, and the full SD3 path on
tiny random models built here (no model hub is ever contacted)."""
import dataclasses
import io
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import flow_grpo as F
import rewards
import toy_2d

# The models here are tiny: one thread is fastest, and spares the machine's other core.
torch.set_num_threads(1)

# ------------------------------------------------------------------------------------------------
# The math
# ------------------------------------------------------------------------------------------------


def gaussian_target_velocity(x, sigma, m, s):
    """Exact rectified-flow velocity E[eps - x0 | x_sigma = x] for data x0 ~ N(m, s^2 I)."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    centred = x - (1 - sigma) * m
    x0_mean = m + (1 - sigma) * s**2 / var * centred
    eps_mean = sigma / var * centred
    return eps_mean - x0_mean


@pytest.mark.parametrize("step", [F.sde_step, F.cps_step])
def test_noise_level_zero_is_the_euler_ode_step(step):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    out = step(v, x, 0.7, 0.55, noise_level=0.0)
    torch.testing.assert_close(out.prev_x, x + v * (0.55 - 0.7), rtol=0, atol=1e-6)
    assert torch.all(out.std == 0)
    assert torch.all(out.log_prob == 0)  # deterministic step: documented 0, never NaN


def test_sde_step_mean_and_std_match_the_spec_formula():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    sigma, sigma_next, a = 0.6, 0.45, 0.7
    sigma_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = x * (1 + sigma_t**2 * dt / (2 * sigma)) + v * (1 + sigma_t**2 * (1 - sigma) / (2 * sigma)) * dt
    out = F.sde_step(v, x, sigma, sigma_next, a)
    torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)
    assert out.std.item() == pytest.approx(sigma_t * math.sqrt(-dt), rel=1e-6)


def test_first_step_at_sigma_one_has_std_noise_level():
    x = torch.randn(4, 8)
    out = F.sde_step(torch.zeros_like(x), x, 1.0, 0.9601, 0.7)
    assert out.std.item() == pytest.approx(0.7, rel=1e-6)
    assert torch.isfinite(out.prev_x).all() and torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("step", [F.sde_step, F.cps_step])
def test_log_prob_equals_torch_distributions_normal(step):
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    out = step(v, x, 0.8, 0.6, 0.7, generator=g)
    reference = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean)).log_prob(out.prev_x)
    torch.testing.assert_close(out.log_prob, reference.mean(dim=(1, 2)), rtol=1e-6, atol=1e-6)


def test_per_sample_sigmas_equal_one_call_per_sample():
    g = torch.Generator().manual_seed(3)
    x, v, prev = (torch.randn(3, 2, 5, generator=g) for _ in range(3))
    sigmas, sigmas_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.96, 0.45, 0.1])
    batched = F.sde_step(v, x, sigmas, sigmas_next, 0.7, prev_x=prev)
    for i in range(3):
        single = F.sde_step(v[i : i + 1], x[i : i + 1], sigmas[i].item(), sigmas_next[i].item(), 0.7, prev_x=prev[i : i + 1])
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)


def test_sde_math_runs_in_float32_for_half_inputs():
    x, v = torch.randn(2, 4).to(torch.bfloat16), torch.randn(2, 4).to(torch.bfloat16)
    out = F.sde_step(v, x, 0.5, 0.4, 0.7)
    assert out.prev_x.dtype == out.log_prob.dtype == out.mean.dtype == torch.float32


def test_grad_of_log_prob_wrt_mean_is_noise_over_std():
    """d log p / d mean = (x_next - mean) / std^2 = eps / std (per element, then averaged)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, generator=g)
    v = torch.randn(2, 10, generator=g, requires_grad=True)
    out = F.sde_step(v, x, 0.5, 0.4, 0.7, generator=g)
    eps = (out.prev_x - out.mean).detach() / out.std
    (grad_mean,) = torch.autograd.grad(out.log_prob.sum(), out.mean)
    torch.testing.assert_close(grad_mean, eps / out.std / x.shape[1], rtol=1e-5, atol=1e-6)


def test_kl_matches_monte_carlo_and_velocity_form():
    g = torch.Generator().manual_seed(5)
    x, v, v_ref = (torch.randn(1, 4, generator=g) for _ in range(3))
    sigma, sigma_next, a = 0.7, 0.6, 0.7
    theta, ref = F.sde_step(v, x, sigma, sigma_next, a), F.sde_step(v_ref, x, sigma, sigma_next, a)
    kl = F.gaussian_kl(theta.mean, ref.mean, theta.std)
    # Monte Carlo: E_{x' ~ pi_theta}[log pi_theta(x') - log pi_ref(x')], both averaged over dims.
    n = 200_000
    samples = theta.mean + theta.std * torch.randn(n, 4, generator=g)
    p = torch.distributions.Normal(theta.mean, theta.std).log_prob(samples).mean(1)
    q = torch.distributions.Normal(ref.mean, ref.std).log_prob(samples).mean(1)
    mc = (p - q).mean()
    standard_error = (p - q).std() / math.sqrt(n)
    assert abs(kl.item() - mc.item()) < 4 * standard_error.item()
    # The paper's velocity form (Eq. 10), averaged over the 4 dims.
    sigma_t = a * math.sqrt(sigma / (1 - sigma))
    dt = abs(sigma_next - sigma)
    velocity_form = dt / 2 * (sigma_t * (1 - sigma) / (2 * sigma) + 1 / sigma_t) ** 2 * ((v - v_ref) ** 2).mean()
    assert kl.item() == pytest.approx(velocity_form.item(), rel=1e-5)


def _run_sampler(step, noise_level, m, s, n=20_000, num_steps=100, stop_at=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1).double()
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if sigma <= stop_at + 1e-9:
            break
        v = gaussian_target_velocity(x, sigma, m, s)
        x = step(v, x, sigma.item(), sigma_next.item(), noise_level, generator=g).prev_x
    return x


@pytest.mark.parametrize("noise_level", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("stop_at", [0.5, 0.0])
def test_sde_keeps_the_analytic_marginal(noise_level, stop_at):
    """Driven by the exact velocity of N(m, s^2 I) data, x_sigma ~ N((1-sigma) m, ((1-sigma)^2 s^2 + sigma^2) I)."""
    m, s = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5
    x = _run_sampler(F.sde_step, noise_level, m, s, stop_at=stop_at)
    expected_mean = (1 - stop_at) * m
    expected_std = math.sqrt((1 - stop_at) ** 2 * s**2 + stop_at**2)
    torch.testing.assert_close(x.mean(0), expected_mean, rtol=0, atol=0.03)
    torch.testing.assert_close(x.std(0), torch.full((2,), expected_std, dtype=torch.float64), rtol=0.03, atol=0)


def test_sde_without_the_score_correction_does_not_keep_the_marginal():
    """Control for the test above: adding noise to the plain Euler step widens the final samples."""
    def naive_step(v, x, sigma, sigma_next, noise_level, generator=None):
        std = noise_level * math.sqrt(sigma / (1 - sigma) if sigma < 1 else 1 / (1 - sigma_next)) * math.sqrt(sigma - sigma_next)
        return F.StepOutput(x + v * (sigma_next - sigma) + std * torch.randn(x.shape, generator=generator, dtype=x.dtype), None, None, None)

    x = _run_sampler(naive_step, 0.7, torch.zeros(2, dtype=torch.float64), 0.5)
    assert x.std(0).min() > 0.5 * 1.5


@pytest.mark.parametrize("num_steps", [10, 40])
def test_cps_keeps_the_mean_and_follows_its_variance_recursion(num_steps):
    """CPS is exact in mean but, with a posterior-mean velocity, not in variance: its fresh noise does
    not vanish as steps shrink, so every step swaps part of the noise for the (less variable)
    prediction. For Gaussian data the variance after a step is closed-form:
        c = x - (1-sigma) m ~ N(0, V),  x0_hat - m = (1-sigma) s^2 / var * c,  x1_hat = sigma / var * c
        V_next = [((1-sigma_next)(1-sigma) s^2 + sqrt(sigma_next^2 - std^2) sigma) / var]^2 V + std^2
    with var = (1-sigma)^2 s^2 + sigma^2. The sampled variance must follow this recursion."""
    m, s, a = torch.tensor([2.0, -1.0], dtype=torch.float64), 0.5, 0.8
    x = _run_sampler(F.cps_step, a, m, s, num_steps=num_steps)
    V = 1.0
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1).double().tolist()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        std = sigma_next * math.sin(a * math.pi / 2)
        k = ((1 - sigma_next) * (1 - sigma) * s**2 + math.sqrt(sigma_next**2 - std**2) * sigma) / var
        V = k**2 * V + std**2
    torch.testing.assert_close(x.mean(0), m, rtol=0, atol=0.02)
    torch.testing.assert_close(x.var(0), torch.full((2,), V, dtype=torch.float64), rtol=0.04, atol=0)
    assert V < 0.9 * s**2  # the bias is real: documented in cps_step and the README


def test_cps_coefficients_are_preserved():
    """With x = (1-sigma) x0 + sigma x1 and the exact v = x1 - x0, the CPS mean plus noise has
    (1 - sigma_next) x0 and, in total, variance sigma_next^2 of unit noise."""
    g = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(50_000, 2, generator=g), torch.randn(50_000, 2, generator=g)
    sigma, sigma_next, a = 0.8, 0.5, 0.8
    x = (1 - sigma) * x0 + sigma * x1
    out = F.cps_step(x1 - x0, x, sigma, sigma_next, a, generator=g)
    std = sigma_next * math.sin(a * math.pi / 2)
    torch.testing.assert_close(out.mean, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1, rtol=1e-5, atol=1e-5)
    noise_part = out.prev_x - (1 - sigma_next) * x0
    assert noise_part.std().item() == pytest.approx(sigma_next, rel=0.01)
    assert (noise_part * x0).mean().abs().item() < 0.01  # uncorrelated with the data


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.1, 0.1, 0.1, 4.0, 6.0])
    groups = torch.tensor([0, 0, 0, 7, 7, 7, 3, 3])
    # Per-group std (paper): group 0 has mean 2, std sqrt(2/3); group 3 has mean 5, std 1.
    adv = F.group_advantages(rewards, groups, global_std=False)
    s0 = math.sqrt(2 / 3)
    expected = torch.tensor([-1 / (s0 + 1e-4), 0, 1 / (s0 + 1e-4), 0, 0, 0, -1 / (1 + 1e-4), 1 / (1 + 1e-4)])
    torch.testing.assert_close(adv, expected)
    assert torch.all(adv[3:6] == 0)  # constant group: exactly zero
    # Global std (official): one population std over all 8 rewards.
    std = rewards.double().std(correction=0).item()
    adv = F.group_advantages(rewards, groups, global_std=True)
    expected = torch.tensor([-1, 0, 1, 0, 0, 0, -1, 1]) / (std + 1e-4)
    torch.testing.assert_close(adv, expected.float())


def test_group_advantages_single_constant_batch_is_zero_not_nan():
    adv = F.group_advantages(torch.full((6,), 0.3), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.all(adv == 0)


def test_grpo_loss_on_policy_value_and_gradient():
    """At log_prob == old_log_prob the ratio is 1: L = -mean(A) and dL/dlog_prob = -A / N."""
    log_prob = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    advantages = torch.tensor([1.0, -0.5, 7.0, 0.0])
    loss = F.grpo_loss(log_prob, log_prob.detach(), advantages, clip_range=1e-4, adv_clip=5.0)
    clipped = advantages.clamp(-5, 5)
    assert loss.item() == pytest.approx(-clipped.mean().item())
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -clipped / 4)


def test_grpo_loss_clips_the_ratio():
    old = torch.zeros(2)
    advantages = torch.tensor([1.0, -1.0])
    # Ratio 1.5 with a positive advantage: the clipped term (1 + eps) wins and has no gradient.
    log_prob = torch.log(torch.tensor([1.5, 1.5])).requires_grad_()
    loss = F.grpo_loss(log_prob, old, advantages, clip_range=0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[0].item() == 0 and grad[1].item() == pytest.approx(1.5 / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# The 2D toy: seconds on CPU, small settings of the same code paths as `python toy_2d.py`
# ------------------------------------------------------------------------------------------------

SEED = 0  # the bounds below held for seeds 0-5
SMALL = dict(seed=SEED, pretrain_steps=1000, pretrain_batch=256, hidden=64, n_eval=3000, eval_every=10, group_size=16)


@pytest.fixture(scope="module")
def toy():
    cfg = toy_2d.Config(**SMALL)
    return cfg, toy_2d.pretrain(cfg)


def test_toy_sigma_schedule_is_sd3s():
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    assert torch.allclose(toy_2d.sigma_schedule(10, 3.0), torch.tensor(expected), atol=1e-4)


def test_toy_sde_keeps_the_marginals(toy):
    cfg, base = toy
    data = toy_2d.sample_data(cfg.n_eval, cfg, toy_2d.generator(cfg, 6))[0]
    swd = toy_2d.marginals(base, data, cfg)
    floor, ode = swd["data vs data (noise floor)"], swd["ODE"]
    assert ode < 0.15  # the pretrained model samples the ring
    for name in ("SDE a=0.3", "SDE a=0.7", "SDE a=1.0", "CPS a=0.8"):
        assert swd[name] < 2 * ode + 2 * floor, (name, swd)


def test_toy_recomputed_log_prob_matches_rollout(toy):
    # The training forward (all timesteps in one batch) must score the stored trajectory exactly as the
    # rollout did: otherwise the first, on-policy ratio is not 1 and clipping bites from the start.
    cfg, base = toy
    labels = torch.arange(64) % 2
    sigmas = toy_2d.sigma_schedule(10, cfg.shift)
    xs, old = toy_2d.rollout(base, labels, sigmas, 0.7, toy_2d.generator(cfg, 9))
    x, prev_x = xs[:-1].reshape(-1, 2), xs[1:].reshape(-1, 2)
    sigma, sigma_next = sigmas[:-1].repeat_interleave(64), sigmas[1:].repeat_interleave(64)
    out = F.sde_step(base(x, sigma, labels.repeat(10)), x, sigma, sigma_next, 0.7, prev_x=prev_x)
    ratio = (out.log_prob - old.reshape(-1)).exp()
    assert (ratio - 1).abs().max() < 1e-4


def test_toy_short_grpo_run_raises_the_reward(toy):
    cfg, base = toy
    _, curve = toy_2d.run_grpo(base, dataclasses.replace(cfg, lr=1e-3), rollout_steps=10, beta=0.0, epochs=30,
                               n_eval=500)
    assert curve[0]["epoch"] == 0 and curve[-1]["epoch"] == 30
    assert curve[-1]["reward"] > curve[0]["reward"] + 1.0, curve  # about -2.5 -> -0.5


def test_toy_kl_keeps_diversity_and_bounds_the_kl(toy):
    cfg, base = toy
    cfg = dataclasses.replace(cfg, lr=1e-3)
    finals = {}
    for beta in (0.0, 1.0):
        policy, curve = toy_2d.run_grpo(base, cfg, rollout_steps=10, beta=beta, epochs=40, n_eval=500)
        x, _ = toy_2d.evaluate(policy, cfg, 2000)
        finals[beta] = dict(start=curve[0]["reward"], reward=curve[-1]["reward"], diversity=toy_2d.diversity(x),
                            kl=toy_2d.mean_step_kl(policy, base, cfg, n=500))
    no_kl, kl = finals[0.0], finals[1.0]
    base_div = toy_2d.diversity(toy_2d.evaluate(base, cfg, 2000)[0])
    assert kl["reward"] > kl["start"] + 0.3, finals  # the KL run still learns
    assert no_kl["diversity"] < 0.25 * base_div, finals  # collapse
    assert kl["diversity"] > 0.5 * base_div, finals
    assert kl["kl"] < 0.3 * no_kl["kl"], finals


def test_toy_main_writes_json_and_png_and_keeps_other_files(tmp_path):
    keep = tmp_path / "mine.txt"
    keep.write_text("not the toy's")
    cfg = toy_2d.Config(seed=SEED, out=str(tmp_path), pretrain_steps=20, hidden=32, epochs=2, eval_every=1, n_eval=300)
    results = toy_2d.main(cfg)
    assert keep.read_text() == "not the toy's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "toy.json", "toy.png"]
    saved = json.loads((tmp_path / "toy.json").read_text())
    assert set(saved) == {"marginals_swd", "runs", "data", "total_seconds", "config"}
    assert set(saved["runs"]) == set(results["runs"]) and len(saved["runs"]) == 4
    assert saved["runs"]["10 steps, beta=0.5"]["curve"][-1]["epoch"] == 2


# ------------------------------------------------------------------------------------------------
# Rewards, on tiny random CLIP models saved to local folders
# ------------------------------------------------------------------------------------------------


def build_tiny_clip(folder, seed=0):
    """Save a tiny random CLIPModel + CLIPProcessor (32 px, projection 16) into ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = F.build_tiny_clip_tokenizer(os.path.join(folder, "_tokenizer"))
    text = F.tiny_clip_text_config(tokenizer, hidden_size=32, projection_dim=16).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_clip"))
    build_tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_aesthetic_dir(tmp_path_factory):
    from safetensors.torch import save_file

    folder = str(tmp_path_factory.mktemp("tiny_aesthetic"))
    build_tiny_clip(folder, seed=1)
    torch.manual_seed(2)
    mlp = rewards.AestheticMLP(in_dim=16)
    save_file(mlp.state_dict(), os.path.join(folder, "aesthetic_mlp.safetensors"))
    return folder


def make_images(n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


PROMPTS = ["a cat", "a red dog", "a dog sat on a cat " * 30]  # the last exceeds 77 tokens


def hand_clip_scores(folder, images, prompts, scale):
    """exp(logit_scale) * <t/|t|, v/|v|> / scale, computed directly from the towers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        v = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        tok = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        t = model.text_projection(model.text_model(**tok).pooler_output)
        v = v / v.norm(dim=-1, keepdim=True)
        t = t / t.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (t * v).sum(-1) / scale, v


def assert_scores(out, name, n):
    assert out[name].dtype == torch.float32 and out[name].shape == (n,)
    assert out[name].device.type == "cpu" and torch.isfinite(out[name]).all()


# --------------------------------------------------------------------------- parsing


def test_parse_single_and_weighted():
    assert rewards.parse_reward_spec("pickscore") == [("pickscore", 1.0)]
    assert rewards.parse_reward_spec(" pickscore=1, aesthetic=0.2 ") == [("pickscore", 1.0), ("aesthetic", 0.2)]
    assert rewards.parse_reward_spec("mymod:score=0.5,jpeg_compressibility=-1e-1") == [
        ("mymod:score", 0.5), ("jpeg_compressibility", -0.1)]
    # Parsing must not import the custom module.
    assert rewards.parse_reward_spec("no_such_module_xyz:fn") == [("no_such_module_xyz:fn", 1.0)]


@pytest.mark.parametrize("spec, words", [
    ("pikscore", ["unknown reward 'pikscore'", "pickscore", "module:function"]),
    ("pickscore=abc", ["malformed weight 'abc'", "name=NUMBER"]),
    ("pickscore=", ["malformed weight"]),
    ("pickscore=nan", ["malformed weight"]),
    ("pickscore=1=2", ["malformed weight"]),
    ("pickscore,,aesthetic", ["empty item"]),
    ("", ["empty reward spec"]),
    ("pickscore,pickscore=2", ["appears twice"]),
    ("my mod:fn", ["malformed custom reward"]),
    ("mymod:", ["malformed custom reward"]),
])
def test_parse_errors(spec, words):
    with pytest.raises(ValueError) as info:
        rewards.parse_reward_spec(spec)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_import_is_light():
    import subprocess
    import sys

    heavy = "('diffusers', 'transformers', 'peft', 'huggingface_hub', 'matplotlib')"
    code = f"import sys, flow_grpo, toy_2d, rewards; print(any(m in sys.modules for m in {heavy}))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(rewards.__file__)), check=True)
    assert res.stdout.strip() == "False"


# --------------------------------------------------------------------------- JPEG


def test_jpeg_flat_more_compressible_than_noise():
    flat = Image.new("RGB", (64, 64), (120, 60, 200))
    noise = make_images(1, size=64)[0]
    r = rewards.load_reward("jpeg_compressibility,jpeg_incompressibility")
    out = r([flat, noise], ["x", "y"])
    comp, incomp = out["jpeg_compressibility"], out["jpeg_incompressibility"]
    assert (comp < 0).all() and (incomp > 0).all()
    assert comp[0] > comp[1] and incomp[0] < incomp[1]
    torch.testing.assert_close(incomp, -comp)
    torch.testing.assert_close(out["reward"], comp + incomp)


def test_jpeg_value_matches_formula():
    image = make_images(1, size=48, seed=3)[0]
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    expected = -len(buffer.getvalue()) / 1000 / 500
    got = rewards.load_reward("jpeg_compressibility")([image], ["p"])["reward"]
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tensor_images_accepted():
    x = torch.rand(2, 3, 16, 16)
    pil = [Image.fromarray((img.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()) for img in x]
    r = rewards.load_reward("jpeg_compressibility")
    torch.testing.assert_close(r(x, ["a", "b"])["reward"], r(pil, ["a", "b"])["reward"])


def test_colour_rewards_match_their_formula():
    # Half the pixels (200, 100, 50), half (10, 20, 30): C - (C' + C'') / 2 per pixel, then the mean, / 255.
    half = Image.new("RGB", (4, 2), (200, 100, 50))
    half.paste((10, 20, 30), (0, 1, 4, 2))
    expected = {"redness": (125 + -15) / 2 / 255, "greenness": (-25 + 0) / 2 / 255, "blueness": (-100 + 15) / 2 / 255}
    pure, grey = Image.new("RGB", (3, 3), (0, 255, 0)), Image.new("RGB", (3, 3), (77, 77, 77))
    noise = make_images(1, size=16, seed=5)[0]
    rgb = np.asarray(noise, dtype=np.float64) / 255
    out = rewards.load_reward("redness,greenness,blueness")([half, pure, grey, noise], ["p"] * 4)
    for c, name in enumerate(("redness", "greenness", "blueness")):
        by_numpy = (rgb[..., c] - (rgb.sum(-1) - rgb[..., c]) / 2).mean()
        torch.testing.assert_close(out[name], torch.tensor([expected[name], [-0.5, 1, -0.5][c], 0, by_numpy]).float())


def test_prompt_count_mismatch():
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        rewards.load_reward("jpeg_compressibility")(make_images(2), ["a"])


# --------------------------------------------------------------------------- CLIP-based


def test_pickscore_matches_hand_formula(tiny_clip_dir):
    images = make_images()
    r = rewards.load_reward("pickscore", model_dirs={"pickscore": tiny_clip_dir})
    out = r(images, PROMPTS)
    assert_scores(out, "pickscore", 3)
    expected, _ = hand_clip_scores(tiny_clip_dir, images, PROMPTS, 26.0)
    from transformers import CLIPTokenizer

    assert len(CLIPTokenizer.from_pretrained(tiny_clip_dir)(PROMPTS[2]).input_ids) > 77  # truncation is exercised
    torch.testing.assert_close(out["pickscore"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["reward"], out["pickscore"])


def test_clipscore_matches_logits_per_image(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = make_images(seed=5)
    out = rewards.load_reward("clipscore", model_dirs={"clipscore": tiny_clip_dir})(images, PROMPTS)
    assert_scores(out, "clipscore", 3)
    expected, _ = hand_clip_scores(tiny_clip_dir, images, PROMPTS, 30.0)
    torch.testing.assert_close(out["clipscore"], expected, atol=1e-5, rtol=1e-5)
    # Same as the diagonal of the full model's logits_per_image / 30.
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=PROMPTS, images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        diag = model(**inputs).logits_per_image.diagonal() / 30
    torch.testing.assert_close(out["clipscore"], diag, atol=1e-5, rtol=1e-5)


def test_aesthetic_matches_hand_formula(tiny_aesthetic_dir):
    from safetensors.torch import load_file

    images = make_images(seed=7)
    out = rewards.load_reward("aesthetic", model_dirs={"aesthetic": tiny_aesthetic_dir})(images, PROMPTS)
    assert_scores(out, "aesthetic", 3)
    _, v = hand_clip_scores(tiny_aesthetic_dir, images, PROMPTS, 1.0)
    sd = load_file(os.path.join(tiny_aesthetic_dir, "aesthetic_mlp.safetensors"))
    assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    h = v
    for i in (0, 2, 4, 6, 7):  # linear layers only: no activations, dropout is off in eval
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(out["aesthetic"], h.squeeze(1), atol=1e-5, rtol=1e-5)


def test_aesthetic_pth_weights_only(tiny_aesthetic_dir, tmp_path):
    import shutil

    folder = tmp_path / "aes_pth"
    shutil.copytree(tiny_aesthetic_dir, folder)
    sd = rewards.load_state_dict_file(str(folder / "aesthetic_mlp.safetensors"))
    os.remove(folder / "aesthetic_mlp.safetensors")
    torch.save(sd, folder / "sac+logos+ava1-l14-linearMSE.pth")
    images = make_images(2)
    a = rewards.load_reward("aesthetic", model_dirs={"aesthetic": str(folder)})(images, PROMPTS[:2])
    b = rewards.load_reward("aesthetic", model_dirs={"aesthetic": tiny_aesthetic_dir})(images, PROMPTS[:2])
    torch.testing.assert_close(a["aesthetic"], b["aesthetic"])
    os.remove(folder / "sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(rewards.RewardModelUnavailable, match="no MLP weights"):
        rewards.load_reward("aesthetic", model_dirs={"aesthetic": str(folder)})


def test_weighted_mix_is_weighted_sum(tiny_clip_dir, tiny_aesthetic_dir):
    images = make_images(seed=9)
    spec = "pickscore=1,clipscore=0.5,aesthetic=0.2,jpeg_compressibility=-2,jpeg_incompressibility=0.3"
    dirs = {"pickscore": tiny_clip_dir, "clipscore": tiny_clip_dir, "aesthetic": tiny_aesthetic_dir}
    r = rewards.load_reward(spec, model_dirs=dirs)
    out = r(images, PROMPTS)
    assert set(out) == {"pickscore", "clipscore", "aesthetic", "jpeg_compressibility", "jpeg_incompressibility", "reward"}
    expected = sum(w * out[name] for name, w in rewards.parse_reward_spec(spec))
    torch.testing.assert_close(out["reward"], expected)
    for name in r.names + ["reward"]:
        assert_scores(out, name, 3)


# --------------------------------------------------------------------------- custom rewards


CUSTOM_MODULE = '''
CALLS = []
import math
import numpy as np
def brightness(images, prompts):
    CALLS.append(len(images))
    return [float(np.asarray(im).mean()) / 255 for im in images]
def wrong_shape(images, prompts):
    return np.zeros((len(images), 2))
def with_nan(images, prompts):
    return [math.nan] + [0.0] * (len(images) - 1)
def not_numbers(images, prompts):
    return ["good"] * len(images)
NOT_CALLABLE = 3
'''


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_reward_mod.py").write_text(CUSTOM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_reward_mod"
    import sys

    sys.modules.pop("my_reward_mod", None)


def test_custom_reward(custom_module):
    images = make_images(4)
    r = rewards.load_reward(f"{custom_module}:brightness=0.5,jpeg_compressibility")
    out = r(images, ["p"] * 4)
    expected = torch.tensor([np.asarray(im).mean() / 255 for im in images], dtype=torch.float32)
    torch.testing.assert_close(out[f"{custom_module}:brightness"], expected)
    torch.testing.assert_close(out["reward"], 0.5 * expected + out["jpeg_compressibility"])
    import my_reward_mod

    assert my_reward_mod.CALLS == [4]  # one batched call


@pytest.mark.parametrize("fn, words", [
    ("wrong_shape", ["'my_reward_mod:wrong_shape'", "shape (3, 2)", "expected (3,)"]),
    ("with_nan", ["'my_reward_mod:with_nan'", "non-finite", "[0]"]),
    ("not_numbers", ["'my_reward_mod:not_numbers'", "not numbers"]),
])
def test_custom_reward_bad_output(custom_module, fn, words):
    r = rewards.load_reward(f"{custom_module}:{fn}")
    with pytest.raises(ValueError) as info:
        r(make_images(3), ["p"] * 3)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_custom_reward_load_errors(custom_module):
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        rewards.load_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        rewards.load_reward(f"{custom_module}:missing")
    with pytest.raises(ValueError, match="has no function 'NOT_CALLABLE'"):
        rewards.load_reward(f"{custom_module}:NOT_CALLABLE")


# --------------------------------------------------------------------------- unavailable models


def test_hub_model_unavailable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(rewards.RewardModelUnavailable) as info:
        rewards.load_reward("pickscore")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "--reward-model-dir pickscore=FOLDER" in message


def test_missing_local_folder_and_bad_model_dir_key(tmp_path):
    with pytest.raises(rewards.RewardModelUnavailable, match="does not exist"):
        rewards.load_reward("clipscore", model_dirs={"clipscore": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="only pickscore, clipscore, aesthetic"):
        rewards.load_reward("clipscore", model_dirs={"jpeg_compressibility": str(tmp_path)})


# ------------------------------------------------------------------------------------------------
# The full SD3 path, on a tiny random SD3.5-shaped pipeline
# ------------------------------------------------------------------------------------------------


def tiny_config(out, **overrides):
    settings = dict(
        model="tiny", reward="jpeg_compressibility", resolution=32, group_size=4, groups_per_step=2, batch_size=4,
        num_steps=4, eval_num_steps=4, max_steps=1, eval_every=100, out=str(out), ema_every=1, lr=1e-2, beta=0.01,
    )
    settings.update(overrides)
    return F.Config(**settings)


def read_metrics(folder):
    with open(f"{folder}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_pipe():
    return F.build_tiny_pipeline()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "out"
    return F.train(tiny_config(folder)), folder


def test_ode_rollout_reproduces_the_diffusers_pipeline(tiny_pipe):
    prompts = ["a photo of a cat", "the dog on a chair"]
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = tiny_pipe(
        prompt=prompts, latents=latents.clone(), num_inference_steps=6, guidance_scale=4.5, height=32, width=32,
        output_type="latent", max_sequence_length=128,
    ).images
    text = F.encode_prompts(tiny_pipe, prompts, 1, 4.5, "cpu")
    sigmas, timesteps = F.schedule(tiny_pipe, 6, "cpu")
    out = F.sample(tiny_pipe.transformer, text, latents, sigmas, timesteps, 4.5, [0.0] * 6)
    torch.testing.assert_close(out.latents[:, -1], expected, rtol=1e-5, atol=1e-5)
    assert out.latents.shape == (2, 7, 16, 8, 8)


def test_schedule_is_sd3_shifted_with_ten_steps(tiny_pipe):
    sigmas, _ = F.schedule(tiny_pipe, 10, "cpu")
    expected = [1.0, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
    torch.testing.assert_close(sigmas, torch.tensor(expected), rtol=0, atol=1e-4)


def test_kl_to_the_frozen_model_is_zero_before_the_first_update(tiny_pipe, tmp_path):
    import copy

    transformer, _ = F.add_lora(copy.deepcopy(tiny_pipe.transformer), tiny_config(tmp_path))
    text = F.encode_prompts(tiny_pipe, ["a cat"], 2, 4.5, "cpu")
    x = torch.randn(2, 16, 8, 8)
    t = torch.tensor(900.0)
    with torch.no_grad():
        v = F.guided_velocity(transformer, x, t, text, 4.5)
        with transformer.disable_adapter():
            v_ref = F.guided_velocity(transformer, x, t, text, 4.5)
        # A LoRA with a nonzero B would make these differ: the adapter really is switched off above.
        next(p for n, p in transformer.named_parameters() if "lora_B" in n).fill_(0.1)
        v_changed = F.guided_velocity(transformer, x, t, text, 4.5)
    out, ref = F.sde_step(v, x, 0.9, 0.8, 0.7), F.sde_step(v_ref, x, 0.9, 0.8, 0.7)
    assert torch.all(F.gaussian_kl(out.mean, ref.mean, out.std) == 0)
    assert (v_changed - v_ref).abs().max() > 1e-4


def test_first_update_is_on_policy_and_metrics_are_logged(trained):
    _, folder = trained
    (record,) = read_metrics(folder)
    assert record["first_ratio_error"] == 0.0  # the training forward reproduces the rollout's exactly
    assert record["optimizer_steps"] == 2 and not record["skipped_update"]
    for key in ("reward_mean", "reward_std", "jpeg_compressibility_mean", "eval_reward", "loss", "policy_loss", "kl",
                "approx_kl", "clip_fraction", "zero_std_group_ratio", "seconds_rollout", "seconds_reward", "seconds_train"):
        assert math.isfinite(record[key]), key
    assert record["kl"] > 0 and record["approx_kl"] > 0  # the second update starts off-policy
    assert os.path.exists(f"{folder}/eval_00000.png") and os.path.exists(f"{folder}/eval_00001.png")


def test_training_changes_the_lora_and_nothing_else(trained):
    run, _ = trained
    fresh = F.build_tiny_pipeline().transformer.state_dict()
    for name, p in run.transformer.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and "attn2" not in name  # SD3.5's second attention is not a target
        else:
            assert not p.requires_grad
            base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, fresh[base_name]), name
    lora_b = [p for n, p in run.transformer.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 8 + 7  # 8 targets per block; the last block has no to_add_out (context_pre_only)
    trained_b = {n for n, p in run.transformer.named_parameters() if "lora_B" in n and p.abs().sum() > 0}
    # B starts at 0: every adapter was trained but the last block's context query, whose output
    # (context tokens) the last block throws away.
    assert len(trained_b) == 14 and not any("blocks.1.attn.add_q_proj" in n for n in trained_b)


def test_saved_lora_loads_in_diffusers_and_reproduces_the_ema_model(trained):
    run, folder = trained
    pipe = F.build_tiny_pipeline()
    pipe.load_lora_weights(str(folder / "lora"), weight_name="pytorch_lora_weights.safetensors")
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    loaded = pipe(prompt="a cat", latents=latents.clone(), num_inference_steps=4, guidance_scale=4.5, height=32, width=32,
                  output_type="latent", max_sequence_length=128).images
    text = F.encode_prompts(run.pipe, ["a cat"], 1, 4.5, "cpu")
    sigmas, timesteps = F.schedule(run.pipe, 4, "cpu")
    with F.swap_in(run.params, run.ema_params):
        ours = F.sample(run.transformer, text, latents, sigmas, timesteps, 4.5, [0.0] * 4).latents[:, -1]
    base = F.sample(run.transformer.get_base_model(), text, latents, sigmas, timesteps, 4.5, [0.0] * 4).latents[:, -1]
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the LoRA matters: this is not base == base
    assert any(not torch.equal(p, e) for p, e in zip(run.params, run.ema_params))  # and the EMA is not the raw LoRA


def test_window_steps_are_consecutive_in_the_first_half():
    cfg = F.Config(num_steps=10, sde_window=3)
    starts = set()
    for seed in range(40):
        sde, trained = F.sde_and_trained_steps(cfg, torch.Generator().manual_seed(seed))
        assert sde == trained == list(range(sde[0], sde[0] + 3))
        starts.add(sde[0])
    assert starts == {0, 1, 2, 3, 4}
    sde, trained = F.sde_and_trained_steps(F.Config(num_steps=10), torch.Generator())
    assert sde == list(range(10)) and trained == list(range(9))  # the last step is never trained


def test_cps_window_run_trains_only_the_window(tmp_path):
    cfg = tiny_config(tmp_path / "out", sde_type="cps", noise_level=0.8, sde_window=2, num_steps=6, beta=0.0)
    run = F.train(cfg)
    (record,) = read_metrics(cfg.out)
    assert record["first_ratio_error"] == 0.0 and record["optimizer_steps"] == 2
    sde, _ = F.sde_and_trained_steps(cfg, F.seeded(cfg.seed, 0))
    # The rollout of that step, redone: log-probs are recorded exactly in the window (ODE steps have none).
    text = F.encode_prompts(run.pipe, ["a cat"], 4, 4.5, "cpu")
    sigmas, timesteps = F.schedule(run.pipe, 6, "cpu")
    levels = [0.8 if j in sde else 0.0 for j in range(6)]
    trajectory = F.sample(run.transformer, text, torch.randn(4, 16, 8, 8), sigmas, timesteps, 4.5, levels, F.cps_step)
    assert [bool((trajectory.log_probs[:, j] != 0).all()) for j in range(6)] == [j in sde for j in range(6)]


# --------------------------------------------------------------------------- the run's effect size and curves


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """4 tiny steps evaluated at steps 3 and 4; records how many steps metrics.jsonl held at each figure."""
    import contextlib

    folder = tmp_path_factory.mktemp("short") / "out"
    lines_at_figure, original = [], F.write_curves

    def spy(folders, path):
        lines_at_figure.append(len(read_metrics(folders[0])))
        return original(folders, path)

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as printed:
        patch.setattr(F, "write_curves", spy)
        F.train(tiny_config(folder, max_steps=4, eval_every=3))
    return folder, lines_at_figure, printed.getvalue()


def test_effect_size_of_a_run_equals_the_hand_computation_from_its_metrics(short_run):
    folder, _, printed = short_run
    records = read_metrics(folder)
    # 4 steps: a tenth is 1 step; the spread is the mean of the 4 within-step stds.
    spread = np.mean([r["reward_std"] for r in records])
    hand = (records[3]["reward_mean"] - records[0]["reward_mean"]) / spread
    got = F.effect_size(records)
    assert got["effect"] == pytest.approx(hand, rel=1e-12) and got["std"] == pytest.approx(spread, rel=1e-12)
    assert got["eval_first"] == (3, records[2]["eval_reward"]) and got["eval_last"] == (4, records[3]["eval_reward"])
    (line,) = [line for line in printed.splitlines() if line.startswith("effect size:")]
    assert line == F.effect_size_line(records) and f"{hand:+.2f} within-step stds" in line


def test_effect_size_averages_a_tenth_of_the_steps():
    # 25 steps: a tenth is 2 steps. reward_mean = step / 10; std 0.1 on odd steps, 0.3 on even ones.
    records = [{"step": s, "reward_mean": s / 10, "reward_std": 0.1 if s % 2 else 0.3} for s in range(1, 26)]
    got = F.effect_size(records)
    first, last, spread = (0.1 + 0.2) / 2, (2.4 + 2.5) / 2, (13 * 0.1 + 12 * 0.3) / 25
    assert (got["first"], got["last"], got["std"]) == pytest.approx((first, last, spread))
    assert got["effect"] == pytest.approx((last - first) / spread)
    assert got["first_steps"] == (1, 2) and got["last_steps"] == (24, 25) and got["eval_first"] is None


def test_curves_are_drawn_at_each_evaluation(short_run):
    folder, lines_at_figure, _ = short_run
    assert lines_at_figure == [3, 4]  # after the evaluations of steps 3 and 4 were logged, not at steps 1-2
    with Image.open(folder / "curves.png") as figure:
        assert figure.format == "PNG" and figure.size == (1200, 750)
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_without_matplotlib_one_line_and_no_figure(tmp_path, monkeypatch, capsys):
    import sys

    for name in ["matplotlib", *[m for m in sys.modules if m.startswith("matplotlib.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it, or any part of it, now raises ImportError
    monkeypatch.setattr(F, "_NOTED_NO_MATPLOTLIB", [])
    F.train(tiny_config(tmp_path / "out", max_steps=2, eval_every=1))  # two evaluations
    notes = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and notes[0].startswith("note: matplotlib is not installed")
    assert not [name for name in os.listdir(tmp_path / "out") if "curves" in name]


def test_plot_command_draws_finished_runs(short_run, tmp_path, capsys):
    folder, _, _ = short_run
    F.main(["--plot", str(folder), str(folder), "--output", str(tmp_path / "both.png")])
    with Image.open(tmp_path / "both.png") as figure:
        assert figure.format == "PNG"
    with pytest.raises(SystemExit) as exit:
        F.main(["--plot", "--help"])
    assert exit.value.code == 0 and "RUN" in capsys.readouterr().out
    code, errors = run_cli(["--plot", str(tmp_path / "nothing")])
    assert code == 2 and len(errors) == 1 and "holds no logged steps" in errors[0]
    assert not os.path.exists(tmp_path / "nothing")
    code, errors = run_cli(["--plot", str(folder), "--output", str(tmp_path / "missing" / "x.png")])
    assert code == 2 and len(errors) == 1 and "cannot write" in errors[0]


# ------------------------------------------------------------------------------------------------
# Reliability: exact resume, bad input, numerical guards
# ------------------------------------------------------------------------------------------------

TINY_FLAGS = [
    "--model", "tiny", "--reward", "jpeg_compressibility", "--resolution", "32", "--group-size", "4",
    "--groups-per-step", "2", "--batch-size", "4", "--num-steps", "4", "--eval-num-steps", "4", "--lr", "1e-2",
    "--ema-every", "1", "--eval-every", "100",
]


def run_cli(args):
    """flow_grpo.main in this process: returns (exit code, stderr lines)."""
    import contextlib

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            F.main(args)
            code = 0
        except SystemExit as exit:
            code = exit.code
    return code, [line for line in stderr.getvalue().splitlines() if line.startswith("error")]


def test_killed_and_resumed_run_ends_with_the_same_lora(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    flags = TINY_FLAGS + ["--max-steps", "3", "--save-every", "1", "--keep-checkpoints", "2"]
    assert run_cli(flags + ["--out", str(tmp_path / "whole")])[0] == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, F.__file__, *flags, "--out", str(killed)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_000001").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # during step 2, after step 1's checkpoint
    assert proc.wait() == -signal.SIGKILL and not (killed / "lora").exists()
    assert run_cli(flags + ["--out", str(killed), "--resume"])[0] == 0

    whole = load_file(tmp_path / "whole" / "lora" / "pytorch_lora_weights.safetensors")
    resumed = load_file(killed / "lora" / "pytorch_lora_weights.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)  # bit-identical on CPU
    assert sorted(os.listdir(killed / "checkpoints")) == ["step_000002", "step_000003"]  # keep the last 2
    assert [r["step"] for r in read_metrics(killed)] == [1, 2, 3]
    assert [r["reward_mean"] for r in read_metrics(killed)] == [r["reward_mean"] for r in read_metrics(tmp_path / "whole")]


BAD_REWARD_MODULE = """
def wrong_shape(images, prompts):
    return [[0.0, 1.0]] * len(images)
def not_finite(images, prompts):
    return [float("nan")] * len(images)
def constant(images, prompts):
    return [0.5] * len(images)
"""


@pytest.fixture
def bad_rewards(tmp_path, monkeypatch):
    (tmp_path / "bad_rewards_mod.py").write_text(BAD_REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))


def bad_input_cases(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    (tmp_path / "a_file").write_text("x")
    return {
        "unknown alias": (["--model", "sd9-huge"], "unknown model 'sd9-huge'", "sd3.5-medium"),
        "hub out of reach": (["--model", "nobody/no-such-model"], "pass its local folder with --model PATH", None),
        "not an SD3 folder": (["--model", str(tmp_path / "not_a_model")], "is not a diffusers SD3 pipeline", None),
        "missing prompt file": (["--prompts", str(tmp_path / "nope.txt")], "cannot read prompt file", None),
        "unreadable prompt file": (["--prompts", str(tmp_path / "binary.txt")], "cannot read prompt file", None),
        "empty prompt file": (["--eval-prompts", str(tmp_path / "empty.txt")], "has no prompts", None),
        "group of one": (["--group-size", "1"], "needs at least 2", None),
        "batch not whole groups": (["--batch-size", "6"], "is not a multiple of --group-size 4", None),
        "unknown reward": (["--reward", "pikscore"], "unknown reward 'pikscore'", "pickscore"),
        "malformed weight": (["--reward", "pickscore=lots"], "malformed weight", None),
        "custom reward shape": (["--reward", "bad_rewards_mod:wrong_shape"], "bad_rewards_mod:wrong_shape", "shape"),
        "custom reward NaN": (["--reward", "bad_rewards_mod:not_finite"], "bad_rewards_mod:not_finite", "non-finite"),
        "unwritable output": (["--out", str(tmp_path / "a_file" / "run")], "cannot write to output folder", None),
    }


@pytest.mark.parametrize("case", [
    "unknown alias", "hub out of reach", "not an SD3 folder", "missing prompt file", "unreadable prompt file",
    "empty prompt file", "group of one", "batch not whole groups", "unknown reward", "malformed weight",
    "custom reward shape", "custom reward NaN", "unwritable output",
])
def test_bad_input_is_one_line_exit_2_and_keeps_the_output_folder(case, tmp_path, bad_rewards):
    args, phrase, also = bad_input_cases(tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, errors = run_cli(TINY_FLAGS + ["--max-steps", "1", "--out", str(out)] + args)
    assert code == 2 and len(errors) == 1, errors
    assert phrase in errors[0] and (also is None or also in errors[0]), errors[0]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_with_a_different_config_names_the_fields(tmp_path):
    out = str(tmp_path / "run")
    assert run_cli(TINY_FLAGS + ["--max-steps", "1", "--out", out])[0] == 0
    before = open(f"{out}/metrics.jsonl").read()
    code, errors = run_cli(TINY_FLAGS + ["--max-steps", "2", "--out", out])  # no --resume: refused
    assert code == 2 and "already holds a run: pass --resume" in errors[0]
    code, errors = run_cli(TINY_FLAGS + ["--max-steps", "2", "--out", out, "--resume", "--group-size", "2", "--lr", "0.5"])
    assert code == 2 and "group_size: 4 -> 2" in errors[0] and "lr: 0.01 -> 0.5" in errors[0]
    assert open(f"{out}/metrics.jsonl").read() == before
    assert os.path.exists(f"{out}/lora/pytorch_lora_weights.safetensors")


def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = F.grpo_loss

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * math.nan if calls["n"] == 1 or calls["n"] > 6 else loss

    monkeypatch.setattr(F, "grpo_loss", sometimes_nan)
    # 2 batches x 3 trained steps = 6 backwards per step, 2 updates: the first update of step 1 is
    # poisoned, the second is fine; from step 2 on every update is poisoned.
    cfg = tiny_config(tmp_path / "out", max_steps=4, save_every=1)
    with pytest.raises(F.TrainingDiverged, match="3 non-finite updates in a row at step 3"):
        F.train(cfg)
    first, second = read_metrics(cfg.out)
    assert (first["nonfinite_updates"], first["optimizer_steps"]) == (1, 1)
    assert (second["nonfinite_updates"], second["optimizer_steps"]) == (2, 1)
    from safetensors.torch import load_file

    for name in ("step_000001", "step_000002"):
        weights = load_file(f"{cfg.out}/checkpoints/{name}/lora.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_constant_rewards_skip_the_update(tmp_path, bad_rewards):
    cfg = tiny_config(tmp_path / "out", reward="bad_rewards_mod:constant")
    run = F.train(cfg)
    (record,) = read_metrics(cfg.out)
    assert record["skipped_update"] and record["optimizer_steps"] == 0 and record["zero_std_group_ratio"] == 1.0
    assert all(torch.all(p == 0) for n, p in run.transformer.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------------
# Data parallel: torchrun with 2 CPU processes (gloo)
# ------------------------------------------------------------------------------------------------

TORCHRUN_SCRIPT = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
import flow_grpo as F
import test_flow_grpo as T

cfg = T.tiny_config({out!r}, max_steps=2, groups_per_step=4)
run = F.train(cfg)
dist = F.Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), torch.device("cpu"))
# Advantages: each rank holds 2 groups of 4 rewards of its own; gather as the training loop does.
local = torch.arange(8, dtype=torch.float32) * (dist.rank + 1) ** 2 + torch.tensor([0, 0, 0, 0, 1, 2, 3, 9.0]) * dist.rank
mine = F.rank_advantages(F.all_gather(local, dist), cfg, dist)
torch.save({{"params": [p.detach() for p in run.params], "local": local, "advantages": mine}}, {out!r} + f"/rank{{dist.rank}}.pt")
"""


def test_two_processes_keep_identical_weights_and_single_process_advantages(tmp_path):
    import shutil
    import subprocess

    out = str(tmp_path / "run")
    script = tmp_path / "ddp.py"
    script.write_text(TORCHRUN_SCRIPT.format(repo=os.path.dirname(os.path.abspath(F.__file__)), out=out))
    torchrun = shutil.which("torchrun") or pytest.fail("torchrun is not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(f"{out}/rank{r}.pt", weights_only=True) for r in range(2)]
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)
    assert any(p.abs().sum() > 0 for p in ranks[0]["params"])
    # One process on all 16 rewards (4 groups of 4) gives the same advantages, split by rank.
    everything = torch.cat([ranks[0]["local"], ranks[1]["local"]])
    single = F.group_advantages(everything, torch.arange(4).repeat_interleave(4), global_std=True)
    torch.testing.assert_close(torch.cat([ranks[0]["advantages"], ranks[1]["advantages"]]), single, rtol=0, atol=0)
    # Only rank 0 wrote the run's files: one metrics line per step.
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_prompt_stream_visits_every_prompt_once_per_pass_and_is_a_function_of_the_step():
    prompts = [f"p{i}" for i in range(7)]
    stream = [p for step in range(7) for p in F.prompts_for_step(prompts, 3, step, seed=5)]  # 3 passes
    for start in (0, 7, 14):
        assert sorted(stream[start : start + 7]) == sorted(prompts)
    assert stream[:7] != stream[7:14]  # a new shuffle each pass
    assert F.prompts_for_step(prompts, 3, 4, seed=5) == stream[12:15]  # what a resumed run at step 4 sees

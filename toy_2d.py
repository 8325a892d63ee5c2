"""Flow-GRPO on a 2D toy, on CPU in about half a minute: `python toy_2d.py`.

A small MLP velocity field is pretrained by rectified flow matching on 8 Gaussians on a ring, then
fine-tuned with Flow-GRPO through the very functions of flow_grpo.py (sde_step, group_advantages,
grpo_step_objective) toward a reward that can be hacked: minus the distance to one point. The
script measures the paper's three claims, prints them as a table and writes <out>/toy.json:
  (a) the SDE of Eq. 8 (any noise level) and CPS sample the same marginals as the ODE;
  (b) denoising reduction: 10 rollout steps reach the reward of 40 steps at several times less time;
  (c) without the KL term the samples collapse onto the reward's optimum; with it diversity is kept.
A figure goes to <out>/toy.png. Everything is seeded: only the measured seconds vary between runs.
"""

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn as nn

import flow_grpo

field = flow_grpo.config_field  # the same idiom as flow_grpo.Config: every field a flag, with its help


@dataclasses.dataclass
class Config:
    """Every field is a CLI flag (python toy_2d.py --help); a help names flow_grpo.py's flag for the same
    quantity where its name differs (the others are the same flag, or have none in the full run)."""

    seed: int = field(0, "seed of the data, the pretraining, the rollouts and the evaluations")
    out: str = field("toy_out", "output folder; only toy.json and toy.png are (over)written in it")
    threads: int = field(1, "torch threads (tiny MLPs: 2 are no faster on 2 cores, 10x slower if the other is busy)")
    # data: 8 Gaussians on a ring; the "prompt" c in {0, 1} selects the even or the odd modes
    radius: float = field(2.0, "radius of the ring of 8 Gaussian modes")
    mode_std: float = field(0.15, "std of each mode")
    # pretraining by rectified flow matching
    hidden: int = field(128, "width of the MLP velocity field v(x, sigma, c)")
    pretrain_steps: int = field(2000, "steps of rectified flow matching")
    pretrain_batch: int = field(256, "batch of rectified flow matching")
    pretrain_lr: float = field(2e-3, "Adam learning rate of the pretraining")
    # sampling: SD3's shifted schedule, as in the paper
    shift: float = field(3.0, "shift of SD3's sigma schedule")
    eval_steps: int = field(
        40, "ODE steps of every evaluation, and rollout steps of the 40-step run (flow_grpo.py: --eval-num-steps)"
    )
    rollout_steps: int = field(10, "SDE steps of a training rollout, denoising reduction (flow_grpo.py: --num-steps)")
    noise_level: float = field(0.7, "a of the SDE, sigma_t = a sqrt(sigma / (1 - sigma))")
    cps_noise_level: float = field(0.8, "a of CPS in table (a) (flow_grpo.py: --noise-level with --sde-type cps)")
    n_eval: int = field(6000, "samples per evaluation (two data draws are then ~0.02-0.03 apart: the noise floor)")
    # Flow-GRPO
    epochs: int = field(200, "rollout-and-update epochs of each run (flow_grpo.py: --max-steps)")
    groups: int = field(8, "groups (prompts) per epoch, half of them per label (flow_grpo.py: --groups-per-step)")
    group_size: int = field(16, "rollouts per group, G")
    lr: float = field(3e-4, "AdamW learning rate")
    clip_range: float = field(
        0.05, "clip range (log-probs averaged over only 2 dims: a 2D ratio moves far more than 1e-4)"
    )
    adv_clip: float = field(5.0, "advantages are clamped to +-adv_clip")
    beta: float = field(0.5, "KL weight of the 'with KL' runs (KL with |dt| in the variance, see gaussian_kl)")
    minibatches: int = field(
        2,
        "optimiser steps per epoch, as the official code; the 2nd is off-policy, so clipping acts "
        "(flow_grpo.py: --updates-per-step)",
    )
    target_x: float = field(2.0, "reward = -||x - target||; (2, 0) is the centre of mode 0 (flow_grpo.py: --reward)")
    target_y: float = field(0.0, "second coordinate of the target")
    eval_every: int = field(10, "epochs between the points of the reward curves (flow_grpo.py: --eval-every, in steps)")
    ratio_norm: bool = field(
        True, "add a row: the beta run with GRPO-Guard's RatioNorm (flow_grpo.py: --ratio-norm trains with it)"
    )


def generator(cfg, stream):
    """An independent, reproducible random stream per use (data, rollouts, each evaluation, ...)."""
    return torch.Generator().manual_seed(1000 * cfg.seed + stream)


def parse_args(argv=None) -> Config:
    return flow_grpo.parse_config(argv, Config, description=__doc__.split("\n")[0])


# --------------------------------------------------------------------------------------------------
# Data, model, reward, metrics
# --------------------------------------------------------------------------------------------------
N_LABELS, N_MODES = 2, 8


def mode_centres(cfg):
    angle = 2 * math.pi * torch.arange(N_MODES) / N_MODES
    return cfg.radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def sample_data(n, cfg, gen):
    """Points of the ring mixture with their labels; label c owns the modes c, c + 2, c + 4, c + 6."""
    labels = torch.arange(n) % N_LABELS
    k = labels + N_LABELS * torch.randint(0, N_MODES // N_LABELS, (n,), generator=gen)
    return mode_centres(cfg)[k] + cfg.mode_std * torch.randn(n, 2, generator=gen), labels


class Velocity(nn.Module):
    """v(x, sigma, c) ~ eps - x0. Fourier features of sigma: a raw scalar input learns slowly."""

    def __init__(self, hidden):
        super().__init__()
        self.register_buffer("freqs", torch.arange(1, 5).float() * math.pi)
        self.label = nn.Embedding(N_LABELS, 16)
        self.net = nn.Sequential(
            nn.Linear(2 + 8 + 16, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x, sigma, labels):
        s = torch.as_tensor(sigma).reshape(-1, 1).expand(x.shape[0], 1) * self.freqs
        return self.net(torch.cat([x, s.sin(), s.cos(), self.label(labels)], dim=1))


def reward(x, cfg):
    # One best point: a delta there maximises it, so the reward can be hacked by collapsing.
    return -(x - torch.tensor([cfg.target_x, cfg.target_y])).norm(dim=1)


def diversity(x, n=2000):
    """Mean pairwise distance between (the first n) samples: about 2.5 for the ring, 0 when collapsed."""
    x = x[:n]
    return torch.cdist(x, x).sum().item() / (len(x) * (len(x) - 1))


def on_mode(x, labels, cfg):
    """Fraction of samples within 3 std of one of their own label's modes: the toy's "prompt fidelity".
    A label-1 sample dragged onto the target (mode 0) has left its prompt's data: reward hacking."""
    centres = mode_centres(cfg)
    own = torch.arange(N_MODES)[None, :] % N_LABELS == labels[:, None]
    dist = torch.cdist(x, centres).masked_fill(~own, math.inf).min(dim=1).values
    return (dist < 3 * cfg.mode_std).float().mean().item()


def sliced_wasserstein(a, b, gen, n_proj=256):
    """W1 averaged over random 1D projections: a distribution distance cheap enough for thousands of points."""
    dirs = torch.randn(2, n_proj, generator=gen)
    dirs = dirs / dirs.norm(dim=0)
    return ((a @ dirs).sort(dim=0).values - (b @ dirs).sort(dim=0).values).abs().mean().item()


def pretrain(cfg):
    """Rectified flow matching: x_sigma = (1 - sigma) x0 + sigma eps, regress v on eps - x0."""
    torch.manual_seed(cfg.seed)  # the initial weights
    gen = generator(cfg, 1)
    model = Velocity(cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    for _ in range(cfg.pretrain_steps):
        x0, labels = sample_data(cfg.pretrain_batch, cfg, gen)
        eps = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(len(x0), 1, generator=gen)
        loss = (model((1 - sigma) * x0 + sigma * eps, sigma, labels) - (eps - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sigma_schedule(steps, shift):
    """diffusers' FlowMatchEulerDiscreteScheduler as SD3 uses it (10 steps: 1.0, 0.9601, ..., 0.0089, 0)."""

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    sigmas = shifted(torch.linspace(1.0, shifted(torch.tensor(1e-3)).item(), steps))
    return torch.cat([sigmas, torch.zeros(1)])


@torch.no_grad()
def rollout(model, labels, sigmas, noise_level, gen, step_fn=flow_grpo.sde_step):
    """Sample from sigma = 1 to 0 with flow_grpo.rollout, the full run's loop: a flow_grpo.Trajectory, time first
    for the slicing below: x_j [T+1, B, 2], log pi_old(x_{j+1} | x_j) [T, B] and its mean [T, B, 2]."""
    x = torch.randn(len(labels), 2, generator=gen)
    trajectory = flow_grpo.rollout(lambda x, j: model(x, sigmas[j], labels), x, sigmas, noise_level, step_fn, gen)
    return flow_grpo.Trajectory(*(values.transpose(0, 1) for values in trajectory))


def evaluate(model, cfg, n=None):
    """As in the paper: the 40-step ODE (noise level 0), both labels, the same noise for every model."""
    labels = torch.arange(n or cfg.n_eval) % N_LABELS
    x = rollout(model, labels, sigma_schedule(cfg.eval_steps, cfg.shift), 0.0, generator(cfg, 2)).latents[-1]
    return x, labels


# --------------------------------------------------------------------------------------------------
# Flow-GRPO
# --------------------------------------------------------------------------------------------------


def grpo_epoch(policy, base, opt, cfg, sigmas, beta, gen, ratio_norm=False):
    """One epoch: G rollouts per prompt, group-relative advantages, clipped surrogate + beta * KL
    (flow_grpo.grpo_step_objective, with the exact KL: |dt| stays in the variance).

    A "prompt" is a label c: the G samples of a group share it, so each group's baseline is the mean
    reward under its label. The labels differ in reachable reward (mode 0, the target, belongs to
    c = 0); a single baseline would hand c = 0 samples an advantage for their label, not their action.
    Returns the fraction of clipped ratios (0 on the first, on-policy minibatch).
    """
    labels = (torch.arange(cfg.groups) % N_LABELS).repeat_interleave(cfg.group_size)
    group_ids = torch.arange(cfg.groups).repeat_interleave(cfg.group_size)
    xs, old_log_probs, old_means = rollout(policy, labels, sigmas, cfg.noise_level, gen)
    advantages = flow_grpo.group_advantages(reward(xs[-1], cfg), group_ids)
    n_train = len(sigmas) - 2  # the last step (std ~ 0.006) is never trained, as in the paper
    clipped = []
    for batch in torch.randperm(len(labels), generator=gen).chunk(cfg.minibatches):
        # All trained timesteps of the minibatch in one forward pass of n_train * len(batch) rows.
        x, prev_x = xs[:n_train, batch].reshape(-1, 2), xs[1 : n_train + 1, batch].reshape(-1, 2)
        sigma = sigmas[:n_train].repeat_interleave(len(batch))
        sigma_next = sigmas[1 : n_train + 1].repeat_interleave(len(batch))
        lab = labels[batch].repeat(n_train)
        out = flow_grpo.sde_step(policy(x, sigma, lab), x, sigma, sigma_next, cfg.noise_level, prev_x=prev_x)
        ref_mean = None
        if beta > 0:
            with torch.no_grad():
                ref_mean = flow_grpo.sde_step(base(x, sigma, lab), x, sigma, sigma_next, cfg.noise_level).mean
        objective = flow_grpo.grpo_step_objective(
            out.log_prob,
            old_log_probs[:n_train, batch].reshape(-1),
            advantages[batch].repeat(n_train),
            cfg.clip_range,
            cfg.adv_clip,
            mean=out.mean,
            std=out.std,
            dt=sigma_next - sigma,
            ref_mean=ref_mean,
            beta=beta,
            kl_dt_scale=False,
            ratio_norm=ratio_norm,
            old_mean=old_means[:n_train, batch].reshape(-1, 2),
        )
        opt.zero_grad()
        objective.loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        clipped.append(objective.clip_fraction.item())
    return sum(clipped) / len(clipped)


@torch.no_grad()
def mean_step_kl(policy, base, cfg, n=2000):
    """Mean per-step KL(pi_theta || pi_ref) on the policy's own 10-step SDE rollouts, trained steps only.
    Always on the 10-step schedule: gaussian_kl scales with |dt|, so only one schedule compares."""
    labels = torch.arange(n) % N_LABELS
    sigmas = sigma_schedule(cfg.rollout_steps, cfg.shift)
    xs = rollout(policy, labels, sigmas, cfg.noise_level, generator(cfg, 3)).latents
    kls = []
    for i in range(len(sigmas) - 2):
        mine, ref = (
            flow_grpo.sde_step(model(xs[i], sigmas[i], labels), xs[i], sigmas[i], sigmas[i + 1], cfg.noise_level)
            for model in (policy, base)
        )
        kls.append(flow_grpo.gaussian_kl(mine.mean, ref.mean, mine.std).mean().item())
    return sum(kls) / len(kls)


def run_grpo(base, cfg, rollout_steps=None, beta=None, epochs=None, n_eval=1000, ratio_norm=False):
    """Fine-tune a copy of `base`. Returns the policy and its curve: the reward of the 40-step ODE on
    n_eval samples every eval_every epochs (entry 0 = before training) against training seconds."""
    rollout_steps = rollout_steps or cfg.rollout_steps
    beta = cfg.beta if beta is None else beta
    epochs = cfg.epochs if epochs is None else epochs
    policy = Velocity(cfg.hidden)
    policy.load_state_dict(base.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sigmas = sigma_schedule(rollout_steps, cfg.shift)
    gen = generator(cfg, 4)
    curve, seconds, clip_frac = [], 0.0, 0.0
    for epoch in range(epochs + 1):
        if epoch % cfg.eval_every == 0 or epoch == epochs:  # evaluation stays off the training clock
            x, _ = evaluate(policy, cfg, n_eval)
            curve.append(
                {"epoch": epoch, "seconds": seconds, "reward": reward(x, cfg).mean().item(), "clip_frac": clip_frac}
            )
        if epoch < epochs:
            start = time.perf_counter()
            clip_frac = grpo_epoch(policy, base, opt, cfg, sigmas, beta, gen, ratio_norm)
            seconds += time.perf_counter() - start
    return policy.requires_grad_(False), curve


# --------------------------------------------------------------------------------------------------
# The three claims
# --------------------------------------------------------------------------------------------------


def marginals(base, data, cfg):
    """Claim (a): sliced W1 to the data of 40-step samplers of the pretrained model."""
    gen = generator(cfg, 5)
    sigmas, labels = sigma_schedule(cfg.eval_steps, cfg.shift), torch.arange(cfg.n_eval) % N_LABELS
    samplers = [("ODE", flow_grpo.sde_step, 0.0)] + [(f"SDE a={a}", flow_grpo.sde_step, a) for a in (0.3, 0.7, 1.0)]
    samplers.append((f"CPS a={cfg.cps_noise_level}", flow_grpo.cps_step, cfg.cps_noise_level))
    rows = {"data vs data (noise floor)": sliced_wasserstein(data, sample_data(cfg.n_eval, cfg, gen)[0], gen)}
    for name, step_fn, a in samplers:
        rows[name] = sliced_wasserstein(data, rollout(base, labels, sigmas, a, gen, step_fn).latents[-1], gen)
    return rows


def main(cfg):
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    base = pretrain(cfg)
    data, data_labels = sample_data(cfg.n_eval, cfg, generator(cfg, 6))
    results = {"marginals_swd": marginals(base, data, cfg), "runs": {}}
    results["data"] = {
        "reward": reward(data, cfg).mean().item(),
        "diversity": diversity(data),
        "on_mode": on_mode(data, data_labels, cfg),
    }

    runs = {
        "pretrained": None,
        f"{cfg.rollout_steps} steps, beta={cfg.beta}": (cfg.rollout_steps, cfg.beta),
        f"{cfg.eval_steps} steps, beta={cfg.beta}": (cfg.eval_steps, cfg.beta),
        f"{cfg.rollout_steps} steps, beta=0": (cfg.rollout_steps, 0.0),
    }
    if cfg.ratio_norm:
        runs[f"ratio-norm, beta={cfg.beta}"] = (cfg.rollout_steps, cfg.beta, None, 1000, True)
    samples = {"data": data}
    for name, setting in runs.items():
        model, curve = (base, []) if setting is None else run_grpo(base, cfg, *setting)
        x, labels = evaluate(model, cfg)
        samples[name] = x
        results["runs"][name] = {
            "reward": reward(x, cfg).mean().item(),
            "diversity": diversity(x),
            "on_mode": on_mode(x, labels, cfg),
            "swd_to_data": sliced_wasserstein(data, x, generator(cfg, 7)),
            "mean_step_kl": mean_step_kl(model, base, cfg),
            "train_seconds": curve[-1]["seconds"] if curve else 0.0,
            "curve": curve,
        }
    results["total_seconds"] = time.perf_counter() - start
    results["config"] = dataclasses.asdict(cfg)
    print_table(results)

    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "toy.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(os.path.join(cfg.out, "toy.png"), samples, results["runs"], cfg)
    print(f"wrote {cfg.out}/toy.json, {cfg.out}/toy.png")
    return results


def print_table(results):
    n = results["config"]["n_eval"]
    print(f"(a) ODE -> SDE keeps the marginals: sliced W1 to the data, pretrained model, 40 steps, {n} samples")
    for name, value in results["marginals_swd"].items():
        print(f"    {name:<28} {value:.3f}")
    print("(b, c) Flow-GRPO, evaluated with the 40-step ODE (diversity = mean pairwise distance)")
    print(f"    {'run':<22} {'reward':>7} {'divers.':>8} {'on-mode':>8} {'SWD':>6} {'step KL':>8} {'train s':>8}")
    d = results["data"]
    print(f"    {'(data)':<22} {d['reward']:>7.3f} {d['diversity']:>8.3f} {d['on_mode']:>8.1%}")
    for name, r in results["runs"].items():
        print(
            f"    {name:<22} {r['reward']:>7.3f} {r['diversity']:>8.3f} {r['on_mode']:>8.1%} "
            f"{r['swd_to_data']:>6.3f} {r['mean_step_kl']:>8.4f} {r['train_seconds']:>8.1f}"
        )
    print(f"total {results['total_seconds']:.1f} s")


def plot(path, samples, runs, cfg):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["data", "pretrained", f"{cfg.rollout_steps} steps, beta={cfg.beta}", f"{cfg.rollout_steps} steps, beta=0"]
    titles = ["data", "pretrained", f"Flow-GRPO, KL (beta={cfg.beta})", "Flow-GRPO, no KL (beta=0)"]
    fig = plt.figure(figsize=(14, 7.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[1, 0.9])
    axes = [fig.add_subplot(grid[0, i]) for i in range(4)] + [
        fig.add_subplot(grid[1, :2]),
        fig.add_subplot(grid[1, 2:]),
    ]
    for ax, name, title in zip(axes, shown, titles):
        x = samples[name][:2000]
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.3, color="tab:blue", rasterized=True)
        ax.scatter([cfg.target_x], [cfg.target_y], marker="*", s=200, color="tab:red", edgecolor="k", zorder=3)
        if name != "data":
            title += f"\nreward {runs[name]['reward']:.2f}, diversity {runs[name]['diversity']:.2f}"
        ax.set(title=title, xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
    axes[0].text(
        cfg.target_x, cfg.target_y - 0.5, "reward\noptimum", color="tab:red", ha="center", va="top", fontsize=9
    )
    for name, r in runs.items():
        if r["curve"]:
            axes[4].plot([c["epoch"] for c in r["curve"]], [c["reward"] for c in r["curve"]], label=name)
            axes[5].plot([c["seconds"] for c in r["curve"]], [c["reward"] for c in r["curve"]], label=name)
    axes[4].set(title="reward (40-step ODE eval)", xlabel="epoch")
    axes[5].set(title="reward vs training wall time (rollouts + updates)", xlabel="seconds")
    for ax in axes[4:]:
        ax.set_ylabel("mean reward (1000 samples)")
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(parse_args())

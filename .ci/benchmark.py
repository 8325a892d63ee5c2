"""Benchmark of one Flow-GRPO step, by phase (rollout, reward, train), for four comparisons; and
(--memory) the host memory of --precompute-text-embeds against the number of prompts.

    python .ci/benchmark.py                  # CPU, tiny random model: about 1 min on 2 cores
    python .ci/benchmark.py --memory 100,25000
                                             # peak RSS of a run with 100 and with 25,000 prompts
    python .ci/benchmark.py --model sd3.5-medium --precompute-text-embeds --gradient-checkpointing
                                             # on a GPU (512 px): real numbers for SD3.5-Medium; add
                                             # --only 1,2,3 on a 24 GB card (live T5-XXL may not fit)

It times exactly what train() times: each configuration is a real `flow_grpo.train(cfg)` run of
--steps steps, and the seconds_rollout / seconds_reward / seconds_train that train() writes to
metrics.jsonl are averaged over steps 2..N (step 1 is warm-up). Comparisons (measured ratio of the
seconds per step, next to the ratio expected from counting transformer work):

  1. 40 vs 10 rollout steps            (--num-steps)
  2. the full trajectory vs --sde-window 2
  3. CFG 4.5 vs no CFG                 (--guidance-scale)
  4. live vs precomputed text embeddings (--precompute-text-embeds)

Expected cost model, in forwards of the transformer on ONE input (one latent + its text):
  rollout = batches x T x I            + text encoding (live only), I = B inputs, 2B with CFG
  train   = batches x trained x I x (1 forward + b backward + 1 reference forward if beta > 0)
  reward  = VAE decode + reward model of the same images: the same in every comparison
b (a backward in forwards) is nominally 2; it cancels in every ratio below. The text encoding cost
is converted to transformer forwards with FLOP counts (torch.utils.flop_counter) of one batch.
A benchmark, not a test: nothing is asserted about timings. On a CUDA device it also prints images/s
in the rollout, trained steps/s and torch.cuda.max_memory_allocated per configuration.

--memory N1,N2,...: for each count, a fresh process runs train() for 2 steps with --precompute-text-embeds on
a file of N distinct prompts (about as long as the official PickScore ones) and reports its peak resident
memory (ru_maxrss), the text cache's size on disk and the wall time. The cache lives on disk, so the peak
should not grow with N; the former in-memory cache would have held 2 rows (prompt and "") per prompt.
"""
import argparse
import contextlib
import gc
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import flow_grpo as fg  # noqa: E402

TOLERANCE = 0.25  # explain a measured ratio that is more than 25% away from the expected one
PHASES = ("rollout", "reward", "train")

# Why a measured ratio can differ from the count of transformer work, by (comparison, phase, direction).
REASONS = {
    ("steps", "rollout", "low"): "fixed per-step costs (live text encoding, noise, Python) are paid once whatever T",
    ("steps", "rollout", "high"): "more steps than counted? the 40-step rollout also keeps 4x more latents; likely timing noise",
    ("steps", "train", "low"): "fixed per-step costs (advantages, 2 optimizer steps, grad clip) do not grow with T",
    ("steps", "train", "high"): "timing noise (other processes on the CPU) or allocator growth with 4x more stored latents",
    ("window", "rollout", "low"): "timing noise: both rollouts run the same T forwards (ODE and SDE steps cost the same)",
    ("window", "rollout", "high"): "timing noise: both rollouts run the same T forwards (ODE and SDE steps cost the same)",
    ("window", "train", "low"): "fixed per-step costs (advantages, 2 optimizer steps, grad clip) weigh more next to 2 trained steps",
    ("window", "train", "high"): "timing noise (other processes on the CPU)",
    ("cfg", "rollout", "low"): "a tiny-model forward is latency-bound (per-op overhead), so 2B inputs cost little more than B",
    ("cfg", "rollout", "high"): "CFG also copies the negative prompt's embeddings and chunks/combines; else timing noise",
    ("cfg", "train", "low"): "a tiny-model forward/backward is latency-bound (per-op overhead), so 2B inputs cost little more than B",
    ("cfg", "train", "high"): "timing noise (other processes on the CPU)",
    ("text", "rollout", "low"): "timing noise: text encoding is a small part of the rollout here",
    ("text", "rollout", "high"): "three tokenizers and encoders per batch cost far more in Python/op overhead than their FLOPs",
    ("text", "train", "low"): "timing noise: the train phase does the same work with either kind of embedding",
    ("text", "train", "high"): "timing noise: the train phase does the same work with either kind of embedding",
}
REWARD_REASON = "same images, same decode and reward: a short phase, so this is timing noise"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="On a GPU pass --model sd3.5-medium (or a local diffusers folder) --resolution 512.")
    p.add_argument("--model", default="tiny", help="tiny (random CPU model, default); on a GPU: sd3.5-medium or a local folder")
    p.add_argument("--resolution", type=int, default=0, help="default: 64 for tiny, 512 otherwise")
    p.add_argument("--reward", default="jpeg_compressibility", help="reward spec (default needs no model)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--groups-per-step", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward (x2 transformer inputs with CFG)")
    p.add_argument("--beta", type=float, default=0.01, help="KL weight; > 0 adds one reference forward per trained step")
    p.add_argument("--dtype", default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument("--precompute-text-embeds", action="store_true", help="use precomputed embeddings in the base config")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="steps per configuration; step 1 is warm-up and not averaged")
    p.add_argument("--only", default="1,2,3,4", help="which comparisons to run, e.g. 1,3")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: a tiny model's ops are too small to split, and 2 OpenMP threads "
                        "sharing 2 cores with another process measured up to 10x slower; 0 = torch's default)")
    p.add_argument("--keep", default="", help="keep the runs' output folders under this folder")
    p.add_argument("--memory", default="", help="only the memory section: prompt counts, e.g. 100,25000")
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-folder", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (step 1 is warm-up)")
    args.resolution = args.resolution or (64 if args.model == "tiny" else 512)
    args.only = sorted({int(c) for c in args.only.split(",") if c.strip()})
    return args


def configurations(args):
    """The base configuration and one variant per comparison: (key, title, numerator, denominator)."""
    base = dict(num_steps=10, sde_window=0, guidance_scale=4.5, precompute_text_embeds=args.precompute_text_embeds)
    variants = {
        "base": base,
        "steps40": {**base, "num_steps": 40},
        "window2": {**base, "sde_window": 2},
        "nocfg": {**base, "guidance_scale": 1.0},
        "live": {**base, "precompute_text_embeds": False},
        "precomputed": {**base, "precompute_text_embeds": True},
    }
    comparisons = {
        1: ("steps", "40 vs 10 rollout steps", "steps40", "base"),
        2: ("window", "full trajectory vs --sde-window 2", "base", "window2"),
        3: ("cfg", "CFG 4.5 vs no CFG (--guidance-scale 1)", "base", "nocfg"),
        4: ("text", "live vs precomputed text embeddings", "live", "precomputed"),
    }
    chosen = [comparisons[c] for c in args.only if c in comparisons]
    # "live" or "precomputed" is the base itself: run each distinct configuration once.
    names, seen = {}, {}
    for _, _, num, den in chosen:
        for name in (num, den):
            key = json.dumps(variants[name], sort_keys=True)
            names[name] = seen.setdefault(key, name)
    runs = {name: variants[name] for name in dict.fromkeys(names.values())}
    return runs, [(key, title, names[num], names[den]) for key, title, num, den in chosen]


def make_config(args, overrides, folder):
    eval_prompts = os.path.join(folder, "eval_prompts.txt")
    with open(eval_prompts, "w") as f:
        f.write("a corgi running on a beach at sunset\n")
    return fg.Config(
        model=args.model, resolution=args.resolution, reward=args.reward, group_size=args.group_size,
        groups_per_step=args.groups_per_step, batch_size=args.batch_size, beta=args.beta, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, max_steps=args.steps, eval_every=10**9,
        eval_num_steps=2, eval_prompts=eval_prompts, save_every=10**9, out=os.path.join(folder, "run"), **overrides,
    )


@contextlib.contextmanager
def cuda_synchronized_timers(enabled):
    """train() reads time.perf_counter() around each phase; CUDA kernels are asynchronous, so on a GPU
    the time of one phase would leak into the next. Synchronise whenever the clock is read."""
    if not enabled:
        yield
        return
    real = time.perf_counter

    def synced():
        torch.cuda.synchronize()
        return real()

    time.perf_counter = synced
    try:
        yield
    finally:
        time.perf_counter = real


def count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure_flops(run, cfg, device):
    """FLOPs of one transformer forward on one input, of a backward (in forwards), and of the live
    text encoding of one batch (with and without CFG), on the model train() just used."""
    import dataclasses

    pipe, transformer = run.pipe, run.transformer
    prompts = fg.BUILTIN_PROMPTS[: cfg.batch_size // cfg.group_size]
    sigmas, timesteps = fg.schedule(pipe, cfg.num_steps, device)
    x = torch.randn(cfg.batch_size, *fg.latent_shape(pipe, cfg), device=device)
    out = {}
    for guidance in (4.5, 1.0):
        text_for = fg.text_encoder_for(pipe, dataclasses.replace(cfg, guidance_scale=guidance, precompute_text_embeds=False), [], device)
        out[f"text_{guidance > 1}"] = count_flops(lambda: text_for(prompts, cfg.group_size))
    text = text_for(prompts, cfg.group_size)  # no CFG: B inputs
    with torch.no_grad():
        forward = count_flops(lambda: fg.guided_velocity(transformer, x, timesteps[0], text, 1.0))

    def forward_backward():
        fg.guided_velocity(transformer, x, timesteps[0], text, 1.0).float().square().mean().backward()

    both = count_flops(forward_backward)
    transformer.zero_grad(set_to_none=True)
    out["forward_per_input"] = forward / cfg.batch_size
    out["backward_in_forwards"] = both / forward - 1
    return out


def run_configuration(name, overrides, args, device, keep_root):
    folder = os.path.join(keep_root, name) if keep_root else tempfile.mkdtemp(prefix=f"bench_{name}_")
    os.makedirs(folder, exist_ok=True)
    cfg = make_config(args, overrides, folder)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    captured = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), cuda_synchronized_timers(cuda):
            run = fg.train(cfg)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    wall = time.perf_counter() - started
    with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    measured = records[1:]  # step 1 is warm-up
    result = {
        "name": name, "cfg": cfg, "wall": wall,
        "seconds": {p: sum(r[f"seconds_{p}"] for r in measured) / len(measured) for p in PHASES},
        "skipped": sum(bool(r.get("skipped_update")) for r in measured),
        "batches": cfg.groups_per_step * cfg.group_size // cfg.batch_size,
        "inputs": cfg.batch_size * (2 if cfg.guidance_scale > 1 else 1),
        "trained": sum(len(fg.sde_and_trained_steps(cfg, fg.seeded(cfg.seed, r["step"] - 1))[1]) for r in measured) / len(measured),
        "peak_memory": torch.cuda.max_memory_allocated() if cuda else None,
        "flops": None,
    }
    if not cfg.precompute_text_embeds and run.pipe.text_encoder is not None:
        result["flops"] = measure_flops(run, cfg, device)
    del run
    if not keep_root:
        shutil.rmtree(folder, ignore_errors=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def forward_units(result, flops, beta, backward=2.0):
    """Expected work per step, in transformer forwards on one input (see the module docstring)."""
    cfg = result["cfg"]
    text = 0.0
    if not cfg.precompute_text_embeds and flops:
        text = flops[f"text_{cfg.guidance_scale > 1}"] / flops["forward_per_input"]
    rollout = result["batches"] * (cfg.num_steps * result["inputs"] + text)
    train = result["batches"] * result["trained"] * result["inputs"] * (1 + backward + (1 if beta > 0 else 0))
    return {"rollout": rollout, "reward": 1.0, "train": train, "text": result["batches"] * text}


def table(headers, rows, left=2):
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = "  ".join(("{:<%d}" if i < left else "{:>%d}") % w for i, w in enumerate(widths))
    out = [line.format(*headers), "  ".join("-" * w for w in widths)]
    out += [line.format(*row) for row in rows]
    return "\n".join(out)


def describe(cfg):
    parts = [f"T={cfg.num_steps}"]
    parts.append(f"window {cfg.sde_window}" if cfg.sde_window else "full")
    parts.append(f"CFG {cfg.guidance_scale:g}" if cfg.guidance_scale > 1 else "no CFG")
    parts.append("precomputed text" if cfg.precompute_text_embeds else "live text")
    return ", ".join(parts)


def synthetic_prompts(count):
    """count distinct prompts of about the official PickScore prompts' length (114 characters on average)."""
    subjects = ["a red fox", "an old lighthouse", "a bowl of ramen", "a robot gardener", "a snow leopard",
                "a tiny house"]
    places = ["in a misty forest", "on a rocky cliff", "under a starry sky", "in a neon-lit street", "by a calm lake"]
    styles = ["oil painting", "studio photograph", "watercolor", "isometric illustration", "cinematic lighting"]
    return [f"{subjects[i % 6]} {places[i // 6 % 5]}, {styles[i // 30 % 5]}, highly detailed, trending on artstation, "
            f"variation {i}" for i in range(count)]


def memory_child(args):
    """One run of the memory section, in its own process so that ru_maxrss is this run's peak."""
    import dataclasses
    import resource

    folder = args.memory_folder
    prompt_file = os.path.join(folder, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(synthetic_prompts(args.memory_child)) + "\n")
    cfg = dataclasses.replace(make_config(args, {}, folder), max_steps=2, prompts=prompt_file,
                              precompute_text_embeds=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fg.train(cfg)
    wall = time.perf_counter() - started
    cache = os.path.join(cfg.out, "text_embeds")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    with open(os.path.join(cache, "index.json")) as f:
        index = json.load(f)
    print(json.dumps({"prompts": args.memory_child, "peak_rss": peak, "wall": wall, "index": index,
                      "cache_bytes": sum(os.path.getsize(os.path.join(cache, n)) for n in os.listdir(cache))}))


def memory_section(args):
    import subprocess

    counts = [int(c) for c in args.memory.split(",") if c.strip()]
    print(f"Host memory of --precompute-text-embeds: model {args.model}, {args.resolution} px, 2 steps of group "
          f"{args.group_size} x {args.groups_per_step} prompts, one fresh process per prompt count", flush=True)
    rows, results = [], []
    for count in counts:
        folder = tempfile.mkdtemp(prefix=f"bench_memory_{count}_")
        command = [sys.executable, os.path.abspath(__file__), "--memory-child", str(count), "--memory-folder", folder,
                   "--model", args.model, "--resolution", str(args.resolution), "--reward", args.reward,
                   "--group-size", str(args.group_size), "--groups-per-step", str(args.groups_per_step),
                   "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        shutil.rmtree(folder, ignore_errors=True)
        if done.returncode:
            sys.exit(f"memory run with {count} prompts failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        index = result["index"]
        itemsize = getattr(torch, index["dtype"].split(".")[-1]).itemsize
        row = sum(math.prod(s) for s in index["shapes"].values()) * itemsize
        result["former"] = 2 * count * row  # prompt and negative rows per prompt, as the in-memory cache held them
        results.append(result)
        rows.append([f"{count:,}", f"{result['peak_rss'] / 2**20:.0f}", f"{result['cache_bytes'] / 2**20:.1f}",
                     f"{result['former'] / 2**20:.0f}", f"{result['wall']:.1f}"])
        print(f"  ran {count:,} prompts: peak RSS {result['peak_rss'] / 2**20:.0f} MiB", flush=True)
    print()
    print(table(["prompts", "peak RSS MiB", "cache on disk MiB", "former in-RAM cache MiB", "wall s"], rows, left=0))
    if len(results) > 1:
        low, high = results[0], results[-1]
        print(f"peak RSS difference {high['prompts']:,} vs {low['prompts']:,} prompts: "
              f"{(high['peak_rss'] - low['peak_rss']) / 2**20:+.0f} MiB; one cached row (prompt or \"\") is "
              f"{row:,} bytes "
              f"({index['shapes']['embeds']} + {index['shapes']['pooled']} in {index['dtype']})")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.memory:
        return memory_section(args)
    runs, comparisons = configurations(args)
    keep_root = os.path.abspath(args.keep) if args.keep else ""
    print(f"Flow-GRPO benchmark: model {args.model}, {args.resolution} px, device {device}"
          f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} torch threads)'}, reward {args.reward}, "
          f"group {args.group_size} x {args.groups_per_step} prompts, batch {args.batch_size}, beta {args.beta:g}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
          f"{args.steps} steps per configuration, step 1 not averaged", flush=True)
    started = time.perf_counter()
    results = {}
    for name, overrides in runs.items():
        try:
            results[name] = run_configuration(name, overrides, args, device, keep_root)
        except torch.cuda.OutOfMemoryError as error:  # e.g. live T5-XXL next to a large batch on a 24 GB card
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"  {name:<12} out of GPU memory (peak {peak:.1f} GiB before failing: {str(error).splitlines()[0][:100]}); "
                  f"comparisons using it are skipped", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        s = results[name]["seconds"]
        print(f"  ran {name:<12} ({describe(results[name]['cfg'])}): rollout {s['rollout']:.3f} s, reward {s['reward']:.3f} s, "
              f"train {s['train']:.3f} s per step  [{results[name]['wall']:.0f} s wall]", flush=True)
    comparisons = [c for c in comparisons if c[2] in results and c[3] in results]
    if not results:
        return
    flops = next((r["flops"] for r in results.values() if r["flops"]), None)
    units = {name: forward_units(r, flops, args.beta) for name, r in results.items()}

    print("\nSeconds per step by phase (mean of steps 2..%d); work in transformer forwards on one input" % args.steps)
    rows = []
    for name, r in results.items():
        s, u = r["seconds"], units[name]
        rows.append([name, describe(r["cfg"]), f"{s['rollout']:.3f}", f"{s['reward']:.3f}", f"{s['train']:.3f}",
                     f"{sum(s.values()):.3f}", f"{u['rollout']:.0f}", f"{u['train']:.0f}",
                     f"{1e3 * s['rollout'] / u['rollout']:.2f}", f"{1e3 * s['train'] / u['train']:.2f}"])
    print(table(["config", "settings", "rollout s", "reward s", "train s", "total s", "roll fwd", "train fwd",
                 "ms/fwd roll", "ms/fwd train"], rows))

    print("\nRatios: measured seconds vs expected from counting transformer forwards (backward = 2 forwards)")
    rows, notes = [], []
    for key, title, num, den in comparisons:
        for phase in PHASES:
            measured = results[num]["seconds"][phase] / max(results[den]["seconds"][phase], 1e-9)
            expected = units[num][phase] / units[den][phase]
            flag = ""
            if abs(measured / expected - 1) > TOLERANCE:
                flag = f"[{len(notes) + 1}]"
                reason = REWARD_REASON if phase == "reward" else REASONS[(key, phase, "low" if measured < expected else "high")]
                notes.append(f"{flag} {title}, {phase}: measured {measured:.2f} vs {expected:.2f}: {reason}")
            rows.append([title if phase == "rollout" else "", phase, f"{num} / {den}", f"{measured:.2f}", f"{expected:.2f}", flag])
    print(table(["comparison", "phase", "configs", "measured", "expected", "note"], rows, left=3))
    for note in notes:
        print(note)

    print("\nHow 'expected' is counted: rollout = batches x T x inputs (+ live text encoding), inputs = batch, x2 with CFG;")
    print("train = batches x trained steps x inputs x (forward + backward + reference forward when beta > 0); reward = same work.")
    if flops:
        print(f"FLOP counter: one transformer forward on one input = {flops['forward_per_input'] / 1e6:.2f} MFLOP; live text "
              f"encoding of one batch = {flops['text_True'] / flops['forward_per_input']:.1f} forwards with CFG, "
              f"{flops['text_False'] / flops['forward_per_input']:.1f} without; a backward = "
              f"{flops['backward_in_forwards']:.2f} forwards (frozen base: no weight gradients; it cancels in every ratio).")
    trained = {n: r["trained"] for n, r in results.items()}
    print(f"Trained steps per batch: {', '.join(f'{n} {t:g}' for n, t in trained.items())} "
          f"(train_fraction 0.99 leaves the last step out; the window trains its K steps).")
    skipped = [n for n, r in results.items() if r["skipped"]]
    if skipped:
        print(f"warning: {', '.join(skipped)}: an update was skipped (all groups had equal rewards): its train time is not representative")
    per_forward = [1e3 * r["seconds"][p] / units[n][p] for n, r in results.items() for p in ("rollout", "train")]
    print(f"Seconds per forward-equivalent range {min(per_forward):.2f}-{max(per_forward):.2f} ms over all configurations and "
          f"phases: the closer to constant, the better the forward count predicts time. Where it is not (a tiny model "
          f"with small batches), per-op Python/dispatch overhead, not FLOPs, sets the time: batch size and CFG then cost "
          f"less than counted, and fixed per-step costs (text encoding, optimizer steps) weigh more.")

    if device.type == "cuda":
        print_gpu_table(results, args)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


def print_gpu_table(results, args):
    """Throughput and peak memory per configuration (CUDA only)."""
    print(f"\nGPU ({torch.cuda.get_device_name()}), model {args.model}, {args.resolution} px, dtype {args.dtype}")
    rows = []
    for name, r in results.items():
        s, cfg = r["seconds"], r["cfg"]
        images = cfg.groups_per_step * cfg.group_size
        trained_steps = r["batches"] * r["trained"]
        rows.append([name, describe(cfg), f"{images / s['rollout']:.2f}", f"{trained_steps / max(s['train'], 1e-9):.2f}",
                     f"{trained_steps * cfg.batch_size / max(s['train'], 1e-9):.2f}", f"{r['peak_memory'] / 2**30:.2f}"])
    print(table(["config", "settings", "rollout images/s", "trained steps/s", "trained image-steps/s", "peak GiB"], rows))
    print("trained step = forward + backward (+ reference forward) of one batch at one timestep; peak = "
          "torch.cuda.max_memory_allocated over the whole run (loading, eval, precompute included).")


if __name__ == "__main__":
    main()

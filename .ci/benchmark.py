"""Benchmark of one Flow-GRPO step, by phase (rollout, reward, train), for four comparisons; and
(--memory) the host memory of --precompute-text-embeds against the number of prompts.

    python .ci/benchmark.py                  # CPU, tiny random model: about 1 min on 2 cores
    python .ci/benchmark.py --model sd3.5-medium --random-weights
                                             # a GPU, nothing downloaded: SD3.5-Medium and PickScore built
                                             # at their real sizes with random weights; the README's two
                                             # recipes (default, 24 GB), 512 px, group 8 x 2 prompts
    python .ci/benchmark.py --model flux.1-dev --random-weights
                                             # the same for FLUX.1-dev (its official recipe, one group of
                                             # 24 images in batches of 3): recipes default and 40gb
    python .ci/benchmark.py --dry-run        # any machine: those models on the meta device, their
                                             # parameter counts and the FLOPs of one step (--model
                                             # flux.1-dev: also its memory on one 80 GB GPU, computed)
    python .ci/benchmark.py --memory 100,25000
                                             # peak RSS of a run with 100 and with 25,000 prompts
    python .ci/benchmark.py --model sd3.5-medium --precompute-text-embeds --gradient-checkpointing
                                             # on a GPU (512 px) with the downloaded model: the four
                                             # comparisons below; --only 1,2,3 on a 24 GB card

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
A benchmark, not a test: nothing is asserted about timings. Every run also prints, per configuration,
seconds per phase and per step, images/s, the transformer's TFLOP/s in the rollout and the training
(FLOPs counted with torch.utils.flop_counter on one input; on a GPU also as a fraction of its dense
bf16 peak, from PEAK_TFLOPS or --peak-tflops), the GPU memory train() logs (peak allocated, peak
reserved, in use on the device) and the extra time of the first step (compilation, warm-up).

--random-weights: the training command keeps `tiny` and `tiny-flux` as its only random models, so a user never
trains a random SD3.5 or FLUX by mistake. Here, inside the benchmark process only, flow_grpo.load_pipeline is
replaced by a builder of SD3.5-Medium or FLUX.1-dev from its published configs with random weights, and PickScore
(CLIP-H) is built the same way and saved to a temporary folder passed as --reward-model-dir. Memory
and speed depend on the shapes, not on the weights.
A benchmark, not a test: nothing is asserted about timings. On a CUDA device it also prints images/s
in the rollout, trained steps/s and torch.cuda.max_memory_allocated per configuration.

--memory N1,N2,...: for each count, a fresh process runs train() for 2 steps with --precompute-text-embeds on
a file of N distinct prompts (about as long as the official PickScore ones), all N in its text cache (as a run
that draws N would hold; a 2-step run itself draws only its own), and reports its peak resident
memory (ru_maxrss), the text cache's size on disk and the wall time. The cache lives on disk, so the peak
should not grow with N; the former in-memory cache would have held 2 rows (prompt and "") per prompt.
"""

import argparse
import contextlib
import dataclasses
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
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# flow_grpo first: it sets the CUDA allocator's variable before torch is imported.
import flow_grpo as fg  # noqa: E402, I001
import torch  # noqa: E402

TOLERANCE = 0.25  # explain a measured ratio that is more than 25% away from the expected one
PHASES = ("rollout", "reward", "train")

# Why a measured ratio can differ from the count of transformer work, by (comparison, phase, direction).
REASONS = {
    ("steps", "rollout", "low"): "fixed per-step costs (live text encoding, noise, Python) are paid once whatever T",
    (
        "steps",
        "rollout",
        "high",
    ): "more steps than counted? the 40-step rollout also keeps 4x more latents; likely timing noise",
    ("steps", "train", "low"): "fixed per-step costs (advantages, 2 optimizer steps, grad clip) do not grow with T",
    (
        "steps",
        "train",
        "high",
    ): "timing noise (other processes on the CPU) or allocator growth with 4x more stored latents",
    (
        "window",
        "rollout",
        "low",
    ): "timing noise: both rollouts run the same T forwards (ODE and SDE steps cost the same)",
    (
        "window",
        "rollout",
        "high",
    ): "timing noise: both rollouts run the same T forwards (ODE and SDE steps cost the same)",
    (
        "window",
        "train",
        "low",
    ): "fixed per-step costs (advantages, 2 optimizer steps, grad clip) weigh more next to 2 trained steps",
    ("window", "train", "high"): "timing noise (other processes on the CPU)",
    (
        "cfg",
        "rollout",
        "low",
    ): "a tiny-model forward is latency-bound (per-op overhead), so 2B inputs cost little more than B",
    (
        "cfg",
        "rollout",
        "high",
    ): "CFG also copies the negative prompt's embeddings and chunks/combines; else timing noise",
    (
        "cfg",
        "train",
        "low",
    ): "a tiny-model forward/backward is latency-bound (per-op overhead), so 2B inputs cost little more than B",
    ("cfg", "train", "high"): "timing noise (other processes on the CPU)",
    ("text", "rollout", "low"): "timing noise: text encoding is a small part of the rollout here",
    (
        "text",
        "rollout",
        "high",
    ): "three tokenizers and encoders per batch cost far more in Python/op overhead than their FLOPs",
    ("text", "train", "low"): "timing noise: the train phase does the same work with either kind of embedding",
    ("text", "train", "high"): "timing noise: the train phase does the same work with either kind of embedding",
}
REWARD_REASON = "same images, same decode and reward: a short phase, so this is timing noise"

# The README's recipes on one GPU (512 px), on top of flow_grpo's GPU defaults (bf16, T = 10, CFG 4.5), or for FLUX
# of its official recipe. The low-memory flags are named by the card they fit: SD3.5-M 24 GB, FLUX.1-dev 40 GB.
RECIPES = {
    "default": {"precompute_text_embeds": False, "gradient_checkpointing": False},
    "24gb": {"precompute_text_embeds": True, "gradient_checkpointing": True},
    "40gb": {"precompute_text_embeds": True, "gradient_checkpointing": True},
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in this order on
# torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM card. --peak-tflops overrides.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
]

# SD3.5-Medium as published (stabilityai/stable-diffusion-3.5-medium, the config.json of transformer/, vae/,
# text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-bigG) and text_encoder_3/ (T5-v1.1-XXL encoder)) and PickScore
# (yuvalkirstain/PickScore_v1, a CLIP-ViT-H/14). Vocabulary tables at their real sizes.
SD35_MEDIUM = {
    "transformer": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    ),
    "clip_l": dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    "clip_g": dict(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        projection_dim=1280,
        hidden_act="gelu",
    ),
    "t5": dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        tie_word_embeddings=False,
    ),
}
PICKSCORE = dict(
    text_config=dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
    ),
    vision_config=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        hidden_act="gelu",
    ),
    projection_dim=1024,
)
TEXT_TOKENS = 77 + 128  # per transformer input: CLIP padded to 77, T5 to the 128 of flow_grpo.encode_prompts

# FLUX.1-dev as published (black-forest-labs/FLUX.1-dev, a gated repository: read in copies of its files on the hub,
# each naming FLUX.1-dev in its _name_or_path, most its snapshot 0ef5fff):
# - transformer/config.json (art42me/flux-dev-fp8-quantized, config.json): FluxTransformer2DModel, 19 double-stream and
#   38 single-stream blocks, 24 heads of 128 (width 3072), T5 width 4096, CLIP-L pooled 768, guidance embedding,
#   rotary axes (16, 56, 56); the same 19, 38, 3072 and mlp_ratio 4 in diffusers' scripts/convert_flux_to_diffusers.py,
#   main();
# - vae/config.json (magespace/FLUX.1-dev-bnb-nf4): SD3.5's AutoencoderKL layout, FLUX's scale 0.3611 and shift 0.1159;
# - text_encoder/config.json (magespace/FLUX.1-dev-bnb-8bit): CLIPTextModel with SD3.5's CLIP-L settings;
# - text_encoder_2/config.json (sitatech/Hyper-FLUX.1-dev-8steps): T5EncoderModel with SD3.5's T5-v1.1-XXL settings;
# - scheduler/scheduler_config.json: the dynamic shift, flow_grpo.FLUX1_DEV_SCHEDULER.
FLUX1_DEV = {
    "transformer": dict(
        patch_size=1,
        in_channels=64,  # 16 latent channels x a 2x2 patch
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    "vae": {**SD35_MEDIUM["vae"], "shift_factor": 0.1159, "scaling_factor": 0.3611},
    "clip_l": SD35_MEDIUM["clip_l"],
    "t5": SD35_MEDIUM["t5"],
    "scheduler": fg.FLUX1_DEV_SCHEDULER,
}
FLUX_TEXT_TOKENS = 128  # T5 only (CLIP-L gives the pooled vector): the official max_sequence_length


@contextlib.contextmanager
def building_on(device, dtype):
    """Modules constructed inside are created on `device` in `dtype` and initialised at random (on the GPU: fast and
    without an fp32 copy; on `meta`: shapes only, no memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def as_loaded(module, dtype, park):
    """The state from_pretrained(dtype=...) leaves a model in: eval mode, every floating tensor (SD3's fp32 position
    table too) in `dtype` but the modules transformers keeps in fp32 under fp16 (T5's `wo`), on `park`."""
    fg.to_loaded_dtype(module, dtype)
    module.eval()
    return module.to(park) if park else module


def clip_text_config(settings, tokenizer):
    from transformers import CLIPTextConfig

    # CLIP pools at eos_token_id: the tiny tokenizer's ids, or the wrong token is pooled (same shapes either way).
    return CLIPTextConfig(
        **settings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_sd35_medium(device="meta", dtype=torch.bfloat16, park=None):
    """SD3.5-Medium's pipeline at its real size with random weights, each component built on `device` and then moved
    to `park` (the GPU builds in seconds; parked on the CPU, the pipeline is where from_pretrained leaves it, and
    train() moves it as it would the real one). Nothing is downloaded: the tokenizers are flow_grpo's tiny ones, whose
    few hundred ids index the real-size vocabulary tables; the pipeline pads every prompt to the real lengths (77 CLIP,
    128 T5 tokens), so every tensor of the models has its real shape."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as folder:
        clip_tokenizer = fg.build_tiny_clip_tokenizer(folder + "/clip")
        t5_tokenizer = fg.build_tiny_t5_tokenizer(folder + "/t5")
    parts = {}
    with building_on(device, dtype):
        parts["transformer"] = as_loaded(SD3Transformer2DModel(**SD35_MEDIUM["transformer"]), dtype, park)
    with building_on(device, torch.float32):
        parts["vae"] = as_loaded(AutoencoderKL(**SD35_MEDIUM["vae"]), torch.float32, park)  # as load_pipeline
    for name, settings in (("text_encoder", SD35_MEDIUM["clip_l"]), ("text_encoder_2", SD35_MEDIUM["clip_g"])):
        with building_on(device, dtype):
            parts[name] = as_loaded(
                CLIPTextModelWithProjection(clip_text_config(settings, clip_tokenizer)), dtype, park
            )
    with building_on(device, dtype):
        t5_config = T5Config(**SD35_MEDIUM["t5"], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        parts["text_encoder_3"] = as_loaded(T5EncoderModel(t5_config), dtype, park)
    return StableDiffusion3Pipeline(
        **parts,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=clip_tokenizer,
        tokenizer_2=clip_tokenizer,
        tokenizer_3=t5_tokenizer,
    )


def build_flux1_dev(device="meta", dtype=torch.bfloat16, park=None):
    """FLUX.1-dev's pipeline at its real size with random weights, built as build_sd35_medium builds SD3.5-Medium
    (the tiny tokenizers pad every prompt to CLIP's 77 and T5's 128 tokens)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as folder:
        clip_tokenizer = fg.build_tiny_clip_tokenizer(folder + "/clip")
        t5_tokenizer = fg.build_tiny_t5_tokenizer(folder + "/t5")
    with building_on(device, dtype):
        transformer = as_loaded(FluxTransformer2DModel(**FLUX1_DEV["transformer"]), dtype, park)
        clip = as_loaded(CLIPTextModel(clip_text_config(FLUX1_DEV["clip_l"], clip_tokenizer)), dtype, park)
        t5_config = T5Config(**FLUX1_DEV["t5"], pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        t5 = as_loaded(T5EncoderModel(t5_config), dtype, park)
    with building_on(device, torch.float32):
        vae = as_loaded(AutoencoderKL(**FLUX1_DEV["vae"]), torch.float32, park)  # fp32, as load_pipeline
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_DEV["scheduler"]),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


# The models --random-weights and --dry-run build, and the recipes run by default.
MODELS = {
    "sd3.5-medium": dict(title="SD3.5-Medium", build=build_sd35_medium, recipes="default,24gb"),
    "flux.1-dev": dict(title="FLUX.1-dev", build=build_flux1_dev, recipes="default,40gb"),
}


def recipe_of(model):
    """The settings a model's benchmark runs start from, as flow_grpo's command line: FLUX_RECIPE for any FLUX model."""
    return dict(fg.FLUX_RECIPE) if fg.is_flux(model) else {}


def build_pickscore(device="meta", dtype=torch.bfloat16, park=None):
    """PickScore (CLIP-H/14) at its real size with random weights, and a CLIPProcessor (224 px, tiny tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = fg.build_tiny_clip_tokenizer(folder)
    text_config = clip_text_config(PICKSCORE["text_config"], tokenizer).to_dict()
    with building_on(device, dtype):
        model = CLIPModel(
            CLIPConfig(
                text_config=text_config,
                vision_config=PICKSCORE["vision_config"],
                projection_dim=PICKSCORE["projection_dim"],
            )
        )
    size = PICKSCORE["vision_config"]["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return as_loaded(model, dtype, park), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def parameter_counts(pipe, pickscore):
    """Parameters of each component (buffers such as SD3's 0.226 B position table not counted)."""
    if type(pipe).__name__ == "FluxPipeline":
        parts = {"transformer": pipe.transformer, "T5-XXL encoder": pipe.text_encoder_2, "CLIP-L": pipe.text_encoder}
    else:
        parts = {
            "transformer": pipe.transformer,
            "T5-XXL encoder": pipe.text_encoder_3,
            "CLIP-bigG": pipe.text_encoder_2,
            "CLIP-L": pipe.text_encoder,
        }
    parts.update({"VAE": pipe.vae, "PickScore (CLIP-H)": pickscore})
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


def use_random_weights(args, device):
    """--random-weights, in this process only (flow_grpo's CLI has no random SD3.5 or FLUX.1-dev):
    flow_grpo.load_pipeline builds --model on `device` and parks it on the CPU; PickScore is built the same way and
    saved to a temporary folder passed as --reward-model-dir (rewards.py loads it as it would the real one). Returns
    that folder ('' if none)."""

    def load_random_model(model, dtype):
        assert model == args.model, model
        pipe = MODELS[model]["build"](device, dtype, park="cpu")
        if device.type == "cuda":  # from_pretrained never touches the GPU: neither may the build, in the memory figures
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return pipe

    fg.load_pipeline = load_random_model
    if "pickscore" not in args.reward or "pickscore=" in args.reward_model_dir:
        return ""
    folder = tempfile.mkdtemp(prefix="bench_pickscore_")
    model, processor = build_pickscore(device, torch.bfloat16, park="cpu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    args.reward_model_dir = ",".join(filter(None, [args.reward_model_dir, f"pickscore={folder}"]))
    return folder


def peak_tflops(device_name, override=0.0):
    if override:
        return override
    return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name), None)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],  # the first paragraph, whole (its first line stops mid-sentence)
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="On a GPU pass --model sd3.5-medium (or a local diffusers folder) --resolution 512.",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="tiny (random CPU model, default); on a GPU: sd3.5-medium, flux.1-dev (the official FLUX recipe: "
        "flow_grpo.FLUX_RECIPE, group 24, batch 3) or a local folder",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="with --model sd3.5-medium or flux.1-dev, on a GPU: build it and PickScore at their real sizes with "
        "random weights (nothing downloaded)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build those models on the meta device (any machine), print their parameter counts and the FLOPs "
        "of one step (for flux.1-dev also the memory of one 80 GB GPU), and stop",
    )
    p.add_argument(
        "--recipes",
        default=None,
        help=f"configurations to run, from {', '.join(RECIPES)}; append +compile for --compile "
        "(default: default,24gb with --random-weights, default,40gb for flux.1-dev, none otherwise)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=0.0, help="the device's peak (default: from a table of known GPUs)"
    )
    p.add_argument("--resolution", type=int, default=0, help="default: 64 for tiny, 512 otherwise")
    p.add_argument(
        "--reward",
        default=None,
        help="reward spec (default: jpeg_compressibility, which needs no model; pickscore with --random-weights)",
    )
    p.add_argument("--reward-model-dir", default="", help="as flow_grpo's --reward-model-dir")
    p.add_argument("--group-size", type=int, default=None, help="default 4; 8 with --random-weights; 24 for FLUX")
    p.add_argument("--groups-per-step", type=int, default=None, help="default 2; 1 for FLUX")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward (x2 transformer inputs with CFG); default 8, 3 for FLUX",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="KL weight; > 0 adds one reference forward per trained step (default 0.01; FLUX's recipe: 0)",
    )
    p.add_argument("--dtype", default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--precompute-text-embeds", action="store_true", help="use precomputed embeddings in the base config"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per configuration (default 5; 3 with --random-weights); step 1 is warm-up and not averaged",
    )
    p.add_argument(
        "--only", default=None, help="which comparisons to run, e.g. 1,3 (default: 1,2,3,4; none with --random-weights)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: a tiny model's ops are too small to split, and 2 OpenMP threads "
        "sharing 2 cores with another process measured up to 10x slower; 0 = torch's default)",
    )
    p.add_argument("--keep", default="", help="keep the runs' output folders under this folder")
    p.add_argument("--memory", default="", help="only the memory section: prompt counts, e.g. 100,25000")
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--memory-folder", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.random_weights, args.model = True, "sd3.5-medium" if args.model == "tiny" else args.model
    if args.random_weights and args.model not in MODELS:
        p.error(f"--random-weights builds {' or '.join(MODELS)} only, not '{args.model}'")
    if args.random_weights and not args.dry_run and not torch.cuda.is_available():
        p.error(
            "--random-weights needs a CUDA GPU (9 to 18 B parameters); --dry-run prints the parameter counts on any "
            "machine"
        )
    flux = args.model == "flux.1-dev"
    if flux and args.only:
        p.error("--only: the comparisons are written for SD3 (CFG, 10 vs 40 steps); FLUX runs --recipes only")
    random = args.random_weights
    args.steps = args.steps if args.steps is not None else (3 if random else 5)
    if args.steps < 2:
        p.error("--steps must be at least 2 (step 1 is warm-up)")
    # FLUX: the official recipe (FLUX_RECIPE) and one group of the official 24 images in batches of 3 (8 batches).
    recipe = recipe_of(args.model)
    args.resolution = args.resolution or (64 if args.model == "tiny" else recipe.get("resolution", 512))
    args.reward = args.reward or ("pickscore" if random else "jpeg_compressibility")
    args.group_size = args.group_size or (24 if flux else 8 if random else 4)
    args.groups_per_step = args.groups_per_step or (1 if flux else 2)
    args.batch_size = args.batch_size or (3 if flux else 8)
    args.beta = args.beta if args.beta is not None else recipe.get("beta", 0.01)
    only = args.only if args.only is not None else ("" if random or flux else "1,2,3,4")
    args.only = sorted({int(c) for c in only.split(",") if c.strip()})
    default_recipes = MODELS[args.model]["recipes"] if args.model in MODELS and (random or flux) else ""
    recipes = args.recipes if args.recipes is not None else default_recipes
    args.recipes = [r.strip() for r in recipes.split(",") if r.strip()]
    compile_field = any(f.name == "compile" for f in dataclasses.fields(fg.Config))
    for recipe in args.recipes:
        name, _, extra = recipe.partition("+")
        if name not in RECIPES or extra not in ("", "compile"):
            p.error(f"--recipes {recipe}: use {', '.join(RECIPES)}, each optionally followed by +compile")
        if extra and not compile_field:
            p.error(f"--recipes {recipe}: this flow_grpo.py has no --compile")
    return args


def configurations(args):
    """The base configuration and one variant per comparison: (key, title, numerator, denominator)."""
    base = dict(num_steps=10, sde_window=0, guidance_scale=4.5, precompute_text_embeds=args.precompute_text_embeds)
    recipe = recipe_of(args.model)
    base.update({key: recipe[key] for key in ("num_steps", "guidance_scale") if key in recipe})
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
    for recipe in args.recipes:  # the README's recipes: flow_grpo's defaults + the recipe's memory flags
        name, _, extra = recipe.partition("+")
        runs[recipe] = {**variants["base"], **RECIPES[name], **({"compile": True} if extra == "compile" else {})}
    return runs, [(key, title, names[num], names[den]) for key, title, num, den in chosen]


def make_config(args, overrides, folder):
    eval_prompts = os.path.join(folder, "eval_prompts.txt")
    with open(eval_prompts, "w") as f:
        f.write("a corgi running on a beach at sunset\n")
    settings = dict(
        model=args.model,
        resolution=args.resolution,
        reward=args.reward,
        reward_model_dir=args.reward_model_dir,
        group_size=args.group_size,
        groups_per_step=args.groups_per_step,
        batch_size=args.batch_size,
        beta=args.beta,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        max_steps=args.steps,
        eval_every=10**9,
        eval_num_steps=2,
        eval_prompts=eval_prompts,
        save_every=10**9,
        out=os.path.join(folder, "run"),
        # an optimizer step takes whole rollout batches: one step of a single batch allows one update
        updates_per_step=min(fg.Config.updates_per_step, args.groups_per_step * args.group_size // args.batch_size),
    )
    return fg.Config(**{**recipe_of(args.model), **settings, **overrides})


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
    x = torch.randn(cfg.batch_size, *fg.model_policy(pipe, cfg.resolution).latent_shape(), device=device)
    out = {}
    for guidance in (4.5, 1.0):
        text_for = fg.text_encoder_for(
            pipe, dataclasses.replace(cfg, guidance_scale=guidance, precompute_text_embeds=False), [], device
        )
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


def transformer_flops(pipe, cfg):
    """FLOPs of the transformer per input (one latent and its text tokens: SD3's TEXT_TOKENS, FLUX's 128) at
    cfg.resolution, counted with torch.utils.flop_counter on one input of a LoRA-wrapped copy (the model's own targets;
    meta device for the real sizes): the policy forward (a rollout step), its forward + backward (a trained step;
    gradient checkpointing's recomputation not counted: this is the model's work) and the reference forward (adapter
    off). One input: SD3 without CFG (CFG doubles the inputs, step_shape counts them), FLUX with its guidance
    embedding (one input per image). Modifies pipe.transformer (LoRA added)."""
    config = pipe.transformer.config
    policy = fg.model_policy(pipe, cfg.resolution)
    like = {"device": pipe.transformer.device, "dtype": pipe.transformer.dtype}
    transformer, _ = fg.add_lora(pipe.transformer, cfg, targets=policy.lora_targets)
    tokens = TEXT_TOKENS if policy.uses_cfg else FLUX_TEXT_TOKENS
    x = torch.randn(1, *policy.latent_shape(), **like)
    text = fg.TextEmbeddings(
        torch.randn(1, tokens, config.joint_attention_dim, **like),
        torch.randn(1, config.pooled_projection_dim, **like),
    )
    timestep = torch.tensor(500.0, device=like["device"])
    guidance = 1.0 if policy.uses_cfg else cfg.guidance_scale

    def forward():
        return policy.velocity(transformer, x, timestep, text, guidance)

    with torch.no_grad():
        flops = count_flops(forward)
        with transformer.disable_adapter():
            reference = count_flops(forward)
    train = count_flops(lambda: forward().square().mean().backward())
    return {"policy": flops, "train": train, "reference": reference, "text_tokens": tokens}


def step_flops(result, per_input, beta):
    """Transformer FLOPs of one step: rollout = batches x T x inputs x policy forward; train = batches x trained
    steps x inputs x (forward + backward, + reference forward when beta > 0)."""
    cfg = result["cfg"]
    rollout = result["batches"] * cfg.num_steps * result["inputs"] * per_input["policy"]
    train = (
        result["batches"]
        * result["trained"]
        * result["inputs"]
        * (per_input["train"] + (per_input["reference"] if beta > 0 else 0))
    )
    return {"rollout": rollout, "train": train}


def run_configuration(name, overrides, args, device, keep_root, text_flops=True):
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
    step_seconds = [sum(r[f"seconds_{p}"] for p in PHASES) for r in records]
    result = {
        "name": name,
        "cfg": cfg,
        "wall": wall,
        "seconds": {p: sum(r[f"seconds_{p}"] for r in measured) / len(measured) for p in PHASES},
        "skipped": sum(bool(r.get("skipped_update")) for r in measured),
        "batches": cfg.groups_per_step * cfg.group_size // cfg.batch_size,
        "inputs": transformer_inputs(cfg),
        "trained": sum(len(fg.sde_and_trained_steps(cfg, fg.seeded(cfg.seed, r["step"] - 1))[1]) for r in measured)
        / len(measured),
        # train() logs each step's GPU peaks (and resets them): the run's peak is the largest.
        "memory": {key: max(r[key] for r in records) for key in records[0] if key.startswith("gpu_")},
        "warmup": step_seconds[0] - sum(step_seconds[1:]) / len(measured),  # step 1's extra seconds
        "compile": sum(r.get("seconds_compile", 0.0) for r in records),
        "flops": None,
    }
    if text_flops and not cfg.precompute_text_embeds and run.pipe.text_encoder is not None:
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
        text = flops[f"text_{uses_cfg(cfg)}"] / flops["forward_per_input"]
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
    guidance = "guidance" if fg.is_flux(cfg.model) else "CFG"
    parts.append(f"{guidance} {cfg.guidance_scale:g}" if cfg.guidance_scale > 1 else "no CFG")
    parts.append("precomputed text" if cfg.precompute_text_embeds else "live text")
    return ", ".join(parts)


def synthetic_prompts(count):
    """count distinct prompts of about the official PickScore prompts' length (114 characters on average)."""
    subjects = [
        "a red fox",
        "an old lighthouse",
        "a bowl of ramen",
        "a robot gardener",
        "a snow leopard",
        "a tiny house",
    ]
    places = ["in a misty forest", "on a rocky cliff", "under a starry sky", "in a neon-lit street", "by a calm lake"]
    styles = ["oil painting", "studio photograph", "watercolor", "isometric illustration", "cinematic lighting"]
    return [
        f"{subjects[i % 6]} {places[i // 6 % 5]}, {styles[i // 30 % 5]}, highly detailed, trending on artstation, "
        f"variation {i}"
        for i in range(count)
    ]


def memory_child(args):
    """One run of the memory section, in its own process so that ru_maxrss is this run's peak."""
    import dataclasses
    import resource

    folder = args.memory_folder
    prompt_file = os.path.join(folder, "prompts.txt")
    with open(prompt_file, "w") as f:
        f.write("\n".join(synthetic_prompts(args.memory_child)) + "\n")
    cfg = dataclasses.replace(
        make_config(args, {}, folder), max_steps=2, prompts=prompt_file, precompute_text_embeds=True
    )
    # A 2-step run caches only the prompts it draws: here it caches all N, as a run that draws N would.
    fg.prompts_drawn = lambda cfg, prompts: list(prompts)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        fg.train(cfg)
    wall = time.perf_counter() - started
    cache = os.path.join(cfg.out, "text_embeds")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    with open(os.path.join(cache, "index.json")) as f:
        index = json.load(f)
    print(
        json.dumps(
            {
                "prompts": args.memory_child,
                "peak_rss": peak,
                "wall": wall,
                "index": index,
                "cache_bytes": sum(os.path.getsize(os.path.join(cache, n)) for n in os.listdir(cache)),
            }
        )
    )


def memory_section(args):
    import subprocess

    counts = [int(c) for c in args.memory.split(",") if c.strip()]
    print(
        f"Host memory of --precompute-text-embeds: model {args.model}, {args.resolution} px, 2 steps of group "
        f"{args.group_size} x {args.groups_per_step} prompts, one fresh process per prompt count",
        flush=True,
    )
    rows, results = [], []
    for count in counts:
        folder = tempfile.mkdtemp(prefix=f"bench_memory_{count}_")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            str(count),
            "--memory-folder",
            folder,
            "--model",
            args.model,
            "--resolution",
            str(args.resolution),
            "--reward",
            args.reward,
            "--group-size",
            str(args.group_size),
            "--groups-per-step",
            str(args.groups_per_step),
            "--batch-size",
            str(args.batch_size),
            "--dtype",
            args.dtype,
            "--threads",
            str(args.threads),
        ]
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
        rows.append(
            [
                f"{count:,}",
                f"{result['peak_rss'] / 2**20:.0f}",
                f"{result['cache_bytes'] / 2**20:.1f}",
                f"{result['former'] / 2**20:.0f}",
                f"{result['wall']:.1f}",
            ]
        )
        print(f"  ran {count:,} prompts: peak RSS {result['peak_rss'] / 2**20:.0f} MiB", flush=True)
    print()
    print(table(["prompts", "peak RSS MiB", "cache on disk MiB", "former in-RAM cache MiB", "wall s"], rows, left=0))
    if len(results) > 1:
        low, high = results[0], results[-1]
        print(
            f"peak RSS difference {high['prompts']:,} vs {low['prompts']:,} prompts: "
            f'{(high["peak_rss"] - low["peak_rss"]) / 2**20:+.0f} MiB; one cached row (prompt or "") is '
            f"{row:,} bytes "
            f"({index['shapes']['embeds']} + {index['shapes']['pooled']} in {index['dtype']})"
        )


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if args.memory:
        return memory_section(args)
    runs, comparisons = configurations(args)
    keep_root = os.path.abspath(args.keep) if args.keep else ""
    print(
        f"Flow-GRPO benchmark: model {args.model}{' (random weights)' if args.random_weights else ''}, "
        f"{args.resolution} px, device {device}"
        f"{'' if device.type == 'cuda' else f' ({torch.get_num_threads()} torch threads)'}, reward {args.reward}, "
        f"group {args.group_size} x {args.groups_per_step} prompts, batch {args.batch_size}, beta {args.beta:g}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; "
        f"{args.steps} steps per configuration, step 1 not averaged",
        flush=True,
    )
    started = time.perf_counter()
    per_input = count_per_input_flops(args)
    reward_folder = use_random_weights(args, device) if args.random_weights else ""
    if reward_folder:
        print(
            f"  PickScore (CLIP-H) with random weights saved to {reward_folder} "
            f"[{time.perf_counter() - started:.0f} s]",
            flush=True,
        )
    results = {}
    try:
        for name, overrides in runs.items():
            try:
                results[name] = run_configuration(
                    name, overrides, args, device, keep_root, text_flops=bool(comparisons)
                )
            except torch.cuda.OutOfMemoryError as error:  # e.g. live T5-XXL next to a large batch on a 24 GB card
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(
                    f"  {name:<12} out of GPU memory (peak {peak:.1f} GiB before failing: "
                    f"{str(error).splitlines()[0][:100]}); "
                    f"comparisons using it are skipped",
                    flush=True,
                )
                gc.collect()
                torch.cuda.empty_cache()
                continue
            s = results[name]["seconds"]
            print(
                f"  ran {name:<12} ({describe(results[name]['cfg'])}): rollout {s['rollout']:.3f} s, reward "
                f"{s['reward']:.3f} s, "
                f"train {s['train']:.3f} s per step  [{results[name]['wall']:.0f} s wall]",
                flush=True,
            )
    finally:
        if reward_folder:
            shutil.rmtree(reward_folder, ignore_errors=True)
    comparisons = [c for c in comparisons if c[2] in results and c[3] in results]
    if not results:
        return
    if comparisons:
        print_comparisons(results, comparisons, args)
    print_throughput_table(results, args, per_input, device)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


def print_comparisons(results, comparisons, args):
    """The seconds by phase next to the count of transformer forwards, and the ratio of each comparison."""
    flops = next((r["flops"] for r in results.values() if r["flops"]), None)
    units = {name: forward_units(r, flops, args.beta) for name, r in results.items()}

    print("\nSeconds per step by phase (mean of steps 2..%d); work in transformer forwards on one input" % args.steps)
    rows = []
    for name, r in results.items():
        s, u = r["seconds"], units[name]
        rows.append(
            [
                name,
                describe(r["cfg"]),
                f"{s['rollout']:.3f}",
                f"{s['reward']:.3f}",
                f"{s['train']:.3f}",
                f"{sum(s.values()):.3f}",
                f"{u['rollout']:.0f}",
                f"{u['train']:.0f}",
                f"{1e3 * s['rollout'] / u['rollout']:.2f}",
                f"{1e3 * s['train'] / u['train']:.2f}",
            ]
        )
    print(
        table(
            [
                "config",
                "settings",
                "rollout s",
                "reward s",
                "train s",
                "total s",
                "roll fwd",
                "train fwd",
                "ms/fwd roll",
                "ms/fwd train",
            ],
            rows,
        )
    )

    print("\nRatios: measured seconds vs expected from counting transformer forwards (backward = 2 forwards)")
    rows, notes = [], []
    for key, title, num, den in comparisons:
        for phase in PHASES:
            measured = results[num]["seconds"][phase] / max(results[den]["seconds"][phase], 1e-9)
            expected = units[num][phase] / units[den][phase]
            flag = ""
            if abs(measured / expected - 1) > TOLERANCE:
                flag = f"[{len(notes) + 1}]"
                reason = (
                    REWARD_REASON
                    if phase == "reward"
                    else REASONS[(key, phase, "low" if measured < expected else "high")]
                )
                notes.append(f"{flag} {title}, {phase}: measured {measured:.2f} vs {expected:.2f}: {reason}")
            rows.append(
                [
                    title if phase == "rollout" else "",
                    phase,
                    f"{num} / {den}",
                    f"{measured:.2f}",
                    f"{expected:.2f}",
                    flag,
                ]
            )
    print(table(["comparison", "phase", "configs", "measured", "expected", "note"], rows, left=3))
    for note in notes:
        print(note)

    print(
        "\nHow 'expected' is counted: rollout = batches x T x inputs (+ live text encoding), inputs = "
        "batch, x2 with CFG;"
    )
    print(
        "train = batches x trained steps x inputs x (forward + backward + reference forward when beta > 0); "
        "reward = same work."
    )
    if flops:
        print(
            f"FLOP counter: one transformer forward on one input = {flops['forward_per_input'] / 1e6:.2f} "
            f"MFLOP; live text "
            f"encoding of one batch = {flops['text_True'] / flops['forward_per_input']:.1f} forwards with CFG, "
            f"{flops['text_False'] / flops['forward_per_input']:.1f} without; a backward = "
            f"{flops['backward_in_forwards']:.2f} forwards (frozen base: no weight gradients; it cancels in "
            f"every ratio)."
        )
    trained = {n: r["trained"] for n, r in results.items()}
    print(
        f"Trained steps per batch: {', '.join(f'{n} {t:g}' for n, t in trained.items())} "
        f"(train_fraction 0.99 leaves the last step out; the window trains its K steps)."
    )
    skipped = [n for n, r in results.items() if r["skipped"]]
    if skipped:
        print(
            f"warning: {', '.join(skipped)}: an update was skipped (all groups had equal rewards): its "
            f"train time is not representative"
        )
    per_forward = [1e3 * r["seconds"][p] / units[n][p] for n, r in results.items() for p in ("rollout", "train")]
    print(
        f"Seconds per forward-equivalent range {min(per_forward):.2f}-{max(per_forward):.2f} ms over all "
        f"configurations and "
        f"phases: the closer to constant, the better the forward count predicts time. Where it is not (a tiny model "
        f"with small batches), per-op Python/dispatch overhead, not FLOPs, sets the time: batch size and CFG then cost "
        f"less than counted, and fixed per-step costs (text encoding, optimizer steps) weigh more."
    )


def count_per_input_flops(args):
    """FLOPs per transformer input (transformer_flops) on a fresh copy of the model: the tiny one, or SD3.5-Medium on
    the meta device (no memory, no time on the GPU). None for a model folder of another shape."""
    if args.model == "tiny":
        pipe = fg.build_tiny_pipeline()
    elif args.model in MODELS:
        pipe = MODELS[args.model]["build"]("meta")
    else:
        return None
    return transformer_flops(
        pipe, fg.Config(**{**recipe_of(args.model), "model": args.model, "resolution": args.resolution})
    )


def uses_cfg(cfg):
    """Whether a guidance scale above 1 doubles the transformer's inputs: SD3's classifier-free guidance does; FLUX.1
    takes the scale as an input of the network (flow_grpo.FluxPolicy), one input per image."""
    return cfg.guidance_scale > 1 and not fg.is_flux(cfg.model)


def transformer_inputs(cfg):
    return cfg.batch_size * (2 if uses_cfg(cfg) else 1)


def step_shape(cfg, steps=(0,)):
    """Rollout batches per step, transformer inputs per forward (x2 with CFG), trained steps per batch (mean over
    `steps`; a --sde-window trains its K steps wherever each batch's window falls)."""
    trained = [len(fg.sde_and_trained_steps(cfg, fg.seeded(cfg.seed, step))[1]) for step in steps]
    return {
        "cfg": cfg,
        "batches": cfg.groups_per_step * cfg.group_size // cfg.batch_size,
        "inputs": transformer_inputs(cfg),
        "trained": sum(trained) / len(trained),
    }


def print_throughput_table(results, args, per_input, device):
    """Per configuration: seconds, images/s, the transformer's TFLOP/s (and fraction of the device's peak), GPU memory
    as train() logs it, and the first step's extra time."""
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = peak_tflops(name, args.peak_tflops) if cuda else (args.peak_tflops or None)

    def rate(flops, seconds):
        if per_input is None:
            return "-"
        tflops = flops / max(seconds, 1e-9) / 1e12
        return f"{tflops:.3g}" + (f" ({100 * tflops / peak:.0f}%)" if peak else "")

    def gib(r, key):
        return f"{r['memory'][key]:.2f}" if key in r["memory"] else "-"

    rows = []
    for config, r in results.items():
        s, cfg = r["seconds"], r["cfg"]
        flops = step_flops(r, per_input, args.beta) if per_input else {"rollout": 0, "train": 0}
        step = sum(s.values())
        rows.append(
            [
                config,
                describe(cfg),
                f"{s['rollout']:.3f}",
                f"{s['reward']:.3f}",
                f"{s['train']:.3f}",
                f"{step:.3f}",
                f"{cfg.groups_per_step * cfg.group_size / step:.3g}",
                rate(flops["rollout"], s["rollout"]),
                rate(flops["train"], s["train"]),
                rate(flops["rollout"] + flops["train"], step),
                gib(r, "gpu_allocated_peak_gib"),
                gib(r, "gpu_reserved_peak_gib"),
                gib(r, "gpu_device_used_gib"),
                f"{r['warmup']:.1f}",
                f"{r['compile']:.1f}" if r["compile"] else "-",
            ]
        )
    peak_text = f", peak {peak:g} TFLOP/s dense bf16" if peak else ", peak unknown (--peak-tflops)" if cuda else ""
    print(
        f"\nPer configuration on {name}{peak_text}: mean of steps 2..{args.steps}, {args.model}, {args.resolution} px"
    )
    print(
        table(
            [
                "config",
                "settings",
                "rollout s",
                "reward s",
                "train s",
                "step s",
                "images/s",
                "rollout TFLOP/s",
                "train TFLOP/s",
                "step TFLOP/s",
                "alloc GiB",
                "reserved GiB",
                "device GiB",
                "step-1 extra s",
                "compile s",
            ],
            rows,
        )
    )
    if per_input:
        print(
            f"TFLOP/s: the transformer's FLOPs (torch.utils.flop_counter, one input of {per_input['text_tokens']} "
            f"text tokens: "
            f"forward {per_input['policy'] / 1e9:.4g} GFLOP, forward + backward "
            f"{per_input['train'] / 1e9:.4g}, reference "
            f"forward {per_input['reference'] / 1e9:.4g}; checkpointing's recomputation not counted) over the phase's "
            f"seconds; rollout = batches x T x inputs forwards, train = batches x trained steps x inputs x (forward + "
            f"backward{' + reference' if args.beta > 0 else ''}); text encoders, VAE and reward not counted."
        )
    if cuda:
        print(
            "GiB: the largest over the run's steps of what train() logs in metrics.jsonl: peak allocated and peak "
            "reserved (torch.cuda.max_memory_*, reset each step), and the device's memory in use at the end of the "
            "step (torch.cuda.mem_get_info: the CUDA context and the allocator's cache included, as nvidia-smi)."
        )
    print(
        "step-1 extra: the first step's seconds minus the mean of the others (compilation, kernel autotuning, the "
        "allocator growing its cache)."
    )


def dry_run(args):
    """Build --model (SD3.5-Medium by default, or FLUX.1-dev) and PickScore on the meta device, print their parameter
    counts and the FLOPs of one step; for FLUX.1-dev also the memory of one 80 GB GPU (flux_memory)."""
    started = time.perf_counter()
    model = MODELS[args.model]
    pipe = model["build"]("meta")
    pickscore, _ = build_pickscore("meta")
    counts = parameter_counts(pipe, pickscore)
    table_rows = [[name, f"{n / 1e9:.3f} B", f"{2 * n / 1e9:.2f}"] for name, n in counts.items()]
    table_rows.append(["total", f"{sum(counts.values()) / 1e9:.3f} B", f"{2 * sum(counts.values()) / 1e9:.2f}"])
    print(
        f"{model['title']} and PickScore from their published configs, built on the meta device (shapes only) "
        f"in {time.perf_counter() - started:.1f} s:"
    )
    print(table(["component", "parameters", "bf16 GB"], table_rows, left=1))
    flux = type(pipe).__name__ == "FluxPipeline"
    if not flux:
        table_size = pipe.transformer.pos_embed.pos_embed.numel()
        print(f"(+ the transformer's position table, a buffer: {table_size / 1e9:.3f} B values)")
    with tempfile.TemporaryDirectory() as folder:
        cfg = make_config(args, RECIPES["default"], folder)
    per_input = transformer_flops(pipe, cfg)
    shape = step_shape(cfg)
    flops = step_flops(shape, per_input, args.beta)
    inputs = shape["inputs"]
    how = "guidance embedding, no CFG" if flux else "CFG" if uses_cfg(cfg) else "no CFG"
    print(
        f"\nTransformer FLOPs (torch.utils.flop_counter on the meta device, LoRA r={cfg.lora_rank}), "
        f"{cfg.resolution} px, "
        f"{per_input['text_tokens']} text tokens: one forward of {inputs} inputs (batch {cfg.batch_size}, {how}) "
        f"{inputs * per_input['policy'] / 1e12:.2f} TFLOP, forward + backward {inputs * per_input['train'] / 1e12:.2f} "
        f"TFLOP, reference forward {inputs * per_input['reference'] / 1e12:.2f} TFLOP"
        f"{' (not run: beta 0)' if args.beta == 0 else ''}."
    )
    peak = args.peak_tflops or dict(PEAK_TFLOPS)["H100"]
    total = flops["rollout"] + flops["train"]
    print(
        f"One step of {cfg.groups_per_step * cfg.group_size} images (T={cfg.num_steps}, {shape['batches']} batches, "
        f"{shape['trained']:g} trained steps each, beta {args.beta:g}): rollout {flops['rollout'] / 1e12:.0f} TFLOP, "
        f"train {flops['train'] / 1e12:.0f} TFLOP; at {peak:g} TFLOP/s "
        f"({'--peak-tflops' if args.peak_tflops else 'an H100'}) no faster than {total / peak / 1e12:.2f} s."
    )
    if flux:
        lora = sum(p.numel() for p in pipe.transformer.parameters() if p.requires_grad)  # transformer_flops added it
        flux_memory(pipe, cfg, counts, lora)


@contextlib.contextmanager
def flash_attention_on_meta():
    """The meta device has no fused attention of its own: torch's SDPA falls back there to the math kernel, which
    saves the [heads, tokens, tokens] probabilities for the backward. The CPU (and CUDA's flash and memory-efficient
    kernels) save q, k, v, the output and the log-sum-exp instead: run the CPU's flash kernel, which has a meta
    implementation, for unmasked attention on meta tensors, so that the saved tensors are the ones a real run keeps."""
    functional = torch.nn.functional
    native = functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.is_meta and attn_mask is None and not dropout_p and not kwargs.get("enable_gqa"):
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, is_causal=is_causal, scale=scale
            )[0]
        return native(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs
        )

    functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = native


def block_activations(cfg, latent_shape, device="meta", width=None):
    """Bytes kept for the backward by one training forward of one input, per FLUX block: a FluxTransformer2DModel with
    FLUX.1-dev's settings (or `width`: {attention_head_dim, num_attention_heads}) but ONE double-stream and ONE
    single-stream block, with the run's LoRA (flow_grpo.add_lora, r and targets as train() uses them, bf16 arithmetic),
    in bf16 on `device`, the velocity of flow_grpo.FluxPolicy at latent_shape with 128 T5 tokens. Counted with
    torch.autograd.graph.saved_tensors_hooks: each tensor saved for the backward, once per storage (a view keeps its
    whole storage alive; one saved by several ops counts once), not the model's parameters, attributed to the block
    whose forward is running ("outside": the embedders and the final layer). On meta (no memory, no time) with the
    flash kernel a CPU or GPU picks (flash_attention_on_meta); on "cpu" with real tensors."""
    from diffusers import FluxTransformer2DModel

    settings = {**FLUX1_DEV["transformer"], **(width or {}), "num_layers": 1, "num_single_layers": 1}
    torch.manual_seed(0)
    with building_on(device, torch.bfloat16):
        transformer = as_loaded(FluxTransformer2DModel(**settings), torch.bfloat16, None)
        model, _ = fg.add_lora(transformer, cfg, targets=fg.FLUX_LORA_TARGETS)
        x = torch.randn(1, *latent_shape)
        text = fg.TextEmbeddings(
            torch.randn(1, FLUX_TEXT_TOKENS, settings["joint_attention_dim"]),
            torch.randn(1, settings["pooled_projection_dim"]),
        )
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    running, saved = ["outside"], {"double": {}, "single": {}, "outside": {}}
    for name, block in (
        ("double", transformer.transformer_blocks[0]),
        ("single", transformer.single_transformer_blocks[0]),
    ):
        block.register_forward_pre_hook(lambda module, inputs, name=name: running.__setitem__(0, name))
        block.register_forward_hook(lambda module, inputs, output: running.__setitem__(0, "outside"))

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[running[0]][storage._cdata] = storage.nbytes()
        return tensor

    velocity = fg.FluxPolicy(None, 0).velocity  # needs only the transformer: no pipeline
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), flash_attention_on_meta():
        velocity(model, x.float(), torch.tensor(500.0, device=device), text, cfg.guidance_scale)
    return {name: sum(storages.values()) for name, storages in saved.items()}


def flux_memory(pipe, cfg, counts, lora):
    """What one training step of FLUX.1-dev holds on one GPU at cfg's batch (the official 3 at 512 px), computed from
    the parameter counts and block_activations (a forward of one double and one single block, scaled by the 19 and 38
    blocks and the batch; no CFG: one input per image): printed for the four settings of --precompute-text-embeds
    (the text encoders freed after encoding) and --gradient-checkpointing (each block keeps only its input, and one
    block's activations are rebuilt at a time in the backward). Returns the bytes: per block kind, per input, and
    the peak of each setting."""
    config = pipe.transformer.config
    latent = fg.model_policy(pipe, cfg.resolution).latent_shape()
    image_tokens = latent[1] * latent[2] // 4  # packed 2x2 patches
    tokens = image_tokens + FLUX_TEXT_TOKENS
    kept = block_activations(cfg, latent)
    width = config.num_attention_heads * config.attention_head_dim
    block_input = tokens * width * 2  # bf16 hidden states of the image and text tokens entering a block
    blocks = config.num_layers + config.num_single_layers
    full = config.num_layers * kept["double"] + config.num_single_layers * kept["single"] + kept["outside"]
    checkpointed = blocks * block_input + kept["outside"] + max(kept["double"], kept["single"])
    batch = cfg.batch_size
    gb = 1e9
    rows = [
        ["transformer", "bf16", 2 * counts["transformer"]],
        [
            "T5-XXL + CLIP-L (freed by --precompute-text-embeds)",
            "bf16",
            2 * (counts["T5-XXL encoder"] + counts["CLIP-L"]),
        ],
        ["VAE", "fp32", 4 * counts["VAE"]],
        ["PickScore (CLIP-H)", "fp32", 4 * counts["PickScore (CLIP-H)"]],
        [f"LoRA r={cfg.lora_rank}: {lora / 1e6:.1f} M: weights, grads, AdamW 2 moments, EMA", "fp32 x 5", 20 * lora],
    ]
    fixed = sum(r[2] for r in rows)
    text = rows[1][2]
    print(
        f"\nMemory of one training step on one GPU (computed, not measured on a GPU): FLUX.1-dev, batch {batch} x "
        f"{cfg.resolution} px ({image_tokens} image + {FLUX_TEXT_TOKENS} text tokens per input, one input per image)"
    )
    print(table(["component", "dtype", "GB"], [[a, b, f"{c / gb:.2f}"] for a, b, c in rows], left=2))
    print(
        f"Activations kept for the backward, per input (saved-tensor hooks on one block of each kind at width {width}, "
        f"LoRA r={cfg.lora_rank}, bf16, meta device): double block {kept['double'] / 2**20:.1f} MiB, single block "
        f"{kept['single'] / 2**20:.1f} MiB, embedders and final layer {kept['outside'] / 2**20:.1f} MiB; "
        f"{config.num_layers} x double + {config.num_single_layers} x single = {full / gb:.2f} GB; "
        f"with --gradient-checkpointing {blocks} block inputs x {block_input / 2**20:.2f} MiB + one block rebuilt "
        f"= {checkpointed / gb:.2f} GB."
    )
    settings = [
        ("live text", False, False),
        ("--gradient-checkpointing", False, True),
        ("--precompute-text-embeds", True, False),
        ("both (40gb recipe)", True, True),
    ]
    peaks, rows = {}, []
    for name, precomputed, checkpointing in settings:
        activations = batch * (checkpointed if checkpointing else full)
        peaks[name] = fixed - (text if precomputed else 0) + activations
        rows.append([name, f"{activations / gb:.1f}", f"{peaks[name] / gb:.1f}"])
    print(table([f"batch {batch}", "activations GB", "peak GB"], rows, left=1))
    print(
        "peak = weights + LoRA state + activations; add the CUDA context and the allocator's slack (1-2 GB for SD3.5, "
        "docs/scale_and_memory.md). Rollout and reward run without gradients, one block or model at a time, never "
        "next to the activations."
    )
    return {"kept": kept, "per_input": full, "per_input_checkpointed": checkpointed, "peaks": peaks}


if __name__ == "__main__":
    main()

"""Reward models for Flow-GRPO: the formulas first, then their weighted sum (``Reward``), then parsing and loading
(``load_reward("pickscore=1,aesthetic=0.2")``), then the rewards served by another process over HTTP (GenEval's
reward server, VLM judges). Only torch, PIL and the standard library are imported here; transformers,
huggingface_hub, safetensors and rapidocr_onnxruntime when a reward that needs them is loaded."""

from __future__ import annotations

import base64
import functools
import http.client
import importlib
import inspect
import io
import json
import math
import os
import pickle
import re
import sys
import threading
import time
import urllib.parse
from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image

RewardFn = Callable[[list, list], object]
COLOUR_CHANNELS = {"redness": 0, "greenness": 1, "blueness": 2}
PICKSCORE_SCALE, CLIPSCORE_SCALE = 26.0, 30.0  # clip_similarity's scale for PickScore, for CLIPScore


# =========================================================================== the formulas
def jpeg_compressibility(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r = -(JPEG size in kB at quality 95) / 500, 1 kB = 1000 bytes: small files (flat images) score high."""
    buffers = [io.BytesIO() for _ in images]
    for image, buffer in zip(images, buffers):
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return torch.tensor([-(buffer.tell() / 1000) / 500 for buffer in buffers], dtype=torch.float32)


def jpeg_incompressibility(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r = +(JPEG size in kB at quality 95) / 500, the negative of jpeg_compressibility."""
    return -jpeg_compressibility(images, prompts)


def colour_excess(channel: int, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r = mean over pixels of (C - (C' + C'') / 2) / 255, C the channel's 8-bit value and C', C'' the
    other two: +1 for a pure colour, -0.5 for its complement, 0 for any grey."""
    scores = []
    for image in images:
        pixels = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).view(-1, 3).double()
        others = pixels.sum(dim=1) - pixels[:, channel]
        scores.append(((pixels[:, channel] - others / 2) / 255).mean())
    return torch.stack(scores).float() if scores else torch.zeros(0)


@torch.no_grad()
def clip_image_embeds(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """v / ||v||, the L2-normalised projected image embeddings, shape [N, D]."""
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    embeds = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype))
    embeds = getattr(embeds, "pooler_output", embeds)  # transformers 5 returns an output object, 4 the tensor
    return embeds / embeds.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_similarity(model, processor, scale: float, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r_i = exp(logit_scale) * <t_i, v_i> / scale, t_i and v_i the L2-normalised projected embeddings of prompt i
    (truncated to the model's 77 tokens) and of image i. PickScore: PickScore's CLIP-H, scale 26; CLIPScore:
    CLIP-L/14, scale 30 (the diagonal of logits_per_image / 30)."""
    image = clip_image_embeds(model, processor, images)
    max_length = model.config.text_config.max_position_embeddings
    tokens = processor.tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    tokens = tokens.to(model.device)
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    text = getattr(text, "pooler_output", text)
    text = text / text.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * (text * image).sum(dim=-1) / scale).float().cpu()


class AestheticMLP(torch.nn.Module):
    """LAION improved aesthetic predictor head: in_dim-1024-128-64-16-1, no activations. The dropouts sit where
    the original's do, so its state dict (layers.0/2/4/6/7) loads."""

    def __init__(self, in_dim: int = 768):
        super().__init__()
        L, D = torch.nn.Linear, torch.nn.Dropout
        self.layers = torch.nn.Sequential(
            L(in_dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64), D(0.1), L(64, 16), L(16, 1)
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


@torch.no_grad()
def aesthetic_score(model, processor, mlp: AestheticMLP, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r = MLP(v / ||v||) with v the CLIP-L/14 image embedding: the raw MLP output, roughly 1..10."""
    return mlp(clip_image_embeds(model, processor, images).to(torch.float32)).squeeze(1).float().cpu()


# The official OCR reward (official `flow_grpo/ocr.py`, `OcrScorer.__call__`) has the rule of ocr_target and
# ocr_similarity, the recognised lines joined without separator in reading order (top to bottom, left to right).
# Where this one differs:
# - Engine: rapidocr-onnxruntime runs PP-OCRv4 detection and recognition (the Chinese+English models its wheel ships,
#   so no download) through onnxruntime; the official runs PaddleOCR(lang="en", use_angle_cls=False), i.e. PaddleOCR's
#   English models. No angle classifier in either. Both keep lines with a recognition score >= 0.5 (rapidocr's
#   text_score, PaddleOCR's drop_score defaults).
# - Colour order: the official passes np.array(PIL image), i.e. RGB, where PaddleOCR expects OpenCV's BGR; here the
#   PIL image is passed and rapidocr converts it to BGR itself.
# - A prompt without a quoted text (or with an empty one) is an error naming the prompt, not an IndexError (or a
#   division by zero); an OCR failure is raised, where the official prints it and scores 0, because a silent 0
#   would train on a wrong reward.


def ocr_target(prompt: str) -> str:
    """The text the image should show: what stands between the prompt's first pair of double quotes."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].replace(" ", ""):
        raise ValueError(
            f"reward 'ocr': prompt {prompt!r} has no text between double quotes; "
            'quote the text the image should show, e.g. a shop sign that says "OPEN"'
        )
    return parts[1]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_similarity(recognized: str, target: str) -> float:
    """r = 1 if target is in recognized, else 1 - min(d, L) / L (d edit distance, L = len(target));
    both with spaces removed and lower-cased. The cap at L keeps r >= 0 when the OCR reads extra text."""
    recognized, target = recognized.replace(" ", "").lower(), target.replace(" ", "").lower()
    return 1.0 if target in recognized else 1.0 - min(edit_distance(recognized, target), len(target)) / len(target)


class OcrReward:
    """r_i = ocr_similarity(the text OCR reads in image i, ocr_target(prompt i)); the OCR engine is built once.
    onnxruntime gets torch's thread count (so OMP_NUM_THREADS / torch.set_num_threads govern both): its default of
    one thread per core fights torch's threads for the same cores."""

    def __init__(self):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise RewardModelUnavailable(
                "reward 'ocr' needs the OCR package, which is not installed: pip install rapidocr-onnxruntime"
            ) from None
        self.engine = RapidOCR(use_cls=False, intra_op_num_threads=torch.get_num_threads(), inter_op_num_threads=1)

    def recognize(self, image: Image.Image) -> str:
        """The recognised lines of one image, joined in reading order ("" when none)."""
        lines, _ = self.engine(image.convert("RGB"), use_cls=False)
        return "".join(line[1] for line in lines or [])

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        targets = [ocr_target(prompt) for prompt in prompts]  # a bad prompt fails before any slow OCR
        scores = [ocr_similarity(self.recognize(image), target) for image, target in zip(images, targets)]
        return torch.tensor(scores, dtype=torch.float32)


def takes_metadata(fn) -> bool:
    """Whether a reward function accepts the prompts' metadata: a parameter named `metadata` (or **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "metadata" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


class Reward:
    """r = sum_k w_k * r_k over the components (name_k, w_k, r_k). ``reward(images, prompts, metadata)`` calls each
    component once with the whole batch and returns ``{name_k: r_k, ..., "reward": r}``, float32 CPU tensors of shape
    [N]. A component is ``fn(images, prompts)``, or ``fn(images, prompts, metadata=...)`` to receive each image's
    prompt metadata (a dict per image: the prompt's JSON Lines object, {} for plain text prompts). A component may
    return a dict of columns instead: the one under its own name is r_k, the others (listed in its ``logged``
    attribute) are logged beside it."""

    def __init__(self, components: Sequence[tuple[str, float, RewardFn]]):
        self.components = list(components)
        self.names = [n for name, _, fn in self.components for n in (name, *getattr(fn, "logged", ()))]

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> dict:
        if isinstance(images, torch.Tensor):  # [N, 3, H, W], uint8 or floats in [0, 1]
            x = images.detach().cpu()
            if x.dtype != torch.uint8:  # round(255 * x) clamped to [0, 255], as in the paper's code
                x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
            images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
        images, prompts = list(images), list(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        n = len(images)
        if len(prompts) != n:
            raise ValueError(f"reward got {n} images but {len(prompts)} prompts; pass one prompt per image")
        if len(metadata) != n:
            raise ValueError(f"reward got {n} images but {len(metadata)} metadata; pass one dict per image")
        out = {}
        for name, _, fn in self.components:
            result = fn(images, prompts, metadata=metadata) if takes_metadata(fn) else fn(images, prompts)
            columns = result if isinstance(result, dict) else {name: result}
            for column in (name, *getattr(fn, "logged", ())):
                out[column] = validate_scores(column, columns.get(column), n)
        total = sum((weight * out[name] for name, weight, _ in self.components), torch.zeros(n, dtype=torch.float32))
        return {**out, "reward": total}


# =========================================================================== parsing, validation and loading
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
# The LAION MLP (sac+logos+ava1-l14-linearMSE.pth) as safetensors; pinned, so a later push cannot change the reward.
AESTHETIC_MLP_REPO = "ttj/sac-logos-ava1-l14-linearMSE"
AESTHETIC_MLP_FILE = "model.safetensors"
AESTHETIC_MLP_REVISION = "1e77fa05081323d99725fc40a9bf9f88180490e7"
# In a local folder model.safetensors holds the CLIP, so the MLP has its own name; the first file found wins.
AESTHETIC_MLP_LOCAL_FILES = (
    "aesthetic_mlp.safetensors",
    "sac+logos+ava1-l14-linearMSE.safetensors",
    "sac+logos+ava1-l14-linearMSE.pth",
)
BUILTIN_REWARDS = ("pickscore", "clipscore", "aesthetic", "jpeg_compressibility", "jpeg_incompressibility", "ocr")
BUILTIN_REWARDS += tuple(COLOUR_CHANNELS) + ("geneval", "vlm")
MODEL_REWARDS = ("pickscore", "clipscore", "aesthetic")  # the ones that can load their model from a local folder
# What a local folder for each model reward must hold (said in error messages).
FOLDER_CONTENTS = {
    "pickscore": f"a CLIPModel ({PICKSCORE_MODEL}) and a CLIPProcessor ({PICKSCORE_PROCESSOR}) "
    "saved together with save_pretrained",
    "clipscore": f"a CLIPModel and CLIPProcessor ({CLIP_L14}) saved with save_pretrained",
    "aesthetic": f"a CLIPModel and CLIPProcessor ({CLIP_L14}) saved with save_pretrained, plus "
    f"{AESTHETIC_MLP_LOCAL_FILES[0]} ({AESTHETIC_MLP_FILE} of {AESTHETIC_MLP_REPO})",
}
VALID_NAMES_HINT = (
    f"valid names: {', '.join(BUILTIN_REWARDS)}, or module:function for your own reward; "
    "write e.g. 'pickscore' or 'pickscore=1,aesthetic=0.2'"
)
# A custom reward is "dotted.module:function"; names only, so parsing never imports anything.
_CUSTOM_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


class RewardModelUnavailable(ValueError):
    """A reward model could not be loaded (no hub access, not cached, or a bad local folder)."""


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """``"name[=weight],..."`` -> ``[(name, weight), ...]``, a missing weight being 1.0; a one-line ValueError for
    an empty spec or item, an unknown name, a malformed custom name, a bad weight or a name given twice."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec; {VALID_NAMES_HINT}")
    parsed: list[tuple[str, float]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise ValueError(f"empty item in reward spec {spec!r} (stray comma?); {VALID_NAMES_HINT}")
        name, has_weight, weight_text = (part.strip() for part in item.partition("="))
        if ":" in name and not _CUSTOM_RE.match(name):
            raise ValueError(
                f"malformed custom reward {name!r} in {spec!r}: write module:function, "
                "e.g. 'mymod:score' or 'pkg.mod:score=0.5'"
            )
        if ":" not in name and name not in BUILTIN_REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; {VALID_NAMES_HINT}")
        try:
            weight = float(weight_text) if has_weight else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(
                f"malformed weight {weight_text!r} for reward {name!r} in {spec!r}: "
                "write name=NUMBER, e.g. 'pickscore=1,aesthetic=0.2'"
            )
        if any(name == seen for seen, _ in parsed):
            raise ValueError(f"reward {name!r} appears twice in {spec!r}; give each reward once with its weight")
        parsed.append((name, weight))
    return parsed


def validate_scores(name: str, scores, n: int) -> torch.Tensor:
    """Turn a component's output into a float32 CPU tensor [n], or raise a one-line ValueError."""
    try:
        tensor = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"reward {name!r} returned {type(scores).__name__}, not numbers ({err}); "
            f"return {n} floats (list, numpy array or tensor)"
        ) from None
    if tuple(tensor.shape) != (n,):
        raise ValueError(f"reward {name!r} returned shape {tuple(tensor.shape)}; expected ({n},), one float per image")
    bad = (~torch.isfinite(tensor)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"reward {name!r} returned non-finite values (NaN/inf) at indices {bad[:8]} of {n}")
    return tensor


def hub_advice(repo_id: str, error: BaseException, local: str) -> str:
    """What to do after loading repo_id from the hub failed with error, told apart by huggingface_hub's exception
    (diffusers and transformers re-raise it as an OSError `from` it, so the whole chain is searched): a gated model
    this account has no access to, an id the hub does not show (a typo, or a gated or private model without a
    login), or a model neither cached nor reachable (offline). `local` is the flag that names a local folder."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    access = f"accept the licence at https://huggingface.co/{repo_id} and log in (`hf auth login`), or pass {local}"
    if any(isinstance(e, GatedRepoError) for e in chain):
        return f"{repo_id} is a gated model and this account has no access to it: {access}"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return f"the hub shows no model {repo_id} to this account: check the id; if it is gated or private, {access}"
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return f"{repo_id} is not in the hub cache and the hub is out of reach (offline?): once online, {access}"
    return f"{repo_id} could not be loaded from the hub: {access}"


def _unavailable(name: str, source: str, err: Exception) -> RewardModelUnavailable:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = f"reward {name!r}: cannot load {source!r} ({type(err).__name__}: {first_line[:120]})"
    if os.path.isdir(source):
        return RewardModelUnavailable(f"{reason}; the folder must hold {FOLDER_CONTENTS[name]}")
    local = f"a local folder with --reward-model-dir {name}=FOLDER holding {FOLDER_CONTENTS[name]}"
    return RewardModelUnavailable(f"{reason}; {hub_advice(source, err, local)}")


def clip_processor(source: str):
    """A CLIPProcessor whose image processor is always the PIL one: transformers 5 loads a torchvision image
    processor whenever torchvision is installed (usual on GPU machines) and a PIL one otherwise; their resizes differ,
    so the same image would score differently in the tests and in a real run. PIL is what the official code ran:
    transformers==4.40.0 (official ``setup.py``), whose CLIPImageProcessor is the PIL one, loaded by
    ``AutoProcessor.from_pretrained`` (official ``flow_grpo/pickscore_scorer.py``, ``PickScoreScorer.__init__``)."""
    import transformers

    # transformers 5 names the PIL backend CLIPImageProcessorPil; in transformers 4 CLIPImageProcessor is PIL.
    pil_image_processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return transformers.CLIPProcessor(
        image_processor=pil_image_processor.from_pretrained(source),
        tokenizer=transformers.AutoTokenizer.from_pretrained(source),
    )


def _load_clip(name: str, model_src: str, processor_src: str, device, cache: dict):
    """Load a frozen float32 CLIPModel and its CLIPProcessor; shared within one load_reward call."""
    key = (model_src, processor_src, str(device))
    if key not in cache:
        from transformers import CLIPModel

        try:
            model = CLIPModel.from_pretrained(model_src, dtype=torch.float32)
            processor = clip_processor(processor_src)
        except (OSError, ValueError) as err:  # offline/uncached -> OSError, bad id -> ValueError
            raise _unavailable(name, model_src, err) from err
        cache[key] = (model.to(device).eval().requires_grad_(False), processor)
    return cache[key]


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read weights without executing pickled code: safetensors, or torch.load(weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _build_aesthetic(device, model_dir: str | None, cache: dict) -> RewardFn:
    model, processor = _load_clip("aesthetic", model_dir or CLIP_L14, model_dir or CLIP_L14, device, cache)
    if model_dir:
        local = [os.path.join(model_dir, filename) for filename in AESTHETIC_MLP_LOCAL_FILES]
        path = next((path for path in local if os.path.isfile(path)), None)
        if path is None:
            raise RewardModelUnavailable(
                f"reward 'aesthetic': no MLP weights in {model_dir!r}; put one of "
                f"{', '.join(AESTHETIC_MLP_LOCAL_FILES)} next to the CLIP model "
                f"(from hub repo {AESTHETIC_MLP_REPO}, file {AESTHETIC_MLP_FILE})"
            )
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(AESTHETIC_MLP_REPO, AESTHETIC_MLP_FILE, revision=AESTHETIC_MLP_REVISION)
        except (OSError, ValueError) as err:
            raise _unavailable("aesthetic", AESTHETIC_MLP_REPO, err) from err
    # The MLP input follows the CLIP projection size (768 for CLIP-L/14), so tiny test CLIPs work too.
    mlp = AestheticMLP(in_dim=model.config.projection_dim)
    mlp.load_state_dict(load_state_dict_file(path))
    return functools.partial(aesthetic_score, model, processor, mlp.to(device).eval().requires_grad_(False))


def _build(name: str, device, model_dir: str | None, cache: dict, servers: ServerOptions) -> RewardFn:
    """The reward function of a built-in name; a model reward loads its model from model_dir, else from the hub;
    a served one talks to the server that servers names."""
    if name == "geneval":
        return GenevalReward(servers)
    if name == "vlm":
        return VlmJudge(servers)
    if name == "pickscore":
        sources = (model_dir, model_dir) if model_dir else (PICKSCORE_MODEL, PICKSCORE_PROCESSOR)
        return functools.partial(clip_similarity, *_load_clip(name, *sources, device, cache), PICKSCORE_SCALE)
    if name == "clipscore":
        source = model_dir or CLIP_L14
        return functools.partial(clip_similarity, *_load_clip(name, source, source, device, cache), CLIPSCORE_SCALE)
    if name == "aesthetic":
        return _build_aesthetic(device, model_dir, cache)
    if name == "ocr":
        return OcrReward()
    if name in COLOUR_CHANNELS:
        return functools.partial(colour_excess, COLOUR_CHANNELS[name])
    return {"jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility}[name]


def load_custom_reward(name: str) -> RewardFn:
    """``module.function`` for a ``module:function`` reward, the module imported here from the working directory,
    the folder of this file (and of flow_grpo.py) or sys.path. ``python /elsewhere/flow_grpo.py`` puts only the
    script's folder on sys.path, ``python -m`` only the working directory: both are searched whichever ran."""
    module_name, _, function_name = name.partition(":")
    saved = list(sys.path)
    sys.path[:0] = [os.getcwd(), os.path.dirname(os.path.abspath(__file__))]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"custom reward {name!r}: cannot import module {module_name!r} ({err}); put it in the working "
            "directory, next to flow_grpo.py or on PYTHONPATH"
        ) from err
    finally:
        sys.path[:] = saved
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(
            f"custom reward {name!r}: module {module_name!r} has no function {function_name!r}; "
            "define fn(images, prompts) (or fn(images, prompts, metadata)) returning one float per image"
        )
    return fn


def load_reward(
    spec: str, device="cpu", model_dirs: dict[str, str] | None = None, servers: ServerOptions | None = None
) -> Reward:
    """A Reward for a spec such as ``"pickscore=1,aesthetic=0.2"``; ``model_dirs`` maps a model reward's name to a
    local folder that replaces its hub ids (FOLDER_CONTENTS); ``servers`` says where the served rewards live (geneval,
    vlm). Rewards on the same CLIP share one copy of it."""
    components = parse_reward_spec(spec)
    model_dirs = dict(model_dirs or {})
    unknown = [k for k in model_dirs if k not in MODEL_REWARDS]
    if unknown:
        raise ValueError(
            f"--reward-model-dir given for {', '.join(map(repr, unknown))}; "
            f"only {', '.join(MODEL_REWARDS)} load models from a folder"
        )
    cache, built = {}, []
    for name, weight in components:
        model_dir = model_dirs.get(name)
        if model_dir and not os.path.isdir(model_dir):
            raise RewardModelUnavailable(
                f"reward {name!r}: local model folder {model_dir!r} does not exist; "
                f"pass an existing folder with --reward-model-dir {name}=FOLDER"
            )
        fn = (
            load_custom_reward(name)
            if ":" in name
            else _build(name, device, model_dir, cache, servers or ServerOptions())
        )
        built.append((name, weight, fn))
    return Reward(built)


# =========================================================================== rewards served by another process (HTTP)
# GenEval's detector (Mask2Former under mmdet) and VLM judges cannot live in this environment: as in the official code
# they run as servers and are called over HTTP, standard library only, with a timeout on every request and bounded
# retries, so that a long run survives a server restart and stops cleanly (resumable) when the server stays away.


class RewardServerError(ValueError):
    """A reward server is unreachable at start, or answered something unusable: one line, exit 2."""


class RewardServerLost(Exception):
    """A reward server stayed unreachable (or kept failing) mid-run for longer than the retry budget."""


class ServerOptions(NamedTuple):
    """Where the served rewards live and how long to wait for them (the --reward-server, --vlm-* flags)."""

    geneval: str = "127.0.0.1:18085"  # the official client's address (`flow_grpo/rewards.py`, `geneval_score`)
    vlm_url: str = "http://127.0.0.1:17140/v1"  # the official `unifiedreward_score_sglang`'s base_url
    vlm_model: str = "UnifiedReward-7b-v1.5"
    vlm_template: str = ""  # a file replacing UNIFIEDREWARD_TEMPLATE
    vlm_concurrency: int = 8
    timeout: float = 120.0  # seconds per request: the official GenEval client's timeout=120
    retry_minutes: float = 10.0


SLOW_REPLY_SECONDS = 15  # a request still unanswered after this long says so: a slow server never waits silently


class HttpEndpoint:
    """POSTs to one server: every request with a timeout; connection failures, timeouts and 5xx answers retried with
    doubling waits (1 s, 2 s, ... at most 60 s) for up to retry_minutes, each wait announced, then RewardServerLost.
    The official client retries HTTP 500 up to 1000 times (`flow_grpo/rewards.py`, `geneval_score`: urllib3 Retry,
    backoff_factor 1): hours, without a word."""

    def __init__(self, url: str, what: str, how_to_start: str, options: ServerOptions):
        self.url, self.what, self.how_to_start = url, what, how_to_start
        self.timeout, self.retry_seconds = options.timeout, 60 * options.retry_minutes

    def post_once(self, body: bytes, headers: dict) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(self.url)
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(parts.hostname, parts.port, timeout=self.timeout)
        notice = threading.Timer(
            SLOW_REPLY_SECONDS,
            lambda: print(
                f"waiting for the {self.what} at {self.url} (no answer after {SLOW_REPLY_SECONDS}s)...",
                file=sys.stderr,
                flush=True,
            ),
        )
        notice.daemon = True
        notice.start()
        try:
            connection.request("POST", parts.path or "/", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            notice.cancel()
            connection.close()

    def post(self, body: bytes, headers: dict, retry: bool = True) -> bytes:
        """The answer's body; retry=False (the check at start) fails at once with how to start the server."""
        deadline, wait = time.monotonic() + self.retry_seconds, 1.0
        while True:
            try:
                status, answer = self.post_once(body, headers)
                if status == 200:
                    return answer
                last_line = (answer.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
                problem = f"HTTP {status}: {last_line}"
                if status < 500:  # the request itself is wrong: repeating it cannot help
                    raise RewardServerError(f"the {self.what} at {self.url} refused the request ({problem})")
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut off
                problem = f"{type(error).__name__}: {error}"
            if not retry:
                raise RewardServerError(f"cannot use the {self.what} at {self.url} ({problem}): {self.how_to_start}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RewardServerLost(
                    f"the {self.what} at {self.url} failed for {self.retry_seconds / 60:g} min "
                    f"(--reward-retry-minutes; last: {problem})"
                )
            print(
                f"waiting for the {self.what} at {self.url} ({problem}): retrying in {min(wait, left):.0f}s, "
                f"giving up in {left / 60:.1f} min",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(min(wait, left))
            wait = min(2 * wait, 60.0)


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and bytes only: they have opcodes of their own, whereas anything
    that could run code (a class, a function to call) must be looked up by name, here refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def plain_loads(data: bytes, source: str):
    """A pickle from a server, decoded by PlainUnpickler: a compromised or wrong server cannot run code here."""
    try:
        return PlainUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # untrusted bytes can fail in many ways; each is the server's fault
        raise RewardServerError(
            f"refused the answer of {source}: a reward server must answer a pickle of plain containers, numbers and "
            f"strings, and this one is not ({type(error).__name__}: {error})"
        ) from None


def jpeg_bytes(image: Image.Image) -> bytes:
    """PIL's JPEG at its default quality (75), as the official client compresses every image before sending it."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_REQUEST_SIZE = 64  # images per request, as the official client
GENEVAL_HOW_TO_START = (
    'start it with gunicorn "app_geneval:create_app()" in a checkout of yifan123/reward-server (docs/geneval.md), '
    "or pass its address with --reward-server HOST:PORT"
)
# A line of the official dataset/geneval/test_metadata.jsonl, sent with a grey image to check the server at start.
GENEVAL_PROBE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}


class GenevalReward:
    """GenEval through the official reward server (yifan123/reward-server, `app_geneval.py`; protocol of the official
    client `flow_grpo/rewards.py`, `geneval_score`): a POST of pickle.dumps({"images": JPEG bytes, "meta_datas": each
    image's metadata, "only_strict": bool}), answered by a pickle of {"scores", "rewards", "strict_rewards",
    "group_rewards", "group_strict_rewards"}.

    The training reward is "scores", the partial credit of `evaluate_reward` in the server's `gen_eval.py` (the mean
    over the prompt's clauses of 1 - |expected - found| / expected): the official `multi_score` weights exactly this
    one. Logged beside it: geneval_strict ("strict_rewards", 1 when every clause holds), geneval_accuracy ("rewards",
    GenEval's own check, the paper's metric) and geneval_TAG (1 when the image is of TAG and correct; the server pads
    other tags with -10, which counts as 0 here), from which geneval_summary computes the paper's GenEval score.
    Deviation: only_strict is always False. The official training sends True, which only spares the server GenEval's
    own check (its "rewards" then read 0); sending False costs that check and logs the paper's accuracy every step."""

    logged = ("geneval_strict", "geneval_accuracy", *(f"geneval_{tag}" for tag in GENEVAL_TAGS))

    def __init__(self, options: ServerOptions):
        self.endpoint = HttpEndpoint(
            f"http://{options.geneval}/", "GenEval reward server", GENEVAL_HOW_TO_START, options
        )

    def request(self, images, metadata, retry: bool = True) -> dict:
        body = pickle.dumps(
            {"images": [jpeg_bytes(i) for i in images], "meta_datas": list(metadata), "only_strict": False}
        )
        answer = plain_loads(self.endpoint.post(body, {"Content-Type": "application/octet-stream"}, retry), self.source)
        n = len(images)
        lists = ("scores", "rewards", "strict_rewards")
        wrong = not isinstance(answer, dict) or any(not isinstance(answer.get(k), list) for k in lists)
        wrong = wrong or not isinstance(answer.get("group_rewards"), dict)
        if wrong or any(len(answer[k]) != n for k in lists):
            got = (
                {k: len(v) if isinstance(v, (list, dict)) else type(v).__name__ for k, v in answer.items()}
                if isinstance(answer, dict)
                else type(answer).__name__
            )
            raise RewardServerError(
                f"the answer of {self.source} is not the reward server's: expected lists 'scores', 'rewards', "
                f"'strict_rewards' of {n} numbers and a dict 'group_rewards', got {got}: {GENEVAL_HOW_TO_START}"
            )
        return answer

    @property
    def source(self) -> str:
        return f"the GenEval reward server at {self.endpoint.url}"

    def probe(self):
        """One grey image with a real GenEval line, no retries: fails at start with how to start the server."""
        self.request([Image.new("RGB", (64, 64), (128, 128, 128))], [GENEVAL_PROBE], retry=False)

    def __call__(self, images, prompts, metadata) -> dict:
        missing = [i for i, m in enumerate(metadata) if not isinstance(m, dict) or "tag" not in m]
        if missing:
            raise ValueError(
                f"reward 'geneval' needs each prompt's GenEval metadata ('tag', 'include', ...), and prompt "
                f"{prompts[missing[0]]!r} has none: pass --prompts and --eval-prompts as .jsonl files "
                "(the official dataset/geneval/train_metadata.jsonl and test_metadata.jsonl)"
            )
        columns = {name: [] for name in ("geneval", *self.logged)}
        for start in range(0, len(images), GENEVAL_REQUEST_SIZE):
            chunk = slice(start, start + GENEVAL_REQUEST_SIZE)
            answer = self.request(images[chunk], metadata[chunk])
            n = len(answer["scores"])
            columns["geneval"] += answer["scores"]
            columns["geneval_strict"] += answer["strict_rewards"]
            columns["geneval_accuracy"] += answer["rewards"]
            for tag in GENEVAL_TAGS:
                values = answer["group_rewards"].get(tag, [-10.0] * n)
                columns[f"geneval_{tag}"] += [max(v, 0.0) for v in values] if len(values) == n else values
        return columns


def geneval_summary(means: dict, metadata: Sequence[dict], prefix: str = "eval_") -> dict:
    """The GenEval score the paper reports, from the means over the evaluation images that evaluate() returns:
    the accuracy of each tag (its images found correct, over its images; mean(geneval_TAG) x N / N_TAG), and their
    mean over the tags (GenEval's overall score: the six tasks weigh equally, whatever their prompt counts); over the
    tags present when the evaluation prompts hold fewer than six."""
    counts = {tag: sum(m.get("tag") == tag for m in metadata) for tag in GENEVAL_TAGS}
    accuracy = {
        tag: means[f"{prefix}geneval_{tag}"] * len(metadata) / counts[tag]
        for tag in GENEVAL_TAGS
        if counts[tag] and f"{prefix}geneval_{tag}" in means
    }
    if not accuracy:
        return {}
    summary = {f"{prefix}geneval_{tag}_accuracy": value for tag, value in accuracy.items()}
    return {f"{prefix}geneval_score": sum(accuracy.values()) / len(accuracy), **summary}


def check_servers(spec: str, options: ServerOptions):
    """Ask each served reward of the spec once, without retries: RewardServerError, with how to start it, if one is
    down or answers something else. Called before the model loads and before anything is written."""
    names = [name for name, _ in parse_reward_spec(spec)]
    if "geneval" in names:
        GenevalReward(options).probe()
    if "vlm" in names:
        VlmJudge(options).probe()


# The official UnifiedReward question (`flow_grpo/rewards.py`, `unifiedreward_score_sglang`, `evaluate_image`),
# word for word: the judge was trained on it. {prompt} is replaced by the image's prompt.
UNIFIEDREWARD_TEMPLATE = (
    "<image>\nYou are given a text caption and a generated image based on that caption. Your task is to evaluate "
    "this image based on two key criteria:\n1. Alignment with the Caption: Assess how well this image aligns with the "
    "provided caption. Consider the accuracy of depicted objects, their relationships, and attributes as described in "
    "the caption.\n2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail "
    "preservation, color accuracy, and overall aesthetic appeal.\nBased on the above criteria, assign a score from 1 "
    "to 5 after 'Final Score:'.\nYour task is provided as follows:\nText Caption: [{prompt}]"
)
VLM_API_KEY_ENV = "VLM_API_KEY"  # the key is read from the environment only: a flag would land in config.json
VLM_FINAL_SCORE = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")  # the official `_extract_scores` pattern
VLM_IMAGE_SIDE = 512  # the official judge sees every image resized to 512 x 512
VLM_HOW_TO_START = (
    "start an OpenAI-compatible server (vLLM or sglang, docs/geneval.md), or pass its URL with --vlm-url "
    "and its model name with --vlm-model"
)


def vlm_score(reply: bytes, source: str) -> float:
    """A chat completion's judgement as the official code reads it (`unifiedreward_score_sglang`, `_extract_scores`,
    then `/ 5.0`): the first number after "Final Score:" matching [1-5](.digits)?, divided by 5. The official code
    scores a reply without one 0, which would train on a judge's failure: here it is an error naming the reply."""
    try:
        content = json.loads(reply)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        text = reply[:200].decode("utf-8", "replace")
        raise RewardServerError(
            f"{source} answered no chat completion (no choices[0].message.content in {text!r}): {VLM_HOW_TO_START}"
        ) from None
    match = VLM_FINAL_SCORE.search(content) if isinstance(content, str) else None
    if match is None:
        raise RewardServerError(
            f"the judge at {source} replied without 'Final Score: N' (N from 1 to 5): {str(content)[:200]!r}; "
            "a template given with --vlm-template must ask for it"
        )
    return float(match.group(1)) / 5


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class VlmJudge:
    """r_i = the score a VLM judge behind an OpenAI-compatible chat-completions endpoint (vLLM, sglang) gives image i,
    as the official `unifiedreward_score_sglang`: the image resized to 512 x 512 as a PNG data URL, then the question
    (the UnifiedReward template by default, a file with --vlm-template), temperature 0; the reply read by vlm_score.
    At most `concurrency` requests at once (official: the whole batch at once). Deviation: the data URL says
    image/png (official: "data:image;base64,", which some servers refuse)."""

    def __init__(self, options: ServerOptions):
        url = options.vlm_url.rstrip("/") + "/chat/completions"
        self.endpoint = HttpEndpoint(url, "VLM judge", VLM_HOW_TO_START, options)
        self.model, self.concurrency = options.vlm_model, options.vlm_concurrency
        self.template = UNIFIEDREWARD_TEMPLATE
        if options.vlm_template:
            with open(options.vlm_template, encoding="utf-8") as f:
                self.template = f.read()
        key = os.environ.get(VLM_API_KEY_ENV, "")
        self.headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def judge(self, image: Image.Image, prompt: str, retry: bool = True) -> float:
        image = image.resize((VLM_IMAGE_SIDE, VLM_IMAGE_SIDE))
        content = [
            {"type": "image_url", "image_url": {"url": png_data_url(image)}},
            {"type": "text", "text": self.template.replace("{prompt}", prompt)},
        ]
        request = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0}
        answer = self.endpoint.post(json.dumps(request).encode(), self.headers, retry)
        return vlm_score(answer, self.endpoint.url)

    def probe(self):
        self.judge(Image.new("RGB", (64, 64), (128, 128, 128)), "a grey square", retry=False)

    def __call__(self, images, prompts) -> list[float]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.judge, images, prompts))

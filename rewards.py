"""Reward models for Flow-GRPO.

A reward spec is a comma-separated list of ``name[=weight]`` items, for example
``"pickscore"`` or ``"pickscore=1,aesthetic=0.2"``.  ``load_reward(spec)`` builds a
``Reward``, which is called once per batch::

    reward = load_reward("pickscore=1,jpeg_compressibility=0.1")
    out = reward(images, prompts)      # images: list of PIL images, prompts: list of str
    out["reward"]                      # float32 CPU tensor [N], the weighted sum
    out["pickscore"]                   # float32 CPU tensor [N], one per component

Built-in components (all return one float per image, higher is better):

- ``pickscore``: exp(logit_scale) * <t, v> / 26 with t, v the L2-normalised PickScore text
  and image embeddings (CLIP-H, ``yuvalkirstain/PickScore_v1``).
- ``clipscore``: exp(logit_scale) * <t, v> / 30 with OpenAI CLIP-L/14, i.e. the diagonal
  of ``logits_per_image`` / 30.
- ``aesthetic``: LAION improved aesthetic predictor, MLP(v) with v the L2-normalised
  CLIP-L/14 image embedding (raw MLP output, roughly 1..10).
- ``jpeg_compressibility``: -(JPEG size in kB at quality 95) / 500.
- ``jpeg_incompressibility``: +(JPEG size in kB at quality 95) / 500.
- ``ocr``: 1 if the prompt's double-quoted text is found in the image by OCR, else
  1 - min(d, L) / L with d the edit distance to it and L its length (spaces removed, lower case);
  needs ``pip install rapidocr-onnxruntime``.
- ``redness``, ``greenness``, ``blueness``: mean over pixels of (C - (other two channels) / 2) / 255
  with C the named channel, in [-0.5, 1]: a colour target that even a random model can approach.
- ``module:function``: your own ``function(images, prompts) -> N floats``.

Only torch and PIL are imported at module level; transformers, huggingface_hub,
safetensors and rapidocr_onnxruntime are imported when a reward that needs them is loaded.
"""

from __future__ import annotations

import importlib
import io
import math
import os
import re
from typing import Callable, Sequence

import torch
from PIL import Image

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
# The LAION MLP ("sac+logos+ava1-l14-linearMSE.pth") re-published as safetensors, pinned to
# the commit that added the safetensors file so a later push cannot change the reward.
AESTHETIC_MLP_REPO = "ttj/sac-logos-ava1-l14-linearMSE"
AESTHETIC_MLP_FILE = "model.safetensors"
AESTHETIC_MLP_REVISION = "1e77fa05081323d99725fc40a9bf9f88180490e7"
# In a local aesthetic folder the CLIP weights already use model.safetensors, so the MLP
# needs its own name; the first file found wins.
AESTHETIC_MLP_LOCAL_FILES = (
    "aesthetic_mlp.safetensors",
    "sac+logos+ava1-l14-linearMSE.safetensors",
    "sac+logos+ava1-l14-linearMSE.pth",
)

PICKSCORE_SCALE = 26.0
CLIPSCORE_SCALE = 30.0
JPEG_QUALITY = 95
JPEG_SCALE = 500.0

MODEL_DIR_FLAG = "--reward-model-dir"

RewardFn = Callable[[list, list], object]


class RewardModelUnavailable(ValueError):
    """A reward model could not be loaded (no hub access, not cached, or a bad local folder)."""


# --------------------------------------------------------------------------- parsing

# A custom reward is "dotted.module:function"; names only, so parsing never imports anything.
_CUSTOM_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_]\w*$")


def _builtin_names() -> list[str]:
    return list(_BUILDERS)


def _valid_names_hint() -> str:
    return (
        f"valid names: {', '.join(_builtin_names())}, or module:function for your own reward; "
        "write e.g. 'pickscore' or 'pickscore=1,aesthetic=0.2'"
    )


def is_custom(name: str) -> bool:
    """True if ``name`` has the ``module:function`` form of a user-supplied reward."""
    return ":" in name


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """Parse ``"name[=weight],name[=weight],..."`` into ``[(name, weight), ...]``.

    A missing weight means 1.0. Names are built-in rewards or ``module:function``; the
    module is not imported here (only the syntax is checked). Raises ValueError with a
    one-line message for empty specs, unknown names, duplicates and bad weights.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec; {_valid_names_hint()}")
    parsed: list[tuple[str, float]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty item in reward spec {spec!r} (stray comma?); {_valid_names_hint()}")
        name, has_weight, weight_text = (part.strip() for part in item.partition("="))
        if name in _BUILDERS:
            pass
        elif is_custom(name):
            if not _CUSTOM_RE.match(name):
                raise ValueError(
                    f"malformed custom reward {name!r} in {spec!r}: write module:function, "
                    "e.g. 'mymod:score' or 'pkg.mod:score=0.5'"
                )
        else:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; {_valid_names_hint()}")
        weight = _parse_weight(name, weight_text, spec) if has_weight else 1.0
        if any(name == seen for seen, _ in parsed):
            raise ValueError(f"reward {name!r} appears twice in {spec!r}; give each reward once with its weight")
        parsed.append((name, weight))
    return parsed


def _parse_weight(name: str, text: str, spec: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ValueError(
            f"malformed weight {text!r} for reward {name!r} in {spec!r}: "
            "write name=NUMBER, e.g. 'pickscore=1,aesthetic=0.2'"
        )
    return weight


# --------------------------------------------------------------------------- the Reward object


class Reward:
    """A weighted sum of reward components.

    ``reward(images, prompts)`` returns ``{name: r_name, ..., "reward": sum_k w_k * r_k}``,
    each a float32 CPU tensor of shape [N]. Each component is called once per call with
    the whole batch.
    """

    def __init__(self, components: Sequence[tuple[str, float, RewardFn]]):
        if not components:
            raise ValueError("a Reward needs at least one component")
        self.components = list(components)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, weight, _ in self.components}

    def __call__(self, images, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        images = to_pil_images(images)
        prompts = list(prompts)
        n = len(images)
        if len(prompts) != n:
            raise ValueError(f"reward got {n} images but {len(prompts)} prompts; pass one prompt per image")
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(n, dtype=torch.float32)
        for name, weight, fn in self.components:
            scores = validate_scores(name, fn(images, prompts), n)
            out[name] = scores
            total = total + weight * scores
        out["reward"] = total
        return out

    def __repr__(self) -> str:
        return "Reward(" + ", ".join(f"{name}={weight:g}" for name, weight, _ in self.components) + ")"


def validate_scores(name: str, scores, n: int) -> torch.Tensor:
    """Turn a component's output into a float32 CPU tensor [n], or raise a one-line ValueError."""
    try:
        if isinstance(scores, torch.Tensor):
            tensor = scores.detach().to("cpu", torch.float32)
        else:
            tensor = torch.as_tensor(scores, dtype=torch.float32)
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


def to_pil_images(images) -> list[Image.Image]:
    """Accept a list of PIL images, or a tensor [N, 3, H, W] (float in [0, 1] or uint8).

    Float tensors become uint8 as round(255 * x) clamped to [0, 255], as in the paper's code.
    """
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in x]
    return list(images)


# --------------------------------------------------------------------------- JPEG rewards


def jpeg_size_kb(image: Image.Image, quality: int = JPEG_QUALITY) -> float:
    """Size of the image saved as JPEG at ``quality``, in kB (1 kB = 1000 bytes)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000


def jpeg_compressibility(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r = -(JPEG size in kB at quality 95) / 500: small files (flat images) score high."""
    return torch.tensor([-jpeg_size_kb(img) / JPEG_SCALE for img in images], dtype=torch.float32)


def jpeg_incompressibility(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """r = +(JPEG size in kB at quality 95) / 500, the negative of jpeg_compressibility."""
    return -jpeg_compressibility(images, prompts)


# --------------------------------------------------------------------------- colour rewards

COLOUR_CHANNELS = {"redness": 0, "greenness": 1, "blueness": 2}


def colour_excess(images: list[Image.Image], channel: int) -> torch.Tensor:
    """r = mean over pixels of (C - (C' + C'') / 2) / 255, C the channel's 8-bit value and C', C'' the
    other two: +1 for a pure colour, -0.5 for its complement, 0 for any grey."""
    scores = []
    for image in images:
        rgb = image.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(-1, 3).double()
        others = pixels.sum(dim=1) - pixels[:, channel]
        scores.append(((pixels[:, channel] - others / 2) / 255).mean())
    return torch.stack(scores).float() if scores else torch.zeros(0)


# --------------------------------------------------------------------------- CLIP helpers


# What a local folder for each model reward must hold (said in error messages).
FOLDER_CONTENTS = {
    "pickscore": f"a CLIPModel ({PICKSCORE_MODEL}) and a CLIPProcessor ({PICKSCORE_PROCESSOR}) "
    "saved together with save_pretrained",
    "clipscore": f"a CLIPModel and CLIPProcessor ({CLIP_L14}) saved with save_pretrained",
    "aesthetic": f"a CLIPModel and CLIPProcessor ({CLIP_L14}) saved with save_pretrained, plus "
    f"{AESTHETIC_MLP_LOCAL_FILES[0]} ({AESTHETIC_MLP_FILE} of {AESTHETIC_MLP_REPO})",
}


def _unavailable(name: str, source: str, err: Exception) -> RewardModelUnavailable:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    reason = f"reward {name!r}: cannot load {source!r} ({type(err).__name__}: {first_line})"
    if os.path.isdir(source):
        return RewardModelUnavailable(f"{reason}; the folder must hold {FOLDER_CONTENTS[name]}")
    return RewardModelUnavailable(
        f"{reason}; on a machine without hub access pass a local folder with "
        f"{MODEL_DIR_FLAG} {name}=FOLDER holding {FOLDER_CONTENTS[name]}"
    )


def _check_local_dir(name: str, folder: str) -> None:
    if not os.path.isdir(folder):
        raise RewardModelUnavailable(
            f"reward {name!r}: local model folder {folder!r} does not exist; "
            f"pass an existing folder with {MODEL_DIR_FLAG} {name}=FOLDER"
        )


def clip_processor(source: str):
    """A CLIPProcessor whose image processor is always the PIL one.

    transformers 5 loads a torchvision image processor whenever torchvision is installed (usual on GPU
    machines) and a PIL one otherwise; their resizes differ, so the same image would score differently
    in the tests and in a real run. PIL is what the official code ran: transformers==4.40.0 (official
    ``setup.py``), whose CLIPImageProcessor is the PIL one, loaded by ``AutoProcessor.from_pretrained``
    (official ``flow_grpo/pickscore_scorer.py``, ``PickScoreScorer.__init__``).
    """
    from transformers import AutoTokenizer, CLIPProcessor

    # transformers 5 names the PIL backend CLIPImageProcessorPil; in transformers 4 CLIPImageProcessor is PIL.
    try:
        from transformers import CLIPImageProcessorPil as PilImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as PilImageProcessor

    return CLIPProcessor(
        image_processor=PilImageProcessor.from_pretrained(source), tokenizer=AutoTokenizer.from_pretrained(source)
    )


def _load_clip(name: str, model_src: str, processor_src: str, device, cache: dict):
    """Load a frozen float32 CLIPModel and its CLIPProcessor; shared within one load_reward call."""
    key = (model_src, processor_src, str(device))
    if key in cache:
        return cache[key]
    from transformers import CLIPModel

    try:
        model = CLIPModel.from_pretrained(model_src, dtype=torch.float32)
        processor = clip_processor(processor_src)
    except (OSError, ValueError) as err:  # offline/uncached -> OSError, bad id -> ValueError
        raise _unavailable(name, model_src, err) from err
    model = model.to(device).eval().requires_grad_(False)
    cache[key] = (model, processor)
    return model, processor


def _features(output) -> torch.Tensor:
    """Projected features from get_*_features: a tensor in transformers 4, an output object in 5."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _text_max_length(model) -> int:
    return model.config.text_config.max_position_embeddings


@torch.no_grad()
def clip_image_embeds(model, processor, images: list[Image.Image]) -> torch.Tensor:
    """L2-normalised projected image embeddings v / ||v||, shape [N, D]."""
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = pixels.to(model.device, model.dtype)
    embeds = _features(model.get_image_features(pixel_values=pixels))
    return embeds / embeds.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_text_embeds(model, processor, prompts: list[str]) -> torch.Tensor:
    """L2-normalised projected text embeddings t / ||t||, shape [N, D]; text truncated to the model's length."""
    tokens = processor.tokenizer(
        prompts,
        padding=True,
        truncation=True,
        max_length=_text_max_length(model),
        return_tensors="pt",
    )
    embeds = _features(
        model.get_text_features(
            input_ids=tokens["input_ids"].to(model.device),
            attention_mask=tokens["attention_mask"].to(model.device),
        )
    )
    return embeds / embeds.norm(dim=-1, keepdim=True)


def clip_similarity_reward(model, processor, scale: float) -> RewardFn:
    """r_i = exp(logit_scale) * <t_i, v_i> / scale, for image i paired with its own prompt."""

    @torch.no_grad()
    def score(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        image = clip_image_embeds(model, processor, images)
        text = clip_text_embeds(model, processor, prompts)
        logits = model.logit_scale.exp() * (text * image).sum(dim=-1)
        return (logits / scale).float().cpu()

    return score


# --------------------------------------------------------------------------- model rewards


def _build_pickscore(device, model_dir: str | None, cache: dict) -> RewardFn:
    """PickScore: exp(logit_scale) * <t, v> / 26 (CLIP-H fine-tuned on Pick-a-Pic)."""
    if model_dir:
        _check_local_dir("pickscore", model_dir)
        model, processor = _load_clip("pickscore", model_dir, model_dir, device, cache)
    else:
        model, processor = _load_clip("pickscore", PICKSCORE_MODEL, PICKSCORE_PROCESSOR, device, cache)
    return clip_similarity_reward(model, processor, PICKSCORE_SCALE)


def _build_clipscore(device, model_dir: str | None, cache: dict) -> RewardFn:
    """CLIPScore: diagonal of logits_per_image / 30 = exp(logit_scale) * <t, v> / 30 (CLIP-L/14)."""
    source = model_dir or CLIP_L14
    if model_dir:
        _check_local_dir("clipscore", model_dir)
    model, processor = _load_clip("clipscore", source, source, device, cache)
    return clip_similarity_reward(model, processor, CLIPSCORE_SCALE)


class AestheticMLP(torch.nn.Module):
    """LAION improved aesthetic predictor head: in_dim-1024-128-64-16-1, no activations.

    The dropout positions match the original so its state dict (layers.0/2/4/6/7) loads.
    """

    def __init__(self, in_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(in_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read weights without executing pickled code: safetensors, or torch.load(weights_only=True)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _aesthetic_mlp_path(model_dir: str | None) -> str:
    if model_dir:
        for filename in AESTHETIC_MLP_LOCAL_FILES:
            path = os.path.join(model_dir, filename)
            if os.path.isfile(path):
                return path
        raise RewardModelUnavailable(
            f"reward 'aesthetic': no MLP weights in {model_dir!r}; put one of "
            f"{', '.join(AESTHETIC_MLP_LOCAL_FILES)} next to the CLIP model "
            f"(from hub repo {AESTHETIC_MLP_REPO}, file {AESTHETIC_MLP_FILE})"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(AESTHETIC_MLP_REPO, AESTHETIC_MLP_FILE, revision=AESTHETIC_MLP_REVISION)
    except (OSError, ValueError) as err:
        raise _unavailable("aesthetic", AESTHETIC_MLP_REPO, err) from err


def _build_aesthetic(device, model_dir: str | None, cache: dict) -> RewardFn:
    """Aesthetic: MLP(v / ||v||) with v the CLIP-L/14 image embedding."""
    source = model_dir or CLIP_L14
    if model_dir:
        _check_local_dir("aesthetic", model_dir)
    model, processor = _load_clip("aesthetic", source, source, device, cache)
    # The MLP input follows the CLIP projection size (768 for CLIP-L/14), so tiny test CLIPs work too.
    mlp = AestheticMLP(in_dim=model.config.projection_dim)
    mlp.load_state_dict(load_state_dict_file(_aesthetic_mlp_path(model_dir)))
    mlp = mlp.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        embeds = clip_image_embeds(model, processor, images)
        return mlp(embeds.to(torch.float32)).squeeze(1).float().cpu()

    return score


# --------------------------------------------------------------------------- OCR reward
# The official OCR reward (official `flow_grpo/ocr.py`, `OcrScorer.__call__`) and where this one differs:
# - The same rule: the target is the text between the first pair of double quotes of the prompt; the
#   recognised lines are joined without separator in reading order (top to bottom, left to right); both
#   lose their spaces and are lower-cased; r = 1 if the target is a substring of the recognised text,
#   else 1 - min(edit distance, len(target)) / len(target).
# - Engine: rapidocr-onnxruntime runs PP-OCRv4 detection and recognition (the Chinese+English models its
#   wheel ships, so no download) through onnxruntime; the official runs PaddleOCR(lang="en",
#   use_angle_cls=False), i.e. PaddleOCR's English models. No angle classifier in either. Both keep lines
#   with a recognition score >= 0.5 (rapidocr's text_score, PaddleOCR's drop_score defaults).
# - Colour order: the official passes np.array(PIL image), i.e. RGB, where PaddleOCR expects OpenCV's BGR;
#   here the PIL image is passed and rapidocr converts it to BGR itself.
# - A prompt without a quoted text (or with an empty one) is an error naming the prompt, not an
#   IndexError (or a division by zero); an OCR failure is raised, where the official prints it and
#   scores 0, because a silent 0 would train on a wrong reward.

OCR_PACKAGE = "rapidocr-onnxruntime"


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
    recognized = recognized.replace(" ", "").lower()
    target = target.replace(" ", "").lower()
    if target in recognized:
        return 1.0
    return 1.0 - min(edit_distance(recognized, target), len(target)) / len(target)


class OcrReward:
    """The OCR reward; the engine (models and onnxruntime sessions) is built once, here.

    onnxruntime gets torch's thread count (so OMP_NUM_THREADS / torch.set_num_threads govern both):
    its default of one thread per core fights torch's threads for the same cores.
    """

    def __init__(self, threads: int | None = None):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise RewardModelUnavailable(
                f"reward 'ocr' needs the OCR package, which is not installed: pip install {OCR_PACKAGE}"
            ) from None
        threads = threads or torch.get_num_threads()
        self.engine = RapidOCR(use_cls=False, intra_op_num_threads=threads, inter_op_num_threads=1)

    def recognize(self, image: Image.Image) -> str:
        """The recognised lines of one image, joined in reading order ("" when none)."""
        lines, _ = self.engine(image.convert("RGB"), use_cls=False)
        return "".join(line[1] for line in lines or [])

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        targets = [ocr_target(prompt) for prompt in prompts]  # every prompt checked before any OCR
        scores = [ocr_similarity(self.recognize(image), target) for image, target in zip(images, targets)]
        return torch.tensor(scores, dtype=torch.float32)


def _build_ocr(device, model_dir, cache) -> RewardFn:
    return OcrReward()


def _build_jpeg_compressibility(device, model_dir, cache) -> RewardFn:
    return jpeg_compressibility


def _build_jpeg_incompressibility(device, model_dir, cache) -> RewardFn:
    return jpeg_incompressibility


def _build_colour(name: str):
    def build(device, model_dir, cache) -> RewardFn:
        return lambda images, prompts: colour_excess(images, COLOUR_CHANNELS[name])

    return build


_BUILDERS = {
    "pickscore": _build_pickscore,
    "clipscore": _build_clipscore,
    "aesthetic": _build_aesthetic,
    "jpeg_compressibility": _build_jpeg_compressibility,
    "jpeg_incompressibility": _build_jpeg_incompressibility,
    "ocr": _build_ocr,
    **{name: _build_colour(name) for name in COLOUR_CHANNELS},
}

# Rewards that need a model and therefore accept a local folder.
MODEL_REWARDS = ("pickscore", "clipscore", "aesthetic")


# --------------------------------------------------------------------------- custom rewards


def load_custom_reward(name: str) -> RewardFn:
    """Import ``module`` and return ``module.function`` for a ``module:function`` reward."""
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"custom reward {name!r}: cannot import module {module_name!r} ({err}); "
            "put it on PYTHONPATH or in the working directory"
        ) from err
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(
            f"custom reward {name!r}: module {module_name!r} has no function {function_name!r}; "
            "define fn(images, prompts) returning one float per image"
        )
    return fn


# --------------------------------------------------------------------------- entry point


def load_reward(spec: str, device="cpu", model_dirs: dict[str, str] | None = None) -> Reward:
    """Build a Reward from a spec such as ``"pickscore=1,aesthetic=0.2"``.

    ``model_dirs`` maps a built-in model reward name to a local folder that replaces the hub
    ids (pickscore/clipscore: a CLIPModel and CLIPProcessor saved together; aesthetic: the
    same plus the MLP weights file). CLIP models and processors are loaded once per source.
    """
    components = parse_reward_spec(spec)
    model_dirs = dict(model_dirs or {})
    unknown = [k for k in model_dirs if k not in MODEL_REWARDS]
    if unknown:
        raise ValueError(
            f"{MODEL_DIR_FLAG} given for {', '.join(map(repr, unknown))}; "
            f"only {', '.join(MODEL_REWARDS)} load models from a folder"
        )
    cache: dict = {}
    built = []
    for name, weight in components:
        if is_custom(name):
            fn = load_custom_reward(name)
        else:
            fn = _BUILDERS[name](device, model_dirs.get(name), cache)
        built.append((name, weight, fn))
    return Reward(built)

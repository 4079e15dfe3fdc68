"""Model families: what differs between SD 1.x, SD 2.x, SDXL and SD3, as one row each — so methods × families
is a table, not a product of copies.

A :class:`Family` is plain data (no torch import): the denoiser and its text encoders, the conditioning
extras beyond the prompt embeddings, the objective, the default LoRA targets, the export layouts, and which
training method runs on it with which recipe. Code that must differ by family reads it from here
(``family_of(cfg)``) instead of comparing ``model.arch`` strings in place:

- :class:`sdtune.config.RunConfig` refuses, when the config loads, a method the family lacks (naming those it
  has); :func:`sdtune.train.run` picks the recipe;
- :func:`sdtune.train.losses.objective_for` builds the family's objective (denoising: epsilon / v-prediction
  from the scheduler; flow matching for SD3);
- :mod:`sdtune.train.outputs` picks the pipeline class, the kohya key layout and whether a single-file
  checkpoint can be written.

A new family is a new row here plus what its row names (a loader, a recipe for a method whose model call
differs); a new method is a recipe module plus its name in the rows of the families it runs on
(docs/architecture.md walks through both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdtune.errors import ConfigError

UNET_METHODS = {
    "lora": "lora",
    "textual_inversion": "textual_inversion",
    "pivotal": "pivotal",
    "dreambooth": "dreambooth",
    "inpaint": "inpaint",
    "full": "full",
}


@dataclass(frozen=True)
class Family:
    arch: str  # model.arch
    title: str
    text_encoders: tuple[str, ...]  # pipeline component names, in order
    pipeline: str  # diffusers pipeline class for outputs and sampling
    kohya_layout: str | None  # key layout of the kohya/A1111 LoRA file; None: not written
    single_file: bool = False  # an original-layout model.safetensors writer exists (sdtune.train.single_file)
    conditioning: tuple[str, ...] = ()  # extras beside the prompt embeddings the denoiser takes
    denoiser: str = "unet"  # the trained network's pipeline component: "unet" or "transformer"
    objective: str = "denoising"  # DDPM (epsilon / v-prediction, from the scheduler) or "flow_matching"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # adapted by default
    methods: dict[str, str] = field(default_factory=lambda: dict(UNET_METHODS))  # method → recipe module
    missing: dict[str, str] = field(default_factory=dict)  # method → why this family has no recipe for it

    def method_problem(self, method: str) -> str | None:
        """Why ``method`` does not run on this family (naming the methods it has), or None when it does."""
        if method in self.methods:
            return None
        why = f": {self.missing[method]}" if method in self.missing else ""
        return (
            f"model.arch={self.arch} ({self.title}) supports train.method={' / '.join(self.methods)} only "
            f"(not {method}){why}"
        )

    def recipe(self, method: str) -> str:
        """The recipe module for ``method`` on this family; one ConfigError line when there is none."""
        if problem := self.method_problem(method):
            raise ConfigError(problem)
        return self.methods[method]


CLIP_L, CLIP_L_G = ("text_encoder",), ("text_encoder", "text_encoder_2")

FAMILIES: dict[str, Family] = {
    f.arch: f
    for f in (
        Family("sd15", "SD 1.x", CLIP_L, "StableDiffusionPipeline", "sd1", single_file=True),
        # v-prediction: from the scheduler config; OpenCLIP-H text encoder (a CLIP-L-shaped diffusers module)
        Family("sd2", "SD 2.x", CLIP_L, "StableDiffusionPipeline", "sd1", single_file=True),
        Family(
            "sdxl",
            "SDXL",
            CLIP_L_G,
            "StableDiffusionXLPipeline",
            "sdxl",
            single_file=True,
            conditioning=("pooled_embeds", "time_ids"),
        ),
        Family(
            "sd3",
            "SD3",
            (*CLIP_L_G, "text_encoder_3"),
            "StableDiffusion3Pipeline",
            kohya_layout=None,  # no kohya reader for SD3 to check one against; ComfyUI reads the diffusers keys
            conditioning=("pooled_embeds",),
            denoiser="transformer",
            objective="flow_matching",
            methods={
                "lora": "sd3_lora",
                "textual_inversion": "textual_inversion",
                "pivotal": "pivotal",
                "dreambooth": "dreambooth",
                "full": "full",
            },
            missing={"inpaint": "there is no 9-channel SD3 inpainting base to fine-tune"},
        ),
    )
}


def family_of(cfg) -> Family:
    """The family of ``cfg.model.arch`` (a RunConfig, or anything with ``.model.arch``)."""
    arch = cfg.model.arch
    if arch not in FAMILIES:
        raise ConfigError(f"model.arch={arch} is not a known model family ({', '.join(FAMILIES)})")
    return FAMILIES[arch]

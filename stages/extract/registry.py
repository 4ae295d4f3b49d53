"""The teacher registry, declared as data: each entry names a timm architecture and pretrained tag,
its feature width and patch size, and where its weights come from. `scalr teachers` lists it."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # scalr's name, e.g. "dinov2-vitl14"
    timm_name: str  # timm architecture + pretrained tag
    dim: int  # feature width
    patch: int  # patch size in pixels
    weights_file: str  # documented file name inside a --weights-dir
    weights_source: str  # where such weights come from (for error messages and the README)
    dense: str = "last-block-pre-norm"  # or "maskclip-value", "oracle"
    random_init_only: bool = False
    inputs: str = "image"  # what it sees of a camera: its image, or (the oracle) its class map


_DINOV2 = "DINOv2 checkpoints from the facebookresearch/dinov2 release (original .pth or timm's state dict)"
_DINOV3 = (
    "DINOv3 checkpoints from the facebookresearch/dinov3 release (original .pth without its hash suffix, or timm's "
    "state dict)"
)
_SIGLIP2 = "SigLIP 2 weights as timm's state dict (its Hugging Face repository of the .v2_webli tag)"
_CLIP = "OpenAI CLIP ViT-B/16 as an open_clip or timm state dict (open_clip_pytorch_model.bin)"
TEACHERS: dict[str, TeacherSpec] = {
    spec.name: spec
    for spec in (
        TeacherSpec(
            "dino-vits8",
            "vit_small_patch8_224.dino",
            384,
            8,
            "dino_deitsmall8_pretrain.pth",
            "DINO ViT-S/8 from the facebookresearch/dino release",
        ),
        TeacherSpec(
            "dinov2-vits14", "vit_small_patch14_dinov2.lvd142m", 384, 14, "dinov2_vits14_pretrain.pth", _DINOV2
        ),
        TeacherSpec("dinov2-vitb14", "vit_base_patch14_dinov2.lvd142m", 768, 14, "dinov2_vitb14_pretrain.pth", _DINOV2),
        TeacherSpec(
            "dinov2-vitl14", "vit_large_patch14_dinov2.lvd142m", 1024, 14, "dinov2_vitl14_pretrain.pth", _DINOV2
        ),
        TeacherSpec(
            "dinov2-vitg14", "vit_giant_patch14_dinov2.lvd142m", 1536, 14, "dinov2_vitg14_pretrain.pth", _DINOV2
        ),
        TeacherSpec(
            "dinov2-vits14-reg4",
            "vit_small_patch14_reg4_dinov2.lvd142m",
            384,
            14,
            "dinov2_vits14_reg4_pretrain.pth",
            _DINOV2,
        ),
        TeacherSpec(
            "dinov2-vitb14-reg4",
            "vit_base_patch14_reg4_dinov2.lvd142m",
            768,
            14,
            "dinov2_vitb14_reg4_pretrain.pth",
            _DINOV2,
        ),
        TeacherSpec(
            "dinov2-vitl14-reg4",
            "vit_large_patch14_reg4_dinov2.lvd142m",
            1024,
            14,
            "dinov2_vitl14_reg4_pretrain.pth",
            _DINOV2,
        ),
        TeacherSpec(
            "dinov2-vitg14-reg4",
            "vit_giant_patch14_reg4_dinov2.lvd142m",
            1536,
            14,
            "dinov2_vitg14_reg4_pretrain.pth",
            _DINOV2,
        ),
        # DINOv3 (timm's eva.py): patch 16, RoPE instead of absolute position embeddings, class + 4
        # register tokens; ImageNet mean/std, except the satellite (.sat493m) weights' own.
        *(
            TeacherSpec(f"dinov3-{name}", f"vit_{arch}_patch16_dinov3.{tag}", dim, 16, file, _DINOV3)
            for name, arch, tag, dim, file in (
                ("vits16", "small", "lvd1689m", 384, "dinov3_vits16_pretrain_lvd1689m.pth"),
                ("vits-plus16", "small_plus", "lvd1689m", 384, "dinov3_vits16plus_pretrain_lvd1689m.pth"),
                ("vitb16", "base", "lvd1689m", 768, "dinov3_vitb16_pretrain_lvd1689m.pth"),
                ("vitl16", "large", "lvd1689m", 1024, "dinov3_vitl16_pretrain_lvd1689m.pth"),
                ("vith-plus16", "huge_plus", "lvd1689m", 1280, "dinov3_vith16plus_pretrain_lvd1689m.pth"),
                ("vitl16-sat", "large", "sat493m", 1024, "dinov3_vitl16_pretrain_sat493m.pth"),
            )
        ),
        # SigLIP 2 (timm's .v2_webli tags): no class token (no prefix tokens), mean/std 0.5; the
        # smallest table of each (timm resizes it to the image size at load).
        *(
            TeacherSpec(f"siglip2-{name}", f"{arch}.v2_webli", dim, patch, f"{arch}.v2_webli.safetensors", _SIGLIP2)
            for name, arch, dim, patch in (
                ("vitb16", "vit_base_patch16_siglip_224", 768, 16),
                ("vitl16", "vit_large_patch16_siglip_256", 1024, 16),
                ("so400m14", "vit_so400m_patch14_siglip_224", 1152, 14),
            )
        ),
        TeacherSpec(
            "mae-vitb16",
            "vit_base_patch16_224.mae",
            768,
            16,
            "mae_pretrain_vit_base.pth",
            "MAE ViT-B/16 from the facebookresearch/mae release",
        ),
        TeacherSpec(
            "maskclip-vitb16",
            "vit_base_patch16_clip_quickgelu_224.openai",
            512,
            16,
            "clip_vit_b16_openai.bin",
            _CLIP,
            dense="maskclip-value",
        ),
        TeacherSpec(
            "test-vit", "test_vit", 64, 16, "", "none: a tiny architecture for tests and demos", random_init_only=True
        ),
        TeacherSpec(  # what a perfect teacher would give: the synthetic rigs only (they have class maps)
            "oracle",
            "-",
            64,
            14,
            "",
            "none: the synthetic rigs' class maps and seeded random class embeddings",
            dense="oracle",
            random_init_only=True,
            inputs="class-map",
        ),
    )
}


def get_spec(name: str) -> TeacherSpec:
    try:
        return TEACHERS[name]
    except KeyError:
        raise ConfigError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}") from None

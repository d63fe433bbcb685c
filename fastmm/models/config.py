"""UnifiedConfig: every size of a unified multimodal model (Janus-style), one commented field each.

The decoder is Llama-shaped. Three optional parts hang off it: a ViT encoder with an MLP aligner for
continuous image input (understanding), an image-generation path (code embeddings + aligner in, a head over
the codebook out) and the VQ tokenizer that turns image tokens back into pixels. ``fastmm.models.convert``
fills these from a transformers Janus config.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class VisionConfig:
    """SigLIP-style ViT (pre-LayerNorm blocks, GELU MLP, biased q/k/v) plus the MLP aligner to the decoder."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 384  # square input, pixels
    patch_size: int = 16  # (image_size / patch_size)^2 tokens per image
    num_channels: int = 3
    mlp_ratio: float = 4.0  # MLP width = hidden_size * mlp_ratio
    layer_norm_eps: float = 1e-6
    aligner_width: int = 2048  # the aligner's output width: the decoder's hidden size
    aligner_depth: int = 2  # Linear layers in the aligner, GELU between them

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass
class DualResolutionConfig:
    """LLaVA-HR's dual-resolution understanding path: the image comes in at ``image_size``; a ConvNeXt
    (transformers' ConvNextModel, total stride 4 * 2^(stages - 1): 32 with four stages) reads it there, the
    ViT reads it resized to vision.image_size, and ResolutionAdapters fuse the ConvNeXt's last map into the
    ViT stream after the blocks in ``adapter_after`` and once more before the aligner. The decoder gets as many
    tokens per image as the plain ViT path would."""

    image_size: int = 1024  # input side in pixels (the conv path's resolution)
    conv_hidden_sizes: tuple[int, ...] = (192, 384, 768, 1536)  # ConvNeXt stage widths; the last is c
    conv_depths: tuple[int, ...] = (3, 3, 27, 3)  # ConvNeXt blocks per stage (ConvNeXt-L)
    adapter_after: tuple[int, ...] = (5, 11, 17)  # ViT block indices (0-based) followed by an adapter
    kernel_size: int = 7  # the adapters' depthwise convolution
    fold_projector: bool = True  # fold the final align into the aligner's first Linear

    @property
    def conv_stride(self) -> int:
        """Pixels per conv-map cell: ConvNeXt's 4x4 stem, then a 2x downsampling before every later stage."""
        return 4 * 2 ** (len(self.conv_hidden_sizes) - 1)

    @property
    def conv_grid(self) -> int:
        return self.image_size // self.conv_stride


@dataclasses.dataclass
class ImageGenConfig:
    """Discrete image output. Janus: token id -> code embedding -> aligner -> decoder input, and a head
    from the decoder's last hidden state to scores over the codebook. Chameleon / Emu3 (``shared_vocab_start``
    set): image token i is text id shared_vocab_start + i, read through embed_tokens and scored by the LM head's
    rows of the image ids alone; the embedding, aligner and head fields are then unused."""

    codebook_size: int = 16384  # image vocabulary
    code_dim: int = 8  # width of the generation embeddings (and of the tokenizer's codes)
    aligner_width: int = 2048  # aligner output: the decoder's hidden size
    aligner_depth: int = 2  # Linear layers in the aligner, GELU between them
    head_width: int = 2048  # hidden width of the generation head (Linear -> GELU -> Linear)
    num_image_tokens: int = 576  # tokens per generated image, a square grid
    shared_vocab_start: int | None = None  # first text id of the image tokens (shared vocabulary); None: Janus

    @property
    def shared_vocab(self) -> bool:
        return self.shared_vocab_start is not None


@dataclasses.dataclass
class VQConfig:
    """The VQ tokenizer (a VQGAN): convolutional encoder / decoder around a codebook (l2 nearest code in,
    l2-normalized codes out, as transformers' Janus quantizer)."""

    codebook_size: int = 16384
    code_dim: int = 8
    latent_channels: int = 256  # channels between the conv stacks and the 1x1 quant convs
    base_channels: int = 128  # GroupNorm(32) needs every level's width to be a multiple of 32
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; 2x resampling between levels
    num_res_blocks: int = 2  # per encoder level (the decoder has one more)
    in_channels: int = 3
    out_channels: int = 3
    grid: int = 24  # image tokens per side: num_image_tokens = grid^2


@dataclasses.dataclass
class UnifiedConfig:
    vocab_size: int = 102400  # text vocabulary of the decoder (embeddings and LM head)
    hidden_size: int = 2048
    intermediate_size: int = 5632  # SwiGLU width
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16  # GQA when fewer than num_heads
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384  # size of the precomputed RoPE table
    tie_word_embeddings: bool = False  # LM head shares the token embeddings
    attention_bias: bool = False
    mlp_bias: bool = False
    # mPLUG-Owl2: one RMSNorm weight and one K / V projection per modality (0 = text, 1 = image)
    modality_adaptive: bool = False
    # special tokens (Janus defaults are set by the converter from the checkpoint)
    image_token_id: int | None = 100581  # placeholder replaced by image features in understanding prompts
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = 100015  # fills the unconditional prompt of classifier-free guidance
    boi_token_id: int | None = 100016  # begin-of-image: ends an image-generation prompt
    vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
    dual_resolution: DualResolutionConfig | None = None  # LLaVA-HR's high-resolution conv path beside the ViT
    image_gen: ImageGenConfig | None = dataclasses.field(default_factory=ImageGenConfig)
    vq: VQConfig | None = dataclasses.field(default_factory=VQConfig)

    @property
    def num_modalities(self) -> int:
        return 2 if self.modality_adaptive else 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UnifiedConfig: {name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"UnifiedConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"UnifiedConfig: head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        gen = self.image_gen
        if gen is not None and gen.shared_vocab:
            start = gen.shared_vocab_start
            if not isinstance(start, int) or start < 0 or start + gen.codebook_size > self.vocab_size:
                raise ValueError(
                    f"UnifiedConfig: image_gen.shared_vocab_start must be an int with shared_vocab_start + "
                    f"codebook_size ({gen.codebook_size}) <= vocab_size ({self.vocab_size}), got {start!r}"
                )
        elif gen is not None and gen.aligner_width != self.hidden_size:
            raise ValueError(
                f"UnifiedConfig: image_gen.aligner_width ({self.image_gen.aligner_width}) must equal hidden_size "
                f"({self.hidden_size}): aligned codes are decoder inputs"
            )
        if self.vision is not None and self.vision.aligner_width != self.hidden_size:
            raise ValueError(
                f"UnifiedConfig: vision.aligner_width ({self.vision.aligner_width}) must equal hidden_size "
                f"({self.hidden_size}): aligned image features are decoder inputs"
            )

        if self.dual_resolution is not None:
            self._check_dual_resolution()

    def _check_dual_resolution(self) -> None:
        dual, vision = self.dual_resolution, self.vision
        if vision is None:
            raise ValueError("UnifiedConfig: dual_resolution needs vision (the ViT path it fuses into)")
        if not dual.conv_hidden_sizes or len(dual.conv_hidden_sizes) != len(dual.conv_depths) or (
            dual.image_size % dual.conv_stride
        ):
            raise ValueError(
                f"UnifiedConfig: dual_resolution needs one depth per conv stage and image_size a multiple of the conv "
                f"stride (4 * 2^(stages - 1)), got "
                f"image_size={dual.image_size}, conv_hidden_sizes={dual.conv_hidden_sizes}, conv_depths={dual.conv_depths}"
            )
        vit_grid, conv_grid = vision.image_size // vision.patch_size, dual.conv_grid
        if not (conv_grid <= vit_grid or conv_grid % vit_grid == 0):
            raise ValueError(
                f"UnifiedConfig: the conv grid ({conv_grid} = dual_resolution.image_size / {dual.conv_stride}) must be at most the "
                f"ViT grid ({vit_grid}) or an integer multiple of it"
            )
        if any(not 0 <= i < vision.num_layers for i in dual.adapter_after):
            raise ValueError(
                f"UnifiedConfig: dual_resolution.adapter_after must index ViT blocks [0, {vision.num_layers}), "
                f"got {dual.adapter_after}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

"""UnifiedModel: one decoder that reads text and images (continuous ViT features) and writes text or discrete
image tokens (Janus). Generation loops live in fastmm.runtime; this module holds the parts they call.

    understanding:  ids (+ images -> ViT -> aligner, spliced at image_token_id) -> decoder -> lm_head
    generation:     prompt -> decoder -> gen_head -> guided sampling -> gen_table[id] -> decoder -> ...
                    image tokens -> VQ tokenizer decoder -> pixels

gen_table = gen_aligner(gen_embed.weight) is computed once ([codebook, hidden]): Janus runs the aligner's
GEMMs on every generated token although its input depends on the token id alone; vq_embed gathers a row.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastmm import _validate as val
from fastmm import ops
from fastmm.models import convert
from fastmm.models.config import UnifiedConfig
from fastmm.models.decoder import Decoder
from fastmm.models.vision import AlignerMLP, DualResolutionVision, VisionEncoder
from fastmm.models.vq_tokenizer import VQTokenizer
from fastmm.nn.linear import Linear
from fastmm.nn.rope import rope_table


class GenerationHead(nn.Module):
    """Decoder hidden state -> scores over the image codebook: Linear, GELU, Linear (Janus's VQVAEHead)."""

    def __init__(self, hidden_size: int, width: int, codebook_size: int):
        super().__init__()
        self.proj_out = Linear(hidden_size, width)
        self.vision_head = Linear(width, codebook_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.proj_out(hidden)))


class UnifiedModel(nn.Module):
    def __init__(self, config: UnifiedConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.decoder.embed_tokens.weight
        self.vision = None
        if config.dual_resolution is not None:
            self.vision = DualResolutionVision(config.vision, config.dual_resolution)
        elif config.vision is not None:
            self.vision = VisionEncoder(config.vision)
        gen = config.image_gen
        self.gen_head = None
        if gen is not None and not gen.shared_vocab:
            self.gen_embed = nn.Embedding(gen.codebook_size, gen.code_dim)
            self.gen_aligner = AlignerMLP(gen.code_dim, gen.aligner_width, gen.aligner_depth)
            self.gen_head = GenerationHead(config.hidden_size, gen.head_width, gen.codebook_size)
            self.register_buffer("gen_table", torch.empty(gen.codebook_size, config.hidden_size), persistent=False)
            self.refresh_generation_table()
        self.vq = VQTokenizer(config.vq) if config.vq is not None else None

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> UnifiedModel:
        """Load a transformers Janus checkpoint directory (config.json, optional generation_config.json,
        model.safetensors or sharded model-*.safetensors with their index). Weights load from safetensors only:
        pickled checkpoints (pytorch_model.bin) are refused. See fastmm.models.convert for the name mapping."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"UnifiedModel.from_pretrained: path must be a checkpoint directory, got {str(path)!r}")
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"UnifiedModel.from_pretrained: {config_file} is missing (expected a transformers checkpoint)")
        generation_file = directory / "generation_config.json"
        generation = convert.read_json(generation_file) if generation_file.is_file() else None
        config = convert.config_from_janus(convert.read_json(config_file), generation)
        files = _safetensors_files(directory)
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                tensors.update(load_file(str(file)))
            except (SafetensorError, OSError) as exc:  # truncated, corrupted or unreadable
                raise ValueError(f"UnifiedModel.from_pretrained: {file} is not a readable safetensors file: {exc}") from exc
        return cls.from_janus_state_dict(config, tensors, dtype, device, source=f"checkpoint {directory}")

    @classmethod
    def from_janus_state_dict(
        cls,
        config: UnifiedConfig,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        source: str = "the state dict",
    ) -> UnifiedModel:
        """Build from a transformers Janus state dict (its names, e.g. ``JanusForConditionalGeneration.state_dict()``)
        and the config of ``convert.config_from_janus``. Tensors already of ``dtype`` on ``device`` are shared, not
        copied (the norms as views with a modality dim); only the fused projections (q/k/v, gate/up) and the
        precomputed generation table are new memory."""
        state = convert.state_dict_from_janus(tensors, config)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()  # meta tensors: names, shapes and dtypes only
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if config.tie_word_embeddings:
            missing = [name for name in missing if name != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"UnifiedModel: {source} does not match its config: "
                f"missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        wrong = [f"{name}: {tuple(t.shape)} {t.dtype}, expected {tuple(expected[name].shape)} {expected[name].dtype}"
                 for name, t in state.items()
                 if t.shape != expected[name].shape or t.is_floating_point() != expected[name].is_floating_point()]  # fmt: skip
        if wrong:
            raise ValueError(f"UnifiedModel: {source} does not match its config (fastmm names): {wrong[:8]}")
        state = {name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for name, t in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.decoder.embed_tokens.weight
        model.rebuild_buffers(device)
        return model.eval()

    def rebuild_buffers(self, device: torch.device | str) -> None:
        """Recompute the derived buffers (RoPE tables, gen_table) on ``device``, e.g. after loading weights."""
        cos, sin = rope_table(self.config.max_position_embeddings, self.config.head_dim, self.config.rope_theta)
        self.decoder.rope_cos, self.decoder.rope_sin = cos.to(device), sin.to(device)
        if self.config.image_gen is not None:
            self.refresh_generation_table()

    @torch.no_grad()
    def refresh_generation_table(self) -> None:
        """gen_table = gen_aligner(gen_embed.weight); call again after changing either. Nothing to do with a
        shared vocabulary, whose table is a view of embed_tokens."""
        if self.gen_head is not None:
            self.gen_table = self.gen_aligner(self.gen_embed.weight).to(self.gen_embed.weight.dtype)

    # ------------------------------------------------------------------------------------------ parts

    def check_ids(self, name: str, ids: torch.Tensor) -> None:
        """Prompt ids: integer [B, L] with L >= 1, every id in the text vocabulary."""
        op = "UnifiedModel"
        val.check_tensor(op, name, ids)
        val.check_ids(op, name, ids)
        if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"{op}: {name} must be [B, L] with B, L >= 1, got {val.describe(ids)}")
        val.check_id_range(op, name, ids, self.config.vocab_size, "the text vocabulary size")

    def embed_prompt(self, input_ids: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, L, hidden]; with images [N, 3, S, S], the aligned ViT features of image n
        replace the n-th run of num_patches image_token_id placeholders (in row-major order)."""
        self.check_ids("input_ids", input_ids)
        embeds = self.decoder.embed_tokens(input_ids)
        placeholders = input_ids == self.config.image_token_id
        if images is None:
            return embeds
        if self.vision is None:
            raise ValueError("UnifiedModel: images given but the model has no vision encoder (config.vision is None)")
        features = self.vision(images).to(embeds.dtype)  # (N, P, hidden)
        count = int(placeholders.sum())
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"UnifiedModel: input_ids hold {count} image_token_id ({self.config.image_token_id}) placeholders, "
                f"expected {features.shape[1]} per image for {features.shape[0]} images = {features.shape[0] * features.shape[1]}"
            )
        return embeds.masked_scatter(placeholders[..., None], features.reshape(-1, features.shape[-1]))

    def prompt_modality(self, input_ids: torch.Tensor, with_images: bool) -> torch.Tensor:
        """Each prompt position's modality [B, L]: 1 (image) at the image placeholders when images fill them
        and the model is modality-adaptive (mPLUG-Owl2: image rows take the image norms and K / V
        projections), else 0 (text)."""
        image = with_images and self.config.modality_adaptive
        if not image:
            return torch.zeros_like(input_ids, dtype=torch.int64)
        return (input_ids == self.config.image_token_id).to(torch.int64)

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def _image_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of the image ids in a [vocab_size, hidden] matrix of a shared vocabulary: a view, no copy."""
        start = self.config.image_gen.shared_vocab_start
        return weight[start : start + self.config.image_gen.codebook_size]

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores [..., codebook_size] over the image tokens. With a shared vocabulary only the image ids' rows
        of the LM head are read (the whole head is 8x that at Chameleon's 65536 ids over 8192 codes)."""
        if self.gen_head is not None:
            return self.gen_head(hidden)
        return ops.linear(hidden, self._image_rows(self.lm_head.weight))

    @property
    def generation_table(self) -> torch.Tensor:
        """[codebook_size, hidden]: the decoder input of each image token."""
        return self.gen_table if self.gen_head is not None else self._image_rows(self.decoder.embed_tokens.weight)

    def image_embeds(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for generated image tokens: one gather from the generation table."""
        return ops.vq_embed(tokens, self.generation_table)

    def decode_image_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """image tokens [N, num_image_tokens] -> pixels [N, 3, S, S], about [-1, 1]."""
        if self.vq is None:
            raise ValueError("UnifiedModel: no VQ tokenizer (config.vq is None) to turn image tokens into pixels")
        return self.vq.decode(tokens)


def _safetensors_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(convert.read_json(index)["weight_map"].values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"UnifiedModel.from_pretrained: shards listed in {index.name} are missing: {missing}")
        return [directory / name for name in shards]
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    hint = f"; found pickled weights {pickled}, which fastmm never loads (convert them to safetensors)" if pickled else ""
    raise FileNotFoundError(f"UnifiedModel.from_pretrained: no model.safetensors or model.safetensors.index.json in {directory}{hint}")

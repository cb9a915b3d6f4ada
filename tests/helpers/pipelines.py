"""A tiny FluxPipeline built on the fly: random weights, tokenizers made from a handful of words."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from helpers.models import tiny_flux_config

WORDS = ("a", "cat", "dog", "photo", "of", "the", "red", "blue", "on", "table", "small", "house")
PROMPT = "a photo of a red cat on the table"


def clip_tokenizer(directory: Path) -> Any:
    """A byte-level BPE CLIPTokenizer whose merges spell out each word of WORDS."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    merges: list[str] = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(
        vocab_file=str(directory / "vocab.json"),
        merges_file=str(directory / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=16,
    )


def t5_tokenizer() -> Any:
    """A Unigram T5TokenizerFast over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in WORDS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=16,
    )


def t5_config(**overrides: Any) -> Any:
    from transformers import T5Config

    options: dict[str, Any] = dict(
        vocab_size=len(WORDS) + 3,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5Config(**{**options, **overrides})


def clip_config(**overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    options: dict[str, Any] = dict(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=32,
    )
    return CLIPTextConfig(**{**options, **overrides})


def tiny_flux_pipeline(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    """Build a random tiny FluxPipeline, save it with diffusers to ``directory`` and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_flux_config(in_channels=4, axes_dims_rope=(4, 4, 8)))
    vae = _small_vae(latent_channels=1)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModel(clip_config()),
        tokenizer=clip_tokenizer(directory.parent / f"{directory.name}-clip-vocab"),
        text_encoder_2=T5EncoderModel(t5_config()),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    return _saved(pipe, directory, dtype)


def _latents(pipe: Any, steps: int, seed: int, output: str = "images", **options: Any) -> torch.Tensor:
    """Run ``pipe`` without gradients from a fixed generator and return its latent ``output``."""
    options.setdefault("prompt", PROMPT)
    with torch.no_grad():
        result = pipe(
            num_inference_steps=steps,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **options,
        )
    return getattr(result, output)


def run_pipeline(pipe: Any, steps: int = 2, seed: int = 0) -> torch.Tensor:
    """Two denoising steps of an 8x8 image from a fixed generator; the latents the transformer made."""
    return _latents(pipe, steps, seed, height=8, width=8, guidance_scale=3.5)


def _small_vae(latent_channels: int) -> Any:
    """An AutoencoderKL with one 4-channel block and Flux's latent shift and scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _saved(pipe: Any, directory: Path, dtype: torch.dtype) -> Any:
    """``pipe`` cast to ``dtype`` and saved by diffusers to ``directory``."""
    pipe = pipe.to(dtype)
    pipe.save_pretrained(directory)
    return pipe


def tiny_sd3_pipeline(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    """A random tiny StableDiffusion3Pipeline: two CLIPTextModelWithProjection encoders and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = _small_vae(latent_channels=4)
    vocab = directory.parent / f"{directory.name}-clip-vocab"
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip_config()),
        tokenizer=clip_tokenizer(vocab),
        text_encoder_2=CLIPTextModelWithProjection(clip_config()),
        tokenizer_2=clip_tokenizer(vocab),
        text_encoder_3=T5EncoderModel(t5_config()),
        tokenizer_3=t5_tokenizer(),
        transformer=transformer,
    )
    return _saved(pipe, directory, dtype)


def tiny_wan_pipeline(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    """A random tiny WanPipeline: a UMT5EncoderModel text encoder and a Wan video transformer."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    t5 = t5_config().to_dict()
    umt5 = UMT5Config(
        **{k: t5[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")}
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=UMT5EncoderModel(umt5),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )
    return _saved(pipe, directory, dtype)


def run_sd3(pipe: Any, steps: int = 2, seed: int = 0) -> torch.Tensor:
    return _latents(pipe, steps, seed, height=8, width=8, guidance_scale=5.0)


def run_wan(pipe: Any, steps: int = 2, seed: int = 0) -> torch.Tensor:
    options = dict(negative_prompt="a dog", height=16, width=16, num_frames=5, guidance_scale=6.0)
    return _latents(pipe, steps, seed, output="frames", **options)


def qwen_tokenizer() -> Any:
    """A byte-level Qwen2Tokenizer with no merges: every byte is a token (round-trips through save)."""
    from transformers import Qwen2Tokenizer

    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", eos_token="<|im_end|>")


def tiny_qwenimage_pipeline(directory: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Any:
    """A random tiny QwenImagePipeline: a Qwen2_5_VLForConditionalGeneration text encoder."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 300,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=300,
        vision_end_token_id=297,
        vision_start_token_id=298,
        vision_token_id=299,
    )
    pipe = QwenImagePipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=qwen_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    return _saved(pipe, directory, dtype)


def run_qwenimage(pipe: Any, steps: int = 2, seed: int = 0) -> torch.Tensor:
    return _latents(pipe, steps, seed, prompt="a photo of a red cat", height=32, width=32, true_cfg_scale=1.0)

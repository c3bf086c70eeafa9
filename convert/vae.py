"""Key table for diffusers' ``AutoencoderKL`` checkpoints (``vae/``)."""

from __future__ import annotations

from imvar_jax.models import abstract_params
from imvar_jax.models.vae import VAEConfig

from .common import ComponentSpec, Rule, conv_rules, linear_rules, norm_rules, resnet_rules


def _resnet(t: str, f: str, in_channels: int, out_channels: int) -> list[Rule]:
    return resnet_rules(t, f, in_channels != out_channels, time_emb=False)


def _mid_block(t: str, f: str, channels: int, attention: bool) -> list[Rule]:
    rules = _resnet(f"{t}.resnets.0", f"{f}/resnets_0", channels, channels)
    if attention:
        a, fa = f"{t}.attentions.0", f"{f}/attentions_0"
        rules += norm_rules(f"{a}.group_norm", f"{fa}/group_norm")
        # Checkpoints from diffusers' old AttentionBlock name these query/key/value/proj_attn.
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            rules += linear_rules(f"{a}.{new}", f"{fa}/{new.replace('.', '_')}", aliases=(f"{a}.{old}",))
    return rules + _resnet(f"{t}.resnets.1", f"{f}/resnets_1", channels, channels)


def _encoder(cfg: VAEConfig) -> list[Rule]:
    channels = cfg.block_out_channels
    rules = conv_rules("encoder.conv_in", "encoder/conv_in")
    prev = channels[0]
    for i, c in enumerate(channels):
        for j in range(cfg.layers_per_block):
            rules += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder/down_blocks_{i}/resnets_{j}",
                             prev if j == 0 else c, c)
        if i < len(channels) - 1:
            rules += conv_rules(f"encoder.down_blocks.{i}.downsamplers.0.conv",
                                f"encoder/down_blocks_{i}/downsamplers_0/conv")
        prev = c
    rules += _mid_block("encoder.mid_block", "encoder/mid_block", channels[-1], cfg.mid_block_add_attention)
    return (rules + norm_rules("encoder.conv_norm_out", "encoder/conv_norm_out")
            + conv_rules("encoder.conv_out", "encoder/conv_out"))


def _decoder(cfg: VAEConfig) -> list[Rule]:
    channels = tuple(reversed(cfg.block_out_channels))
    rules = conv_rules("decoder.conv_in", "decoder/conv_in")
    rules += _mid_block("decoder.mid_block", "decoder/mid_block", channels[0], cfg.mid_block_add_attention)
    prev = channels[0]
    for i, c in enumerate(channels):
        for j in range(cfg.layers_per_block + 1):
            rules += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder/up_blocks_{i}/resnets_{j}",
                             prev if j == 0 else c, c)
        if i < len(channels) - 1:
            rules += conv_rules(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder/up_blocks_{i}/upsamplers_0/conv")
        prev = c
    return (rules + norm_rules("decoder.conv_norm_out", "decoder/conv_norm_out")
            + conv_rules("decoder.conv_out", "decoder/conv_out"))


def table(config: VAEConfig) -> list[Rule]:
    rules = _encoder(config) + _decoder(config)
    if config.use_quant_conv:
        rules += conv_rules("quant_conv", "quant_conv")
    if config.use_post_quant_conv:
        rules += conv_rules("post_quant_conv", "post_quant_conv")
    return rules


SPEC = ComponentSpec(
    name="vae",
    read_config=lambda d: VAEConfig.from_json(d / "config.json"),
    table=table,
    abstract_params=abstract_params,
)

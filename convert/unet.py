"""Key table for diffusers' ``UNet2DConditionModel`` (``unet/``) -> ``imvar_jax.models.unet``."""

from __future__ import annotations

from imvar_jax.models import abstract_params
from imvar_jax.models.unet import UNetConfig

from .common import ComponentSpec, Rule, conv_rules, linear_rules, norm_rules, resnet_rules


def _resnet(t: str, f: str, has_shortcut: bool) -> list[Rule]:
    return resnet_rules(t, f, has_shortcut, time_emb=True)


def _attention(t: str, f: str) -> list[Rule]:
    rules = []
    for proj in ("to_q", "to_k", "to_v"):
        rules += linear_rules(f"{t}.{proj}", f"{f}/{proj}", bias=False)
    return rules + linear_rules(f"{t}.to_out.0", f"{f}/to_out_0")


def _transformer(t: str, f: str, depth: int, linear_projection: bool) -> list[Rule]:
    proj = linear_rules if linear_projection else conv_rules
    rules = norm_rules(f"{t}.norm", f"{f}/norm") + proj(f"{t}.proj_in", f"{f}/proj_in")
    for k in range(depth):
        bt, bf = f"{t}.transformer_blocks.{k}", f"{f}/transformer_blocks_{k}"
        rules += (norm_rules(f"{bt}.norm1", f"{bf}/norm1") + _attention(f"{bt}.attn1", f"{bf}/attn1")
                  + norm_rules(f"{bt}.norm2", f"{bf}/norm2") + _attention(f"{bt}.attn2", f"{bf}/attn2")
                  + norm_rules(f"{bt}.norm3", f"{bf}/norm3")
                  + linear_rules(f"{bt}.ff.net.0.proj", f"{bf}/ff/net_0/proj")
                  + linear_rules(f"{bt}.ff.net.2", f"{bf}/ff/net_2"))
    return rules + proj(f"{t}.proj_out", f"{f}/proj_out")


def table(config: UNetConfig) -> list[Rule]:
    """Every tensor of the UNet, in diffusers' order of construction."""
    channels = config.block_out_channels
    n = len(channels)
    layers, depth = config.resnets_per_block, config.transformer_depths
    linear = config.use_linear_projection

    rules = conv_rules("conv_in", "conv_in")
    rules += linear_rules("time_embedding.linear_1", "time_embedding/linear_1")
    rules += linear_rules("time_embedding.linear_2", "time_embedding/linear_2")

    for i, kind in enumerate(config.down_block_types):
        t, f = f"down_blocks.{i}", f"down_blocks_{i}"
        c_in = channels[max(i - 1, 0)]
        for j in range(layers[i]):
            rules += _resnet(f"{t}.resnets.{j}", f"{f}/resnets_{j}", (c_in if j == 0 else channels[i]) != channels[i])
            if kind == "CrossAttnDownBlock2D":
                rules += _transformer(f"{t}.attentions.{j}", f"{f}/attentions_{j}", depth[i], linear)
        if i < n - 1:
            rules += conv_rules(f"{t}.downsamplers.0.conv", f"{f}/downsamplers_0/conv")

    rules += _resnet("mid_block.resnets.0", "mid_block/resnets_0", False)
    rules += _transformer("mid_block.attentions.0", "mid_block/attentions_0", depth[-1], linear)
    rules += _resnet("mid_block.resnets.1", "mid_block/resnets_1", False)

    for i, kind in enumerate(config.up_block_types):
        level = n - 1 - i
        t, f = f"up_blocks.{i}", f"up_blocks_{i}"
        # Every up-block resnet sees a concatenation with a skip, so its input width never equals its output.
        for j in range(layers[level] + 1):
            rules += _resnet(f"{t}.resnets.{j}", f"{f}/resnets_{j}", True)
            if kind == "CrossAttnUpBlock2D":
                rules += _transformer(f"{t}.attentions.{j}", f"{f}/attentions_{j}", depth[level], linear)
        if i < n - 1:
            rules += conv_rules(f"{t}.upsamplers.0.conv", f"{f}/upsamplers_0/conv")

    rules += norm_rules("conv_norm_out", "conv_norm_out") + conv_rules("conv_out", "conv_out")
    return rules


SPEC = ComponentSpec(
    name="unet",
    read_config=lambda d: UNetConfig.from_json(d / "config.json"),
    table=table,
    abstract_params=abstract_params,
)

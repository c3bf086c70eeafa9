"""Key tables for the CLIP image encoder (``image_encoder/``) and the safety checker (``safety_checker/``)."""

from __future__ import annotations

from dataclasses import replace

from imvar_jax.models import abstract_params
from imvar_jax.models.clip_vision import CLIPVisionConfig
from imvar_jax.models.safety_checker import SafetyCheckerConfig

from .common import ComponentSpec, Rule, conv_rules, linear_rules, norm_rules, param_rule


def _tower(cfg: CLIPVisionConfig) -> list[Rule]:
    """transformers' vision transformer under ``vision_model.``, as ``CLIPVisionModelWithProjection`` saves it."""
    t, f = "vision_model", "vision_model"
    rules = [param_rule(f"{t}.embeddings.class_embedding", f"{f}/embeddings/class_embedding")]
    rules += conv_rules(f"{t}.embeddings.patch_embedding", f"{f}/embeddings/patch_embedding", bias=False)
    rules.append(param_rule(f"{t}.embeddings.position_embedding.weight",
                            f"{f}/embeddings/position_embedding/embedding"))
    rules += norm_rules(f"{t}.pre_layrnorm", f"{f}/pre_layrnorm")
    for i in range(cfg.num_hidden_layers):
        lt, lf = f"{t}.encoder.layers.{i}", f"{f}/encoder/layers_{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            rules += linear_rules(f"{lt}.self_attn.{proj}", f"{lf}/self_attn/{proj}")
        rules += norm_rules(f"{lt}.layer_norm1", f"{lf}/layer_norm1")
        rules += linear_rules(f"{lt}.mlp.fc1", f"{lf}/mlp/fc1")
        rules += linear_rules(f"{lt}.mlp.fc2", f"{lf}/mlp/fc2")
        rules += norm_rules(f"{lt}.layer_norm2", f"{lf}/layer_norm2")
    return rules + norm_rules(f"{t}.post_layernorm", f"{f}/post_layernorm")


def image_encoder_table(config: CLIPVisionConfig) -> list[Rule]:
    return _tower(config) + linear_rules("visual_projection", "visual_projection", bias=False)


def safety_checker_table(config: SafetyCheckerConfig) -> list[Rule]:
    # transformers 4 nested the tower in CLIPVisionModel (``vision_model.vision_model.*``, as the
    # published checkpoints hold it); transformers 5 saves it one level up (``vision_model.*``).
    rules = [replace(r, torch_key=f"vision_model.{r.torch_key}", flax_path=("vision_model",) + r.flax_path,
                     aliases=(r.torch_key,))
             for r in _tower(config.vision_config)]
    rules += linear_rules("visual_projection", "visual_projection", bias=False)
    for name in ("concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights"):
        rules.append(param_rule(name, name))
    return rules


# transformers before 4.31 saved the position-id buffer with the weights.
_POSITION_IDS = "vision_model.embeddings.position_ids"

IMAGE_ENCODER_SPEC = ComponentSpec(
    name="image_encoder",
    read_config=lambda d: CLIPVisionConfig.from_json(d / "config.json"),
    table=image_encoder_table,
    abstract_params=abstract_params,
    ignored=(_POSITION_IDS,),
)

SAFETY_CHECKER_SPEC = ComponentSpec(
    name="safety_checker",
    read_config=lambda d: SafetyCheckerConfig.from_json(d / "config.json"),
    table=safety_checker_table,
    abstract_params=abstract_params,
    ignored=(f"vision_model.{_POSITION_IDS}", _POSITION_IDS),
)

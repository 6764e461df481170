"""Networks: the MiT (SegFormer) encoder or a timm CNN, the all-MLP decoder and the ECA/AFA network."""

from ecaseg.models.checkpoints import (
    convert_mit_state_dict,
    hf_to_nvlabs,
    load_mit_weights,
    nvlabs_to_hf,
    read_checkpoint,
)
from ecaseg.models.ecanet import (
    ECANet,
    ECAOutput,
    attention_to_affinity,
    gmp_logits,
    raw_cam,
    stochastic_layers,
)
from ecaseg.models.mit import (
    MIT_CONFIGS,
    MixVisionTransformer,
    available_backbones,
    create_backbone,
    mit_b0,
    mit_b1,
    mit_b2,
    mit_b3,
    mit_b4,
    mit_b5,
    mit_nano,
)
from ecaseg.models.segformer_head import SegFormerHead
from ecaseg.models.timm_backbone import TimmBackbone, is_timm_backbone

__all__ = [
    "MIT_CONFIGS",
    "ECANet",
    "ECAOutput",
    "MixVisionTransformer",
    "SegFormerHead",
    "TimmBackbone",
    "attention_to_affinity",
    "available_backbones",
    "convert_mit_state_dict",
    "create_backbone",
    "gmp_logits",
    "hf_to_nvlabs",
    "is_timm_backbone",
    "load_mit_weights",
    "mit_b0",
    "mit_b1",
    "mit_b2",
    "mit_b3",
    "mit_b4",
    "mit_b5",
    "mit_nano",
    "nvlabs_to_hf",
    "raw_cam",
    "read_checkpoint",
    "stochastic_layers",
]

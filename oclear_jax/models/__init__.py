"""OCLEAR models: image and text towers, document fusion, query/doc heads (logical axis names only)."""
from oclear_jax.models import accelerator  # model.dtype, model.remat, model.conv_impl per backend
from oclear_jax.models import bert  # registers the 'minilm' and 'bert' text towers
from oclear_jax.models import checkpoint_towers  # registers 'hf' and 'big_vision' (model.*_tower='hf:FOLDER')
from oclear_jax.models.bert import BertEncoder
from oclear_jax.models.bert import BertSizes
from oclear_jax.models.bert import MINILM_L6
from oclear_jax.models.concept_memory import ConceptMemoryFusion
from oclear_jax.models import efficientnet  # Registers the "efficientnet_lite0" image tower.
from oclear_jax.models.efficientnet import EfficientNetLite0
from oclear_jax.models.fusion import DocumentFusion
from oclear_jax.models.fusion import FUSIONS
from oclear_jax.models.fusion import TitleFeatures
from oclear_jax.models.fusion import title_present
from oclear_jax.models.oclear import build_model
from oclear_jax.models.oclear import IMAGE_TOWERS
from oclear_jax.models.oclear import l2_normalize
from oclear_jax.models.oclear import ModelConfig
from oclear_jax.models.oclear import OclearModel
from oclear_jax.models.oclear import ProjectionHead
from oclear_jax.models.oclear import register_image_tower
from oclear_jax.models.oclear import register_text_tower
from oclear_jax.models.oclear import TEXT_TOWERS
from oclear_jax.models.oclear import TextConfig
from oclear_jax.models.text import TextEncoder
from oclear_jax.models.vit import SelfAttention
from oclear_jax.models.vit import TransformerBlock
from oclear_jax.models.vit import VIT_PRESETS
from oclear_jax.models.vit import ViTEncoder


__all__ = [
    "BertEncoder",
    "BertSizes",
    "MINILM_L6",
    "ConceptMemoryFusion",
    "DocumentFusion",
    "EfficientNetLite0",
    "FUSIONS",
    "IMAGE_TOWERS",
    "ModelConfig",
    "OclearModel",
    "ProjectionHead",
    "TEXT_TOWERS",
    "TextConfig",
    "TextEncoder",
    "TitleFeatures",
    "SelfAttention",
    "TransformerBlock",
    "VIT_PRESETS",
    "ViTEncoder",
    "build_model",
    "l2_normalize",
    "register_image_tower",
    "register_text_tower",
    "title_present",
]

"""condiff backbones: `create(name, conditioning="class" | "text", **overrides)`; every model is `model(x_t, t, cond)`.

Names: dit, dit-att, mdt-v2, pixart-alpha, mmdit, mmdit-ours (+ -tiny, -s/2, -b/2, -l/2, -xl/2) and the
registered UNet family; see `condiff.models.zoo`. `attention_impl("math")` switches every model to explicit
attention matmuls (FLOP counting).
"""

from condiff.models.layers import attention_impl
from condiff.models.zoo import FAMILIES, available, create, family_of, model_config, register_family

__all__ = ["create", "model_config", "family_of", "available", "register_family", "FAMILIES", "attention_impl"]

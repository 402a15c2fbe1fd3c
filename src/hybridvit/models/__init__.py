"""The model families and the table of every registered variant (`VARIANTS`, name -> Variant)."""
from . import cabvit, crossformer, fastervit
from ._base import FeatureInfo, adapt_input_channels
from ._variant import Variant

VARIANTS: dict[str, Variant] = {}
for _family in (fastervit, crossformer, cabvit):
    for _v in _family.VARIANTS:
        if _v.name in VARIANTS:
            raise ValueError(f"model {_v.name!r} is registered twice")
        VARIANTS[_v.name] = _v

__all__ = ["VARIANTS", "FeatureInfo", "Variant", "adapt_input_channels"]

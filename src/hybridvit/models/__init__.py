"""Model families; importing this module registers every variant."""
import importlib

for _family in ("fastervit", "crossformer", "cabvit"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as e:  # a family not written yet
        if e.name != f"{__name__}.{_family}":
            raise

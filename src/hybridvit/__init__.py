"""hybridvit: FasterViT, CrossFormer/CrossFormer++ and CabViT with official weights, training,
benchmarks and export."""
from ._version import __version__
from .hub import save_pretrained
from .integrations import install_timm_hook
from .loading import create_model, load_checkpoint, load_model
from .registry import list_models

__all__ = ["create_model", "list_models", "load_checkpoint", "load_model", "save_pretrained", "__version__"]

install_timm_hook()  # hybridvit's models appear in timm's registry once timm is (or gets) imported

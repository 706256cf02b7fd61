"""sparsedeploy: prune a causal LM with layerwise sparsity and deploy it for sparse CPU inference."""
import os as _os

# deepsparse / sparseml / sparsezoo make a blocking analytics call on import unless this is set.
# It must be set before any of them is imported, so it lives at the package root.
_os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"

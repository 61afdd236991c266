"""onnx-lobs: prune exported ONNX models with layer-wise Optimal Brain Surgeon.

    import onnx_lobs
    result = onnx_lobs.prune("model.onnx", "calib.npz", onnx_lobs.PruneConfig(sparsity=0.9))
    onnx_lobs.save_model(result.model, "pruned.onnx")
    print(result.report.to_json())
"""

from .version import __version__  # noqa: E402,F401
from .errors import LobsError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .graph import find_layers  # noqa: E402
from .modelio import load_model, save_model  # noqa: E402
from .pruning import PruneConfig, PruneResult, prune  # noqa: E402
from .retrain import RetrainResult, retrain  # noqa: E402  (imports torch only when called)

__all__ = ["LobsError", "PruneConfig", "PruneResult", "evaluate", "find_layers", "load_model",
           "prune", "retrain", "RetrainResult", "save_model", "__version__"]

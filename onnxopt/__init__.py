"""onnxopt: optimize trained ONNX models and check them against ONNX Runtime."""

from onnxopt.errors import GateFailed, OnnxoptError
from onnxopt.model_io import load_model, save_model
from onnxopt.pass_infra import Pass, PassConfig, PassContext, PassManager, PassResult
from onnxopt.recipe import GateConfig, Recipe, load_recipe
from onnxopt.registry import get_pass_class, register_pass

__version__ = "0.1.0"

__all__ = [
    "GateConfig",
    "GateFailed",
    "OnnxoptError",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassManager",
    "PassResult",
    "Recipe",
    "get_pass_class",
    "load_model",
    "load_recipe",
    "register_pass",
    "save_model",
]

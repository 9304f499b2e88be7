"""Brain3D: volumes and text in, reports out. Knows nothing of DICOM."""

# The model's names, imported lazily: the node imports ``inference.report_schema`` without torch.
_MODEL_EXPORTS = {
    "Brain3D": "inference.modeling_brain3d",
    "GenerationOutput": "inference.modeling_brain3d",
    "Brain3DConfig": "inference.configuration_brain3d",
    "train_report_tokenizer": "inference.tokenization",
}


def __getattr__(name: str) -> object:
    if name in _MODEL_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_MODEL_EXPORTS[name]), name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")

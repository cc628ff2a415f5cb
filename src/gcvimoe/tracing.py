"""Which graph capture is running, read the same way under every torch release."""
import torch


def exporting() -> bool:
    """Whether ``torch.export`` (or the ONNX exporter built on it) is capturing the model; False under
    ``torch.compile``.

    This reads torch's own export flag instead of calling ``torch.compiler.is_exporting()``. Before the fix in
    pytorch/pytorch#176499 (torch 2.11 still lacks it), dynamo replaced that call by a constant True inside every
    trace, ``torch.compile`` included (pytorch/pytorch#176347). A compiled model would then take the export paths:
    every expert on every token, and no routing statistics or aux loss.
    """
    return torch.compiler._is_exporting_flag


def fx_tracing() -> bool:
    """Whether ``torch.fx`` symbolic tracing (timm's fx feature extraction, MAC counting) is running the model."""
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing()

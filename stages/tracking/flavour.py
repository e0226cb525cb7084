"""The trained network as an MLflow model: the pytorch flavour, its signature, the checkpoint.

MLflow 3 saves it in the 'pt2' format (a torch.export graph, no pickled code), traced on the
example input; the stage's state dict file (models/model.pt) goes with it as extra_files/model.pt,
so model.pretrained = runs:/<id>/model can start a new run from it.
"""

from __future__ import annotations

from pathlib import Path


def log_model(model, example_input, checkpoint: Path) -> None:
    """mlflow.pytorch.log_model into the active run, with an explicit signature."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with (
        torch.no_grad()
    ):  # the signature: float32 images (N×3×H×W, pixels in [0, 1]) → class logits
        device = next(model.parameters()).device
        signature = infer_signature(
            example_input.numpy(), model(example_input.to(device)).float().cpu().numpy()
        )
    mlflow.pytorch.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example_input.numpy(),
        extra_files=[str(checkpoint)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )

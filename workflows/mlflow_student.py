"""The registered student as an MLflow "model from code": MLflow stores this file, the safetensors
weights and the factory spec, and loading runs this code, so nothing is unpickled from the
tracking server (`mlflow.pyfunc.load_model(uri)`). `predict` takes input features ([B, F] float32,
or token ids for an LM) and returns the student's logits; `model.unwrap_python_model().module` is
the torch module itself.
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class Student(PythonModel):
    def load_context(self, context):
        from kd_ops import models

        spec = json.loads(open(context.artifacts["spec"]).read())
        self.module = models.load_weights(models.build(spec["factory"], spec["kwargs"]), context.artifacts["weights"])
        self.module.eval()

    def predict(self, context, model_input, params=None):
        x = torch.as_tensor(np.asarray(model_input))
        with torch.inference_mode():
            out = self.module(x)
        return (out.logits if hasattr(out, "logits") else out).numpy()


mlflow.models.set_model(Student())

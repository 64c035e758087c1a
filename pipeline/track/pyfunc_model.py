"""The file MLflow runs to build the logged model ("models from code"): no pickled object is stored.

`tracking.log_model` passes this file as `python_model`; it ships with the model, beside the
`pipeline` package (code_paths), and runs when the model is loaded.
"""

from mlflow.models import set_model

from pipeline.track.serving import ImageClassifierModel

set_model(ImageClassifierModel())

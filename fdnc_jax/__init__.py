"""fdnc_jax: fast Deep Neuron Correspondence for C. elegans in JAX/Flax.

Example:
  >>> import fdnc_jax as fd
  >>> template, test = fd.load_demo_pair()
  >>> pred = fd.predict(fd.load_pretrained(), template, test, top_k=5)  # doctest: +SKIP
"""

from fdnc_jax.atlas import build_atlas, load_atlas
from fdnc_jax.checkpoint import load_checkpoint, load_pretrained
from fdnc_jax.datasets import load_demo_pair
from fdnc_jax.io import load_fdnc_pickle, load_recording, load_worm, save_recording, save_worm
from fdnc_jax.model.fdnc import Model
from fdnc_jax.predict import (
    Prediction,
    predict,
    predict_batch,
    save_predictions,
    track_matrix,
)
from fdnc_jax.worm import Worm

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Prediction",
    "Worm",
    "build_atlas",
    "load_atlas",
    "load_checkpoint",
    "load_demo_pair",
    "load_fdnc_pickle",
    "load_pretrained",
    "load_recording",
    "load_worm",
    "predict",
    "predict_batch",
    "save_predictions",
    "save_recording",
    "save_worm",
    "track_matrix",
]

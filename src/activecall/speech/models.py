"""Models no registry package ships, kept under the models directory (``--models-dir``, default ``./models``).

``<models_dir>/<name>/`` holds one model (``sensevoice``: a sherpa-onnx SenseVoice directory with
``model.int8.onnx`` or ``model.onnx`` and ``tokens.txt``).  Nothing is ever fetched at call time.
"""

from __future__ import annotations

import os
from typing import Optional

REQUIRED = {
    "sensevoice": (("model.int8.onnx", "model.onnx"), ("tokens.txt",)),
}


def installed_dir(models_dir: str, name: str) -> Optional[str]:
    """``<models_dir>/<name>`` when every file the model needs is there, else None."""
    path = os.path.join(models_dir, name)
    need = REQUIRED.get(name)
    if need is None or not os.path.isdir(path):
        return None
    for alternatives in need:
        if not any(os.path.isfile(os.path.join(path, f)) for f in alternatives):
            return None
    return path

"""The MNIST application built on torchcnn: what train.py and predict.py are made of.

The library (torchcnn, torchcnn.functional, torchcnn.nn) never imports this package. Its modules:

- ``cli``: train.py's command line — its choices, the recipes, the parser — in plain Python (no torch).
- ``run``: one run of train.py, stage by stage (checkpoint, data, model, training, outputs).
- ``data``: find, verify and load the MNIST files as tensors; ``Batches`` for training and evaluation.
- ``model``: ``MnistNet``, from torchcnn's layers or, identically, torch.nn's.
- ``engine``: optimizers, schedules, the training epoch, evaluation, the process group, stop requests.
- ``checkpoint``: ``TrainingState``, what a checkpoint holds; atomic saving; loading, old formats too.
- ``plots``: the pictures a run leaves behind (matplotlib, imported when drawing).
- ``cuda_graph``: the training step captured in a CUDA graph (``--cuda-graphs``).
- ``digits``: a photo of a digit prepared as MNIST's were (PIL, imported when preparing).

Import the modules themselves (``from torchcnn.mnist import data``); this file imports only ``cli``,
which needs no torch (train.py loads it before anything else, from its file; see train.py).
"""

from . import cli  # noqa: F401

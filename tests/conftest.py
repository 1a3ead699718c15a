import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchcnn  # noqa: E402,F401  (builds/loads the extension once, before any test runs)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The references must be exact to the dtype: torch's CUDA convolutions (cuDNN) would otherwise run
# float32 in TF32, and cuBLAS may reduce half-type partial sums in half precision.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

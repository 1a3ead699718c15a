"""Checks that a torchcnn package built for another torch is refused by name, not by the dynamic loader.

    python scripts/expect_refused.py FOLDER VERSION

FOLDER holds a ``torchcnn`` package whose compiled library was built for torch VERSION; under this
interpreter's torch (another one), loading its kernels must raise an ImportError naming both
versions. .ci/run runs it on the wheel it builds against torch 2.13.
"""

import sys


def main() -> int:
    folder, version = sys.argv[1:3]
    sys.path.insert(0, folder)
    import torch
    import torchcnn

    if not torchcnn.__file__.startswith(folder):
        print(f"expect_refused: imported {torchcnn.__file__}, not the package in {folder}")
        return 1
    try:
        torchcnn.load()
    except ImportError as e:
        if f"was built for torch {version}" in str(e) and torch.__version__ in str(e):
            print(f"refused under torch {torch.__version__}, as it should be: {e}")
            return 0
        print(f"expect_refused: an ImportError that does not name both versions: {e}")
        return 1
    print(f"expect_refused: a package built for torch {version} loaded under torch {torch.__version__}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

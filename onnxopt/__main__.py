"""``python -m onnxopt``: the same CLI as the ``onnxopt`` script."""

from onnxopt.cli import main

if __name__ == "__main__":
    main()

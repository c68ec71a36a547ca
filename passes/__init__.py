"""Built-in passes, one module each (installed as ``onnxopt.passes``).

Each is registered in pyproject's ``onnxopt.passes`` entry-point group, the same
way a third-party package adds its own.
"""

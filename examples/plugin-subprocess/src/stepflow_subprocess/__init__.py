"""stepflow-subprocess: a step-operator flavor that runs each step attempt in a fresh Python process.

Importing this package imports nothing else: the flavor (``stepflow_subprocess.flavor``), the
operator (``stepflow_subprocess.operator``) and the child's entry point
(``python -m stepflow_subprocess.entrypoint``) are separate modules, loaded when needed.
"""

__version__ = "0.1.0"

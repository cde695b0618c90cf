"""Framework adapters, installed as ``mldbg_callbacks.integrations``.

Each module knows one framework and nothing else; importing this package imports no framework.
"""

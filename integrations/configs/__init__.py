"""Config snippets for OpenMMLab configs, installed with the package.

``HOOK_CONFIG`` is the path of ``mldbg_hook.py``, to ``_base_``-include in an MMEngine config::

    _base_ = ["<HOOK_CONFIG>", ...]    # e.g. from mldbg_callbacks.integrations.configs import HOOK_CONFIG
"""

import os

HOOK_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mldbg_hook.py")

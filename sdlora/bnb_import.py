"""bitsandbytes only for the runs that ask for it (8-bit AdamW, an NF4 base).

peft imports bitsandbytes whenever it is installed (at `import peft`, and again when it injects LoRA layers). That
import takes seconds and, on CPUs with AVX512-BF16, bitsandbytes' CPU backend tries to fetch a kernel from a model
hub and logs a warning when it cannot. `hide()` (called when `sdlora` is imported) puts `None` into sys.modules:
`import bitsandbytes` then raises ImportError and `importlib.util.find_spec` answers None, so peft, accelerate and
diffusers take bitsandbytes as not installed. `load()` undoes that for the runs that need it.
"""

from __future__ import annotations

import sys
from types import ModuleType

_NAME = "bitsandbytes"
_hidden = False  # True while the None entry in sys.modules is ours


# Libraries that ask once whether bitsandbytes is installed and import it later on that answer (diffusers' quantizers,
# for one): imported before sdlora, they may have been told yes.
_ASKERS = ("accelerate", "diffusers", "peft", "transformers")


def hide() -> None:
    """Make bitsandbytes look uninstalled until `load()`, unless it or a library that asks for it is imported."""
    global _hidden
    if _NAME not in sys.modules and not any(name in sys.modules for name in _ASKERS):
        # None in sys.modules makes `import` raise ImportError (the import system's documented rule); typeshed
        # types the dict as modules only.
        sys.modules[_NAME] = None  # type: ignore[assignment]
        _hidden = True


def load() -> ModuleType:
    """Import bitsandbytes (undoing `hide()`).

    Raises:
        ImportError: bitsandbytes is not installed.
    """
    global _hidden
    if _hidden and _NAME in sys.modules and sys.modules[_NAME] is None:
        del sys.modules[_NAME]
        # peft caches its "is bitsandbytes installed" answers, given while it was hidden.
        peft_imports = sys.modules.get("peft.import_utils")
        for check in ("is_bnb_available", "is_bnb_4bit_available"):
            cached = getattr(peft_imports, check, None)
            if cached is not None:
                cached.cache_clear()
    _hidden = False
    import bitsandbytes

    return bitsandbytes

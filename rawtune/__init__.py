"""rawtune: raw text in, an Ollama-pullable model out.

The library's stages live in one module each (data, train, evaluate, merge, export, hub, chat);
``rawtune.pipeline.run_pipeline`` chains them. Importing rawtune needs neither gradio nor a GPU.
"""

__version__ = "0.1.0"

from .errors import RawtuneError  # noqa: E402,F401
from .rundir import RunDir  # noqa: E402,F401
from .settings import RunSettings  # noqa: E402,F401

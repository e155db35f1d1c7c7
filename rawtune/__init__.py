"""rawtune: raw text in, an Ollama-pullable model out.

The library's stages live in one module or package each (data, train, evaluate, merge, export,
publish, compare), over shared facts (quants, hubauth, models); ``rawtune.pipeline.run_pipeline``
chains them. docs/architecture.md draws the layers. Importing rawtune needs neither gradio nor a
GPU.
"""

__version__ = "0.1.0"

from .errors import RawtuneError  # noqa: E402,F401
from .rundir import RunDir  # noqa: E402,F401
from .settings import RunSettings  # noqa: E402,F401

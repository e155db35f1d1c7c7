"""The export stage: base model + adapter -> GGUF files checked by llama.cpp, plus the files Ollama reads.

:func:`export_run` is an orchestrator over :mod:`.steps` (plan, convert, reference model,
quantize, verify, Ollama files, clean up, record). A safetensors base is merged tensor by tensor
while the GGUF is written: no merged folder, memory bounded by a few tensors. :mod:`.gguf_writer` is rawtune's own HF -> GGUF writer, :mod:`.imatrix`
the importance matrix for k-quants,
:mod:`.ollama` writes the Ollama files, :mod:`.llama` is the one place that opens a GGUF in
llama.cpp. Running export twice reuses files made from the same base model and adapter.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ExportError
from ..rundir import RunDir
from ..settings import ExportSettings
from . import steps

__all__ = ["export_run"]


def export_run(run: RunDir, settings: ExportSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Merge, convert, quantize and verify; write the Ollama files; record ``gguf`` and ``export``.

    On any failure the F16 work file and half-written GGUFs are removed: a full disk must not
    stay full, and a later export must not mistake a fragment for a finished file.
    """
    try:
        with run.lock():  # also when called directly (the app), not only through the pipeline
            return _export(run, settings, log)
    except BaseException as exc:
        steps.remove_work_files(run, steps.file_stem(run, settings.name))
        if isinstance(exc, OSError):
            raise ExportError(f"writing the GGUF files in {run.path} failed ({exc.strerror or exc}); free disk "
                              f"space there (the F16 file needs about 2 bytes per parameter) and export again") from None
        raise


def _export(run: RunDir, settings: ExportSettings, log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    plan = steps.plan(run, settings, log)
    gguf = dict(plan.kept)
    license = (run.load().get("model") or {}).get("license")
    conversion, seconds_convert = steps.convert(plan, license, gguf, log)
    check = steps.prepare_verification(run, plan, settings.verify, log)
    imatrix = steps.reference(run, plan, check, log)  # the one PyTorch model, freed before llama.cpp runs
    seconds_quantize = steps.quantize_all(run, plan, gguf, imatrix, log)
    tokenizer = AutoTokenizer.from_pretrained(str(plan.model_dir))
    steps.verify(plan, gguf, tokenizer, check, log)
    written = steps.ollama_files(plan, tokenizer, conversion, log)
    steps.clean_up(plan, log)
    times = steps.Times(seconds_convert, seconds_quantize, check.seconds, imatrix.seconds if imatrix else 0.0,
                        check.seconds_model + plan.seconds_check_reference)
    return steps.record(run, plan, gguf, conversion, check, written, times, imatrix, log)

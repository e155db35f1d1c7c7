"""Start rawtune's Gradio app: `python app.py` (local), `--share` (public link), or as a Space.

On a Hugging Face Space this file is the ``app_file``; the Space runs it with no arguments and
reads ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` itself. Run directories go under
``RAWTUNE_RUNS`` (default ``./runs``). What visitors of a shared app may do is set by environment
variables described in docs/security.md.
"""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# On a Space with several GPUs one training uses all of them (one worker process per GPU); with
# one GPU, or on ZeroGPU, training stays in the app's process.
os.environ.setdefault("RAWTUNE_GPUS", "all")
if "--share" in sys.argv[1:]:
    # A public link makes this a shared app: visitors get the same limits as on a Space. Set
    # before the page is built, so the page states those limits too.
    os.environ["RAWTUNE_SHARED"] = "1"

from rawtune.pipeline import exit_on_sigterm  # noqa: E402
from rawtune.ui import build_demo, launch_options  # noqa: E402  (after the analytics switch)
from rawtune.ui.session import runs_root  # noqa: E402

demo = build_demo()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="rawtune's web app")
    parser.add_argument("--share", action="store_true", help="also serve a public gradio.live link")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    args = parser.parse_args(argv)
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    # GPU work takes turns in the app's own line (rawtune.space); other events queue here.
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **launch_options())
    exit_on_sigterm()  # a Space stopping the app: trainings save a checkpoint, then exit 143
    demo.block_thread()


if __name__ == "__main__":
    main()

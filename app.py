"""Start rawtune's Gradio app: `python app.py` (local), `--share` (public link), or as a Space.

On a Hugging Face Space this file is the ``app_file``; the Space runs it with no arguments and
reads ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` itself. Run directories go under
``RAWTUNE_RUNS`` (default ``./runs``).
"""

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from rawtune.ui import build_demo, runs_root  # noqa: E402  (after the analytics switch)

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
    # One training at a time per GPU (the Train buttons' own limit); other events queue too.
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share,
                allowed_paths=[str(root)], footer_links=["gradio", "settings"])


if __name__ == "__main__":
    main()

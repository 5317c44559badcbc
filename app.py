"""The web studio: `python app.py [OPTIONS]` is `studio serve [OPTIONS]` (the UI lives in studio/webapp.py)."""
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notes about unused image backends

from studio.cli import app  # noqa: E402

if __name__ == "__main__":
    sys.exit(app(["serve", *sys.argv[1:]]))

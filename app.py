"""The web studio: `python app.py` does what `studio serve` does (the UI lives in studio/webapp.py)."""
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time notes about unused image backends

from studio.webapp import cli_main  # noqa: E402

if __name__ == "__main__":
    cli_main()

"""The web studio: `python app.py` does what `studio serve` does (the UI lives in studio/webapp.py)."""
from studio.webapp import cli_main

if __name__ == "__main__":
    cli_main()

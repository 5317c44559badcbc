"""The `studio` command."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from studio.errors import StudioError

app = typer.Typer(help="LoRA Studio: compose several LoRAs on a diffusion model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
toyworld = typer.Typer(help="The shapes world: train and evaluate the bundled default model, its judge and "
                            "example LoRAs.", no_args_is_help=True)
app.add_typer(toyworld, name="toyworld")


def fail(message: str, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def not_built(name: str) -> None:
    typer.secho(f"`studio {name}` is not built yet.", err=True)
    raise typer.Exit(3)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(7860, help="Port."),
          model: Optional[str] = typer.Option(None, help="Base model: folder, .safetensors file or hub id "
                                                         "(default: the bundled shapes-world model)."),
          open_browser: bool = typer.Option(False, "--open", help="Open a browser tab.")):
    """Start the web studio."""
    import app as studio_app

    try:
        studio_app.main(host=host, port=port, model=model, open_browser=open_browser)
    except StudioError as exc:
        fail(str(exc))


@app.command()
def generate(preset: Path = typer.Argument(..., help="A preset (.json) or a PNG made by the studio."),
             out: Path = typer.Option(..., "--out", help="Output folder."),
             method: Optional[str] = typer.Option(None, help="Override the preset's method."),
             seed: Optional[int] = typer.Option(None, help="Override the preset's seed.")):
    """Generate the image of a preset."""
    not_built("generate")


@app.command()
def inspect(lora_file: Path = typer.Argument(..., help="A LoRA file."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Identify a LoRA file without loading its tensors."""
    not_built("inspect")


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the composition methods with their parameters."""
    not_built("methods")


@app.command()
def batch(presets: list[Path] = typer.Argument(None), out: Path = typer.Option(Path("out"), "--out")):
    """Generate many presets and seeds, locally or on Ray."""
    not_built("batch")


@app.command()
def bench(name: str = typer.Argument("all")):
    """Run a benchmark from bench/ and print its measured ratios."""
    not_built("bench")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

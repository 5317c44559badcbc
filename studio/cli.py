"""The `studio` command."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from studio.errors import StudioError

# transformers warns at import time about optional image backends the studio never uses
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

app = typer.Typer(help="LoRA Studio: compose several LoRAs on a diffusion model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
toyworld = typer.Typer(help="The shapes world: train and evaluate the bundled default model, its judge and "
                            "example LoRAs.", no_args_is_help=True)
app.add_typer(toyworld, name="toyworld")
b4m = typer.Typer(help="Break-for-Make: train B4M content / style adapters and assemble a pair.", no_args_is_help=True)
app.add_typer(b4m, name="b4m")


MaxPixels = Annotated[Optional[int], typer.Option("--max-pixels", help="Limit: pixels of one image (default "
                                                                     "1024² on CPU, 4096² on CUDA; "
                                                                     "$LORA_STUDIO_MAX_PIXELS).")]
MaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help="Limit: denoising steps (default 150; "
                                                                   "$LORA_STUDIO_MAX_STEPS).")]
MaxLoras = Annotated[Optional[int], typer.Option("--max-loras", help="Limit: LoRAs in one composition (default 16; "
                                                                   "$LORA_STUDIO_MAX_LORAS).")]
MaxImages = Annotated[Optional[int], typer.Option("--max-images", help="Limit: images (seeds) of one request "
                                                                     "(default 64; $LORA_STUDIO_MAX_IMAGES).")]


def limits_from_options(device: str | None = None, upload_mb: float | None = None, **values):
    from studio.limits import Limits

    return Limits.for_device(device, max_upload_bytes=None if upload_mb is None else int(upload_mb * 2**20),
                             **values)


def fail(message: str, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps({"error": message}))
    else:
        typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Address to listen on."),
          port: int = typer.Option(7860, help="Port."),
          model: Optional[str] = typer.Option(None, help="Base model: folder, .safetensors file or hub id "
                                                         "(default: the bundled shapes-world model)."),
          config: Optional[str] = typer.Option(None, help="For a single-file checkpoint: a local diffusers folder of "
                                                          "the same architecture, instead of the shipped "
                                                          "configuration."),
          library: Optional[str] = typer.Option(None, help="LoRA library folder (default ~/.cache/lora-studio/loras "
                                                          "or $LORA_STUDIO_LORAS)."),
          models: Optional[Path] = typer.Option(None, help="An A1111 or ComfyUI install: its LoRA folders join the "
                                                           "library and --model may name one of its checkpoints."),
          outputs: Optional[Path] = typer.Option(None, help="Folder the studio keeps every result in, across restarts "
                                                            "(default ~/.local/share/lora-studio/outputs or "
                                                            "$LORA_STUDIO_OUTPUTS)."),
          open_browser: bool = typer.Option(False, "--open", help="Open a browser tab."),
          auth: Optional[str] = typer.Option(None, help="USER:PASSWORD asked of every visitor (Gradio auth); "
                                                        "default $LORA_STUDIO_AUTH. Use it whenever --host is not "
                                                        "127.0.0.1."),
          max_pixels: MaxPixels = None, max_steps: MaxSteps = None, max_loras: MaxLoras = None,
          max_images: MaxImages = None,
          max_upload_mb: Optional[float] = typer.Option(None, "--max-upload-mb", help="Limit: one uploaded file, in "
                                                        "MiB (default 2048; $LORA_STUDIO_MAX_UPLOAD_MB)."),
          max_queue: Optional[int] = typer.Option(None, "--max-queue", help="Limit: requests waiting in the queue "
                                                  "(default 64; $LORA_STUDIO_MAX_QUEUE).")):
    """Start the web studio. It opens LoRA files only in its library folders (uploads go there) and listens on
    127.0.0.1 unless told otherwise."""
    from studio import webapp

    try:
        limits = limits_from_options(None, max_upload_mb, max_pixels=max_pixels, max_steps=max_steps,
                                     max_loras=max_loras, max_images=max_images, max_queue=max_queue)
        webapp.main(host=host, port=port, model=model, config=config, open_browser=open_browser, library=library,
                    models=models, auth=auth, limits=limits, outputs=outputs)
    except StudioError as exc:
        fail(str(exc))


def parse_lora_option(text: str):
    """FILE[:WEIGHT][@x0,y0,x1,y1] → (file, weight, box or None)."""
    file, _, box_text = text.rpartition("@") if "@" in text else (text, "", "")
    box = None
    if box_text:
        try:
            box = tuple(float(v) for v in box_text.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise StudioError(f"--lora {text}: the box after @ must be four numbers x0,y0,x1,y1 between 0 and 1.")
    weight = 1.0
    head, sep, tail = file.rpartition(":")
    if sep and head:
        try:
            weight, file = float(tail), head
        except ValueError:
            pass
    return file, weight, box


def parse_size(text: str | None) -> dict:
    if not text:
        return {}
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise StudioError(f"--size {text} is not like 512x768 (width x height in pixels).")
    return {"width": int(width), "height": int(height)}


def command_line_composition(library, preset: Path | None, prompt: str | None, loras: list[str], **overrides):
    """The composition the generate command describes: a preset, or a prompt (A1111 syntax) with --lora options."""
    from studio.spec import LoraEntry, Region

    if preset is None and not prompt:
        raise StudioError("Give a preset (a .json or a PNG made by the studio) or --prompt.")
    if preset is not None and (prompt or loras):
        raise StudioError("Give either a preset or --prompt/--lora, not both (use --method, --seeds, --size … to "
                          "change a preset).")
    if preset is not None:
        return library.composition(preset, **overrides)
    composition = library.composition(prompt, method=overrides.get("method"))
    entries = list(composition.loras)
    for text in loras:
        file, weight, box = parse_lora_option(text)
        path = library.find(file)
        info = library.load(path).info
        entries.append(LoraEntry(file=str(path), weight=weight, trigger_words=list(info.trigger_words),
                                 region=Region(box=box) if box else None))
    placed = any(entry.region is not None for entry in entries)
    method = overrides.pop("method", None) or ("regional" if placed else composition.method)
    return library.composition(composition.model_copy(update={"loras": entries}), method=method, **overrides)


@app.command()
def generate(preset: Optional[Path] = typer.Argument(None, help="A preset (.json) or a PNG made by the studio; or "
                                                                "give --prompt instead."),
             out: Path = typer.Option(..., "--out", help="Output folder."),
             prompt: Optional[str] = typer.Option(None, help="A prompt (A1111 syntax: <lora:name:weight> tags, BREAK "
                                                             "between region prompts)."),
             lora: list[str] = typer.Option([], "--lora", help="FILE[:WEIGHT][@x0,y0,x1,y1]: a LoRA (path or name in "
                                                              "the library), its weight and its box; repeatable."),
             negative: Optional[str] = typer.Option(None, "--negative", help="Negative prompt."),
             method: Optional[str] = typer.Option(None, help="Composition method (see `studio methods`)."),
             seed: Optional[int] = typer.Option(None, help="One seed."),
             seeds: Optional[str] = typer.Option(None, help="Seeds, e.g. 1-8 or 1,5,9."),
             size: Optional[str] = typer.Option(None, help="WIDTHxHEIGHT in pixels, e.g. 512x768."),
             steps: Optional[int] = typer.Option(None), guidance: Optional[float] = typer.Option(None),
             sampler: Optional[str] = typer.Option(None, help="A1111 sampler name, e.g. 'DPM++ 2M Karras'."),
             regions: Optional[str] = typer.Option(None, help="Regional Prompter divide ratios for BREAK, e.g. 1,1 or "
                                                              "1,2;1,1."),
             save_preset: Optional[Path] = typer.Option(None, "--save-preset", help="Also save the composition as a "
                                                                                     "preset here."),
             model: Optional[str] = typer.Option(None, help="Base model (default: the preset's, else the bundled)."),
             config: Optional[str] = typer.Option(None, help="For a single-file checkpoint: a local diffusers folder "
                                                                  "instead of the shipped configuration."),
             library: Optional[str] = typer.Option(None, help="LoRA library folder."),
             models: Optional[Path] = typer.Option(None, help="An A1111 or ComfyUI install (or a folder of "
                                                              "checkpoints): its LoRA folders join the library and "
                                                              "--model may name one of its checkpoints."),
             device: Optional[str] = typer.Option(None), dtype: Optional[str] = typer.Option(None),
             max_pixels: MaxPixels = None, max_steps: MaxSteps = None, max_loras: MaxLoras = None,
             max_images: MaxImages = None,
             with_overview: bool = typer.Option(False, "--overview", help="Also write …-overview.png: the image "
                                                "enlarged with each concept's region outlined and its attention "
                                                "map laid over it, in that concept's colour.")):
    """Generate from a preset, or from a prompt and --lora options; writes each PNG (with its composition inside)
    and each concept's attention map and mask beside it."""
    from studio.api import LoraLibrary, Studio, model_folders, resolve_checkpoint
    from studio.batch import parse_seeds
    from studio.outputs import overview
    from studio.spec import save_preset as write_preset

    written = []
    try:
        found = model_folders(models)
        model = resolve_checkpoint(model, found)
        lora_library = LoraLibrary(library, found.lora_folders if found else ())
        overrides = dict(method=method, seed=seed, steps=steps, guidance=guidance, scheduler=sampler,
                         negative_prompt=negative, **parse_size(size))
        if regions and not prompt:
            raise StudioError("--regions divides a --prompt with BREAK; a preset has its own regions.")
        composition = command_line_composition(lora_library, preset, (prompt or "") and prompt, lora,
                                               **({"regions": regions} if regions else {}),
                                               **{k: v for k, v in overrides.items() if v is not None})
        if save_preset:
            write_preset(composition, save_preset)
            written.append(save_preset)
        seed_list = parse_seeds(seeds) if seeds else [composition.seed]
        from tqdm.auto import tqdm

        pipe = _load_pipe(model or composition.base_model, device, dtype, config)
        limits = limits_from_options(pipe.device.type, max_pixels=max_pixels, max_steps=max_steps,
                                     max_loras=max_loras, max_images=max_images)
        studio = Studio(pipe, model or composition.base_model, library=lora_library, limits=limits)
        studio.check(composition, images=len(seed_list))  # refused before any progress bar or file
        stem = preset.stem if preset is not None else "image"
        made = f"-{composition.method}-{composition.seed}"
        if preset is not None and preset.suffix.lower() == ".png" and stem.endswith(made):
            stem = stem[:-len(made)]  # a studio PNG made again keeps its name
        for one_seed in seed_list:
            with tqdm(total=composition.steps, desc=f"{composition.method} seed {one_seed}", leave=False) as bar:
                [result] = studio.generate(composition, seeds=[one_seed], callback=lambda info: bar.update(1))
            paths_written = result.save(out, f"{stem}-{composition.method}-{one_seed}")
            if with_overview:
                path = paths_written[0].with_name(f"{paths_written[0].stem}-overview.png")
                overview(result).save(path)
                paths_written.append(path)
            written += paths_written
    except StudioError as exc:
        fail(str(exc))
    for path in written:
        typer.echo(str(path))


def _load_pipe(model, device, dtype, config):
    from studio.models import load_base_model

    return load_base_model(model, device=device, dtype=dtype, config=config)


@app.command()
def inspect(lora_files: list[Path] = typer.Argument(..., help="LoRA files, or folders of them (searched recursively)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON."),
            hashes: Optional[bool] = typer.Option(None, "--hashes/--no-hashes",
                                                  help="Compute the files' hashes (they read each whole file once; "
                                                       "then cached). Default: for single files, not for folders.")):
    """Identify LoRA files without loading their tensors; a folder is listed as the library lists it."""
    from studio.lora.inspect import inspect_lora
    from studio.lora.library import inspect_entry, scan_library

    if len(lora_files) == 1 and not lora_files[0].is_dir():
        try:
            info = inspect_lora(lora_files[0])
        except StudioError as exc:
            fail(str(exc), as_json)
        if as_json:
            print(json.dumps(info.to_json(hashes=hashes is not False), indent=1))
        else:
            typer.echo(info.summary(hashes=hashes is not False))
        return
    entries = []
    for path in lora_files:
        if path.is_dir():
            entries += scan_library(path)
        else:
            entry = inspect_entry(path)
            if entry is None:
                fail(f"{path} does not exist." if not path.exists() else f"{path} is not a regular file.", as_json)
            entries.append(entry)
    if as_json:
        print(json.dumps([entry.to_json(hashes=bool(hashes)) for entry in entries], indent=1))
        return
    for entry in entries:
        info = entry.info
        if info is None:
            typer.echo(f"{entry.path}  unusable: {entry.error}")
            continue
        short = f"  {info.short_hash or info.model_hash}" if hashes else ""
        typer.echo(f"{entry.path}  {info.format}  {info.base_model or 'unknown base'}  rank {info.rank or 'full'}"
                   f"  {', '.join(info.trigger_words) or '-'}{short}")


@app.command("models")
def list_models(root: Path = typer.Argument(..., help="An A1111 or ComfyUI install, its models folder, or any "
                                                      "folder of checkpoints."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the checkpoints and LoRA folders of an A1111 or ComfyUI install (headers only, no file is loaded)."""
    from studio.api import model_folders

    try:
        found = model_folders(root)
    except StudioError as exc:
        fail(str(exc), as_json)
    if as_json:
        typer.echo(json.dumps({"kind": found.kind, "checkpoints": [str(p) for p in found.checkpoints],
                               "lora_folders": [str(p) for p in found.lora_folders]}, indent=1))
        return
    typer.echo(f"{root} ({found.kind})")
    typer.echo("checkpoints:" if found.checkpoints else "checkpoints: none")
    for path in found.checkpoints:
        typer.echo(f"  {path.stem}  {path}")
    typer.echo("LoRA folders:" if found.lora_folders else "LoRA folders: none")
    for path in found.lora_folders:
        typer.echo(f"  {path}")


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the composition methods with their parameters, defaults and UNet passes per step."""
    from composers import registry

    described = [cls.describe() for cls in registry().values()]
    if as_json:
        typer.echo(json.dumps(described, indent=1))
        return
    for d in described:
        typer.secho(d["name"], bold=True, nl=False)
        typer.echo(f"  — {d['summary']}")
        typer.echo(f"    UNet passes per step: {d['unet_passes_per_step']}")
        if d["limits"]:
            typer.echo(f"    limits: {d['limits']}")
        for name, spec in d["params"].items():
            typer.echo(f"    {name} = {spec['default']!r}  {spec['description']}")


@app.command()
def batch(manifests: list[Path] = typer.Argument(..., help="Manifests (.json or .csv), or presets (.json, or PNGs "
                                                          "made by the studio)."),
          out: Path = typer.Option(..., "--out", help="Output folder (results and index.json)."),
          seeds: Optional[str] = typer.Option(None, help="Seeds for items that name none, e.g. 0-7 or 1,5,9."),
          method: Optional[str] = typer.Option(None, help="Override every item's method."),
          model: Optional[str] = typer.Option(None, help="Base model (default: the bundled model)."),
          library: Optional[str] = typer.Option(None, help="LoRA library folder."),
          models: Optional[Path] = typer.Option(None, help="An A1111 or ComfyUI install: its LoRA folders join the "
                                                           "library and --model may name one of its checkpoints."),
          engine: str = typer.Option("local", help="local (this process) or ray (a Ray cluster)."),
          address: Optional[str] = typer.Option(None, help="Ray: the cluster's address (auto, or ray://host:10001); "
                                                           "default: a local Ray instance."),
          workers: Optional[int] = typer.Option(None, help="Ray: number of workers (default: one per GPU, else per "
                                                           "CPU)."),
          max_pixels: MaxPixels = None, max_steps: MaxSteps = None, max_loras: MaxLoras = None):
    """Generate a manifest's items × seeds × overrides; re-running the same command skips what is done and resumes
    what was interrupted; a failing item is recorded and the others go on."""
    from studio.batch import load_manifests, run_batch

    try:
        manifest = load_manifests(manifests, seeds=seeds, method=method)
        limits = limits_from_options(None, max_pixels=max_pixels, max_steps=max_steps, max_loras=max_loras)
        report = run_batch(manifest, out, model=model, library=library, engine=engine, address=address,
                           workers=workers, models=models, limits=limits)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(report.table())
    typer.echo(f"outputs and index: {out}")
    if report.failed:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument(..., help="A benchmark in bench/ (e.g. regional_cost).")):
    """Run a benchmark from bench/; it prints what it measured in this run."""
    import runpy

    from studio import paths

    script = paths.PROJECT_ROOT / "bench" / f"{name}.py"
    if not script.exists():
        available = ", ".join(sorted(p.stem for p in script.parent.glob("*.py")))
        fail(f"No benchmark named {name!r}; available: {available}.")
    runpy.run_path(str(script), run_name="bench")["main"](ctx.args)


DEFAULT_RUN = Path.home() / ".cache" / "lora-studio" / "toyworld-run"


@toyworld.command("train")
def toyworld_train(workdir: Path = typer.Option(DEFAULT_RUN, help="Checkpoints and logs (re-running resumes)."),
                   steps: int = typer.Option(20000, help="Total optimiser steps of the UNet and text encoder."),
                   seed: int = typer.Option(0),
                   export: Optional[Path] = typer.Option(None, help="Write the EMA pipeline here when done "
                                                                    "(e.g. assets/shapes-world)."),
                   max_minutes: Optional[float] = typer.Option(None, help="Stop (with a checkpoint) after this long."),
                   threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
                   vae_thumbnail_weight: float = typer.Option(
                       0.0, help="A new run's VAE: > 0 pulls its latents towards the 2× thumbnail of the image "
                                 "(a pixel-like latent); 0 leaves them free. A resumed run keeps its own."),
                   decay_steps: int = typer.Option(
                       0, help="Decay the learning rate along a half cosine to 0 over the last N of --steps "
                               "(0: constant). May be set when resuming a constant-rate run."),
                   grounding_weight: float = typer.Option(
                       0.0, help="Weight of the token-grounding loss (each object's words attend inside its box; "
                                 "0: off)."),
                   grounding_start: int = typer.Option(
                       0, help="Step from which grounding applies; a resumed run may add grounding from its "
                               "checkpoint's step on."),
                   init_from: Optional[Path] = typer.Option(None, help="Without a checkpoint in --workdir, continue "
                                                                       "from an exported model (e.g. "
                                                                       "assets/shapes-world)."),
                   warm_start: Optional[Path] = typer.Option(
                       None, help="A new run (its own VAE, from step 0) whose UNet and text encoder start from an "
                                  "exported model's weights (e.g. assets/shapes-world) instead of random ones.")):
    """Train the bundled default model (VAE, then UNet + text encoder): seeded and resumable."""
    import torch

    from studio import paths
    from studio.toyworld.train import BaseTrainConfig, resumed_config, train_base

    if threads:
        torch.set_num_threads(threads)
    cfg = BaseTrainConfig(seed=seed, steps=steps, vae_thumbnail_weight=vae_thumbnail_weight, decay_steps=decay_steps,
                          grounding_weight=grounding_weight, grounding_start=grounding_start)
    kept = resumed_config(workdir, cfg)
    if (kept.seed, kept.vae_thumbnail_weight) != (seed, vae_thumbnail_weight):
        typer.echo(f"{workdir} already holds a run: it continues with its own recipe ({workdir / 'config.json'}); "
                   "--seed and --vae-thumbnail-weight apply to new runs only.")
    if (kept.steps, kept.decay_steps) != (steps, decay_steps):
        typer.echo(f"{workdir} is already in its learning-rate decay: it ends at step {kept.steps} as recorded; "
                   "to train on, export it and start a new run with --init-from.")
    if (kept.grounding_weight, kept.grounding_start) != (grounding_weight, grounding_start):
        typer.echo(f"{workdir} continues with its own grounding (weight {kept.grounding_weight:g} from step "
                   f"{kept.grounding_start}): a resumed run may add grounding only from its checkpoint's step on "
                   "(--grounding-start).")
    if init_from is not None and warm_start is not None:
        fail("--init-from continues a model with its own VAE and --warm-start begins a new run with a new VAE: "
             "give one of them.")
    try:
        train_base(workdir, paths.TOKENIZER, cfg, export_dir=export, max_minutes=max_minutes, init_from=init_from,
                   warm_start=warm_start)
    except StudioError as exc:
        fail(str(exc))


@toyworld.command("export")
def toyworld_export(workdir: Path = typer.Option(DEFAULT_RUN), out: Path = typer.Option(Path("assets/shapes-world")),
                    weights: str = typer.Option("ema", help="ema (the default) or raw: the optimiser's weights, "
                                                            "which show a change of recipe before the EMA does.")):
    """Export the EMA (or raw) weights of the last checkpoint as a diffusers folder."""
    from studio import paths
    from studio.toyworld.train import CHECKPOINT_WEIGHTS, checkpoint_pipeline, export

    if weights not in CHECKPOINT_WEIGHTS:
        fail(f"--weights must be {' or '.join(CHECKPOINT_WEIGHTS)}, not {weights!r}.")
    try:
        export(workdir, checkpoint_pipeline(workdir, paths.TOKENIZER, weights=weights), out, weights)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(f"wrote {out}")


@toyworld.command("train-judge")
def toyworld_train_judge(out: Optional[Path] = typer.Option(None, help="Default: assets/judge/judge.safetensors."),
                         steps: int = typer.Option(3000), seed: int = typer.Option(0)):
    """Train the judge and print its accuracy on fresh held-out renders."""
    from studio import paths
    from studio.toyworld.judge import train_judge

    try:
        report = train_judge(out or paths.JUDGE, steps=steps, seed=seed)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(json.dumps(report, indent=1))


@toyworld.command("evaluate")
def toyworld_evaluate(model: Optional[str] = typer.Option(None, help="Default: the bundled model."),
                      n: int = typer.Option(64), steps: int = typer.Option(20), guidance: float = typer.Option(5.0),
                      images: Optional[Path] = typer.Option(None, help="Also save the generated images here."),
                      prompt_seed: int = typer.Option(2024, help="2024: the quality bar's prompts; another seed: a "
                                                                 "fresh set, to choose settings on without fitting "
                                                                 "the bar's own prompts.")):
    """Score a shapes-world model with the judge on 64 seeded prompts (the README's quality bar)."""
    from studio.models import load_base_model
    from studio.toyworld.evaluate import evaluate_model

    try:
        pipe = load_base_model(model)
    except StudioError as exc:
        fail(str(exc))
    if images:
        images.mkdir(parents=True, exist_ok=True)
    typer.echo(json.dumps(evaluate_model(pipe, n=n, steps=steps, guidance=guidance, seed=prompt_seed,
                                         images_out=images), indent=1))


@toyworld.command("evaluate-vae")
def toyworld_evaluate_vae(model: Optional[Path] = typer.Option(None, help="A shapes-world pipeline folder, or a VAE "
                                                                    "folder (a run's `vae/`). Default: the bundled model."),
                          n: int = typer.Option(64)):
    """The ceiling a model's VAE sets: the evaluation prompts' renders, encoded and decoded, scored by the judge."""
    from studio import paths
    from studio.toyworld.evaluate import evaluate_vae
    from studio.toyworld.train import load_vae

    folder = Path(model) if model else Path(paths.DEFAULT_MODEL)
    if (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    config = folder / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("_class_name") != "AutoencoderKL":
        fail(f"{folder} holds no VAE: give a shapes-world pipeline folder or a VAE folder (an AutoencoderKL's "
             "config.json and weights).")
    try:
        vae = load_vae(folder).eval()
    except StudioError as exc:
        fail(str(exc))
    typer.echo(json.dumps(evaluate_vae(vae, n=n), indent=1))


@toyworld.command("tune-decoder")
def toyworld_tune_decoder(model: Path = typer.Option(..., help="A model written by `studio toyworld export` (its VAE "
                                                              "is replaced in place)."),
                          steps: int = typer.Option(1500), seed: int = typer.Option(0),
                          palettes: bool = typer.Option(False, "--palettes", help="Its renders also show objects "
                                                        "in the palettes the example style LoRAs teach."),
                          threads: Optional[int] = typer.Option(None, help="torch CPU threads.")):
    """Train an exported model's VAE decoder on, its encoder frozen (the UNet's latents do not move): a sharper
    drawing of the same latents. Run it after `export` (which writes the run's own VAE)."""
    import torch

    from studio.toyworld.train import DecoderTuneConfig, tune_model_decoder

    if threads:
        torch.set_num_threads(threads)
    try:
        tuning = tune_model_decoder(model, DecoderTuneConfig(steps=steps, seed=seed, palettes=palettes))
    except StudioError as exc:
        fail(str(exc))
    typer.echo(f"{model / 'vae'}: reconstruction error {tuning['recon_mae_0_255_before']:.2f} -> "
               f"{tuning['recon_mae_0_255']:.2f} (mean absolute, 0-255, 256 fresh renders); measure its ceiling "
               f"with `studio toyworld evaluate-vae --model {model}`.")


@toyworld.command("train-lora")
def toyworld_train_lora(kind: str = typer.Option(..., help="concept (a new shape) or style (a new texture or palette)."),
                        subject: str = typer.Option(..., help="The shape (crescent, cross), texture (checkered, "
                                                              "ringed) or palette (sepia, cyanotype) to teach."),
                        trigger: str = typer.Option(..., help="The trigger word bound to it."),
                        out: Path = typer.Option(..., help="Output .safetensors (kohya format)."),
                        steps: int = typer.Option(800), rank: int = typer.Option(8), seed: int = typer.Option(0),
                        lr: float = typer.Option(1e-3), model: Optional[str] = typer.Option(None),
                        object_weight: float = typer.Option(1.0, help="Loss weight inside the objects' boxes "
                                                            "(1 = plain mean over the image)."),
                        prior_fraction: float = typer.Option(0.5, help="Share of each batch that is ordinary "
                                                             "scenes with ordinary captions (prior preservation)."),
                        unet_only: bool = typer.Option(False, "--unet-only", help="Leave the text encoder as it is "
                                                       "(kohya's network_train_unet_only)."),
                        embedding: bool = typer.Option(False, "--embedding", help="Also learn the trigger as a new "
                                                       "word (its own token embedding, bundled in the file)."),
                        embedding_lr: float = typer.Option(5e-3, help="Learning rate of that word."),
                        trigger_after_noun: bool = typer.Option(False, "--trigger-after-noun", help="Style: captions "
                                                                "put the trigger right after the noun (\"a large red "
                                                                "star sepx on the left\"), leaving the words before "
                                                                "it as the base model reads them.")):
    """Train an example LoRA on the shapes world (kohya format with ss_* metadata and its trigger word)."""
    from studio.models import load_base_model
    from studio.toyworld.lora_train import LoraTrainConfig, train_lora

    if kind not in ("concept", "style"):
        fail(f"--kind must be concept or style, not {kind!r}.")
    cfg = LoraTrainConfig(kind=kind, subject=subject, trigger=trigger, steps=steps, rank=rank, seed=seed, lr=lr,
                          text_encoder=not unet_only, object_weight=object_weight, prior_fraction=prior_fraction,
                          embedding=embedding, embedding_lr=embedding_lr, trigger_after_noun=trigger_after_noun)
    try:
        path = train_lora(load_base_model(model), cfg, out)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


@toyworld.command("evaluate-lora")
def toyworld_evaluate_lora(lora: Path = typer.Argument(..., help="A shapes-world LoRA made by train-lora."),
                           n: int = typer.Option(128, help="Prompts (at 80 %, 32 prompts leave about ±7 "
                                                            "points of sampling error, 128 about ±3.5)."),
                           steps: int = typer.Option(20), guidance: float = typer.Option(5.0),
                           weight: float = typer.Option(1.0),
                           seed: int = typer.Option(4048, help="Seed of the prompts and of their generations.")):
    """Score a shapes-world LoRA used alone with the judge (its shape or texture, and colour)."""
    from studio.models import load_base_model
    from studio.toyworld.evaluate import evaluate_lora

    try:
        report = evaluate_lora(load_base_model(), lora, n=n, steps=steps, guidance=guidance, weight=weight,
                               seed=seed)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(json.dumps(report, indent=1))


@b4m.command("break")
def b4m_break(role: str = typer.Option(..., help="content or style."),
              out: Path = typer.Option(...),
              seed: int = typer.Option(7, help="Seed of the frozen halves: use the same one for both adapters of "
                                               "a pair."),
              images: Optional[Path] = typer.Option(None, help="A folder of a few images with .txt captions (real "
                                                                "models; a GPU is advised)."),
              aux_images: list[Path] = typer.Option([], help="Auxiliary sets (styles for a content adapter, "
                                                             "contents for a style adapter); repeatable."),
              caption: Optional[str] = typer.Option(None, help="Caption of images without a .txt file."),
              size: Optional[int] = typer.Option(None, help="Training resolution (default: the model's)."),
              kind: Optional[str] = typer.Option(None, help="Shapes world: concept (a shape) or style (a texture or palette)."),
              subject: Optional[str] = typer.Option(None, help="Shapes world: the shape, texture or palette."),
              trigger: Optional[str] = typer.Option(None, help="Shapes world: its trigger word."),
              steps: int = typer.Option(400), rank: int = typer.Option(8),
              main_lr: Optional[float] = typer.Option(None, help="Rate of the half the main images teach (D for "
                                                       "content, B for style); default 1e-3 on the shapes world, "
                                                       "the official 1e-4 on images."),
              aux_lr: Optional[float] = typer.Option(None, help="Rate of the other half, on the auxiliary sets; "
                                                      "default 1e-4 on the shapes world, the official 1e-5 on images."),
              embedding: bool = typer.Option(False, "--embedding", help="Shapes world: also learn the trigger as "
                                             "a new word (its own token embedding, bundled in the adapter)."),
              trigger_after_noun: bool = typer.Option(False, "--trigger-after-noun", help="Shapes world, style: "
                                                      "captions put the trigger right after the noun, so that a "
                                                      "content adapter's words read as they do without it."),
              aux_style: list[str] = typer.Option([], help="Shapes world, content: a style (texture or palette) of "
                                                   "the auxiliary sets B learns from; repeatable (default: the base "
                                                   "textures)."),
              split_sets: bool = typer.Option(False, "--split-sets", help="Each learnable half learns only from "
                                              "its own images (for content: D from the content, B from the "
                                              "auxiliary sets): the official trainers' one optimiser per loss."),
              model: Optional[str] = typer.Option(None)):
    """Train a B4M content or style adapter: on a folder of images with their prompts, or on the shapes
    world (the bundled model, CPU, minutes)."""
    from studio.generation import default_size
    from studio.models import load_base_model
    from studio.training import command_line
    from studio.training.b4m import BreakConfig, ImageFolder, break_train, break_train_folders

    if role not in ("content", "style"):
        fail("--role must be content or style.")
    command = command_line("studio b4m break", {
        "role": role, "out": out, "seed": seed, "images": images, "aux_images": aux_images, "caption": caption,
        "size": size, "kind": kind, "subject": subject, "trigger": trigger, "steps": steps, "rank": rank,
        "main_lr": main_lr, "aux_lr": aux_lr, "embedding": embedding, "trigger_after_noun": trigger_after_noun,
        "aux_style": aux_style, "split_sets": split_sets, "model": model})
    rates = {k: v for k, v in (("main_lr", main_lr), ("aux_lr", aux_lr)) if v is not None}  # else each path's default
    if images is not None and (embedding or trigger_after_noun):
        fail("--embedding and --trigger-after-noun shape the shapes world's captions (with --kind, --subject and "
             "--trigger); with --images the captions are yours, so write the trigger where it belongs.")
    if images is not None and aux_style:
        fail("--aux-style draws shapes-world auxiliary sets; with --images give them as folders (--aux-images).")
    try:
        pipe = load_base_model(model)
        if images is not None:
            resolution = size or default_size(pipe)
            path = break_train_folders(pipe, role, ImageFolder(images, resolution, caption),
                                       [ImageFolder(a, resolution, caption) for a in aux_images], out, seed=seed,
                                       rank=rank, steps=steps, command=command, split_sets=split_sets, **rates)
        elif kind in ("concept", "style") and subject and trigger:
            path = break_train(pipe, BreakConfig(role, kind, subject, trigger, seed=seed, rank=rank, steps=steps,
                                                 embedding=embedding, trigger_after_noun=trigger_after_noun,
                                                 aux_styles=tuple(aux_style), split_sets=split_sets, **rates),
                               out, command=command)
        else:
            fail("Give --images (a folder of images with captions), or --kind, --subject and --trigger for the "
                 "shapes world.")
    except StudioError as exc:
        fail(str(exc))
    typer.echo(f"wrote {path}")


@b4m.command("make")
def b4m_make(content: Path = typer.Argument(...), style: Path = typer.Argument(...), out: Path = typer.Option(...),
             finetune_steps: int = typer.Option(0, help="Then fine-tune both learnable halves jointly on the content's "
                                                        "and the style's images (the official pipeline: 1000)."),
             finetune_lr: float = typer.Option(1e-4, help="Rate of the joint fine-tune (official: 1e-4)."),
             content_images: Optional[Path] = typer.Option(None, help="For adapters trained on your images: the "
                                                                      "content's folder, for the fine-tune."),
             style_images: Optional[Path] = typer.Option(None, help="… and the style's folder."),
             model: Optional[str] = typer.Option(None)):
    """Assemble a B4M content adapter and a B4M style adapter (same seed) into one ordinary LoRA."""
    from studio.models import load_base_model
    from studio.training import command_line
    from studio.training.b4m import make

    command = command_line(f"studio b4m make {content} {style}", {
        "out": out, "finetune_steps": finetune_steps or None, "finetune_lr": finetune_lr if finetune_steps else None,
        "content_images": content_images, "style_images": style_images, "model": model})
    try:
        make(load_base_model(model) if finetune_steps else None, content, style, out, finetune_steps, finetune_lr,
             content_images, style_images, command=command)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(f"wrote {out}")


@b4m.command("evaluate")
def b4m_evaluate(content: Path = typer.Argument(..., help="B4M content adapter (shapes world)."),
                 style: Path = typer.Argument(..., help="B4M style adapter made with the same seed."),
                 n: int = typer.Option(32, help="Prompts (at 40 %, 32 leave about ±9 points of sampling error, 16 ±12)."),
                 steps: int = typer.Option(20), guidance: float = typer.Option(5.0),
                 seed: int = typer.Option(6072, help="Seed of the prompts and of their generations (another seed: "
                                                     "another, independent set)."),
                 assembled: Optional[Path] = typer.Option(None, help="Score this file of `studio b4m make` (e.g. "
                                                           "after --finetune-steps) as the assembled adapter.")):
    """Score a shapes-world B4M pair with the judge: the content's shape in the style's texture, assembled,
    against each adapter alone."""
    from studio.models import load_base_model
    from studio.toyworld.evaluate import evaluate_b4m

    try:
        report = evaluate_b4m(load_base_model(), content, style, n=n, steps=steps, guidance=guidance, seed=seed,
                              assembled_path=assembled)
    except StudioError as exc:
        fail(str(exc))
    typer.echo(json.dumps(report, indent=1))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())

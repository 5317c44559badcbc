"""The web studio (Gradio). `python app.py` or `studio serve`."""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gradio as gr

from studio.generation import GenerationSettings, a1111_parameters, default_size, generate_plain, png_info
from studio.models import load_base_model, model_family

CSS = """
#title {margin-bottom: 0}
.small-note {font-size: 0.85em; opacity: 0.8}
"""


class StudioState:
    """The loaded base model; one per server process."""

    def __init__(self, model: str | None, config: str | None = None):
        self.model_ref = model or "bundled shapes-world"
        self.pipe = load_base_model(model, config=config)
        self.family = model_family(self.pipe)
        self.size = default_size(self.pipe)
        self.outputs = Path(tempfile.mkdtemp(prefix="lora-studio-"))


def build_ui(state: StudioState) -> gr.Blocks:
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio", elem_id="title")
        gr.Markdown(f"Base model: **{state.model_ref}** ({state.family}, {state.size}×{state.size} px, "
                    f"{state.pipe.device}, {str(state.pipe.dtype).replace('torch.', '')})", elem_classes="small-note")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2,
                                    value="a large solid red circle on the left and a small striped blue square on "
                                          "the right, white background")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                with gr.Row():
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Generate", variant="primary")
            with gr.Column(scale=2):
                image = gr.Image(label="Result", type="filepath", format="png", height=384)
                info = gr.Markdown(elem_classes="small-note")

        def on_generate(prompt_text, negative_text, n_steps, cfg, seed_value, progress=gr.Progress()):
            settings = GenerationSettings(prompt=prompt_text, negative_prompt=negative_text, steps=int(n_steps),
                                          guidance=float(cfg), seed=int(seed_value))

            def step_callback(pipe, i, t, kwargs):
                progress((i + 1, settings.steps), desc="denoising")
                return kwargs

            start = time.perf_counter()
            result = generate_plain(state.pipe, settings, callback=step_callback)
            elapsed = time.perf_counter() - start
            out = state.outputs / f"{int(time.time() * 1000)}-{settings.seed}.png"
            result.save(out, pnginfo=png_info(a1111_parameters(settings, *result.size, model_name=state.model_ref)))
            return str(out), f"{result.size[0]}×{result.size[1]} in {elapsed:.2f} s · seed {settings.seed}"

        run.click(on_generate, [prompt, negative, steps, guidance, seed], [image, info])
    return demo


def main(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, config: str | None = None,
         open_browser: bool = False, prevent_thread_lock: bool = False):
    state = StudioState(model, config)
    demo = build_ui(state)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, inbrowser=open_browser, css=CSS, theme=gr.themes.Soft(),
                prevent_thread_lock=prevent_thread_lock, footer_links=["gradio", "settings"])
    return demo


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="LoRA Studio web app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    main(args.host, args.port, args.model)

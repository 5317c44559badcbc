"""Why a concept loses its shape under the sepia palette in the quality benchmark's style suite: the palette's word
stands before the concept's trigger ("a large sepx solid red sks on the left"), and CLIP's text encoder is causal, so
the trigger is read after a word its LoRA never saw beside it.

The style suite's compositions, each concept drawn alone in its box by `merge` (no composition involved):
- the concept LoRA, its phrase without the palette word (the suite's shape reference);
- the concept LoRA, its phrase with the palette word, no style LoRA;
- the concept LoRA and the style LoRA, with the palette word (what `merge` does in the suite);
- the concept LoRA and the style LoRA, without the palette word.
Per row: the concept's shape right in its box, and the palette applied (the judge's colour class).

Usage: studio bench palette_word [--n 12] [--split test|dev] [--out DIR]
Writes DIR/palette_word.md (DIR defaults to bench/results).
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="studio bench palette_word", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--split", default="test", choices=("test", "dev"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    quality = runpy.run_path(str(Path(__file__).with_name("quality.py")), run_name="bench")
    from studio.spec import Composition, LoraEntry

    runner = quality["Runner"]()
    cases = quality["suite_cases"]("style", args.n, args.split)
    rows = (("concept LoRA, no palette word", False, False), ("concept LoRA, palette word", False, True),
            ("concept + style LoRA, palette word", True, True), ("concept + style LoRA, no palette word", True, False))
    lines = [f"Style suite, split `{args.split}`, {len(cases)} compositions, each concept alone in its box (merge); "
             f"measured by `studio bench palette_word{' ' + ' '.join(argv) if argv else ''}`.", "",
             "| prompt and LoRAs | shape right | palette applied |", "|---|---|---|"]
    print("\n".join(lines))
    for label, with_style, with_word in rows:
        shape = styled = 0
        for case in cases:
            concept = case.concepts[0]
            phrase = case.phrases[0] if with_word else case.alone_phrases[0]
            loras = [LoraEntry(file=str(quality["LORAS"] / concept.file), trigger_words=[concept.trigger])]
            if with_style:
                style_file, _, word = case.style
                loras.append(LoraEntry(file=str(quality["LORAS"] / style_file), role="style", trigger_words=[word]))
            composition = Composition(prompt=quality["_join"]([phrase], case.background), steps=quality["STEPS"],
                                      guidance=quality["GUIDANCE"], seed=case.seed, method="merge", loras=loras)
            image, _ = runner.generate(composition)
            verdict = quality["judge_regions"](runner.judge, image, [case.boxes[0]])[0]
            shape += verdict.shape == concept.shape
            styled += verdict.colour == case.style[1]
        lines.append(f"| {label} | {shape} of {len(cases)} | {styled} of {len(cases)} |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "palette_word.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""The region canvas of the web studio: a Gradio 6 HTML component (no build step) the size and aspect of the image,
where each LoRA has its own colour. With the Box tool a designer drags a box for the active LoRA, drags inside a box
to move it and drags its corner to resize it; with Paint and Erase they paint the LoRA's mask. Every finished
gesture sends the whole value to the server as the `edit` event.

Its value: {"width", "height", "active": index, "background": image URL or null,
            "loras": [{"label", "colour", "box": [x0, y0, x1, y1] relative or null, "mask": PNG data URI or null}]}.
A mask is greyscale at the image's size, white inside, as the composition spec stores it."""
from __future__ import annotations

import base64
import io

import gradio as gr
import numpy as np
from PIL import Image

DISPLAY_PX = 512  # the canvas's longer side on screen, whatever the image's size

HTML = """
<div class="region-canvas">
  <div class="toolbar">
    <span class="chips"></span>
    <span class="tools">
      <button type="button" data-tool="box" title="Drag to draw the active LoRA's box; drag a box to move it,
its corner to resize it">Box</button>
      <button type="button" data-tool="paint" title="Paint the active LoRA's mask">Paint</button>
      <button type="button" data-tool="erase" title="Erase from the active LoRA's mask">Erase</button>
      <label class="brush">brush <input type="range" min="1" max="30" value="8"></label>
      <button type="button" data-action="clear" title="Remove the active LoRA's box or mask">Clear</button>
    </span>
  </div>
  <canvas class="board"></canvas>
  <div class="hint"></div>
</div>
"""

CSS = """
.region-canvas { display: flex; flex-direction: column; gap: 6px; }
.toolbar { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; justify-content: space-between; }
.toolbar button { border: 1px solid var(--border-color-primary); border-radius: 6px; padding: 2px 10px;
                  background: var(--background-fill-secondary); cursor: pointer; font-size: 0.9em; }
.toolbar button.on { outline: 2px solid var(--color-accent); font-weight: 600; }
.chips button { border-width: 2px; }
.board { border: 1px solid var(--border-color-primary); cursor: crosshair; touch-action: none; max-width: 100%;
         image-rendering: pixelated; background: #fafafa; }
.hint { font-size: 0.85em; opacity: 0.75; min-height: 1.2em; }
"""

JS = r"""
const board = element.querySelector('canvas.board');
const ctx = board.getContext('2d');
const chips = element.querySelector('.chips');
const hint = element.querySelector('.hint');
const brushInput = element.querySelector('.brush input');
let tool = 'box';
let masks = [];        // per LoRA: {mask: white-on-black canvas at image size, tint: its colour where painted}
let background = null; // the last result, drawn faintly under the regions
let gesture = null;

const S = () => props.value || {width: 64, height: 64, active: 0, loras: []};
const size = () => { const v = S(); const k = %(display)d / Math.max(v.width, v.height);
                     return [Math.round(v.width * k), Math.round(v.height * k)]; };

function colourRGB(hex) { const n = parseInt(hex.slice(1), 16); return [(n >> 16) & 255, (n >> 8) & 255, n & 255]; }

function blankMask(w, h) {
  const c = document.createElement('canvas'); c.width = w; c.height = h;
  const g = c.getContext('2d'); g.fillStyle = '#000'; g.fillRect(0, 0, w, h); return c;
}

function retint(i) {
  const v = S(), m = masks[i]; if (!m) return;
  const w = m.mask.width, h = m.mask.height;
  const src = m.mask.getContext('2d').getImageData(0, 0, w, h);
  const out = m.tint.getContext('2d').createImageData(w, h);
  const [r, g, b] = colourRGB(v.loras[i].colour);
  for (let p = 0; p < src.data.length; p += 4) {
    out.data[p] = r; out.data[p + 1] = g; out.data[p + 2] = b; out.data[p + 3] = src.data[p] > 127 ? 255 : 0;
  }
  m.tint.getContext('2d').putImageData(out, 0, 0);
}

function loadMasks() {
  const v = S();
  masks = v.loras.map((lora, i) => {
    const m = {mask: blankMask(v.width, v.height), tint: document.createElement('canvas')};
    m.tint.width = v.width; m.tint.height = v.height;
    if (lora.mask) {
      const img = new Image();
      img.onload = () => { m.mask.getContext('2d').drawImage(img, 0, 0, v.width, v.height); retint(i); draw(); };
      img.src = lora.mask;
    }
    return m;
  });
}

function loadBackground() {
  const v = S(); background = null;
  if (v.background) { const img = new Image(); img.onload = () => { background = img; draw(); }; img.src = v.background; }
}

function draw() {
  const v = S(); const [w, h] = size();
  if (board.width !== w || board.height !== h) { board.width = w; board.height = h; }
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = '#fafafa'; ctx.fillRect(0, 0, w, h);
  if (background) { ctx.globalAlpha = 0.45; ctx.drawImage(background, 0, 0, w, h); ctx.globalAlpha = 1; }
  v.loras.forEach((lora, i) => {
    if (masks[i] && lora.mask !== null) {
      ctx.globalAlpha = i === v.active ? 0.5 : 0.3; ctx.drawImage(masks[i].tint, 0, 0, w, h); ctx.globalAlpha = 1;
    }
  });
  v.loras.forEach((lora, i) => {
    if (!lora.box) return;
    const [x0, y0, x1, y1] = lora.box;
    ctx.strokeStyle = lora.colour; ctx.lineWidth = i === v.active ? 3 : 2;
    ctx.setLineDash(i === v.active ? [] : [6, 4]);
    ctx.strokeRect(x0 * w + 1, y0 * h + 1, (x1 - x0) * w - 2, (y1 - y0) * h - 2);
    ctx.setLineDash([]);
    ctx.fillStyle = lora.colour; ctx.font = '13px sans-serif';
    ctx.fillText(lora.label, x0 * w + 6, y0 * h + 16);
    if (i === v.active) for (const [cx, cy] of [[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) {
      ctx.fillRect(cx * w - 5, cy * h - 5, 10, 10);
    }
  });
}

function renderChips() {
  const v = S();
  chips.innerHTML = '';
  v.loras.forEach((lora, i) => {
    const b = document.createElement('button'); b.type = 'button'; b.textContent = lora.label;
    b.style.borderColor = lora.colour; b.style.color = lora.colour; b.dataset.index = i;
    b.className = i === v.active ? 'on' : '';
    b.addEventListener('click', () => { commit({...S(), active: i}); });
    chips.appendChild(b);
  });
  element.querySelectorAll('[data-tool]').forEach(b => b.classList.toggle('on', b.dataset.tool === tool));
  hint.textContent = v.loras.length ? (tool === 'box' ? 'Drag to place the active LoRA; drag a box to move it, '
      + 'a corner to resize it.' : 'Paint the active LoRA\'s mask.') : 'Add a LoRA to place it on the canvas.';
}

function commit(value) {
  props.value = value;
  renderChips(); draw();
  trigger('edit');
}

function point(e) {
  const r = board.getBoundingClientRect();
  return [Math.min(1, Math.max(0, (e.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (e.clientY - r.top) / r.height))];
}

function inside(box, p) { return box && p[0] >= box[0] && p[0] <= box[2] && p[1] >= box[1] && p[1] <= box[3]; }

function paintAt(p, last) {
  const v = S(), m = masks[v.active]; if (!m) return;
  const radius = Number(brushInput.value) / 200 * Math.max(v.width, v.height);
  const g = m.mask.getContext('2d'), colour = tool === 'paint' ? '#fff' : '#000';
  g.strokeStyle = colour; g.fillStyle = colour; g.lineCap = 'round'; g.lineWidth = 2 * radius;
  g.beginPath(); g.moveTo((last || p)[0] * v.width, (last || p)[1] * v.height);
  g.lineTo(p[0] * v.width, p[1] * v.height); g.stroke();
  g.beginPath(); g.arc(p[0] * v.width, p[1] * v.height, radius, 0, 2 * Math.PI); g.fill();
  retint(v.active);
  v.loras[v.active].mask = v.loras[v.active].mask || 'painting';
  draw();
}

board.addEventListener('pointerdown', (e) => {
  const v = S(); if (!v.loras.length) return;
  board.setPointerCapture(e.pointerId);
  const p = point(e), activeBefore = v.active;
  if (tool !== 'box') { gesture = {kind: 'paint', last: p}; paintAt(p, null); return; }
  const [w, h] = size();
  const active = v.loras[v.active];
  if (active && active.box) {
    const [x0, y0, x1, y1] = active.box;
    for (const [cx, cy, ix, iy] of [[x0, y0, 0, 1], [x1, y0, 2, 1], [x0, y1, 0, 3], [x1, y1, 2, 3]]) {
      if (Math.abs(cx - p[0]) * w < 10 && Math.abs(cy - p[1]) * h < 10) {
        gesture = {kind: 'resize', ix, iy, box: [...active.box], activeBefore}; return;
      }
    }
  }
  let hit = inside(active && active.box, p) ? v.active : v.loras.findIndex(l => inside(l.box, p));
  if (hit >= 0) {
    if (hit !== v.active) { props.value = {...v, active: hit}; renderChips(); }
    gesture = {kind: 'move', start: p, box: [...S().loras[hit].box], activeBefore}; return;
  }
  gesture = {kind: 'new', start: p, box: [p[0], p[1], p[0], p[1]], activeBefore};
});

board.addEventListener('pointermove', (e) => {
  if (!gesture) return;
  const v = S(), p = point(e), lora = v.loras[v.active];
  if (gesture.kind === 'paint') { paintAt(p, gesture.last); gesture.last = p; return; }
  let box;
  if (gesture.kind === 'new') box = [Math.min(gesture.start[0], p[0]), Math.min(gesture.start[1], p[1]),
                                     Math.max(gesture.start[0], p[0]), Math.max(gesture.start[1], p[1])];
  else if (gesture.kind === 'move') {
    const [x0, y0, x1, y1] = gesture.box;
    const dx = Math.min(1 - x1, Math.max(-x0, p[0] - gesture.start[0]));
    const dy = Math.min(1 - y1, Math.max(-y0, p[1] - gesture.start[1]));
    box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
  } else {
    box = [...gesture.box]; box[gesture.ix] = p[0]; box[gesture.iy] = p[1];
    box = [Math.min(box[0], box[2]), Math.min(box[1], box[3]), Math.max(box[0], box[2]), Math.max(box[1], box[3])];
  }
  gesture.current = box;
  lora.box = box; lora.mask = null;
  draw();
});

board.addEventListener('pointerup', () => {
  if (!gesture) return;
  const v = S(), lora = v.loras[v.active], g = gesture; gesture = null;
  if (g.kind === 'paint') {
    lora.mask = masks[v.active].mask.toDataURL('image/png'); lora.box = null;
  } else if (g.current) {
    const b = g.current.map(x => Math.round(x * 1000) / 1000);
    if (b[2] - b[0] < 0.03 || b[3] - b[1] < 0.03) { lora.box = g.kind === 'new' ? null : g.box; }
    else lora.box = b;
    if (lora.box) masks[v.active] = {mask: blankMask(v.width, v.height), tint: masks[v.active].tint};
  } else if (g.activeBefore === v.active) { return; }  // a click that changed nothing
  commit({...v, loras: v.loras.map(l => ({...l}))});
});

element.querySelectorAll('[data-tool]').forEach(b => b.addEventListener('click', () => { tool = b.dataset.tool; renderChips(); }));
element.querySelector('[data-action=clear]').addEventListener('click', () => {
  const v = S(); if (!v.loras.length) return;
  const loras = v.loras.map((l, i) => i === v.active ? {...l, box: null, mask: null} : l);
  masks[v.active] = {mask: blankMask(v.width, v.height), tint: masks[v.active].tint};
  retint(v.active);
  commit({...v, loras});
});

function refresh() { loadMasks(); loadBackground(); renderChips(); draw(); }
watch('value', refresh);
refresh();
""" % {"display": DISPLAY_PX}


class RegionCanvas(gr.HTML):
    """Boxes and painted masks of every LoRA on one canvas; `edit` fires after each finished gesture."""

    def __init__(self, value: dict | None = None, **kwargs):
        super().__init__(value=value or canvas_value(64, 64, []), html_template=HTML, css_template=CSS,
                         js_on_load=JS, **kwargs)

    def api_info(self) -> dict:
        return {"type": "object", "description": "the canvas: width, height, active, background, loras "
                                                 "[{label, colour, box, mask}]"}


def canvas_value(width: int, height: int, loras: list[dict], active: int = 0, background: str | None = None
                 ) -> dict:
    return {"width": width, "height": height, "active": min(active, max(0, len(loras) - 1)),
            "background": background, "loras": loras}


def mask_is_empty(data_uri: str | None) -> bool:
    """True for no mask, or a painted mask with nothing white left in it (all erased)."""
    from attention.masks import MAX_MASK_PIXELS
    from studio.errors import PresetError

    if not data_uri:
        return True
    _, _, payload = data_uri.partition(",")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            if image.width * image.height > MAX_MASK_PIXELS:
                raise PresetError(f"The painted mask is {image.width}×{image.height} pixels; a mask is at most "
                                  f"{MAX_MASK_PIXELS} pixels.")
            return not (np.asarray(image.convert("L")) > 127).any()
    except (ValueError, OSError, Image.DecompressionBombError) as exc:
        raise PresetError(f"The painted mask is not a readable PNG image ({str(exc)[:80] or 'corrupt'}).") from None

"""The web UI: one self-contained HTML page (no build step, no CDN) served at `/` by the API app.

It is a client of the public API only: `GET /api/info` for presets and limits, `POST /api/jobs`
(with a base64 source image and a painted mask for image-to-image, inpainting and variations),
`GET /api/jobs/{id}/events` (Server-Sent Events) for progress and the Stage C preview, and
`POST /api/jobs/{id}/cancel`. Gradio was the other option; it pins an older Pillow, brings ~230 MB
of dependencies and its own queue, which would duplicate the job queue this server already has.
"""

from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Würstchen</title>
<link rel="icon" href="data:,">
<style>
:root { --bg: #f6f6f4; --panel: #fff; --text: #1d1d1f; --muted: #6b6b70; --line: #dedee2; --accent: #c2410c;
        --accent-text: #fff; --bad: #b91c1c; color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #151517; --panel: #1f1f23; --text: #ececf0; --muted: #9a9aa3; --line: #34343a; --accent: #f97316; }
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--text); }
header { display: flex; align-items: baseline; gap: 1rem; padding: .7rem 1.2rem; border-bottom: 1px solid var(--line); }
header h1 { font-size: 1.15rem; margin: 0; }
#model { flex: 1; }
main { display: grid; grid-template-columns: minmax(300px, 380px) 1fr; gap: 1.2rem; padding: 1.2rem; }
@media (max-width: 800px) { main { grid-template-columns: 1fr; } }
form, .job { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 1rem; }
form { display: flex; flex-direction: column; gap: .7rem; align-self: start; position: sticky; top: 1rem; }
label { display: flex; flex-direction: column; gap: .25rem; color: var(--muted); font-size: .85rem; }
textarea, input, select { font: inherit; color: var(--text); background: var(--bg); border: 1px solid var(--line);
                          border-radius: 6px; padding: .4rem .5rem; width: 100%; }
textarea { resize: vertical; }
.row { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem; }
.row3 { display: grid; grid-template-columns: 2fr 1fr 1fr; gap: .6rem; align-items: end; }
fieldset { border: 1px solid var(--line); border-radius: 8px; padding: .5rem .7rem .7rem; margin: 0; }
legend { color: var(--muted); font-size: .8rem; padding: 0 .3rem; }
.seed { display: flex; gap: .3rem; }
button { font: inherit; border: 1px solid var(--line); background: var(--bg); color: var(--text); border-radius: 6px;
         padding: .35rem .7rem; cursor: pointer; }
button.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-text); font-weight: 600;
                 padding: .6rem; font-size: 1rem; }
.muted { color: var(--muted); }
.error { color: var(--bad); min-height: 1.2em; margin: 0; }
#gallery { display: flex; flex-direction: column; gap: 1rem; min-width: 0; }
#gallery:empty::before { content: "Your images will appear here."; color: var(--muted); }
.job header { padding: 0 0 .6rem; border: 0; gap: .6rem; flex-wrap: wrap; }
.job .prompt { font-weight: 600; flex: 1; min-width: 12rem; overflow-wrap: anywhere; }
.state { font-size: .8rem; padding: .1rem .5rem; border-radius: 99px; background: var(--line); }
.state.done { background: #15803d; color: #fff; } .state.failed { background: var(--bad); color: #fff; }
.bars { display: grid; grid-template-columns: auto 1fr auto; gap: .2rem .6rem; align-items: center; font-size: .8rem; }
progress { width: 100%; accent-color: var(--accent); }
.preview { display: block; margin-top: .6rem; image-rendering: pixelated; max-width: 100%; border-radius: 6px; }
.images { display: flex; flex-wrap: wrap; gap: .7rem; }
figure { margin: 0; display: flex; flex-direction: column; gap: .25rem; }
figure img { width: 256px; max-width: 100%; border-radius: 6px; display: block; image-rendering: auto; }
figcaption { display: flex; gap: .5rem; align-items: center; font-size: .8rem; }
figcaption button { padding: .05rem .4rem; font-size: .8rem; }
#drop { border: 1px dashed var(--line); border-radius: 8px; padding: .6rem; text-align: center; color: var(--muted); }
#drop.over { border-color: var(--accent); }
#canvases { position: relative; display: inline-block; max-width: 100%; line-height: 0; }
#canvases canvas { max-width: 100%; border-radius: 6px; }
#mask { position: absolute; left: 0; top: 0; width: 100%; height: 100%; opacity: .55; cursor: crosshair;
        touch-action: none; }
.tools { display: flex; gap: .4rem; align-items: center; flex-wrap: wrap; font-size: .85rem; }
.tools label { flex-direction: row; align-items: center; gap: .25rem; }
.tools input[type=range] { width: 6rem; }
</style>
</head>
<body>
<header><h1>Würstchen</h1><span class="muted" id="model">loading…</span><span class="muted" id="queue"></span></header>
<main>
<form id="form" autocomplete="off">
  <label>Prompt
    <textarea id="prompt" rows="3" placeholder="a red circle above a blue square"></textarea></label>
  <label>Negative prompt
    <textarea id="negative_prompt" rows="2" placeholder="what the image should not show"></textarea></label>
  <div class="row3">
    <label>Size <select id="preset"></select></label>
    <label>Width <input id="width" type="number"></label>
    <label>Height <input id="height" type="number"></label>
  </div>
  <div class="row">
    <label>Images <input id="num_images" type="number" min="1" value="1"></label>
    <label>Seed <span class="seed"><input id="seed" type="number" min="0" placeholder="random">
      <button type="button" id="random_seed" title="a new random seed each time">random</button></span></label>
  </div>
  <fieldset><legend>Stage C · prior</legend><div class="row">
    <label>Steps <input id="prior_steps" type="number" min="1"></label>
    <label>Guidance <input id="prior_guidance" type="number" min="0" step="0.5"></label></div></fieldset>
  <fieldset><legend>Stage B · decoder</legend><div class="row3">
    <label>Steps <input id="decoder_steps" type="number" min="1"></label>
    <label>Guidance <input id="decoder_guidance" type="number" min="0" step="0.5"></label>
    <label>Sampler <select id="sampler"></select></label></div></fieldset>
  <fieldset><legend>Start from an image</legend>
    <div id="drop">Drop an image here, or
      <input id="image_file" type="file" accept="image/png,image/jpeg,image/webp"></div>
    <div id="source_tools" hidden>
      <div id="canvases"><canvas id="source"></canvas><canvas id="mask"></canvas></div>
      <div class="tools">
        <label><input type="radio" name="tool" id="brush" value="brush" checked> brush</label>
        <label><input type="radio" name="tool" id="eraser" value="eraser"> eraser</label>
        <label>size <input id="brush_size" type="range" min="2" max="128" value="24"></label>
        <button type="button" id="clear_mask">clear mask</button>
        <button type="button" id="remove_image">remove image</button>
      </div>
      <label>Strength <span class="tools"><input id="strength" type="range" min="0" max="1" step="0.05" value="0.6">
        <output id="strength_value">0.6</output></span></label>
      <p class="muted">Paint the region to repaint (inpainting); without a mask the whole image is the start
        (image-to-image). Strength: the share of Stage C's steps run from it (1: ignore the image).</p>
      <button type="button" id="variations">Variations of this image</button>
    </div>
  </fieldset>
  <button class="primary" id="generate" type="submit">Generate</button>
  <p class="error" id="error" role="alert"></p>
  <p class="muted">Ctrl+Enter generates; an empty prompt generates unconditionally. The preview during
    Stage C is a colour map fitted to the latent, not a decode.</p>
</form>
<section id="gallery" aria-live="polite"></section>
</main>
<script>
"use strict";
const $ = (sel, el = document) => el.querySelector(sel);
// build("a", {href: url}, [child, ...]): text goes in through textContent, never innerHTML (prompts are user text).
function build(tag, props, children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c);
  return node;
}
let info = null;

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error?.message || `${response.status} ${response.statusText}`);
  return body;
}

function setSize(w, h) {
  $("#width").value = w; $("#height").value = h;
  const key = `${w}x${h}`;
  $("#preset").value = [...$("#preset").options].some(o => o.value === key) ? key : "custom";
}

async function init() {
  info = await api("/api/info");
  const L = info.limits, d = info.defaults;
  $("#model").textContent = `${info.model} (${info.generation}) · ${info.device} · ${info.dtype}`;
  for (const p of info.presets) {
    const option = {value: `${p.width}x${p.height}`, textContent: `${p.width} × ${p.height}`};
    $("#preset").append(build("option", option, []));
  }
  $("#preset").append(build("option", {value: "custom", textContent: "custom"}, []));
  for (const id of ["width", "height"]) {
    Object.assign($("#" + id), {min: L.min_side, max: L.max_side, step: info.size_step});
  }
  setSize(d.width, d.height);
  Object.assign($("#num_images"), {max: L.max_images, value: d.num_images});
  Object.assign($("#prior_steps"), {max: L.max_steps, placeholder: `${info.default_prior_steps} (model default)`});
  Object.assign($("#decoder_steps"), {max: L.max_steps, value: d.decoder_steps});
  Object.assign($("#prior_guidance"), {max: L.max_guidance, value: d.prior_guidance});
  Object.assign($("#decoder_guidance"), {max: L.max_guidance, value: d.decoder_guidance});
  $("#seed").max = L.max_seed;
  $("#prompt").maxLength = $("#negative_prompt").maxLength = L.max_prompt_chars;
  for (const s of info.samplers) $("#sampler").append(build("option", {value: s, textContent: s}, []));
  $("#sampler").value = d.sampler;
  refreshHealth();
  setInterval(refreshHealth, 2000);
}

async function refreshHealth() {
  try {
    const h = await api("/health");
    $("#queue").textContent = h.running ? `running · ${h.queue} waiting` : (h.queue ? `${h.queue} waiting` : "idle");
  } catch (e) { $("#queue").textContent = "server unreachable"; }
}

const numberOrNull = id => $("#" + id).value.trim() === "" ? null : Number($("#" + id).value);

// The source image and its mask, at the image's own size (the canvases are only scaled by CSS).
const source = {loaded: false, painted: false, strengthTouched: false};

function loadImage(file) {
  if (!file) return;
  const url = URL.createObjectURL(file);
  const img = new Image();
  img.onload = () => {
    const canvas = $("#source"), mask = $("#mask");
    canvas.width = mask.width = img.naturalWidth;
    canvas.height = mask.height = img.naturalHeight;
    canvas.getContext("2d").drawImage(img, 0, 0);
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    Object.assign(source, {loaded: true, painted: false});
    $("#source_tools").hidden = false;
    const snap = v => Math.max(info.size_step, Math.min(info.limits.max_side, v - v % info.size_step));
    setSize(snap(img.naturalWidth), snap(img.naturalHeight));
    URL.revokeObjectURL(url);
  };
  img.onerror = () => { $("#error").textContent = "that file is not an image this browser can read"; };
  img.src = url;
}

function removeImage() {
  Object.assign(source, {loaded: false, painted: false});
  $("#source_tools").hidden = true;
  $("#image_file").value = "";
}

function paint(e) {
  const mask = $("#mask"), r = mask.getBoundingClientRect();
  const x = (e.clientX - r.left) * mask.width / r.width, y = (e.clientY - r.top) * mask.height / r.height;
  const ctx = mask.getContext("2d");
  ctx.globalCompositeOperation = $("#eraser").checked ? "destination-out" : "source-over";
  ctx.fillStyle = "#e11d48";
  ctx.beginPath();
  ctx.arc(x, y, Number($("#brush_size").value) * mask.width / r.width / 2, 0, 2 * Math.PI);
  ctx.fill();
  if (!$("#eraser").checked && !source.painted) {
    source.painted = true;
    if (!source.strengthTouched) setStrength(1);  // inpainting repaints the masked region from noise
  }
}

function setStrength(v) { $("#strength").value = v; $("#strength_value").textContent = Number(v).toFixed(2); }

// The painted overlay → a black-and-white PNG (white = repaint), or null when nothing is painted.
function maskPNG() {
  const mask = $("#mask"), pixels = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const out = document.createElement("canvas");
  out.width = mask.width; out.height = mask.height;
  const ctx = out.getContext("2d"), bw = ctx.createImageData(mask.width, mask.height);
  let any = false;
  for (let i = 0; i < pixels.data.length; i += 4) {
    const v = pixels.data[i + 3] > 0 ? 255 : 0;
    any = any || v > 0;
    bw.data[i] = bw.data[i + 1] = bw.data[i + 2] = v; bw.data[i + 3] = 255;
  }
  if (!any) return null;
  ctx.putImageData(bw, 0, 0);
  return out.toDataURL("image/png");
}

function request(variations = false) {
  const images = {};
  if (source.loaded) Object.assign(images, {image: $("#source").toDataURL("image/png"), variations,
                                            strength: Number($("#strength").value)});
  if (source.loaded && !variations) {
    const mask = maskPNG();
    if (mask) images.mask = mask;
  }
  if (variations) delete images.strength;
  return {
    ...images,
    prompt: $("#prompt").value,
    negative_prompt: $("#negative_prompt").value || null,
    width: Number($("#width").value), height: Number($("#height").value),
    num_images: Number($("#num_images").value),
    seed: numberOrNull("seed"),
    prior_steps: numberOrNull("prior_steps"),
    prior_guidance: Number($("#prior_guidance").value),
    decoder_steps: Number($("#decoder_steps").value),
    decoder_guidance: Number($("#decoder_guidance").value),
    sampler: $("#sampler").value,
  };
}

function card(job) {
  const p = job.params;
  const state = build("span", {className: "state", textContent: job.state}, []);
  const cancel = build("button", {type: "button", textContent: "Cancel", className: "cancel"}, []);
  const bars = build("div", {className: "bars"}, []);
  const stages = {};
  for (const [stage, label] of [["prior", "Stage C"], ["decoder", "Stage B"]]) {
    const bar = build("progress", {max: 1, value: 0}, []);
    const text = build("span", {className: "muted", textContent: ""}, []);
    bars.append(build("span", {textContent: label}, []), bar, text);
    stages[stage] = {bar, text};
  }
  const preview = build("img", {className: "preview", alt: "Stage C preview", hidden: true}, []);
  const images = build("div", {className: "images"}, []);
  const error = build("p", {className: "error"}, []);
  const seeds = p.num_images > 1 ? `${job.seed}…${job.seed + p.num_images - 1}` : `${job.seed}`;
  const mode = p.variations ? " · variations" : p.mask ? " · inpainting"
    : p.image ? ` · from an image (${p.strength ?? 0.6})` : "";
  const meta = build("span", {className: "muted", textContent: `${p.width}×${p.height} · seed ${seeds}${mode}`}, []);
  const title = build("span", {className: "prompt", textContent: p.prompt || "(no prompt)"}, []);
  const node = build("article", {className: "job"}, [
    build("header", {}, [title, meta, state, cancel]), bars, preview, images, error]);
  node.dataset.job = job.id;
  cancel.onclick = () => {
    api(`/api/jobs/${job.id}/cancel`, {method: "POST"}).catch(e => { error.textContent = e.message; });
  };
  $("#gallery").prepend(node);
  return {node, state, cancel, bars, stages, preview, images, error};
}

function show(c, job) {
  c.state.textContent = job.state;
  c.state.className = `state ${job.state}`;
  if (!["done", "failed", "cancelled"].includes(job.state)) return;
  c.cancel.remove();
  if (job.state === "done") {
    c.bars.remove(); c.preview.remove();
    for (const im of job.images) {
      const name = `wuerstchen-${im.seed}.png`;
      const reuse = build("button", {type: "button", textContent: "use seed", title: "generate this image again"}, []);
      reuse.onclick = () => { $("#seed").value = im.seed; $("#num_images").value = 1; };
      const img = build("img", {src: im.url, alt: `seed ${im.seed}`, className: "result"}, []);
      c.images.append(build("figure", {}, [
        build("a", {href: im.url, target: "_blank"}, [img]),
        build("figcaption", {}, [build("span", {textContent: `seed ${im.seed}`}, []),
          build("a", {href: im.url, download: name, textContent: "download"}, []), reuse])]));
    }
  } else {
    c.error.textContent = job.state === "failed" ? job.error : "cancelled";
  }
}

function follow(job) {
  const c = card(job);
  const events = new EventSource(`/api/jobs/${job.id}/events`);
  events.addEventListener("state", e => {
    const data = JSON.parse(e.data);
    refreshHealth();
    if (data.id) { show(c, data); events.close(); } else show(c, {...job, state: data.state});
  });
  events.addEventListener("progress", e => {
    const d = JSON.parse(e.data), s = c.stages[d.stage];
    if (s) { s.bar.value = d.step / d.total; s.text.textContent = `${d.step}/${d.total}`; }
  });
  events.addEventListener("preview", e => {
    c.preview.src = "data:image/png;base64," + JSON.parse(e.data).image;
    c.preview.hidden = false;
  });
  events.onerror = () => { c.error.textContent = events.readyState === 2 ? "connection lost" : "reconnecting…"; };
  events.onopen = () => { c.error.textContent = ""; };
}

async function submit(variations) {
  $("#error").textContent = "";
  const body = JSON.stringify(request(variations));
  const options = {method: "POST", headers: {"Content-Type": "application/json"}, body};
  try { follow(await api("/api/jobs", options)); } catch (err) { $("#error").textContent = err.message; }
}
$("#form").addEventListener("submit", e => { e.preventDefault(); submit(false); });
$("#variations").onclick = () => submit(true);
$("#image_file").addEventListener("change", e => loadImage(e.target.files[0]));
$("#drop").addEventListener("dragover", e => { e.preventDefault(); $("#drop").classList.add("over"); });
$("#drop").addEventListener("dragleave", () => $("#drop").classList.remove("over"));
$("#drop").addEventListener("drop", e => {
  e.preventDefault(); $("#drop").classList.remove("over"); loadImage(e.dataTransfer.files[0]);
});
$("#mask").addEventListener("pointerdown", e => { $("#mask").setPointerCapture(e.pointerId); paint(e); });
$("#mask").addEventListener("pointermove", e => { if (e.buttons & 1) paint(e); });
$("#clear_mask").onclick = () => {
  const mask = $("#mask");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  source.painted = false;
};
$("#remove_image").onclick = removeImage;
$("#strength").addEventListener("input", e => { source.strengthTouched = true; setStrength(e.target.value); });
$("#prompt").addEventListener("keydown", e => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#form").requestSubmit();
});
$("#preset").addEventListener("change", e => {
  if (e.target.value !== "custom") setSize(...e.target.value.split("x"));
});
for (const id of ["width", "height"]) {
  $("#" + id).addEventListener("change", () => setSize($("#width").value, $("#height").value));
}
$("#random_seed").onclick = () => { $("#seed").value = ""; };
init().catch(e => { $("#error").textContent = `cannot load /api/info: ${e.message}`; });
</script>
</body>
</html>
"""

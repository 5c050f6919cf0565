// The server's web page: a client of the same AUTOMATIC1111 /sdapi/v1 API that other tools use.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere.
"use strict";

const API = "/sdapi/v1";
const POLL_MS = 250;
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// HTTP

// JSON in and out; a failed call throws an Error carrying the server's `detail` (A1111's
// {"error", "detail"} shape, or FastAPI's list of validation errors).
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const response = await fetch(API + path, init);
  const text = await response.text();
  let data = null;
  try { data = JSON.parse(text); } catch { /* not JSON: the status line says enough */ }
  if (!response.ok) throw new Error(errorMessage(response, data, text));
  return data;
}

function errorMessage(response, data, text) {
  const detail = data && (data.detail ?? data.error);
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  }
  return `${response.status} ${response.statusText} ${text.slice(0, 200)}`.trim();
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---------------------------------------------------------------------------------------------
// Pickers filled from the server's lists

function fillSelect(select, items, value, label) {
  select.replaceChildren(...items.map((item) => new Option(label(item), value(item))));
}

let samplerAliases = new Map();   // lower-case name or alias -> the sampler's name
let schedulerLabels = new Map();  // lower-case name or label -> the scheduler's name

async function loadLists() {
  const loads = [
    api("/samplers").then((samplers) => {
      fillSelect($("sampler_name"), samplers, (s) => s.name, (s) => s.name);
      samplerAliases = new Map(samplers.flatMap((s) => [s.name, ...(s.aliases || [])].map((a) => [a.toLowerCase(), s.name])));
      if (samplers.some((s) => s.name === "Euler")) $("sampler_name").value = "Euler";
    }),
    api("/schedulers").then((schedulers) => {
      fillSelect($("scheduler"), schedulers, (s) => s.name, (s) => s.label || s.name);
      schedulerLabels = new Map(schedulers.flatMap((s) => [[s.name.toLowerCase(), s.name], [(s.label || s.name).toLowerCase(), s.name]]));
    }),
    api("/loras").then((loras) => {
      $("lora").append(...loras.map((l) => new Option(l.alias || l.name, l.name)));
    }),
    loadModels(),
  ];
  for (const result of await Promise.allSettled(loads)) {
    if (result.status === "rejected") showError(result.reason.message);
  }
}

async function loadModels() {
  const [models, options] = await Promise.all([api("/sd-models"), api("/options")]);
  fillSelect($("model"), models, (m) => m.title, (m) => m.model_name || m.title);
  $("model").value = options.sd_model_checkpoint;
  $("model").dataset.current = $("model").value;
}

async function switchModel() {
  const select = $("model");
  clearError();
  $("model-status").textContent = "Loading the model…";
  select.disabled = $("generate").disabled = true;
  try {
    await api("/options", { sd_model_checkpoint: select.value });
    select.dataset.current = select.value;
    $("model-status").textContent = "";
  } catch (e) {
    select.value = select.dataset.current;
    $("model-status").textContent = "";
    showError(e.message);
  } finally {
    select.disabled = $("generate").disabled = false;
  }
}

// A1111's extra-networks syntax: the tag goes at the end of the prompt at weight 1.
function insertLora() {
  const name = $("lora").value;
  if (!name) return;
  const prompt = $("prompt");
  prompt.value = `${prompt.value.trimEnd()} <lora:${name}:1>`.trimStart();
  $("lora").value = "";
}

// ---------------------------------------------------------------------------------------------
// Source image and the mask painted on it

let initImage = null;  // base64 of the uploaded file
let maskPainted = false;

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function showMode() {
  $("image-section").hidden = mode() === "txt2img";
  for (const el of document.querySelectorAll(".inpaint-only")) el.hidden = mode() !== "inpaint";
  $("mask-canvas").hidden = mode() !== "inpaint";
}

function loadImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const picture = new Image();
    picture.onload = () => {
      for (const canvas of [$("image-canvas"), $("mask-canvas")]) {
        canvas.width = picture.naturalWidth;
        canvas.height = picture.naturalHeight;
      }
      $("image-canvas").getContext("2d").drawImage(picture, 0, 0);
      maskPainted = false;
      // The generation keeps the picture's size (to the multiple of 8 the model needs).
      $("width").value = Math.max(8, picture.naturalWidth - (picture.naturalWidth % 8));
      $("height").value = Math.max(8, picture.naturalHeight - (picture.naturalHeight % 8));
      initImage = reader.result.split(",")[1];
    };
    picture.onerror = () => showError(`${file.name} is not a picture the browser can read`);
    picture.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}

// Pointer position in the canvas's own pixels (the canvas is shown scaled to the page).
function canvasPoint(canvas, event) {
  const box = canvas.getBoundingClientRect();
  return [
    (event.clientX - box.left) * canvas.width / box.width,
    (event.clientY - box.top) * canvas.height / box.height,
  ];
}

function setUpMaskPainting() {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  let last = null;
  canvas.addEventListener("pointerdown", (event) => {
    if (!canvas.width) return;
    canvas.setPointerCapture(event.pointerId);
    last = canvasPoint(canvas, event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = canvasPoint(canvas, event);
    stroke(last, point);
    last = point;
  });
  const stop = () => { last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);

  function stroke(from, to) {
    context.strokeStyle = "white";
    context.lineCap = context.lineJoin = "round";
    context.lineWidth = Number($("brush").value) || 1;
    context.beginPath();
    context.moveTo(...from);
    context.lineTo(...to);
    context.stroke();
    maskPainted = true;
  }
}

// A1111's mask: white repaints, black keeps; painted strokes over a black picture of the image's size.
function maskBase64() {
  const painted = $("mask-canvas");
  const mask = document.createElement("canvas");
  mask.width = painted.width;
  mask.height = painted.height;
  const context = mask.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, mask.width, mask.height);
  context.drawImage(painted, 0, 0);
  return mask.toDataURL("image/png").split(",")[1];
}

// ---------------------------------------------------------------------------------------------
// Generation

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);  // left out: the server's default
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    cfg_scale: number("cfg_scale"),
    sampler_name: $("sampler_name").value || undefined,
    scheduler: $("scheduler").value || undefined,
    seed: number("seed"),
    batch_size: number("batch_size"),
  };
  if (mode() === "txt2img") return body;
  if (!initImage) throw new Error("choose an image for image to image / inpainting first");
  body.init_images = [initImage];
  body.denoising_strength = number("denoising_strength");
  if (mode() === "inpaint") {
    if (!maskPainted) throw new Error("paint the area to repaint on the image first");
    body.mask = maskBase64();
    body.mask_blur = number("mask_blur");
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  clearError();
  let body;
  try {
    body = requestBody();
  } catch (e) {
    showError(e.message);
    return;
  }
  setRunning(true);
  const progress = watchProgress();
  try {
    addResults(await api(mode() === "txt2img" ? "/txt2img" : "/img2img", body));
    progress.stop(true);
  } catch (e) {
    progress.stop(false);
    showError(e.message);
  } finally {
    setRunning(false);
  }
}

function setRunning(running) {
  $("generate").disabled = running;
  $("interrupt").disabled = !running;
  $("model").disabled = running;
}

async function interrupt() {
  try {
    await api("/interrupt", {});
  } catch (e) {
    showError(e.message);
  }
}

// Polls /progress until stopped; A1111's progress is 0..1 over the whole job (all batches).
function watchProgress() {
  let running = true;
  const bar = $("progress");
  const text = $("progress-text");
  const preview = $("preview");
  bar.value = 0;
  text.textContent = "Waiting for the server…";
  preview.hidden = true;
  $("progress-box").hidden = false;

  async function poll() {
    while (running) {
      try {
        const p = await api("/progress?skip_current_image=false");
        if (!running) break;
        show(p);
      } catch { /* the generation's own answer reports errors */ }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  }

  function show(p) {
    const state = p.state || {};
    if (!state.job_count && !p.progress) return;  // not started yet (queued behind another job)
    bar.value = p.progress * 100;
    const step = state.sampling_steps ? `, step ${state.sampling_step} of ${state.sampling_steps}` : "";
    text.textContent = `${Math.round(p.progress * 100)} %${step}, ${p.eta_relative.toFixed(1)} s left`;
    if (p.current_image) {
      preview.src = `data:image/png;base64,${p.current_image}`;
      preview.hidden = false;
    }
  }

  poll();
  return {
    stop(done) {
      running = false;
      preview.hidden = true;
      bar.value = done ? 100 : 0;
      text.textContent = done ? "Done" : "Stopped";
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Gallery

function addResults(result) {
  let info = {};
  try { info = JSON.parse(result.info); } catch { /* no infotexts: the images still show */ }
  const infotexts = info.infotexts || [];
  const figures = (result.images || []).map((image, i) => {
    const figure = $("result-template").content.firstElementChild.cloneNode(true);
    const infotext = infotexts[i] ?? infotexts[0] ?? "";
    figure.querySelector("img").src = `data:image/png;base64,${image}`;
    figure.querySelector(".infotext").textContent = infotext;
    figure.querySelector(".reuse").addEventListener("click", () => reuse(infotext));
    return figure;
  });
  $("gallery").prepend(...figures);
}

// A1111's infotext (modules/infotext_utils.py): prompt lines, then "Negative prompt: ..." lines, then
// one line of `Key: value` pairs, values holding commas written as JSON strings.
const PAIR = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;

function parseInfotext(text) {
  const lines = text.trim().split("\n");
  let last = lines.pop() ?? "";
  if ([...last.matchAll(PAIR)].length < 3) {  // no parameter line: all of it is prompt
    lines.push(last);
    last = "";
  }
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (let line of lines) {
    if (line.startsWith("Negative prompt:")) {
      inNegative = true;
      line = line.slice("Negative prompt:".length).trim();
    }
    (inNegative ? negative : prompt).push(line);
  }
  const fields = { Prompt: prompt.join("\n"), "Negative prompt": negative.join("\n") };
  for (const [, key, raw] of last.matchAll(PAIR)) {
    let value = raw.trim();
    if (value.startsWith('"') && value.endsWith('"')) {
      try { value = JSON.parse(value); } catch { /* kept as written */ }
    }
    fields[key.trim()] = value;
  }
  return fields;
}

function reuse(infotext) {
  const fields = parseInfotext(infotext);
  const set = (id, key) => { if (fields[key] !== undefined) $(id).value = fields[key]; };
  set("prompt", "Prompt");
  set("negative_prompt", "Negative prompt");
  set("steps", "Steps");
  set("cfg_scale", "CFG scale");
  set("seed", "Seed");
  set("denoising_strength", "Denoising strength");
  set("mask_blur", "Mask blur");
  set("batch_size", "Batch size");
  const size = /^(\d+)x(\d+)$/.exec(fields.Size || "");
  if (size) [, $("width").value, $("height").value] = size;
  if (fields.Sampler) setSampler(fields.Sampler, fields["Schedule type"]);
}

// A legacy name ("DPM++ 2M Karras") carries its schedule type as a suffix, which wins (as in A1111).
function setSampler(sampler, schedule) {
  let name = samplerAliases.get(sampler.toLowerCase());
  if (!name) {
    for (const [label, scheduler] of schedulerLabels) {
      const base = sampler.toLowerCase().slice(0, -label.length - 1);
      if (sampler.toLowerCase().endsWith(` ${label}`) && samplerAliases.has(base)) {
        name = samplerAliases.get(base);
        schedule = scheduler;
      }
    }
  }
  if (name) $("sampler_name").value = name;
  const scheduler = schedulerLabels.get((schedule || "automatic").toLowerCase());
  if (scheduler) $("scheduler").value = scheduler;
}

// ---------------------------------------------------------------------------------------------

for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", showMode);
$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", interrupt);
$("model").addEventListener("change", switchModel);
$("lora").addEventListener("change", insertLora);
$("init-image").addEventListener("change", (e) => { if (e.target.files[0]) loadImage(e.target.files[0]); });
$("clear-mask").addEventListener("click", clearMask);
setUpMaskPainting();
showMode();
loadLists();

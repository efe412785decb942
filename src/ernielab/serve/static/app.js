// ernielab serve web page: POST /v1/generate?stream=true and read its server-sent events (progress, done).
"use strict";
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadConfig() {
  try {
    const r = await fetch("/v1/config", { headers: headers() });
    if (!r.ok) return;
    const c = await r.json();
    $("model").textContent = "model: " + c.model;
    $("width").value = c.width; $("height").value = c.height;
    $("width").step = $("height").step = c.size_multiple;
    $("width").max = $("height").max = c.max_side;
    $("steps").value = c.steps; $("steps").max = c.max_steps;
    $("guidance").value = c.guidance_scale; $("shift").value = c.shift;
    $("n").max = c.max_images;
    $("enhance").disabled = !c.enhancer;
  } catch (e) { /* the form still works with the server's defaults */ }
}

function showError(msg) { $("error").textContent = msg; $("error").hidden = false; }

function num(id) { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); }

function addImage(img, box) {
  const fig = document.createElement("figure");
  const el = document.createElement("img");
  el.src = "data:image/png;base64," + img.b64_png;
  el.alt = img.revised_prompt;
  el.className = "result";
  el.dataset.seed = img.seed;
  const cap = document.createElement("figcaption");
  const a = document.createElement("a");
  a.href = el.src; a.download = "ernielab-seed" + img.seed + ".png"; a.textContent = "download";
  cap.append("seed " + img.seed + " · " + img.width + "×" + img.height + " · ", a,
             document.createElement("br"), img.revised_prompt);
  fig.append(el, cap);
  box.append(fig);
}

async function generate(ev) {
  ev.preventDefault();
  $("error").hidden = true;
  const body = { prompt: $("prompt").value, seed: num("seed") ?? 0, n: num("n") ?? 1,
                 width: num("width"), height: num("height"), steps: num("steps"), guidance: num("guidance"),
                 shift: num("shift"), enhance: $("enhance").checked };
  const neg = $("negative").value;
  if (neg) body.negative_prompt = neg;
  $("generate").disabled = true;
  $("progress").value = 0; $("status").textContent = "sending…";
  try {
    const r = await fetch("/v1/generate?stream=true", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) {}
      showError(msg); $("status").textContent = ""; return;
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        const d = data ? JSON.parse(data) : {};
        if (name === "queued") $("status").textContent = "queued (position " + d.position + ")";
        else if (name === "started") $("status").textContent = "running (batch of " + d.batch_images + ")";
        else if (name === "progress") { $("progress").value = d.step / d.steps; $("status").textContent = "step " + d.step + "/" + d.steps; }
        else if (name === "done") { $("progress").value = 1; $("status").textContent = "done"; const box = document.createDocumentFragment(); d.images.forEach((im) => addImage(im, box)); $("gallery").prepend(box); }
        else if (name === "error") { showError(d.error.message); $("status").textContent = ""; }
      }
    }
  } catch (e) {
    showError("request failed: " + e);
  } finally {
    $("generate").disabled = false;
  }
}

$("form").addEventListener("submit", generate);
loadConfig();

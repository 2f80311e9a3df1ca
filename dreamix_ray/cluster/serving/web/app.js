// The Dreamix page: upload, submit, poll the durable job, then show original | edit and a download link.
// Results are fetched with the bearer key and shown from blob URLs, because <video src> cannot send headers.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { urls: [] };

function headers() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

function blobUrl(blob) {
  const url = URL.createObjectURL(blob);
  state.urls.push(url);
  return url;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showOriginal(file) {
  const box = $("original");
  box.replaceChildren();
  if (!file) { box.textContent = "(text to video: no original)"; return; }
  const el = document.createElement(file.type.startsWith("image/") ? "img" : "video");
  el.src = blobUrl(file);
  el.id = "original-media";
  if (el.tagName === "VIDEO") { el.controls = el.loop = el.muted = el.autoplay = true; el.playsInline = true; }
  box.append(el);
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    const stages = info.stages.map((s) => `${s.name} ${s.frames}x${s.height}x${s.width}`).join(" → ");
    $("model").textContent = `Model: ${stages}. Accepts ${info.accepted}, up to ${info.limits.max_upload_mb} MB.`;
    $("preset").replaceChildren(...Object.entries(info.edit_presets).map(([name, p]) =>
      new Option(`${name} (strength ${p.strength}${p.finetune ? ", finetuned" : ""})`, name, false, name === "balanced")));
    $("camera").replaceChildren(...info.cameras.map((c) => new Option(c, c)));
    $("edit-type").replaceChildren(new Option("any", ""), ...info.edit_types.map((t) => new Option(t, t)));
  } catch (err) {
    $("model").textContent = `Enter your API key to load the model's presets (${err.message}).`;
  }
}

async function poll(route, id) {
  for (;;) {
    const job = await (await api(`${route}/${id}`)).json();
    $("progress").value = job.progress;
    $("stage").textContent = `${job.status} · ${job.stage} · ${Math.round(job.progress * 100)}%`;
    if (job.status === "done") return job;
    if (job.status === "failed") throw new Error(job.error || "the job failed");
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const file = $("file").files[0];
  const image = file && file.type.startsWith("image/");
  const route = !file ? "/v1/generations" : image ? "/v1/animations" : "/v1/edits";
  const form = new FormData();
  form.append("prompt", $("prompt").value);
  form.append("seed", $("seed").value || "0");
  if (file) {
    form.append(image ? "image" : "video", file);
    form.append("preset", $("preset").value);
    if ($("edit-type").value) form.append("edit_type", $("edit-type").value);
  }
  if (image) form.append("camera", $("camera").value);
  $("run").disabled = true;
  $("status").hidden = false;
  $("download").hidden = true;
  $("sheet-figure").hidden = true;
  $("progress").value = 0;
  showOriginal(file);
  try {
    const { id } = await (await api(route, { method: "POST", body: form })).json();
    $("stage").textContent = `queued · ${id}`;
    const job = await poll(route, id);
    const video = blobUrl(await (await api(job.result.video_url)).blob());
    $("edited").src = video;
    $("edited").play().catch(() => {});
    $("download").href = video;
    $("download").download = `${id}.mp4`;
    $("download").hidden = false;
    if (job.result.preview_png_url) {
      $("sheet").src = blobUrl(await (await api(job.result.preview_png_url)).blob());
      $("sheet-figure").hidden = false;
    }
    document.body.dataset.job = id;
    document.body.dataset.state = "done";
  } catch (err) {
    showError(err.message);
    document.body.dataset.state = "failed";
  } finally {
    $("run").disabled = false;
  }
}

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  $("camera-label").hidden = !(file && file.type.startsWith("image/"));
  $("run").textContent = !file ? "Generate" : file.type.startsWith("image/") ? "Animate" : "Edit";
});
$("key").value = sessionStorage.getItem("dreamix-key") || "";
$("key").addEventListener("change", () => { sessionStorage.setItem("dreamix-key", $("key").value.trim()); loadInfo(); });
$("form").addEventListener("submit", submit);
loadInfo();

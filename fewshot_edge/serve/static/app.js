// The enrollment page: plain JavaScript over the service's JSON API (no build step, nothing from a CDN).
"use strict";

const KEY = "fewshot-edge-api-key";
const $ = (id) => document.getElementById(id);
const shots = []; // camera shots waiting to be enrolled: {blob, url}
let stream = null;
let live = false;

function status(message, isError = false) {
  const line = $("status");
  line.textContent = message;
  line.className = isError ? "error" : "";
}

// fetch() with the API key; a JSON error becomes an Error with the service's one-line message
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY);
  if (key) headers.set("X-API-Key", key);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) $("key-form").hidden = false;
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error || message;
    } catch (ignored) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();
const classPath = (label) => `/classes/${encodeURIComponent(label)}`;

async function refreshInfo() {
  const info = await json("/info");
  $("info").textContent =
    `${info.bundle.split(/[\\/]/).pop()} · mode ${info.mode} · ${info.precision} · ${info.backend}` +
    ` · ${info.input.width}x${info.input.height}`;
}

async function refreshClasses() {
  const { classes } = await json("/classes");
  const list = $("classes");
  list.replaceChildren();
  $("class-count").textContent = `(${classes.length})`;
  $("no-classes").hidden = classes.length > 0;
  for (const { label, shots: count } of classes) {
    const item = $("class-template").content.firstElementChild.cloneNode(true);
    item.dataset.label = label;
    item.querySelector(".label").textContent = label;
    item.querySelector(".shots").textContent = `${count} shot${count === 1 ? "" : "s"}`;
    item.querySelector(".rename-input").value = label;
    item.querySelector(".rename").addEventListener("submit", (event) => {
      event.preventDefault();
      rename(label, item.querySelector(".rename-input").value);
    });
    item.querySelector(".remove").addEventListener("click", () => remove(label));
    list.append(item);
    thumbnail(label, item.querySelector(".thumb"));
  }
}

async function thumbnail(label, img) {
  try {
    const blob = await (await api(`${classPath(label)}/thumbnail`)).blob();
    img.src = URL.createObjectURL(blob);
    img.alt = `first shot of ${label}`;
  } catch (error) { /* removed meanwhile: the next refresh drops it */ }
}

async function run(action, done) {
  try {
    const message = await action();
    status(message || done);
    return true;
  } catch (error) {
    status(error.message, true);
    return false;
  }
}

async function enroll(label, files, add) {
  const form = new FormData();
  if (!add) form.append("label", label);
  for (const file of files) form.append("images", file, file.name || "shot.png");
  const path = add ? `${classPath(label)}/shots` : "/classes";
  const result = await json(path, { method: "POST", body: form });
  await refreshClasses();
  return add
    ? `added ${result.added} to '${result.label}': ${result.shots} shots`
    : `enrolled '${result.label}': ${result.shots} shot${result.shots === 1 ? "" : "s"}`;
}

async function rename(label, name) {
  await run(async () => {
    const result = await json(classPath(label), {
      method: "PATCH",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ label: name }),
    });
    await refreshClasses();
    return `renamed '${label}' to '${result.label}'`;
  });
}

async function remove(label) {
  if (!confirm(`Remove '${label}' and its shots?`)) return;
  await run(async () => {
    const result = await json(classPath(label), { method: "DELETE" });
    await refreshClasses();
    return `removed '${result.removed}' (${result.shots} shots)`;
  });
}

async function predict(files, topK) {
  const form = new FormData();
  form.append("top_k", String(topK));
  for (const file of files) form.append("images", file, file.name || "frame.png");
  return (await json("/predict", { method: "POST", body: form })).predictions;
}

function describe(p) {
  const top = p.top_k.map((t) => `${t.label} ${(100 * t.probability).toFixed(1)}%`).join(", ");
  const entropy = p.entropy === null || p.entropy === undefined ? "" : ` · entropy ${p.entropy.toFixed(3)}`;
  return `${p.label}${p.unknown ? " (unknown)" : ""} · distance ${p.distance.toFixed(3)}${entropy} · top: ${top}`;
}

function showPredictions(files, predictions) {
  const box = $("predictions");
  box.replaceChildren();
  predictions.forEach((p, i) => {
    const row = document.createElement("div");
    row.className = "prediction" + (p.unknown ? " unknown" : "");
    row.dataset.label = p.label;
    const img = document.createElement("img");
    img.src = URL.createObjectURL(files[i]);
    img.alt = p.image;
    const text = document.createElement("span");
    text.textContent = `${p.image}: ${describe(p)}`;
    row.append(img, text);
    box.append(row);
  });
}

// the camera: a video frame as a PNG blob
function frame() {
  const video = $("camera-video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function startCamera() {
  if (stream) return;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    status("no camera access here: browsers allow it on localhost or over HTTPS only", true);
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
  } catch (error) {
    status(`camera: ${error.message}`, true);
    return;
  }
  const video = $("camera-video");
  video.srcObject = stream;
  video.hidden = false;
  await video.play();
  for (const id of ["camera-shot", "camera-live"]) $(id).disabled = false;
  status("camera on");
}

async function takeShot() {
  const blob = await frame();
  const url = URL.createObjectURL(blob);
  shots.push({ blob, url });
  const item = document.createElement("li");
  const img = document.createElement("img");
  img.src = url;
  img.alt = `shot ${shots.length}`;
  item.append(img);
  $("shots").append(item);
  $("camera-enroll").disabled = false;
}

async function enrollShots() {
  const label = $("enroll-label").value;
  const ok = await run(() => enroll(label, shots.map((s) => s.blob), $("enroll-add").checked));
  if (ok) {
    shots.splice(0).forEach((s) => URL.revokeObjectURL(s.url));
    $("shots").replaceChildren();
    $("camera-enroll").disabled = true;
  }
}

async function liveLoop() {
  while (live) {
    try {
      const [p] = await predict([await frame()], 3);
      $("live").textContent = describe(p);
    } catch (error) {
      $("live").textContent = error.message;
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

function toggleLive() {
  live = !live;
  $("camera-live").setAttribute("aria-pressed", String(live));
  $("camera-live").textContent = live ? "Stop live predictions" : "Live predictions";
  if (live) liveLoop();
}

async function refresh() {
  await run(async () => {
    await refreshInfo();
    await refreshClasses();
    $("key-form").hidden = true;
  }, "ready");
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key-input").value);
  refresh();
});

$("enroll-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = [...$("enroll-files").files];
  if (!files.length) {
    status("choose image files to enroll (or take camera shots)", true);
    return;
  }
  if (await run(() => enroll($("enroll-label").value, files, $("enroll-add").checked))) {
    $("enroll-files").value = "";
  }
});

$("predict-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = [...$("predict-files").files];
  if (!files.length) {
    status("choose image files to classify", true);
    return;
  }
  await run(async () => {
    showPredictions(files, await predict(files, Number($("predict-topk").value) || 1));
    return `predicted ${files.length} image${files.length === 1 ? "" : "s"}`;
  });
});

$("camera-start").addEventListener("click", startCamera);
$("camera-shot").addEventListener("click", takeShot);
$("camera-enroll").addEventListener("click", enrollShots);
$("camera-live").addEventListener("click", toggleLive);

refresh();

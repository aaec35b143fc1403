// The upload page: one POST /v1/captions per image, so the server's micro-batcher gathers them.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = { max_images: 16, max_upload_bytes: 10 * 1024 * 1024, max_beams: 8, max_new_tokens: 100,
  num_beams: 1, default_new_tokens: 67 };

function fillSelect(select, max, value) {
  const keep = Number(select.value) || value;
  select.replaceChildren();
  for (let i = 1; i <= max; i++) select.append(new Option(String(i), String(i)));
  select.value = String(Math.min(keep, max));
}

function syncCaptionChoices() {
  fillSelect($("num-captions"), Number($("num-beams").value), 1);
}

async function loadLimits() {
  try {
    const r = await fetch("/healthz");
    if (r.ok) limits = (await r.json()).limits;
  } catch (e) { /* keep the defaults; the server reports its own limits on each request */ }
  fillSelect($("num-beams"), limits.max_beams, limits.num_beams);
  syncCaptionChoices();
  const tokens = $("max-new-tokens");
  tokens.max = String(limits.max_new_tokens);
  tokens.value = String(limits.default_new_tokens);
  const mb = (limits.max_upload_bytes / 1024 / 1024).toFixed(0);
  $("limits").textContent = `JPEG, PNG, WebP, GIF, BMP or TIFF · up to ${mb} MB each`;
}

function makeCard(file) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.state = "pending";
  const img = document.createElement("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  img.onerror = () => {  // not something the browser can show either: keep the card's shape
    const blank = document.createElement("div");
    blank.className = "no-preview";
    blank.textContent = "no preview";
    img.replaceWith(blank);
  };
  const body = document.createElement("div");
  body.className = "body";
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = file.name;
  const status = document.createElement("div");
  status.className = "status";
  status.textContent = "captioning";
  body.append(name, status);
  card.append(img, body);
  $("results").prepend(card);
  return card;
}

function showError(card, message) {
  card.dataset.state = "error";
  card.querySelector(".status").textContent = message;
}

function showCaptions(card, captions) {
  card.dataset.state = "done";
  card.querySelector(".status").remove();
  const list = document.createElement("ol");
  list.className = "captions";
  for (const text of captions) {
    const item = document.createElement("li");
    item.textContent = text || "(empty caption)";
    list.append(item);
  }
  card.querySelector(".body").append(list);
}

function errorText(status, body) {
  const detail = body && body.detail;
  if (Array.isArray(detail)) return `${status}: ${detail.map((d) => d.msg).join("; ")}`;
  return `${status}: ${detail || "request failed"}`;
}

async function caption(file) {
  const card = makeCard(file);
  if (file.size > limits.max_upload_bytes) {
    showError(card, `413: larger than ${(limits.max_upload_bytes / 1024 / 1024).toFixed(0)} MB`);
    return;
  }
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("num_beams", $("num-beams").value);
  form.append("num_captions", $("num-captions").value);
  form.append("max_new_tokens", $("max-new-tokens").value);
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await fetch("/v1/captions", { method: "POST", body: form });
    } catch (e) {
      showError(card, `network error: ${e.message}`);
      return;
    }
    if (response.status === 503 && attempt < 3) {  // overloaded: wait as told, then retry
      const wait = Number(response.headers.get("Retry-After")) || 1;
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      continue;
    }
    const body = await response.json().catch(() => null);
    if (response.ok) showCaptions(card, body.results[0].captions);
    else showError(card, errorText(response.status, body));
    return;
  }
}

function handle(files) {
  for (const file of files) caption(file);
}

document.addEventListener("DOMContentLoaded", () => {
  loadLimits();
  $("num-beams").addEventListener("change", syncCaptionChoices);
  const input = $("file-input");
  input.addEventListener("change", () => { handle(input.files); input.value = ""; });
  const drop = $("drop");
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => handle(e.dataTransfer.files));
});

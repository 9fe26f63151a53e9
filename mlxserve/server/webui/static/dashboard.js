// The dashboard: the store (/api/tags, /api/show), the loaded models (/api/ps), pull with a
// progress bar (/api/pull), delete with a confirmation (/api/delete). Redrawn every
// REFRESH_MS while it is shown; every name and value goes in as text.

import * as api from "./api.js";
import { showError } from "./chat.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 1000;
const NEVER = "0001-01-01T00:00:00Z";
let timer = null;
let confirming = null;

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  for (; n >= 1000 && i < units.length - 1; i++) n /= 1000;
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function timeLeft(expires) {
  if (!expires || expires.startsWith("0001")) return "never";
  const seconds = Math.max(0, Math.round((Date.parse(expires) - Date.now()) / 1000));
  return seconds >= 60 ? `${Math.floor(seconds / 60)} min ${seconds % 60} s` : `${seconds} s`;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell ?? "";
    tr.append(td);
  }
  return tr;
}

function deleteButton(name) {
  const node = document.createElement("button");
  node.type = "button";
  node.className = confirming === name ? "delete confirm" : "delete";
  node.textContent = confirming === name ? "Really delete?" : "Delete";
  node.addEventListener("click", async () => {
    if (confirming !== name) {
      confirming = name;
      node.className = "delete confirm";
      node.textContent = "Really delete?";
      return;
    }
    confirming = null;
    try {
      await api.call("/api/delete", { method: "DELETE", body: { model: name } });
    } catch (error) {
      showError(`delete ${name}: ${error.message}`);
    }
    refresh();
  });
  return node;
}

export async function refresh() {
  try {
    const [tags, ps] = await Promise.all([api.json("/api/tags"), api.json("/api/ps")]);
    $("loaded").tBodies[0].replaceChildren(
      ...ps.models.map((m) =>
        row([
          m.name,
          m.runner,
          bytes(m.size),
          bytes(m.size_vram),
          bytes(m.kv_cache_bytes),
          m.context_length,
          `${m.active ?? 0} / ${m.slots ?? "?"}`,
          m.queued ?? 0,
          m.expires_at === NEVER ? "never" : timeLeft(m.expires_at),
        ]),
      ),
    );
    const capabilities = await Promise.all(tags.models.map((m) => api.capabilities(m.name)));
    $("store").tBodies[0].replaceChildren(
      ...tags.models.map((m, i) =>
        row([
          m.name,
          bytes(m.size),
          m.details?.format,
          m.details?.quantization_level,
          m.details?.family,
          m.details?.parameter_size,
          capabilities[i].join(", "),
          m.details?.parent_model,
          deleteButton(m.name),
        ]),
      ),
    );
  } catch (error) {
    showError(error.message);
  }
}

async function pull(event) {
  event.preventDefault();
  const name = $("pull-name").value.trim();
  const bar = $("pull-progress");
  const status = $("pull-status");
  bar.hidden = false;
  bar.removeAttribute("value");
  $("pull").disabled = true;
  try {
    const response = await api.call("/api/pull", {
      method: "POST",
      body: { model: name, stream: true, insecure: $("pull-insecure").checked },
    });
    for await (const line of api.ndjson(response)) {
      status.textContent = line.status ?? "";
      if (line.total) bar.value = (line.completed ?? 0) / line.total;
    }
    bar.value = 1;
  } catch (error) {
    status.textContent = `error: ${error.message}`;
    bar.hidden = true;
  } finally {
    $("pull").disabled = false;
    refresh();
  }
}

export function show(visible) {
  clearInterval(timer);
  timer = null;
  if (!visible) return;
  refresh();
  timer = setInterval(refresh, REFRESH_MS);
}

export function start() {
  $("pull-form").addEventListener("submit", pull);
}

// The daemon's public API, called as any client calls it. When the daemon requires an API key
// the page asks for it once and keeps it in this tab's sessionStorage only (never localStorage:
// it leaves with the tab).

const KEY = "mlxserve.apiKey";
let askKey = null;

export class ApiError extends Error {}

export function onKeyNeeded(prompt) {
  askKey = prompt;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error ?? body;
    return typeof error === "string" ? error : error.message ?? JSON.stringify(error);
  } catch {
    return `HTTP ${response.status}`;
  }
}

export async function call(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, {
      method,
      headers,
      signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && askKey) {
      sessionStorage.setItem(KEY, await askKey());
      continue;
    }
    if (!response.ok) throw new ApiError(await errorText(response));
    return response;
  }
}

export async function json(path, options) {
  return (await call(path, options)).json();
}

// NDJSON lines of a streamed answer (/api/chat, /api/pull), as objects; an error line throws.
export async function* ndjson(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let rest = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    const parts = (rest + value).split("\n");
    rest = parts.pop();
    for (const line of parts) if (line.trim()) yield parsed(line);
  }
  if (rest.trim()) yield parsed(rest);
}

function parsed(line) {
  const item = JSON.parse(line);
  if (item.error) {
    throw new ApiError(typeof item.error === "string" ? item.error : item.error.message);
  }
  return item;
}

// A model's capabilities (/api/show), asked once per page.
const shown = new Map();
export function capabilities(model) {
  if (!shown.has(model)) {
    const asked = json("/api/show", { method: "POST", body: { model } })
      .then((body) => body.capabilities ?? [])
      .catch(() => []);
    shown.set(model, asked);
  }
  return shown.get(model);
}

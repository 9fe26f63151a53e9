// Conversations live in this browser (localStorage), never on the daemon.

const STORE = "mlxserve.conversations";
const CURRENT = "mlxserve.current";

export const DEFAULT_SETTINGS = {
  system: "",
  temperature: "",
  top_p: "",
  top_k: "",
  num_predict: "",
  num_ctx: "",
  seed: "",
  think: true,
  tools: "",
};

export function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) ?? "[]");
    return Array.isArray(saved) ? saved : [];
  } catch {
    return [];
  }
}

// Returns an error text when the browser refused (quota: images are large), else null.
export function save(conversations, current) {
  try {
    localStorage.setItem(STORE, JSON.stringify(conversations));
    localStorage.setItem(CURRENT, current ?? "");
    return null;
  } catch (error) {
    return `could not save the conversations in this browser (${error.name})`;
  }
}

export function currentId() {
  return localStorage.getItem(CURRENT);
}

export function create(model) {
  return {
    id: crypto.randomUUID(),
    title: "New chat",
    model,
    settings: { ...DEFAULT_SETTINGS },
    messages: [],
    updated: Date.now(),
  };
}

export function exportJson(conversations) {
  const blob = new Blob([JSON.stringify(conversations, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `mlxserve-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}
